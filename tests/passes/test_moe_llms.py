"""MoE language models (transformers' Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): their experts recognised from the
graph, `slice_neurons` inside every expert and `drop_layers` on MoE blocks, each against the same change made by
hand on the Hugging Face model (eager, transformers' default experts implementation), in PyTorch and in ONNX
Runtime at a shape other than the capture shape, with left padding."""

import copy

import pytest
import torch
from conftest import MOE_MODELS, make_inputs, make_model, slice_by_hand, slice_experts_by_hand
from test_drop_layers import ZeroMlp

import sparsec
from sparsec import testing
from sparsec.analysis.experts import find_experts
from sparsec.analysis.inspection import format_inspection, inspect_program
from sparsec.analysis.regions import region_index
from sparsec.analysis.vocabulary import skip_passthrough
from sparsec.data.calibration import CalibrationSet
from sparsec.errors import PassError
from sparsec.exporters.lowering.onnx import export_onnx


def _dense_mlps(model):
    """The HF model's dense gated MLPs (shared experts, DeepSeek-V3's dense first layer): plain FFNs to sparsec."""
    return sorted(name for name, module in model.named_modules() if hasattr(module, "gate_proj"))


def _moe_layers(model):
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def _capture(name):
    model = make_model(name)
    return model, sparsec.capture(model, make_inputs(model, 2, 16))


def _calibration(model):
    return CalibrationSet(make_inputs(model, 8, 12, seed=4, pad_left=3), source="test", batch_size=4)


def _other_shape(model):
    return make_inputs(model, 3, 9, seed=7, pad_left=2)


@pytest.mark.parametrize("name", MOE_MODELS)
def test_experts_are_found_from_the_graph(name):
    model, program = _capture(name)
    found = find_experts(program)
    config = model.config
    assert [e.block_path for e in found] == [f"model.layers.{i}.mlp" for i in _moe_layers(model)]
    for i, e in zip(_moe_layers(model), found):
        block = model.model.layers[i].mlp
        assert e.path == f"model.layers.{i}.mlp.experts"
        assert (e.num_experts, e.top_k) == tuple(block.experts.gate_up_proj.shape[:1]) + (config.num_experts_per_tok,)
        assert e.intermediate_size == block.experts.down_proj.shape[-1] and e.gate_half == 0
        assert [(t.name, t.role, t.neuron_dim) for t in e.tensors] == [
            (f"{e.path}.gate_up_proj", "up", 1),
            (f"{e.path}.down_proj", "down", 2),
        ]
        assert program.state_name(skip_passthrough(e.router.args[1])) == f"model.layers.{i}.mlp.gate.weight"
    assert sorted(f.path for f in region_index(program).ffns()) == _dense_mlps(model)
    info = inspect_program(program, make_inputs(model, 1, 4))
    assert [x["path"] for x in info["experts"]] == [e.path for e in found]
    assert f"{found[0].path}  8 experts, top-2, width" in format_inspection(info)


@pytest.mark.parametrize("name", MOE_MODELS)
def test_slice_inside_every_expert_equals_hand_sliced(name):
    model, program = _capture(name)
    record = testing.apply_pass(program, "slice_neurons", keep_ratio=0.5, calibration=_calibration(model))
    decisions = record.decisions["experts"]
    assert [d["path"] for d in decisions] == [e.path for e in find_experts(program)]
    for d in decisions:
        kept = torch.tensor(d["kept_indices"])
        assert kept.shape == (8, d["width_before"] // 2) == (8, d["width_after"])
        assert len({tuple(k) for k in kept.tolist()}) > 1  # each expert keeps its own neurons
    assert sorted(d["path"] for d in record.decisions["ffns"]) == _dense_mlps(model)
    reference = slice_experts_by_hand(slice_by_hand(model, record.decisions), record.decisions)
    removed = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in reference.parameters())
    assert record.parameters_before - record.parameters_after == removed > 0
    assert program.num_parameters() == sum(p.numel() for p in reference.parameters())
    testing.assert_equivalent(program, reference, _other_shape(model), output="logits", rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen2-moe"])
def test_expert_activation_importance_follows_the_routed_tokens(name):
    """An expert neuron whose down column is zero is never kept; experts see only their own tokens."""
    model = make_model(name)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[3, :, 5] = 0
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    record = testing.apply_pass(
        program,
        "slice_neurons",
        keep=model.model.layers[1].mlp.experts.down_proj.shape[-1] - 1,
        where="model.layers.1.mlp",
        calibration=_calibration(model),
    )
    ((d),) = record.decisions["experts"]
    assert 5 not in d["kept_indices"][3] and all(5 in k for i, k in enumerate(d["kept_indices"]) if i != 3)


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen3-moe", "tiny-deepseek-v3"])
def test_drop_moe_block_and_mlp_sublayer_equal_hf_model(name):
    model, program = _capture(name)
    record = testing.apply_pass(program, "drop_layers", layers=[1], kind="mlp")
    assert record.decisions["dropped"] == ["model.layers.1:mlp"]
    assert not any(p.startswith("model.layers.1.mlp.") for p in program.parameter_names())
    reference = copy.deepcopy(model)
    reference.model.layers[1].mlp = ZeroMlp()
    testing.assert_equivalent(program, reference, _other_shape(model), output="logits", rtol=1e-5, atol=1e-5)

    model, program = _capture(name)
    testing.apply_pass(program, "drop_layers", layers=[0], kind="block")
    reference = copy.deepcopy(model)
    del reference.model.layers[0]
    testing.assert_equivalent(program, reference, _other_shape(model), output="logits", rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=MOE_MODELS)
def sliced_and_dropped(request, tmp_path_factory):
    """Per family, one program with every expert sliced to half its width and block 1 dropped, its ONNX file
    and the same change made by hand (one export per family, shared by the assertions)."""
    model, program = _capture(request.param)
    record = testing.apply_pass(
        program, "slice_neurons", keep_ratio=0.5, importance="magnitude", where="model.layers.*.mlp"
    )
    testing.apply_pass(program, "drop_layers", layers=[1])
    reference = slice_experts_by_hand(slice_by_hand(model, record.decisions), record.decisions)
    del reference.model.layers[1]
    path = tmp_path_factory.mktemp(request.param) / "m.onnx"
    export_onnx(program, path)
    return model, program, reference, path


@pytest.mark.slow
def test_sliced_and_dropped_moe_in_onnx_runtime(sliced_and_dropped):
    model, program, reference, path = sliced_and_dropped
    inputs = _other_shape(model)
    testing.assert_equivalent(program, reference, inputs, output="logits", rtol=1e-5, atol=1e-5)
    testing.assert_onnx_equivalent(path, reference, inputs, output="logits")
    testing.assert_onnx_equivalent(path, reference, make_inputs(model, 1, 5, seed=2), output="logits")


def test_global_scope_is_refused_over_experts_before_anything_changes():
    model, program = _capture("tiny-mixtral")
    nodes = [n.name for n in program.graph.nodes]
    with pytest.raises(PassError, match="scope 'global' ranks dense FFN neurons .* also matches MoE experts"):
        testing.apply_pass(program, "slice_neurons", keep_ratio=0.5, scope="global", importance="magnitude")
    with pytest.raises(PassError, match=r"keep 64 exceeds the 32 neurons of model.layers.0.mlp.experts \(per expert\)"):
        testing.apply_pass(program, "slice_neurons", keep=64, importance="magnitude")
    assert [n.name for n in program.graph.nodes] == nodes
