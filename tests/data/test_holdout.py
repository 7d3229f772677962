"""The held-out calibration split: the passes never see it, the quality gates measure on it, and a causal LM's
perplexity there equals a hand computation from the models' logits."""

import math
import re

import pytest
import torch
import yaml
from conftest import make_inputs, make_model, slice_by_hand
from safetensors.torch import save_file

import sparsec
from sparsec.cli import main
from sparsec.compiler import compile_model
from sparsec.data.calibration import CalibrationSet
from sparsec.errors import CalibrationError
from sparsec.pipeline import run_passes
from sparsec.recipe import Recipe
from sparsec.transform.pass_manager import (
    PASS_REGISTRY,
    Pass,
    PassResult,
    get_pass,
)


def _ids_set(samples: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """Random tiny-qwen2 token ids (vocab 256), every sample distinct; samples 1, 4, 7 ... left-padded by 1 to 6."""
    ids = torch.randint(0, 256, (samples, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for i in range(1, samples, 3):
        mask[i, : 1 + i % 6] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _rows(ids: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(row) for row in ids.tolist()}


def test_the_split_is_by_whole_samples_deterministic_and_sized_by_the_fraction():
    inputs = _ids_set(10, 6, seed=0)
    calib = CalibrationSet(inputs, source="ids", batch_size=4)
    split = calib.split(0.2, seed=3)
    assert (len(split.decision), len(split.holdout)) == (8, 2)
    decision, held = _rows(split.decision.inputs["input_ids"]), _rows(split.holdout.inputs["input_ids"])
    assert not decision & held and decision | held == _rows(inputs["input_ids"])
    original = [tuple(r) for r in inputs["input_ids"].tolist()]
    for side in (split.decision, split.holdout):  # each side keeps the file's order, and each sample its mask
        positions = [original.index(tuple(r)) for r in side.inputs["input_ids"].tolist()]
        assert positions == sorted(positions)
        assert torch.equal(side.inputs["attention_mask"], inputs["attention_mask"][positions])
        assert side.batch_size == 4 and side.source == "ids"
    again = calib.split(0.2, seed=3)
    assert torch.equal(again.holdout.inputs["input_ids"], split.holdout.inputs["input_ids"])
    others = [_rows(calib.split(0.2, seed=s).holdout.inputs["input_ids"]) for s in range(4, 8)]
    assert any(o != held for o in others)  # the seed chooses the samples
    assert split.describe() == {
        "holdout": 0.2,
        "decision": {"samples": 8, "tokens": int(split.decision.inputs["attention_mask"].sum())},
        "held_out": {"samples": 2, "tokens": int(split.holdout.inputs["attention_mask"].sum())},
    }
    assert split.describe()["decision"]["tokens"] + split.describe()["held_out"]["tokens"] == calib.num_tokens()
    # rounded to the nearest, at least one held out; 0 holds out nothing
    sizes = {n: len(CalibrationSet(_ids_set(n, 3, 0), source="ids").split(0.2, 0).holdout) for n in (2, 4, 7, 8, 16)}
    assert sizes == {2: 1, 4: 1, 7: 1, 8: 2, 16: 3}
    nothing = calib.split(0.0, seed=3)
    assert nothing.holdout is None and nothing.decision is calib
    assert nothing.describe()["held_out"] is None


def test_a_split_that_leaves_a_side_empty_is_refused_naming_the_option():
    with pytest.raises(
        CalibrationError, match=r"calibration.holdout: 0.2 of ids's 1 sample\(s\) leaves 0 .*`calibration.holdout: 0`"
    ):
        CalibrationSet(_ids_set(1, 4, 0), source="ids").split(0.2, seed=0)
    with pytest.raises(CalibrationError, match=r"calibration.holdout: 0.9 of ids's 5 sample\(s\) leaves 0"):
        CalibrationSet(_ids_set(5, 4, 0), source="ids").split(0.9, seed=0)
    with pytest.raises(CalibrationError, match=r"calibration.holdout: must be in \[0, 1\), got 1.0"):
        CalibrationSet(_ids_set(5, 4, 0), source="ids").split(1.0, seed=0)


SEEN: list[torch.Tensor] = []


class _SeesData(Pass):
    """Records the calibration inputs a pass is given (its context's and its statistics cache's); changes nothing."""

    name = "sees_data"

    def requires(self, program, ctx):
        SEEN.extend([ctx.calibration.inputs["input_ids"], ctx.statistics.calibration.inputs["input_ids"]])

    def run(self, program, ctx, plan):
        return PassResult(modified=False)


RECIPE = {
    "passes": ["sees_data", {"slice_neurons": {"keep_ratio": 0.5, "importance": "activation"}}],
    "calibration": {"holdout": 0.25, "seed": 5, "batch_size": 4},
    "quality": {"max_ppl_ratio": 100.0},  # gated, and loose enough to hold for poisoned held-out samples
}


def _dry_run(tmp_path, inputs, name):
    path = tmp_path / f"{name}.safetensors"
    save_file(inputs, str(path))
    return compile_model("builtin:tiny-qwen2", Recipe.from_dict(RECIPE), None, calib=path, dry_run=True, progress=False)


@pytest.fixture
def _sees_data():
    with PASS_REGISTRY.temporarily(_SeesData):
        yield


@pytest.mark.usefixtures("_sees_data")
def test_the_held_out_samples_are_never_seen_by_a_pass_and_are_what_the_gates_measure(tmp_path):
    """Poisoning the held-out samples (garbage token ids) changes the reported quality and no decision; the same
    poison on a sample the passes decide on changes the decisions (so the comparison can fail)."""
    inputs = _ids_set(12, 10, seed=1)
    split = CalibrationSet(inputs, source="ids").split(0.25, seed=5)
    original = [tuple(r) for r in inputs["input_ids"].tolist()]
    held = sorted(original.index(r) for r in _rows(split.holdout.inputs["input_ids"]))
    decided = [i for i in range(12) if i not in held]
    assert len(held) == 3

    SEEN.clear()
    clean = _dry_run(tmp_path, inputs, "clean")
    assert len(SEEN) == 2 and all(_rows(seen) == _rows(split.decision.inputs["input_ids"]) for seen in SEEN)
    assert clean["calibration"]["split"]["held_out"] == {
        "samples": 3,
        "tokens": int(inputs["attention_mask"][held].sum()),
    }
    assert clean["quality_gates"] == {
        "source": "recipe",
        "gated": True,
        "bounds": {"logits": {"ppl_ratio": 100.0}},
        "checked": True,
        "measured_on": "held_out",
    }

    def poisoned(rows):
        ids = inputs["input_ids"].clone()
        ids[rows] = torch.randint(200, 256, (len(rows), 10), generator=torch.Generator().manual_seed(9))
        return {**inputs, "input_ids": ids}

    SEEN.clear()
    held_poisoned = _dry_run(tmp_path, poisoned(held), "held")
    assert all(_rows(seen) == _rows(split.decision.inputs["input_ids"]) for seen in SEEN)
    decisions = [p["decisions"] for p in clean["passes"]]
    assert [p["decisions"] for p in held_poisoned["passes"]] == decisions
    sliced, poisoned_sliced = clean["passes"][1]["quality"]["logits"], held_poisoned["passes"][1]["quality"]["logits"]
    for metric in ("cosine", "top1", "kl", "perplexity", "dense_perplexity"):
        assert poisoned_sliced[metric] != sliced[metric], metric

    decision_poisoned = _dry_run(tmp_path, poisoned(decided[:3]), "decided")
    assert decision_poisoned["passes"][1]["decisions"] != decisions[1]


def _hand_perplexity(model, inputs) -> float:
    """exp(mean over valid next-token pairs of -log softmax(logits)[next token]), in float64, from `model`'s logits."""
    with torch.no_grad():
        logits = model(**inputs).logits.double()
    log_probs = logits.log_softmax(-1)[:, :-1]
    targets = inputs["input_ids"][:, 1:]
    valid = inputs["attention_mask"][:, :-1].bool() & inputs["attention_mask"][:, 1:].bool()
    return math.exp(-float(log_probs.gather(-1, targets[..., None])[..., 0][valid].mean()))


def test_perplexity_on_the_held_out_samples_equals_a_hand_computation_with_left_padding():
    model = make_model("tiny-qwen2")
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    inputs = _ids_set(10, 12, seed=2)  # another shape than the capture's; held-out samples are left-padded
    split = CalibrationSet(inputs, source="ids", batch_size=2).split(0.4, seed=1)
    held = split.holdout.inputs
    assert len(split.holdout) == 4 and (held["attention_mask"] == 0).any()
    slice_pass = get_pass("slice_neurons")(keep_ratio=0.25, importance="activation")
    (record,) = run_passes(program, [slice_pass], split.decision, holdout=split.holdout, progress=False)
    logits = record.quality["logits"]
    dense = _hand_perplexity(model, held)
    sliced = _hand_perplexity(slice_by_hand(model, record.decisions), held)
    assert logits["dense_perplexity"] == pytest.approx(dense, rel=1e-5)
    assert logits["perplexity"] == pytest.approx(sliced, rel=1e-5)
    assert logits["ppl_ratio"] == pytest.approx(sliced / dense, rel=1e-5)
    assert abs(sliced / dense - 1) > 1e-4  # ten times the tolerance: the slice's change can be told apart
    assert logits["tokens"] == int(held["attention_mask"].sum())  # agreement metrics on the same held-out tokens


@pytest.mark.parametrize(
    "recipe, message",
    [
        ({"calibration": {"holdout": 1.0}}, r"calibration.holdout: must be in \[0, 1\)"),
        ({"calibration": {"holdout": -0.1}}, r"calibration.holdout: must be in \[0, 1\)"),
        ({"calibration": {"holdout": "a fifth"}}, r"calibration.holdout"),
        ({"quality": {"max_ppl_ratio": 0.9}}, r"quality.max_ppl_ratio: must be >= 1"),
        ({"quality": {"outputs": {"logits": {"ppl_ratio": 1.1}}}}, r"quality.outputs.logits.ppl_ratio: unknown metric"),
    ],
)
def test_bad_options_exit_2_naming_them(tmp_path, capsys, recipe, message):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["compile", "--recipe", str(tmp_path / "r.yaml"), "--dry-run"]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_calibration_file_too_small_to_split_exits_2_naming_the_option(tmp_path, capsys):
    save_file(_ids_set(1, 8, 0), str(tmp_path / "one.safetensors"))
    (tmp_path / "r.yaml").write_text("passes: []\n")
    code = main(
        ["compile", "--recipe", str(tmp_path / "r.yaml"), "--calib", str(tmp_path / "one.safetensors"), "--dry-run"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "calibration.holdout: 0.2 of" in err and "1 sample(s) leaves 0" in err


def test_max_ppl_ratio_on_a_program_without_perplexity_exits_2_before_calibration(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("passes: []\nquality: {max_ppl_ratio: 1.1}\n")
    code = main(["compile", "--model", "builtin:tiny-qwenimage", "--recipe", str(tmp_path / "r.yaml"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "quality.max_ppl_ratio: perplexity needs a causal language model" in err
    assert "[sparsec] capturing" in err and "[sparsec] calibration" not in err  # refused right after capture
