"""slice_neurons against Hugging Face models whose Linear weights were sliced by hand."""

import copy

import pytest
import torch
from conftest import SMALL_DECODER, hf_builder, make_inputs, make_model, slice_by_hand

import sparsec
from sparsec import testing
from sparsec.analysis.regions import region_index
from sparsec.data.calibration import CalibrationSet
from sparsec.errors import PassError, RecipeError
from sparsec.exporters.lowering.onnx import export_onnx
from sparsec.recipe import Recipe


def _calibration(model, seed=4):
    return CalibrationSet(make_inputs(model, 8, 12, seed=seed, pad_left=3), source="test", batch_size=4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama", "tiny-janus"])
def test_slice_equals_hand_sliced_hf_model(tmp_path, name):
    model = make_model(name)
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    record = testing.apply_pass(
        program, "slice_neurons", keep_ratio=0.5, where="**.mlp", calibration=_calibration(model)
    )
    decisions = record.decisions
    paths = {d["path"] for d in decisions["ffns"]}
    if name == "tiny-janus":
        assert {"model.language_model.layers.0.mlp", "model.vision_model.encoder.layers.1.mlp"} <= paths
        assert {d["kind"] for d in decisions["ffns"]} == {"gated", "plain"}
    for d in decisions["ffns"]:
        assert d["width_after"] == d["width_before"] // 2 == len(d["kept_indices"])
        assert d["kept_indices"] == sorted(d["kept_indices"])
    reference = slice_by_hand(model, decisions)
    assert program.num_parameters() == record.parameters_after
    removed = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in reference.parameters())
    assert record.parameters_before - record.parameters_after == removed
    assert sum(d["parameters_before"] - d["parameters_after"] for d in decisions["ffns"]) == removed

    inputs = make_inputs(model, 3, 9, seed=7, pad_left=2)
    testing.assert_equivalent(program, reference, inputs, rtol=1e-5, atol=1e-5)
    export_onnx(program, tmp_path / "m.onnx")
    testing.assert_onnx_equivalent(tmp_path / "m.onnx", reference, inputs, output="logits")


def test_keep_ratio_one_is_the_identity():
    model = make_model("tiny-llama")
    program = sparsec.capture(model, make_inputs(model, 2, 8))
    record = testing.apply_pass(program, "slice_neurons", keep_ratio=1.0, importance="magnitude")
    assert not record.modified and record.parameters_after == record.parameters_before
    testing.assert_equivalent(program, model, make_inputs(model, 2, 5, seed=1), rtol=0, atol=0)


@pytest.mark.parametrize("importance", ["activation", "magnitude"])
def test_neuron_with_zeroed_down_column_is_ranked_last(importance):
    model = make_model("tiny-qwen2")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, 37] = 0
    program = sparsec.capture(model, make_inputs(model, 2, 8))
    record = testing.apply_pass(
        program,
        "slice_neurons",
        keep=127,
        where="model.layers.1.mlp",
        importance=importance,
        calibration=_calibration(model),
    )
    (d,) = record.decisions["ffns"]
    assert 37 not in d["kept_indices"] and len(d["kept_indices"]) == 127
    assert d["importance"]["min"] == 0.0


def test_global_scope_takes_more_from_a_layer_of_small_neurons():
    model = make_model("tiny-qwen2")
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(0.05)
    program = sparsec.capture(model, make_inputs(model, 2, 8))
    record = testing.apply_pass(
        program, "slice_neurons", keep_ratio=0.5, scope="global", round_to=8, calibration=_calibration(model)
    )
    widths = {d["path"]: d["width_after"] for d in record.decisions["ffns"]}
    assert widths["model.layers.2.mlp"] == 8  # the floor: round_to
    assert all(w > 64 for p, w in widths.items() if p != "model.layers.2.mlp")
    assert all(w % 8 == 0 for w in widths.values())
    assert abs(sum(widths.values()) - 256) <= 4 * 8  # the global budget, up to rounding


def test_round_to_and_random_are_deterministic():
    model = make_model("tiny-qwen2")
    kept = []
    for _ in range(2):
        program = sparsec.capture(model, make_inputs(model, 2, 8))
        record = testing.apply_pass(program, "slice_neurons", keep_ratio=0.3, round_to=16, importance="random", seed=3)
        kept.append([d["kept_indices"] for d in record.decisions["ffns"]])
        assert all(d["width_after"] == 32 for d in record.decisions["ffns"])  # 0.3 * 128 = 38.4 -> 32
    assert kept[0] == kept[1]


