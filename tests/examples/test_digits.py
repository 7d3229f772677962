"""The trained digits testbed (examples/digits): shipped weights load safely and score what was measured."""

import sys
from pathlib import Path

import pytest
import torch

import sparsec
from sparsec.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "digits"))

import testbed as tb  # noqa: E402

# a little below the numbers measured with the shipped weights (examples/digits/README.md)
MIN_UNDERSTANDING_ACCURACY = 0.94  # measured 0.953
MIN_GENERATION_JUDGE_ACCURACY = 0.85  # 5 digits per label, seed 0: measured 0.96
MIN_JUDGE_HELDOUT_ACCURACY = 0.97  # measured 0.981
PER_LABEL = 5


@pytest.fixture(scope="module")
def loaded():
    return load_model(tb.WEIGHTS / "mot")


@pytest.fixture(scope="module")
def judge():
    return tb.load_judge()


@pytest.fixture(scope="module")
def quality(loaded, judge):
    return tb.generation_quality(loaded.model, judge, per_label=PER_LABEL, seed=0)


def test_shipped_weights_are_safetensors_and_small():
    files = sorted(p.name for p in tb.WEIGHTS.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))], files
    assert sum(p.stat().st_size for p in tb.WEIGHTS.rglob("*") if p.is_file()) < 4_000_000


def test_model_loads_as_the_mot_family_with_the_testbed_vocabulary(loaded):
    assert loaded.family.name == "mot"
    assert loaded.model.config.vocab_size == tb.VOCAB_SIZE


def test_understanding_accuracy_on_heldout_digits(loaded):
    assert tb.understanding_accuracy(loaded.model) >= MIN_UNDERSTANDING_ACCURACY


def test_judge_recognises_real_heldout_digits(judge):
    held = tb.load_split("heldout")
    assert tb.judge_accuracy(judge, tb.dequantize(tb.quantize(held.images)), held.labels) >= MIN_JUDGE_HELDOUT_ACCURACY


def test_generated_digits_are_judged_as_the_requested_labels(quality):
    assert quality["judge_accuracy"] >= MIN_GENERATION_JUDGE_ACCURACY, quality
    assert quality["frechet_distance"] > 0


def test_metrics_are_deterministic(loaded, judge, quality):
    assert tb.generation_quality(loaded.model, judge, per_label=PER_LABEL, seed=0) == quality
    assert tb.understanding_accuracy(loaded.model) == tb.understanding_accuracy(loaded.model)
    labels = torch.arange(tb.NUM_LABELS)
    assert not torch.equal(tb.generate(loaded.model, labels, seed=0), tb.generate(loaded.model, labels, seed=1))


def test_split_is_stratified_and_disjoint():
    train, held = tb.load_split("train"), tb.load_split("heldout")
    assert (len(train.labels), len(held.labels)) == (1437, 360)
    assert torch.bincount(held.labels).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    seen = {tuple(row.tolist()) for row in train.images}
    assert not any(tuple(row.tolist()) in seen for row in held.images)


def test_captured_program_scores_like_the_eager_model(loaded):
    model = loaded.model
    program = sparsec.capture(model, loaded.family.example_inputs(model, 2, 16))
    run = lambda batch: program.run(batch)["logits"]  # noqa: E731
    held = tb.load_split("heldout")
    assert torch.equal(tb.predict_labels(run, held.images), tb.predict_labels(model, held.images))
    assert tb.understanding_accuracy(run) == tb.understanding_accuracy(model)
    generation = tb.task_inputs("generation", n=32)  # teacher-forced: every generation-token position
    with torch.no_grad():
        torch.testing.assert_close(run(generation), model(**generation).logits)
