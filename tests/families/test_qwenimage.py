"""Qwen-Image: the MMDiT denoising step (diffusers) and the Qwen2.5-VL text encoder (transformers).

References are independent of sparsec: the diffusers transformer called as its pipeline calls it
(`img_shapes` with one grid per sample), the transformers model, and the same rewrite made by hand on them.
"""

import copy

import pytest
import torch
from conftest import make_qwenimage, qwenimage_inputs

import sparsec
from sparsec import testing
from sparsec.analysis.regions import region_index
from sparsec.data.calibration import CalibrationSet
from sparsec.errors import PassError, SparsecError
from sparsec.exporters.lowering.onnx import export_onnx
from sparsec.families import detect_family
from sparsec.families.qwenimage import QwenImageStep
from sparsec.passes.real_rotary import is_complex_node
from sparsec.transform.pass_manager import PassContext, PassManager, get_pass

aten = torch.ops.aten


def diffusers_step(step: QwenImageStep):
    """The diffusers model called as the Qwen-Image pipeline calls it: one `img_shapes` entry per sample."""

    def run(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep):
        with torch.no_grad():
            return step.transformer(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                encoder_hidden_states_mask=encoder_hidden_states_mask,
                timestep=timestep,
                img_shapes=[step.grid] * hidden_states.shape[0],
                return_dict=False,
            )[0]

    return run


def padded_inputs(batch: int, seed: int) -> dict:
    """Step inputs whose last sample has a padded prompt (mask 0 on its last 3 tokens), as pipelines pad."""
    inputs = qwenimage_inputs(batch, 7, seed=seed)
    inputs["encoder_hidden_states_mask"][-1, -3:] = 0
    return inputs


def complex_ops(program) -> list[str]:
    return [
        n.name
        for n in program.graph.nodes
        if is_complex_node(n) or n.target in (aten.view_as_complex.default, aten.view_as_real.default)
    ]


# ----- the MMDiT step --------------------------------------------------------------------------------------
def test_step_wrapper_is_the_pipeline_call_at_any_batch():
    step = make_qwenimage()
    for batch in (1, 3):
        inputs = padded_inputs(batch, seed=batch)
        with torch.no_grad():
            torch.testing.assert_close(step(**inputs), diffusers_step(step)(**inputs), rtol=0, atol=0)


def test_family_tags_and_dynamic_batch():
    step = make_qwenimage()
    assert detect_family(step).name == detect_family(step.transformer).name == "qwenimage"
    inputs = detect_family(step).example_inputs(step, 2, 7)
    assert {k: tuple(v.shape) for k, v in inputs.items()} == {
        k: tuple(v.shape) for k, v in qwenimage_inputs(2, 7).items()
    }
    program = sparsec.capture(step, inputs)
    assert program.family == "qwenimage"
    assert program.dynamic_dims == {name: {0: "batch"} for name in inputs}  # grid and prompt length are fixed
    tags = region_index(program).tags()
    block = "transformer.transformer_blocks.0"
    expected = {
        f"{block}.img_mlp": "generation",
        f"{block}.img_mod": "generation",
        f"{block}.img_norm1": "generation",
        f"{block}.attn.to_q": "generation",
        f"{block}.attn.to_out.0": "generation",
        f"{block}.attn.norm_k": "generation",
        "transformer.img_in": "generation",
        "transformer.proj_out": "generation",
        f"{block}.txt_mlp": "understanding",
        f"{block}.txt_mod": "understanding",
        f"{block}.txt_norm2": "understanding",
        f"{block}.attn.add_v_proj": "understanding",
        f"{block}.attn.to_add_out": "understanding",
        f"{block}.attn.norm_added_q": "understanding",
        "transformer.txt_in": "understanding",
        "transformer.txt_norm": "understanding",
        f"{block}.attn": "shared",
        block: "shared",
        "transformer.time_text_embed": "shared",
    }
    assert {path: tags[path] for path in expected} == expected
    for rule in program.tagger.rules:  # every default rule names modules that exist in diffusers' model
        assert region_index(program).match(rule.glob), f"tag rule {rule.glob!r} matches no region"