class _Leaky(torch.nn.Module):
    """An FFN whose intermediate activation is also read outside it."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.probe = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8), torch.nn.Linear(16, 1)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.up(x))
        return self.down(h) + self.probe(h)


def test_refuses_when_the_intermediate_escapes_and_leaves_program_untouched():
    program = sparsec.capture(_Leaky(), {"x": torch.randn(2, 3, 8)})
    nodes = [n.name for n in program.graph.nodes]
    with pytest.raises(PassError, match=r"intermediate values .* are also read by \['linear_2'\] outside the FFN"):
        testing.apply_pass(program, "slice_neurons", keep_ratio=0.5, importance="magnitude")
    assert [n.name for n in program.graph.nodes] == nodes


def test_bad_input():
    model = make_model("tiny-qwen2")
    program = sparsec.capture(model, make_inputs(model, 2, 8))
    with pytest.raises(PassError, match=r"keep_ratio 0.001 leaves zero of the 128 neurons of model.layers.0.mlp"):
        testing.apply_pass(program, "slice_neurons", keep_ratio=0.001, importance="magnitude")
    with pytest.raises(PassError, match=r"where='\*\*.fc1' matches no FFN; FFNs in this model: \['model.layers.0.mlp'"):
        testing.apply_pass(program, "slice_neurons", keep_ratio=0.5, where="**.fc1", importance="magnitude")
    with pytest.raises(PassError, match="keep 500 exceeds the 128 neurons"):
        testing.apply_pass(program, "slice_neurons", keep=500, importance="magnitude")
    with pytest.raises(PassError, match="needs calibration data"):
        testing.apply_pass(program, "slice_neurons", keep_ratio=0.5)
    for options, message in [
        ({"keep_ratio": 0}, "slice_neurons.keep_ratio: must be in (0, 1], got 0"),
        ({"keep_ratio": 1.5}, "slice_neurons.keep_ratio: must be in (0, 1], got 1.5"),
        ({"keep_ratio": 0.5, "keep": 3}, "give exactly one of keep_ratio, keep"),
        ({"keep": 8, "scope": "global"}, "give it keep_ratio, not keep"),
        ({"keep_ratio": 0.5, "importance": "taylor"}, "choose one of ['activation', 'magnitude', 'random']"),
    ]:
        with pytest.raises(RecipeError) as info:
            Recipe.from_dict({"passes": [{"slice_neurons": options}]})
        assert message in str(info.value)


def test_qwenimage_mmdit_feedforward_equals_hand_sliced():
    from conftest import make_qwenimage, qwenimage_inputs

    step = make_qwenimage()
    program = sparsec.capture(step, qwenimage_inputs(2, 7), dynamic=False)
    calib = CalibrationSet(qwenimage_inputs(2, 7, seed=1), source="test")
    record = testing.apply_pass(program, "slice_neurons", keep_ratio=0.25, where="**.*_mlp", calibration=calib)
    paths = [d["path"] for d in record.decisions["ffns"]]
    assert paths == [
        "transformer.transformer_blocks.0.img_mlp",
        "transformer.transformer_blocks.0.txt_mlp",
        "transformer.transformer_blocks.1.img_mlp",
    ]
    reference = copy.deepcopy(step)
    for d in record.decisions["ffns"]:
        ff = reference.get_submodule(d["path"])  # diffusers FeedForward: net = [GELU(proj), Dropout, Linear]
        idx = torch.tensor(d["kept_indices"])
        ff.net[0].proj, ff.net[2] = testing.linear_rows(ff.net[0].proj, idx), testing.linear_columns(ff.net[2], idx)
    testing.assert_equivalent(program, reference, qwenimage_inputs(2, 7, seed=5), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fused_gate_up_projection_equals_hand_sliced(tmp_path):
    import transformers

    config = transformers.Phi3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config).eval()
    ids = torch.randint(0, 256, (2, 16))
    program = sparsec.capture(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert [f.kind for f in region_index(program).ffns()] == ["fused_gated", "fused_gated"]
    record = testing.apply_pass(program, "slice_neurons", keep_ratio=0.25, importance="magnitude", round_to=8)
    reference = copy.deepcopy(model)
    for d in record.decisions["ffns"]:
        mlp = reference.get_submodule(d["path"])  # Phi3MLP: gate_up_proj rows [gate | up], then down_proj
        idx = torch.tensor(d["kept_indices"])
        mlp.gate_up_proj = testing.linear_rows(mlp.gate_up_proj, torch.cat([idx, idx + 128]))
        mlp.down_proj = testing.linear_columns(mlp.down_proj, idx)
        assert d["width_after"] == 32
    inputs = {"input_ids": torch.randint(0, 256, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    testing.assert_equivalent(program, reference, inputs, rtol=1e-5, atol=1e-5)
    export_onnx(program, tmp_path / "m.onnx")
    testing.assert_onnx_equivalent(tmp_path / "m.onnx", reference, inputs, output="logits")


def test_kept_pins_exact_neurons_and_is_checked():
    """`kept` keeps exactly the listed neurons of the named FFN; the rest follow keep_ratio; bad pins are refused."""
    model = make_model("tiny-qwen2")
    program = sparsec.capture(model, make_inputs(model, 2, 8))
    pinned = [3, 1, 120, 64]
    record = testing.apply_pass(
        program, "slice_neurons", keep_ratio=0.25, importance="magnitude", kept={"model.layers.0.mlp": pinned}
    )
    widths = {d["path"]: (d["width_after"], d["kept_indices"]) for d in record.decisions["ffns"]}
    assert widths["model.layers.0.mlp"] == (4, sorted(pinned)) and widths["model.layers.1.mlp"][0] == 32
    reference = copy.deepcopy(model)
    mlp, idx = reference.model.layers[0].mlp, torch.tensor(sorted(pinned))
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = (
        testing.linear_rows(mlp.gate_proj, idx),
        testing.linear_rows(mlp.up_proj, idx),
        testing.linear_columns(mlp.down_proj, idx),
    )
    for i in (1, 2, 3):
        mlp, idx = reference.model.layers[i].mlp, torch.tensor(widths[f"model.layers.{i}.mlp"][1])
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = (
            testing.linear_rows(mlp.gate_proj, idx),
            testing.linear_rows(mlp.up_proj, idx),
            testing.linear_columns(mlp.down_proj, idx),
        )
    testing.assert_equivalent(program, reference, make_inputs(model, 3, 7, seed=2), rtol=1e-5, atol=1e-5)
    fresh = sparsec.capture(model, make_inputs(model, 2, 8))
    with pytest.raises(PassError, match="kept names 'model.layers.9.mlp', which is not an FFN matched"):
        testing.apply_pass(
            fresh, "slice_neurons", keep_ratio=0.5, importance="magnitude", kept={"model.layers.9.mlp": [0]}
        )
    with pytest.raises(
        PassError, match=r"kept\['model.layers.0.mlp'\] must list distinct neuron indices in \[0, 128\)"
    ):
        testing.apply_pass(
            fresh, "slice_neurons", keep_ratio=0.5, importance="magnitude", kept={"model.layers.0.mlp": [0, 128]}
        )


def _nemotron_and_apertus():
    """Two decoders whose FFN activation is no SiLU / GELU: Nemotron's squared ReLU (`relu`, `square`) and Apertus'
    xIELU, whose learned parameters are one element each (`alpha_p`, `alpha_n`)."""
    import transformers as T

    return [
        hf_builder(T.NemotronForCausalLM, T.NemotronConfig, **SMALL_DECODER)(),
        hf_builder(T.ApertusForCausalLM, T.ApertusConfig, **SMALL_DECODER)(),
    ]


def test_ffns_of_other_elementwise_activations_slice_as_by_hand():
    """Every FFN is found and sliced; the program equals the Hugging Face model sliced by hand, with left padding at
    another shape (the learned scalars act on every neuron alike, so they stay as they are)."""
    for model in _nemotron_and_apertus():
        program = sparsec.capture(model, make_inputs(model, 2, 12))
        record = testing.apply_pass(program, "slice_neurons", keep_ratio=0.5, calibration=_calibration(model))
        decisions = record.decisions
        assert [d["path"] for d in decisions["ffns"]] == [f"model.layers.{i}.mlp" for i in range(2)], type(model)
        reference = slice_by_hand(model, decisions, roles={"up": "up_proj", "down": "down_proj"})
        testing.assert_equivalent(
            program, reference, make_inputs(model, 3, 9, seed=5, pad_left=2), output="logits", rtol=1e-4, atol=1e-5
        )
