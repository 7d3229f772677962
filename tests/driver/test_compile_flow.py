"""The compile flow's traps: an --out that cannot be created is refused before the model loads; a signal leaves
nothing half-written; a dry run shows every pass past a failed gate and refuses what the compile refuses."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

import sparsec.cli
import sparsec.compiler
import sparsec.models
from sparsec.cli import main
from sparsec.compiler import compile_model
from sparsec.errors import Terminated
from sparsec.recipe import Recipe
from sparsec.staging import check_creatable, move_into_place, signals_as_exceptions

PRUNE = {"passes": [{"slice_neurons": {"keep_ratio": 0.25}}, {"drop_layers": {"count": 1}}]}


@pytest.fixture
def no_model_load(monkeypatch):
    fail = lambda *a, **k: pytest.fail("the model was loaded")  # noqa: E731
    monkeypatch.setattr(sparsec.compiler, "load_model", fail)
    monkeypatch.setattr(sparsec.models, "load_model", fail)


@pytest.mark.parametrize("command", ["compile", "analyze"])
def test_an_out_that_cannot_be_created_exits_2_before_the_model_loads(command, tmp_path, capsys, no_model_load):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    for out, says in [
        (afile / "out", f"--out {afile / 'out'}: {afile} is a file, not a directory"),
        (afile / "deeper" / "out", f"{afile} is a file, not a directory"),
        ("/proc/x", "--out /proc/x: cannot create a directory in /proc"),
    ]:
        assert main([command, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"sparsec {command}: error: " in err and says in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # the check itself leaves nothing


def test_a_new_out_under_directories_still_to_be_made_is_accepted(tmp_path):
    check_creatable(tmp_path / "a" / "b" / "out", "--out")
    assert list(tmp_path.iterdir()) == []  # checked by making and removing a directory in tmp_path


@pytest.mark.slow
def test_sigterm_while_writing_leaves_nothing_half_written(tmp_path):
    """SIGTERM (what `timeout` and CI cancels send) arrives while the staging directory is being filled: the
    command exits 143, and neither the staging directory nor an output is left."""
    parent = tmp_path / "outs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "sparsec.cli", "compile", "--out", str(parent / "term"), "--quiet"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (parent.is_dir() and any(p.name.startswith(".term.tmp-") for p in parent.iterdir())):
        assert process.poll() is None, f"the compile ended before writing: {process.stderr.read()}"
        assert time.monotonic() < deadline, "no staging directory appeared"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "sparsec compile: terminated by SIGTERM" in err
    assert list(parent.iterdir()) == []


def _outputs(tmp_path):
    """An earlier output `out/` (file `old`) and a staged new one beside it (file `new`)."""
    out, stage = tmp_path / "out", tmp_path / ".out.tmp-x"
    for directory, name in ((out, "old"), (stage, "new")):
        directory.mkdir()
        (directory / name).write_text(name)
    return out, stage


def test_sigterm_raises_terminated_and_the_default_handler_comes_back():
    with pytest.raises(Terminated, match="terminated by SIGTERM") as caught, signals_as_exceptions():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises as soon as the signal arrives
    assert caught.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL


def test_a_signal_between_the_renames_waits_until_the_new_output_is_in_place(tmp_path, monkeypatch):
    out, stage = _outputs(tmp_path)
    rename = os.replace

    def rename_then_signal(source, target):
        rename(source, target)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(os, "replace", rename_then_signal)
    with pytest.raises(Terminated), signals_as_exceptions():
        move_into_place(stage, out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["new"]


def test_an_output_that_cannot_be_moved_in_puts_the_earlier_one_back(tmp_path, monkeypatch):
    out, stage = _outputs(tmp_path)
    rename = os.replace

    def refuse_the_stage(source, target):
        if source == stage:
            raise PermissionError(13, "Permission denied")
        rename(source, target)

    monkeypatch.setattr(os, "replace", refuse_the_stage)
    with pytest.raises(PermissionError):
        move_into_place(stage, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-x", "out"]
    assert [p.name for p in out.iterdir()] == ["old"]


def _dry_run(recipe: dict) -> dict:
    return compile_model("builtin:tiny-qwen2", Recipe.from_dict(recipe), None, dry_run=True, progress=False)


@pytest.mark.slow
def test_dry_run_marks_a_failed_gate_and_shows_the_later_passes(tmp_path, capsys):
    """The first pass fails the gates; the dry run goes on: the second pass decides on the program the first left,
    as with the gates off, and the command exits 1 saying where the compile would stop."""
    gated = _dry_run({**PRUNE, "quality": {"min_cosine": 0.9999}})
    ungated = _dry_run({**PRUNE, "quality": {"gates": False}})
    first, second = gated["passes"]
    assert first["gate_failed"].startswith("logits: cosine") and "< 0.9999" in first["gate_failed"]
    assert [p["decisions"] for p in gated["passes"]] == [p["decisions"] for p in ungated["passes"]]
    assert second["parameters_before"] == first["parameters_after"] > second["parameters_after"]
    assert all(p["gate_failed"] is None for p in ungated["passes"])

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**PRUNE, "quality": {"min_cosine": 0.9999}}))
    assert main(["compile", "--recipe", str(recipe), "--dry-run", "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert out.count("GATE FAILED: logits: cosine") == 2 and "pass drop_layers (" in out
    assert "rank" in out.split("pass drop_layers (")[1]  # the later pass's ranking is shown
    assert "quality gate failed after slice_neurons, drop_layers; the compile would stop at the first" in err


def test_dry_run_refuses_an_export_the_target_cannot_run_as_the_compile_does(tmp_path, capsys, no_model_load):
    recipe = tmp_path / "bf16.yaml"
    recipe.write_text("export: {precision: bf16}\n")
    for extra in (["--dry-run"], ["--out", str(tmp_path / "out")]):
        assert main(["compile", "--recipe", str(recipe), "--quiet", *extra]) == 2
        assert "export.precision: bf16 does not run on ONNX Runtime's CPU provider" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16.yaml"]


def test_the_report_and_the_dry_run_state_the_resulting_architecture():
    """A block dropped, FFNs sliced to half and half the KV groups pruned on tiny-llama (4 blocks, FFN 128, 4 heads
    in 2 KV groups of 16): the report says so in one place, and the dry run prints it."""
    recipe = {
        "passes": [
            {"drop_layers": {"count": 1}},
            {"slice_neurons": {"keep_ratio": 0.5}},
            {"prune_heads": {"keep_ratio": 0.5, "unit": "kv_group"}},
        ],
        "calibration": {"samples": 8, "seq_len": 16},
        "quality": {"gates": False},
    }
    report = compile_model("builtin:tiny-llama", Recipe.from_dict(recipe), None, dry_run=True, progress=False)
    summary = "3 blocks (model.layers); hidden 64; heads 2, kv heads 1, head dim 16; FFN 64"
    assert report["architecture"] == {
        "stack": "model.layers",
        "blocks": 3,
        "hidden": 64,
        "heads": 2,
        "kv_heads": 1,
        "head_dim": 16,
        "ffn": 64,
        "experts": None,
        "top_k": None,
        "expert_ffn": None,
        "summary": summary,
    }
    assert f"result      {summary}" in sparsec.cli._decisions(report).splitlines()  # what the dry run prints
