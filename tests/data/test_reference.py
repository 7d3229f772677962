"""Reference outputs kept while small and recomputed per batch otherwise: the same values bit for bit, and the same
quality a compile reports, from a model in memory and from a checkpoint directory read lazily."""

import pytest
import torch
from conftest import make_inputs, make_model

from sparsec import capture
from sparsec.compiler import compile_model
from sparsec.data import reference as reference_module
from sparsec.data.calibration import CalibrationSet
from sparsec.data.logits import logit_rows
from sparsec.data.reference import ReferenceOutputs, output_bytes
from sparsec.recipe import Recipe

EXACT = {"rtol": 0, "atol": 0}


def _calibration(model, samples: int, seq: int, batch_size: int) -> CalibrationSet:
    return CalibrationSet(make_inputs(model, samples, seq, seed=2, pad_left=3), source="test", batch_size=batch_size)


@pytest.mark.parametrize("dynamic", [True, False])
def test_output_bytes_are_the_outputs_bytes_over_all_batches(dynamic):
    """The logits' bytes; a reference keeps the hidden states they are projected from (`sparsec.data.logits`)."""
    model = make_model("tiny-llama")
    program = capture(model, make_inputs(model, 4, 12), dynamic=dynamic)
    calib = _calibration(model, 12, 12, batch_size=4)  # a static capture runs at its batch of 4 and seq 12
    assert output_bytes(program, calib) == 12 * 12 * model.config.vocab_size * 4
    kept = ReferenceOutputs(program, calib)
    assert kept.kept
    hidden = [o["logits"].hidden for o in kept]
    assert kept.bytes == sum(h.numel() * h.element_size() for h in hidden) == 12 * 12 * model.config.hidden_size * 4


def test_recomputed_outputs_equal_the_kept_ones_on_every_iteration(captured):
    model, program = captured("tiny-qwen2")
    calib = _calibration(model, 7, 10, batch_size=3)  # a short last batch
    kept = list(ReferenceOutputs(program, calib))
    recomputed = ReferenceOutputs(program, calib, keep_bytes=0)
    assert not recomputed.kept
    assert recomputed.bytes == 9 * 10 * model.config.hidden_size * 4  # three full batches: an upper bound
    for _ in range(2):
        got = list(recomputed)
        assert len(got) == len(kept) == 3
        for expected, value in zip(kept, got):
            torch.testing.assert_close(logit_rows(value["logits"]), logit_rows(expected["logits"]), **EXACT)


RECIPE = {
    "passes": [{"drop_layers": {"count": 1}}, {"slice_neurons": {"keep_ratio": 0.5, "importance": "activation"}}],
    "calibration": {"samples": 10, "seq_len": 12, "batch_size": 4, "holdout": 0.4},
    "quality": {"max_ppl_ratio": 1000.0, "min_cosine": 0.0},
}


def _qualities(report: dict) -> list[dict]:
    return [record["quality"] for record in report["passes"]]


@pytest.mark.parametrize("lazy", [False, True])
def test_a_compile_reports_the_same_quality_with_its_reference_recomputed(tmp_path, monkeypatch, lazy):
    """From a checkpoint directory: the passes replace weights, and the reference reads the dense ones back."""
    make_model("tiny-llama").save_pretrained(tmp_path / "model")
    recipe = Recipe.from_dict(RECIPE)
    run = lambda: compile_model(tmp_path / "model", recipe, None, dry_run=True, progress=False, lazy=lazy)  # noqa: E731
    kept = run()
    monkeypatch.setattr(reference_module, "KEEP_BYTES", 0)
    recomputed = run()
    assert _qualities(recomputed) == _qualities(kept)
    first = _qualities(kept)[0]["logits"]
    assert first["cosine"] < 0.9999 and first["ppl_ratio"] != 1.0  # a change was measured, not a copy of the reference
