"""The BAGEL-style Mixture-of-Transformers reference model: semantics, capture, tags, passes, ONNX."""

import copy

import pytest
import torch
import transformers
from conftest import mot_inputs

import sparsec
from sparsec import testing
from sparsec.analysis.regions import region_index
from sparsec.data.calibration import CalibrationSet
from sparsec.families.mot import GEN, MOT_PRESETS, MoTConfig, MoTForCausalLM
from sparsec.models import build_model, builtin_config, load_model


@pytest.fixture(scope="module")
def mot():
    model = build_model(builtin_config("tiny-mot"))
    return model, sparsec.capture(model, mot_inputs(2, 16, 8))


def qwen3_from_copy(model: MoTForCausalLM, suffix: str) -> torch.nn.Module:
    """transformers' Qwen3 (qk-norm, biased q/k/v) carrying one weight copy of the MoT: the independent reference."""
    c = model.config
    ref = transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            rms_norm_eps=c.rms_norm_eps,
            rope_theta=c.rope_theta,
            attention_bias=True,
            tie_word_embeddings=False,
        )
    ).eval()
    state = {k: v for k, v in model.state_dict().items() if GEN not in k}  # understanding copy + shared
    if suffix:  # the generation copy's tensors under the plain names
        state.update({k.replace(GEN, ""): v for k, v in model.state_dict().items() if GEN in k})
    for layer in ref.model.layers:  # the MoT's o_proj has no bias
        layer.self_attn.o_proj.bias.data.zero_()
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert unexpected == [] and all(m.endswith("o_proj.bias") for m in missing), (missing, unexpected)
    return ref


@pytest.mark.parametrize("suffix", ["", GEN])
def test_each_weight_copy_is_a_qwen3_decoder(mot, suffix):
    """All tokens of one modality: the MoT is exactly a Qwen3 decoder with that copy's weights (padding too)."""
    model, _ = mot
    inputs = mot_inputs(3, 11, 0 if suffix else None, seed=1)
    inputs["attention_mask"][0, :3] = 0
    ref = qwen3_from_copy(model, suffix)
    with torch.no_grad():
        got = model(**inputs).logits
        want = ref(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)


def test_tokens_use_their_modality_copy(mot):
    """Changing the generation copy changes generation tokens only; tokens before them are causal-untouched."""
    model, _ = mot
    other = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in other.named_parameters():
            if GEN in name:
                param.add_(torch.randn_like(param) * 0.1)
        inputs = mot_inputs(2, 12, 7, seed=2)
        a, b = model(**inputs).logits, other(**inputs).logits
        und_only = model(**{**inputs, "gen_mask": torch.zeros_like(inputs["gen_mask"])}).logits
    torch.testing.assert_close(a[:, :7], b[:, :7])
    torch.testing.assert_close(a[:, :7], und_only[:, :7])
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3
    assert (a[:, 7:] - und_only[:, 7:]).abs().max() > 1e-3


@pytest.mark.parametrize("gen_from", [None, 0, 5])
def test_capture_exact_at_other_shapes_and_mixes(mot, gen_from):
    model, program = mot
    testing.assert_equivalent(program, model, mot_inputs(3, 9, gen_from, seed=3), rtol=1e-5, atol=1e-5)


def test_tags_and_regions(mot):
    _, program = mot
    tags = region_index(program).tags()
    assert tags["model.layers.0.mlp"] == tags["model.layers.0.self_attn.q_proj"] == "understanding"
    assert tags["model.layers.0.mlp_moe_gen"] == tags["model.layers.0.self_attn.k_norm_moe_gen"] == "generation"
    assert tags["model.norm"] == "understanding" and tags["model.norm_moe_gen"] == "generation"
    assert tags["model.embed_tokens"] == tags["lm_head"] == tags["model.layers.0"] == "shared"
    ffns = {f.path: program.tagger.tag(f.path) for f in region_index(program).ffns()}
    assert ffns == {
        f"model.layers.{i}.{m}": t
        for i in range(4)
        for m, t in (("mlp", "understanding"), ("mlp_moe_gen", "generation"))
    }
    per_tag = {}
    for name in program.parameter_names():
        tag = program.tagger.tag(name.rsplit(".", 1)[0])
        per_tag[tag] = per_tag.get(tag, 0) + program.state_tensor(name).numel()
    assert per_tag["understanding"] == per_tag["generation"]