def test_real_rotary_rewrites_the_complex_rotary_exactly(tmp_path):
    step = make_qwenimage()
    program = sparsec.capture(step, qwenimage_inputs(2, 7))
    with pytest.raises(SparsecError, match="complex values .* run the `real_rotary` pass first"):
        export_onnx(program, tmp_path / "step.onnx")
    targets = testing.op_counts(program)
    assert (
        targets["aten.view_as_complex.default"] == targets["aten.view_as_real.default"] == 8
    )  # q, k x img, txt x 2 blocks
    splits = [n for n in program.graph.nodes if n.target == aten.split_with_sizes.default and is_complex_node(n)]
    assert len(splits) == 2  # the complex frequency tables, cut into the frame / height / width axes

    record = testing.apply_pass(program, "real_rotary")
    assert complex_ops(program) == []
    assert record.stats == {"complex_ops_rewritten": 60, "complex_multiplies": 8, "tables": 2}
    assert record.removed_state == ["transformer.pos_embed.neg_freqs", "transformer.pos_embed.pos_freqs"]
    table = step.transformer.pos_embed.pos_freqs
    torch.testing.assert_close(program.state_tensor("transformer.pos_embed.pos_freqs_cos"), table.real, rtol=0, atol=0)
    torch.testing.assert_close(program.state_tensor("transformer.pos_embed.pos_freqs_sin"), table.imag, rtol=0, atol=0)
    for batch in (2, 3, 1):  # the capture batch and others: batch stayed dynamic
        testing.assert_equivalent(
            program, diffusers_step(step), padded_inputs(batch, seed=10 + batch), rtol=1e-6, atol=1e-6
        )


@pytest.mark.slow
def test_real_rotary_program_exports_to_onnx_and_matches(tmp_path):
    step = make_qwenimage()
    program = sparsec.capture(step, qwenimage_inputs(2, 7))
    testing.apply_pass(program, "real_rotary")
    facts = export_onnx(program, tmp_path / "step.onnx")
    assert facts["inputs"] == list(qwenimage_inputs(2, 7))
    assert facts["dynamic_dims"] == {name: {0: "batch"} for name in facts["inputs"]}
    assert {"Cos", "Sin"} <= set(facts["op_counts"])  # the time embedding's; the rotary tables are constants
    testing.assert_onnx_equivalent(
        tmp_path / "step.onnx", diffusers_step(step), padded_inputs(3, seed=7), rtol=1e-4, atol=1e-5
    )


@pytest.mark.slow
def test_sliced_img_mlp_then_real_rotary_exports_and_matches_hand_sliced(tmp_path):
    step = make_qwenimage()
    program = sparsec.capture(step, qwenimage_inputs(2, 7))
    passes = [
        get_pass("real_rotary")(),
        get_pass("slice_neurons")(keep_ratio=0.5, where="**.img_mlp", importance="magnitude"),
    ]
    records = PassManager(passes).run(program, PassContext(progress=False))
    assert [r.name for r in records] == ["slice_neurons", "real_rotary"]  # lowering runs after transform
    assert complex_ops(program) == []

    reference = copy.deepcopy(step)
    for d in records[0].decisions["ffns"]:
        ff = reference.get_submodule(d["path"])  # diffusers FeedForward: net = [GELU(proj), Dropout, Linear]
        assert d["path"].endswith("img_mlp") and d["width_after"] == ff.net[0].proj.out_features // 2
        idx = torch.tensor(d["kept_indices"])
        ff.net[0].proj, ff.net[2] = testing.linear_rows(ff.net[0].proj, idx), testing.linear_columns(ff.net[2], idx)
    inputs = padded_inputs(3, seed=9)
    testing.assert_equivalent(program, diffusers_step(reference), inputs, rtol=1e-6, atol=1e-6)
    export_onnx(program, tmp_path / "sliced.onnx")
    testing.assert_onnx_equivalent(tmp_path / "sliced.onnx", diffusers_step(reference), inputs, rtol=1e-4, atol=1e-5)


# ----- real_rotary on other complex patterns ---------------------------------------------------------------
class ComplexRotary(torch.nn.Module):
    """Two complex rotations: a table computed in the graph with `polar`, and a complex128 buffer (modulus 0.5)
    cast to complex64 (export checks the cast's input with `_assert_tensor_metadata`) and scaled by a real number."""

    def __init__(self, dim: int = 8, max_len: int = 32) -> None:
        super().__init__()
        inv_freq = 1.0 / 100 ** (torch.arange(0, dim, 2).float() / dim)
        angles = torch.outer(torch.arange(max_len).float(), inv_freq)
        self.register_buffer("inv_freq", inv_freq)
        self.register_buffer("table", torch.polar(torch.full_like(angles, 0.5), angles).to(torch.complex128))
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        angles = torch.arange(seq, dtype=torch.float32)[:, None] * self.inv_freq
        z = torch.view_as_complex(self.proj(x).reshape(batch, seq, -1, 2))
        in_graph = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).flatten(2)
        buffered = torch.view_as_real(z * self.table[:seq].to(torch.complex64) * 2.0).flatten(2)
        return in_graph + buffered


