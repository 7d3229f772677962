"""prune_experts against the Hugging Face MoE model with those experts deleted by hand (expert weight slices and
router rows removed, num_experts lowered), in PyTorch and in ONNX Runtime at another shape, with left padding."""

import pytest
import torch
from conftest import make_inputs, make_model, prune_experts_by_hand

import sparsec
from sparsec import testing
from sparsec.analysis.experts import find_experts
from sparsec.data.calibration import CalibrationSet
from sparsec.errors import PassError, RecipeError
from sparsec.exporters.lowering.onnx import export_onnx
from sparsec.recipe import Recipe


def _capture(name, model=None):
    model = model or make_model(name)
    return model, sparsec.capture(model, make_inputs(model, 2, 16))


def _calibration(model, seed=4):
    return CalibrationSet(make_inputs(model, 8, 12, seed=seed, pad_left=3), source="test", batch_size=4)


def _routed_by_hand(model, calibration):
    """Per MoE block, how many valid token-expert pairs the HF router chooses each expert for (forward hooks)."""
    counts = {}

    def hook(module, args, output):
        ids = output[2]  # (logits, weights, indices)
        counts.setdefault(module, torch.zeros(module.weight.shape[0]))
        counts[module] += torch.bincount(ids[mask.reshape(-1)].reshape(-1), minlength=module.weight.shape[0])

    routers = [layer.mlp.gate for layer in model.model.layers]
    handles = [r.register_forward_hook(hook) for r in routers]
    try:
        for batch in calibration.batches():
            mask = batch["attention_mask"].bool()
            with torch.no_grad():
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return [counts[r] for r in routers]


@pytest.fixture(scope="module", params=[("tiny-mixtral", "frequency"), ("tiny-qwen2-moe", "mass")])
def pruned(request, tmp_path_factory):
    """Per family, 8 -> 5 experts in every MoE block by one criterion, its ONNX file and the hand-made model."""
    name, criterion = request.param
    model, program = _capture(name)
    calibration = _calibration(model)
    record = testing.apply_pass(program, "prune_experts", keep=5, criterion=criterion, calibration=calibration)
    reference = prune_experts_by_hand(model, record.decisions)
    path = tmp_path_factory.mktemp(name) / "m.onnx"
    export_onnx(program, path)
    return model, program, record, reference, calibration, path


def test_pruned_equals_hand_deleted_experts(pruned):
    model, program, record, reference, calibration, _ = pruned
    blocks = record.decisions["blocks"]
    assert [d["path"] for d in blocks] == [f"model.layers.{i}.mlp" for i in range(3)]
    for d, counted in zip(blocks, _routed_by_hand(model, calibration)):
        assert d["experts_after"] == len(d["kept_experts"]) == 5 and d["experts_before"] == 8
        assert d["frequency"] == pytest.approx((counted / counted.sum()).tolist(), abs=1e-6)
        score = torch.tensor(d[record.decisions["criterion"]])
        assert score[d["kept_experts"]].min() >= score[d["removed_experts"]].max()
    assert [(e.num_experts, e.top_k) for e in find_experts(program)] == [(5, 2)] * 3
    removed = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in reference.parameters())
    assert record.parameters_before - record.parameters_after == removed > 0
    testing.assert_equivalent(program, reference, make_inputs(model, 3, 9, seed=7, pad_left=2), output="logits")


@pytest.mark.slow
def test_pruned_in_onnx_runtime(pruned):
    model, _, _, reference, _, path = pruned
    for inputs in (make_inputs(model, 3, 9, seed=7, pad_left=2), make_inputs(model, 1, 4, seed=3)):
        testing.assert_onnx_equivalent(path, reference, inputs, output="logits")


def test_mass_ranks_a_silent_expert_last_although_it_is_chosen_often():
    """An expert whose down projection is zero routes tokens but moves nothing: mass drops it, frequency keeps it."""
    model = make_model("tiny-mixtral")
    calibration = _calibration(model)
    counted = _routed_by_hand(model, calibration)[0]
    busiest = int(counted.argmax())
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[busiest] = 0
    kept = {}
    for criterion in ("frequency", "mass"):
        _, program = _capture("tiny-mixtral", model)
        record = testing.apply_pass(
            program, "prune_experts", keep=7, criterion=criterion, where="model.layers.0.mlp", calibration=calibration
        )
        (d,) = record.decisions["blocks"]
        kept[criterion] = d["kept_experts"]
        assert d["mass"][busiest] == 0.0
    assert busiest in kept["frequency"] and kept["mass"] == [e for e in range(8) if e != busiest]


def test_bad_input_is_refused_before_anything_changes():
    model, program = _capture("tiny-qwen3-moe")
    nodes = [n.name for n in program.graph.nodes]
    with pytest.raises(PassError, match=r"keeping 1 of the 8 experts of model.layers.0.mlp is fewer than its top-k 2"):
        testing.apply_pass(program, "prune_experts", keep=1, calibration=_calibration(model))
    with pytest.raises(PassError, match="keep 9 exceeds the 8 experts of model.layers.0.mlp"):
        testing.apply_pass(program, "prune_experts", keep=9, calibration=_calibration(model))
    with pytest.raises(PassError, match=r"where='\*\*.attn' matches no MoE block; MoE blocks in this model"):
        testing.apply_pass(program, "prune_experts", keep=4, where="**.attn", calibration=_calibration(model))
    with pytest.raises(PassError, match="needs calibration data"):
        testing.apply_pass(program, "prune_experts", keep=4)
    assert [n.name for n in program.graph.nodes] == nodes
    model, program = _capture("tiny-deepseek-v3")
    with pytest.raises(PassError, match=r"reshape_\d+ \(reshape.default\) writes the expert count into its shape"):
        testing.apply_pass(program, "prune_experts", keep=6, calibration=_calibration(model))
    dense = make_model("tiny-qwen2")
    with pytest.raises(PassError, match=r"matches no MoE block; MoE blocks in this model: none"):
        testing.apply_pass(sparsec.capture(dense, make_inputs(dense, 2, 8)), "prune_experts", keep_ratio=0.5)
    for options, message in [
        ({"keep": 4, "keep_ratio": 0.5}, "give exactly one of keep, keep_ratio"),
        ({"keep_ratio": 1.5}, "keep_ratio: must be in (0, 1], got 1.5"),
        ({"keep": 4, "criterion": "gradient"}, "choose one of ['frequency', 'mass']"),
    ]:
        with pytest.raises(RecipeError) as info:
            Recipe.from_dict({"passes": [{"prune_experts": options}]})
        assert message in str(info.value)
