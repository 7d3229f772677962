"""Issue 18 part A: default quality gates, the gates and named dims in a compact report, artifact modes from the
umask, readable dry-run output and progress without carriage returns in logs."""

import contextlib
import io
import json
import os
import stat
import subprocess
import sys

import pytest
import yaml

from sparsec.cli import main
from sparsec.data.quality import DEFAULT_GATES, QualityGates
from sparsec.errors import RecipeError
from sparsec.progress import progress_bar
from sparsec.recipe import Recipe

PRUNE = "passes:\n  - drop_layers: {count: 1}\n  - slice_neurons: {keep_ratio: 0.5}\n"  # cosine ~0.66 on tiny-qwen2


def test_no_quality_section_means_the_default_gates_and_gates_off_is_the_one_way_out():
    assert Recipe().quality.describe() == Recipe.from_dict({}).quality.describe()
    assert Recipe().quality.describe() == {
        "source": "default",
        "gated": True,
        "bounds": {"*": {"cosine": DEFAULT_GATES["min_cosine"], "top1": DEFAULT_GATES["min_top1"]}},
    }
    off = Recipe.from_dict(yaml.safe_load("quality: {gates: off}")).quality
    assert off.describe() == {"source": "off", "gated": False, "bounds": {}}
    assert off.failures({"logits": {"cosine": -1.0, "top1": 0.0}}) == []
    explicit = Recipe.from_dict({"quality": {"min_top1": 0.5}}).quality  # a section states the gates in full
    assert explicit.describe()["bounds"] == {"*": {"top1": 0.5}}
    with pytest.raises(RecipeError, match=r"quality: sets no bound; .* `quality: \{gates: off\}`"):
        Recipe.from_dict({"quality": {}})
    with pytest.raises(RecipeError, match="quality.gates: off, yet bounds are set; remove them"):
        Recipe.from_dict({"quality": {"gates": False, "min_cosine": 0.9}})
    assert QualityGates.default().failures({"logits": {"cosine": 0.995, "top1": 0.5}}) == ["logits: top1 0.5 < 0.9"]


