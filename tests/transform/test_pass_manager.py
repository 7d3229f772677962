"""PassManager: custom passes by name, verification after every pass, parameter bookkeeping, quality gates."""

import pytest
import torch
from conftest import make_inputs, make_model
from skip_ffn import SkipFfn

import sparsec
from sparsec import testing
from sparsec.data.calibration import CalibrationSet
from sparsec.errors import PassError, QualityError, RecipeError, VerificationError
from sparsec.transform.pass_manager import Pass, PassContext, PassManager, PassResult, register_pass
from sparsec.data.quality import QualityGates
from sparsec.recipe import Recipe
from sparsec.analysis.regions import region_index

aten = torch.ops.aten


class NoOp(Pass):
    """Does nothing (a pipeline placeholder)."""

    name = "noop"

    def run(self, program, ctx):
        return PassResult(modified=False)


@pytest.fixture(autouse=True)
def _registered():
    register_pass(NoOp)
    register_pass(SkipFfn)


def _fresh(name="tiny-qwen2"):
    model = make_model(name)
    return model, sparsec.capture(model, make_inputs(model, 2, 8))


def test_noop_changes_nothing():
    model, program = _fresh()
    before = testing.parameter_names(program)
    record = testing.apply_pass(program, "noop")
    assert not record.modified and record.parameters_after == record.parameters_before
    assert testing.parameter_names(program) == before


def test_requires_failure_leaves_program_untouched():
    _, program = _fresh()
    before = [n.name for n in program.graph.nodes]
    with pytest.raises(PassError, match="no FFN matches"):
        testing.apply_pass(program, "skip_ffn", where="model.vision_model.**")
    assert [n.name for n in program.graph.nodes] == before


class _BreaksShapes(Pass):
    """Feeds the residual stream into a linear of the wrong width: only shape propagation can see it."""

    name = "breaks_shapes"

    def run(self, program, ctx):
        ffn = region_index(program).ffns()[0]
        ffn.down.args = (ffn.input, *ffn.down.args[1:])
        return PassResult(modified=True)


class _LeavesOrphanWeight(Pass):
    name = "leaves_orphan_weight"

    def run(self, program, ctx):
        program.exported.state_dict["ghost.weight"] = torch.zeros(3)
        return PassResult(modified=True)


@pytest.mark.parametrize("bad, message", [(_BreaksShapes, "shape propagation failed"),
                                          (_LeavesOrphanWeight, "ghost.weight")])
def test_verification_catches_broken_passes(bad, message):
    _, program = _fresh()
    with pytest.raises(VerificationError, match=message):
        testing.apply_pass(program, bad())


def test_quality_gate_failure_stops_pipeline():
    model, program = _fresh()
    calib = CalibrationSet(make_inputs(model, 4, 12, seed=1), source="test")
    manager = PassManager([SkipFfn(where="model.layers.*.mlp")], gates=QualityGates(min_cosine=0.999))
    with pytest.raises(QualityError, match=r"quality gate failed after pass 'skip_ffn': logits: cosine"):
        manager.run(program, PassContext(calibration=calib, progress=False))


def test_manager_orders_lowering_after_transform():
    class Lower(NoOp):
        name = "lower_noop"
        stage = "lowering"

    order = PassManager([Lower(), NoOp(), SkipFfn()]).passes
    assert [p.name for p in order] == ["noop", "skip_ffn", "lower_noop"]


def test_registered_pass_runs_from_recipe_and_options_are_validated():
    recipe = Recipe.from_dict({"passes": [{"skip_ffn": {"where": "model.layers.0.mlp"}}, "noop"]})
    assert [p.name for p in recipe.passes] == ["skip_ffn", "noop"]
    with pytest.raises(RecipeError, match=r"passes\[0\]\.skip_ffn: unknown option\(s\) \['were'\]; allowed: \['where'\]"):
        Recipe.from_dict({"passes": [{"skip_ffn": {"were": "x"}}]})
    with pytest.raises(RecipeError, match=r"passes\[0\]\.skip_ffn\.where: must be a non-empty"):
        Recipe.from_dict({"passes": [{"skip_ffn": {"where": ""}}]})


def test_describe_decisions_writes_each_key_with_long_lists_summarised():
    decisions = {"importance": "activation", "kept": list(range(20)), "ffns": [{"path": "mlp", "score": 0.123456789}]}
    assert Pass.describe_decisions(decisions) == [
        "  importance: activation", "  kept: <20 items>", "  ffns:", "    {'path': 'mlp', 'score': 0.123457}"]
    assert Pass.describe_decisions([1, 2]) == ["  decisions: [1, 2]"]