class ComplexMagnitude(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)).abs()


def test_real_rotary_handles_in_graph_polar_and_complex_buffers():
    torch.manual_seed(0)
    model = ComplexRotary().eval()
    program = sparsec.capture(model, {"x": torch.randn(2, 5, 8)}, dynamic={"x": {0: "batch"}})
    assert testing.op_counts(program)["aten.polar.default"] == 1
    assert testing.op_counts(program)["aten._assert_tensor_metadata.default"] >= 1
    record = testing.apply_pass(program, "real_rotary")
    assert complex_ops(program) == [] and record.removed_state == ["table"]
    assert record.decisions["tables"] == {"table": ["table_real", "table_imag"]}  # modulus 0.5: not a cos/sin table
    assert program.exported.state_dict["table_real"].dtype == torch.float64  # persistent buffers stay buffers
    for batch in (3, 1):
        testing.assert_equivalent(program, model, {"x": torch.randn(batch, 5, 8)}, rtol=1e-5, atol=1e-6)


def test_real_rotary_refuses_complex_ops_it_cannot_rewrite():
    program = sparsec.capture(ComplexMagnitude(), {"x": torch.randn(2, 3, 8)}, dynamic=False)
    before = [n.name for n in program.graph.nodes]
    with pytest.raises(PassError, match=r"cannot rewrite: abs\w* \(abs\.default, top level\)"):
        testing.apply_pass(program, "real_rotary")
    assert [n.name for n in program.graph.nodes] == before


def test_real_rotary_leaves_real_programs_alone():
    program = sparsec.capture(torch.nn.Linear(4, 4), {"input": torch.randn(2, 4)})
    record = testing.apply_pass(program, "real_rotary")
    assert not record.modified and record.stats["complex_ops_rewritten"] == 0


# ----- the Qwen2.5-VL text encoder ----------------------------------------------------------------------------
def tiny_text_encoder(seed: int = 0):
    """A tiny random Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`, as Qwen-Image loads it).

    Qwen-Image encodes the prompt with its `.model` (`Qwen2_5_VLModel`: vision tower + language model) on
    input_ids + attention_mask and uses the last hidden states; the LM head is not used."""
    import transformers

    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            out_hidden_size=64,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=16,
            fullatt_block_indexes=[1],
        ),
        image_token_id=255,
        video_token_id=254,
        vision_start_token_id=253,
        vision_end_token_id=252,
    )
    torch.manual_seed(seed)
    return transformers.Qwen2_5_VLForConditionalGeneration(config).eval()


def text_inputs(batch: int, seq: int, seed: int, pad_left: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :pad_left] = 0
    return {"input_ids": ids, "attention_mask": mask}


def last_hidden_state_of(full_model):
    """Qwen-Image's prompt encoding on the full model: `hidden_states[-1]` with output_hidden_states=True."""

    def run(input_ids, attention_mask):
        with torch.no_grad():
            return full_model(
                input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
            ).hidden_states[-1]

    return run


def test_text_encoder_capture_is_exact_with_dynamic_batch_and_seq():
    full = tiny_text_encoder()
    encoder = full.model
    program = sparsec.capture(encoder, detect_family(encoder).example_inputs(encoder, 2, 16))
    assert program.family == "qwen2_5_vl" and program.output_names == ["last_hidden_state"]
    assert program.dynamic_dims["input_ids"] == {0: "batch", 1: "seq"}
    for batch, seq in [(3, 9), (1, 23)]:
        inputs = text_inputs(batch, seq, seed=seq, pad_left=2)
        testing.assert_equivalent(program, encoder, inputs, rtol=1e-5, atol=1e-5)
        testing.assert_equivalent(program, last_hidden_state_of(full), inputs, rtol=1e-5, atol=1e-5)
    tags = region_index(program).tags()
    assert tags["language_model.layers.0.mlp"] == tags["language_model.embed_tokens"] == "understanding"
    assert program.tagger.tag("visual.blocks.0.mlp") == "understanding"
    assert not region_index(program).match("visual.**")  # text-only: the vision tower is not in the program
    assert [f.path for f in region_index(program).ffns()] == [f"language_model.layers.{i}.mlp" for i in range(4)]