def test_bagel_7b_shapes():
    """The real-shape preset: 28 layers of two Qwen2.5-7B-sized copies, about 14B parameters (7B active)."""
    with torch.device("meta"):
        model = MoTForCausalLM(MoTConfig(**MOT_PRESETS["bagel-7b"]))
    total = sum(p.numel() for p in model.parameters())
    gen = sum(p.numel() for n, p in model.named_parameters() if GEN in n)
    h, i, kv, d, v = 3584, 18944, 4 * 128, 128, 152064
    per_copy_layer = 2 * h * h + 2 * h * kv + (h + 2 * kv) + 3 * h * i + 2 * h + 2 * d
    assert len(model.model.layers) == 28 and model.model.layers[0].mlp_moe_gen.up_proj.weight.shape == (i, h)
    assert gen == 28 * per_copy_layer + h and total == 2 * gen + 2 * v * h
    assert total == pytest.approx(14.14e9, rel=0.001)


def test_save_and_load_roundtrip(tmp_path, mot):
    model, _ = mot
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.family.name == "mot"
    inputs = mot_inputs(2, 10, 4)
    torch.testing.assert_close(loaded.model(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def _calibration(n: int = 8) -> CalibrationSet:
    parts = [mot_inputs(4, 16, g, seed=10 + i) for i, g in enumerate((None, 4))]
    return CalibrationSet({k: torch.cat([p[k] for p in parts]) for k in parts[0]}, source="test", batch_size=n)


def test_slice_generation_ffns_equals_hand_sliced():
    model = build_model(builtin_config("tiny-mot"))
    program = sparsec.capture(model, mot_inputs(2, 16, 8))
    record = testing.apply_pass(
        program, "slice_neurons", keep_ratio=0.5, where="**.mlp_moe_gen", calibration=_calibration()
    )
    reference = copy.deepcopy(model)
    for entry in record.decisions["ffns"]:
        mlp = reference.get_submodule(entry["path"])
        kept = torch.tensor(entry["kept_indices"])
        for name in ("gate_proj", "up_proj"):
            getattr(mlp, name).weight.data = getattr(mlp, name).weight.data[kept]
        mlp.down_proj.weight.data = mlp.down_proj.weight.data[:, kept]
    assert {e["path"] for e in record.decisions["ffns"]} == {f"model.layers.{i}.mlp_moe_gen" for i in range(4)}
    testing.assert_equivalent(program, reference, mot_inputs(3, 10, 3, seed=4), rtol=1e-5, atol=1e-5)
    assert program.num_parameters() == sum(p.numel() for p in reference.parameters())


def test_generation_ffns_to_moe_all_experts_exact():
    model = build_model(builtin_config("tiny-mot"))
    program = sparsec.capture(model, mot_inputs(2, 16, 8))
    record = testing.apply_pass(
        program, "ffn_to_moe", experts=4, top_k=4, where="**.mlp_moe_gen", calibration=_calibration()
    )
    assert len(record.decisions["ffns"]) == 4
    testing.assert_op_count(program, "model.layers.*.mlp_moe_gen", "sparsec.moe.default", 4)
    testing.assert_op_count(program, "model.layers.*.mlp", "sparsec.moe.default", 0)
    testing.assert_equivalent(program, model, mot_inputs(3, 10, 3, seed=4), rtol=1e-5, atol=1e-5)


def test_drop_layer_equals_hand_removed():
    model = build_model(builtin_config("tiny-mot"))
    program = sparsec.capture(model, mot_inputs(2, 16, 8))
    testing.apply_pass(program, "drop_layers", layers=[2], where="model.layers.*")
    reference = copy.deepcopy(model)
    reference.model.layers = torch.nn.ModuleList(layer for i, layer in enumerate(reference.model.layers) if i != 2)
    testing.assert_equivalent(program, reference, mot_inputs(3, 10, 3, seed=4), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_onnx_parity_including_no_generation_tokens(tmp_path, mot):
    """Modality routing lowers to NonZero/Gather/ScatterND: ORT matches at other shapes, also with 0 gen tokens."""
    from sparsec.exporters.lowering.onnx import export_onnx

    model, program = mot
    export_onnx(program, tmp_path / "mot.onnx")
    for gen_from in (None, 0, 6):
        testing.assert_onnx_equivalent(
            tmp_path / "mot.onnx", model, mot_inputs(3, 13, gen_from, seed=5), output="logits"
        )