@pytest.mark.slow
def test_default_gates_refuse_a_bad_compile_and_write_nothing(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(PRUNE)
    out = tmp_path / "out"
    code = main(["compile", "--recipe", str(tmp_path / "r.yaml"), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "quality gate failed: logits: cosine" in err and "< 0.99" in err
    assert "the default gates of a recipe without a `quality:` section" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no output, no staging left


@pytest.fixture(scope="module")
def ungated(tmp_path_factory):
    """One ungated compile of a pruned tiny-qwen2 under umask 022: (out dir, summary printed, report, decisions)."""
    tmp = tmp_path_factory.mktemp("ungated")
    (tmp / "r.yaml").write_text(PRUNE + "quality: {gates: off}\n")
    out, printed = tmp / "out", io.StringIO()
    old = os.umask(0o022)
    try:
        with contextlib.redirect_stdout(printed):
            assert main(["compile", "--recipe", str(tmp / "r.yaml"), "--out", str(out)]) == 0
    finally:
        os.umask(old)
    report = json.loads((out / "report.json").read_text())
    return out, printed.getvalue(), report, json.loads((out / "decisions.json").read_text())


@pytest.mark.slow
def test_gates_off_compiles_and_says_nothing_was_gated(ungated):
    _, summary, report, _ = ungated
    assert report["quality_gates"] == {
        "source": "off",
        "gated": False,
        "bounds": {},
        "checked": False,
        "measured_on": "held_out",
    }
    assert "gates      NONE: nothing was gated (quality: {gates: off})" in summary
    assert all(p["quality"]["logits"]["cosine"] < 0.99 for p in report["passes"])  # measured, not gated
    split = report["calibration"]["split"]  # 16 synthetic samples of 32 tokens (the defaults), a fifth held out
    assert split == {
        "holdout": 0.2,
        "decision": {"samples": 13, "tokens": 416},
        "held_out": {"samples": 3, "tokens": 96},
    }
    assert "passes decide on 13 samples (416 tokens); quality measured on 3 held-out samples (96 tokens)" in " ".join(
        summary.split()
    )
    for p in report["passes"]:
        logits = p["quality"]["logits"]
        assert logits["ppl_ratio"] == pytest.approx(logits["perplexity"] / logits["dense_perplexity"], rel=1e-12)
        assert f"ppl {logits['perplexity']:.4g} (dense {logits['dense_perplexity']:.4g}" in summary


@pytest.mark.slow
def test_report_is_compact_with_named_dims_and_decisions_beside_it(ungated):
    out, _, report, decisions = ungated
    assert report["export"]["dynamic_dims"] == {
        "input_ids": {"0": "batch", "1": "seq"},
        "attention_mask": {"0": "batch", "1": "seq"},
    }
    assert report["capture"]["dynamic_dims"] == report["export"]["dynamic_dims"]
    assert (out / "report.json").stat().st_size < 8000
    assert [p["decisions"] for p in report["passes"]] == ["decisions.json#/passes/0", "decisions.json#/passes/1"]
    dropped, sliced = decisions["passes"]
    (block,) = dropped["dropped"]
    assert report["passes"][0]["removed_state"] and all(
        n.startswith(block + ".") for n in report["passes"][0]["removed_state"]
    )
    kept = [f["kept_indices"] for f in sliced["ffns"]]
    assert len(kept) == 3 and all(len(k) == 64 and k == sorted(set(k)) for k in kept)  # 128 neurons to half


@pytest.mark.slow
def test_artifacts_get_the_modes_the_umask_allows(ungated):
    out = ungated[0]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    files = [p for p in out.iterdir()]
    assert {p.name for p in files} == {"decisions.json", "model.onnx", "program.pt2", "report.json"}
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}


@pytest.mark.slow
def test_dry_run_prints_tables_within_100_columns_and_logs_no_carriage_returns(tmp_path):
    (tmp_path / "r.yaml").write_text(PRUNE + "quality: {gates: off}\n")
    command = [sys.executable, "-m", "sparsec.cli", "compile", "--recipe", str(tmp_path / "r.yaml"), "--dry-run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)  # stderr is a pipe
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "[sparsec]   slice_neurons: params" in done.stderr
    lines = done.stdout.splitlines()
    assert max(map(len, lines)) <= 100
    assert lines[0].startswith("gates      NONE: nothing was gated")
    assert lines[1].startswith("result      3 blocks (model.layers)")
    assert lines[2].startswith("calibration synthetic random inputs")
    header = next(i for i, line in enumerate(lines) if line.startswith("pass "))
    assert " ".join(lines[2:header]).split()[-6:] == ["on", "3", "held-out", "samples", "(96", "tokens)"]
    assert lines[header].split() == ["pass", "params", "before", "->", "after", "quality", "perplexity"]
    assert lines[header + 1].split()[:4] == ["drop_layers", "181,312", "->", "144,192"]
    dense = [line.split()[-3:-1] for line in lines[header + 1 : header + 3]]  # ["(dense", "264.7,"] per pass
    assert dense[0] == dense[1] and dense[0][0] == "(dense"  # one dense program, one held-out split


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere(monkeypatch):
    terminal, log = _Terminal(), io.StringIO()
    assert list(progress_bar(range(3), desc="quality check", stream=terminal)) == [0, 1, 2]
    assert "\r" in terminal.getvalue()  # tqdm redraws in place
    monkeypatch.setattr("sparsec.progress.LOG_EVERY_S", 0.0)  # a long loop: a line per step, one at the end
    assert list(progress_bar(range(3), desc="quality check", stream=log)) == [0, 1, 2]
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and lines[:3] == [f"[sparsec]     quality check: {i}/3" for i in (1, 2, 3)]
    assert lines[3].startswith("[sparsec]     quality check: 3/3 done in")
    quiet = io.StringIO()
    bar = progress_bar(total=2, desc="probe statistics", enabled=False, stream=quiet)
    bar.update(2)
    bar.close()
    assert quiet.getvalue() == ""