def test_text_encoder_ffn_to_moe_with_all_experts_is_exact():
    encoder = tiny_text_encoder().model
    program = sparsec.capture(encoder, text_inputs(2, 16, seed=0))
    calibration = CalibrationSet(text_inputs(8, 16, seed=1), source="test inputs")
    record = testing.apply_pass(program, "ffn_to_moe", experts=4, top_k=4, router="similarity", calibration=calibration)
    assert len(record.decisions["ffns"]) == 4
    assert testing.op_counts(program)["sparsec.moe.default"] == 4
    testing.assert_equivalent(program, encoder, text_inputs(3, 9, seed=5, pad_left=2), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_text_encoder_slice_and_drop_match_hand_made_and_export(tmp_path):
    encoder = tiny_text_encoder().model
    program = sparsec.capture(encoder, text_inputs(2, 16, seed=0))
    sliced = testing.apply_pass(program, "slice_neurons", keep_ratio=0.5, importance="magnitude")
    testing.apply_pass(program, "drop_layers", layers=[1], where="language_model.layers.*")

    reference = copy.deepcopy(encoder)
    for d in sliced.decisions["ffns"]:
        mlp = reference.get_submodule(d["path"])  # Qwen2MLP: down(act(gate(x)) * up(x))
        idx = torch.tensor(d["kept_indices"])
        mlp.gate_proj, mlp.up_proj = testing.linear_rows(mlp.gate_proj, idx), testing.linear_rows(mlp.up_proj, idx)
        mlp.down_proj = testing.linear_columns(mlp.down_proj, idx)
    del reference.language_model.layers[1]
    inputs = text_inputs(3, 9, seed=7, pad_left=3)  # not the capture shape
    testing.assert_equivalent(program, reference, inputs, rtol=1e-5, atol=1e-5)
    export_onnx(program, tmp_path / "encoder.onnx")
    testing.assert_onnx_equivalent(tmp_path / "encoder.onnx", reference, inputs, output="last_hidden_state")


def test_mmdit_drop_block_equals_hand_removed_and_attn_keeps_modulation():
    """Dual-stream blocks: dropping one bypasses both the image and the text stream; dropping only the joint
    attention removes both streams' attention weights but keeps the modulation the MLP sublayers still read."""
    step = make_qwenimage()
    calib = CalibrationSet(qwenimage_inputs(4, 7, seed=1), source="test", batch_size=2)
    program = sparsec.capture(step, qwenimage_inputs(2, 7))
    before = program.num_parameters()
    record = testing.apply_pass(
        program, "drop_layers", count=1, where="transformer.transformer_blocks.*", calibration=calib
    )
    (dropped,) = record.decisions["dropped"]
    reference = copy.deepcopy(step)
    index = int(dropped.rsplit(".", 1)[1])
    blocks = reference.transformer.transformer_blocks
    reference.transformer.transformer_blocks = torch.nn.ModuleList(b for i, b in enumerate(blocks) if i != index)
    testing.assert_equivalent(program, diffusers_step(reference), padded_inputs(3, seed=4), rtol=1e-5, atol=1e-5)
    assert before - program.num_parameters() == sum(p.numel() for p in blocks[index].parameters())

    attn_only = sparsec.capture(step, qwenimage_inputs(2, 7))
    record = testing.apply_pass(
        attn_only, "drop_layers", layers=[0], kind="attn", where="transformer.transformer_blocks.*"
    )
    left = set(attn_only.parameter_names())
    gone = set(record.decisions["parameters"]["transformer.transformer_blocks.0:attn"])
    assert {
        "transformer.transformer_blocks.0.attn.to_q.weight",
        "transformer.transformer_blocks.0.attn.add_q_proj.weight",
    } <= gone
    assert not gone & left
    assert {
        "transformer.transformer_blocks.0.img_mod.1.weight",
        "transformer.transformer_blocks.0.txt_mod.1.weight",
        "transformer.transformer_blocks.0.img_mlp.net.0.proj.weight",
    } <= left
