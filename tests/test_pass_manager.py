"""PassManager: custom passes by name, verification after every pass, parameter bookkeeping, quality gates."""

import sys
import textwrap

import pytest
import torch
from conftest import make_inputs, make_model
from custom_passes import NoOp, SkipFfn

import sparsec
from sparsec import testing
from sparsec.calibration import CalibrationSet
from sparsec.errors import PassError, QualityError, RecipeError, VerificationError
from sparsec.pass_manager import Pass, PassContext, PassManager, PassResult, available_passes, register_pass
from sparsec.quality import QualityGates
from sparsec.recipe import Recipe

aten = torch.ops.aten


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


def test_custom_pass_matches_hand_edited_model_and_removes_exactly_its_weights():
    model, program = _fresh()
    before = testing.parameter_names(program)
    n_before = program.num_parameters()
    record = testing.apply_pass(program, "skip_ffn", where="model.layers.[12].mlp",
                                calibration=make_inputs(model, 4, 12, seed=3))
    # post_attention_layernorm only fed the MLP: it goes too
    testing.assert_parameters_removed(before, program, ["model.layers.[12].mlp.**", "model.layers.[12].post_attention_layernorm.*"])
    assert set(record.removed_state) == before - testing.parameter_names(program)
    mlp_params = sum(p.numel() for i in (1, 2) for p in model.model.layers[i].mlp.parameters())
    norm_params = sum(model.model.layers[i].post_attention_layernorm.weight.numel() for i in (1, 2))
    assert n_before - program.num_parameters() == mlp_params + norm_params
    testing.assert_op_count(program, "model.layers.1", "aten.linear.default", 4)
    testing.assert_op_count(program, "model.layers.0", "aten.linear.default", 7)
    assert record.quality["logits"]["cosine"] < 1.0  # the check ran on calibration data

    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    for i in (1, 2):
        model.model.layers[i].mlp = Zero()
    testing.assert_equivalent(program, model, make_inputs(model, 3, 11, seed=5, pad_left=3), rtol=1e-5, atol=1e-5)


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
        ffn = program.regions.ffns()[0]
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


def test_third_party_pass_registers_through_entry_point(tmp_path, monkeypatch):
    """A package that declares `[sparsec.passes]` in its entry points is found by name."""
    (tmp_path / "thirdparty_passes.py").write_text(textwrap.dedent("""
        from sparsec.pass_manager import Pass, PassResult
        class Identity(Pass):
            name = "thirdparty_identity"
            def run(self, program, ctx):
                return PassResult(modified=False, stats={"ran": True})
    """))
    dist = tmp_path / "thirdparty_passes-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-passes\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[sparsec.passes]\nthirdparty_identity = thirdparty_passes:Identity\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("sparsec.pass_manager._entry_points_loaded", False)
    assert "thirdparty_identity" in available_passes()
    _, program = _fresh()
    record = testing.apply_pass(program, "thirdparty_identity")
    assert record.stats == {"ran": True}
    sys.modules.pop("thirdparty_passes", None)
