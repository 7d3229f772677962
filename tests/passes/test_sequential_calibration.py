"""Passes decide the same on layer-sequential calibration (`calibration.sequential`) as on whole-model runs:
block scores, activation importance, quality gates, even where a pass re-scores a graph it has changed."""

import dataclasses

import pytest
from conftest import make_inputs, make_model

import sparsec
from sparsec.analysis.regions import block_boundaries
from sparsec.compiler import compile_model
from sparsec.data.calibration import CalibrationSet
from sparsec.data.quality import QualityGates
from sparsec.errors import RecipeError
from sparsec.passes.drop_layers import DropLayers
from sparsec.passes.slice_neurons import SliceNeurons
from sparsec.pipeline import run_passes
from sparsec.recipe import Recipe


def _compile(name, sequential):
    model = make_model(name)
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    calibration = CalibrationSet(make_inputs(model, 6, 12, seed=5, pad_left=5), source="test", batch_size=4)
    if sequential:
        calibration = dataclasses.replace(calibration, cuts=block_boundaries)
    passes = [DropLayers(count=2, iterative=True), SliceNeurons(keep_ratio=0.5, importance="activation")]
    records = run_passes(program, passes, calibration, gates=QualityGates(min_cosine=-1.0), progress=False)
    return [(r.name, r.decisions, r.quality, r.parameters_after) for r in records]


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-mot"])
def test_sequential_calibration_gives_the_same_decisions_and_quality(name):
    whole = _compile(name, sequential=False)
    assert _compile(name, sequential=True) == whole
    assert [r[0] for r in whole] == ["drop_layers", "slice_neurons"] and whole[0][2]["logits"]["cosine"] < 1


def _recipe(sequential):
    return Recipe.from_dict(
        {
            "passes": [{"drop_layers": {"count": 1}}],
            "quality": {"gates": False},
            "calibration": {"samples": 6, "seq_len": 8, "batch_size": 4, "sequential": sequential},
        }
    )


def test_recipe_calibration_sequential_runs_the_compile_layer_sequentially():
    reports = [
        compile_model("builtin:tiny-qwen2", _recipe(s), None, dry_run=True, progress=False, log=lambda _: None)
        for s in (False, True)
    ]
    assert [r["calibration"]["sequential"] for r in reports] == [False, True]
    whole, sequential = ([(p["decisions"], p["quality"]) for p in r["passes"]] for r in reports)
    assert sequential == whole and len(whole) == 1
    with pytest.raises(RecipeError, match="calibration.sequential"):
        _recipe("auto")
