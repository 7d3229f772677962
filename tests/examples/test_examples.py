"""The examples in examples/ run as they are documented, at tiny size.

Every recipe runs: the Janus and Qwen-Image recipes compile for real (ONNX and the parity check), the others as a
dry run (the compile runs the same passes, so those two are not dry-run as well);
the custom-pass example installs as a package and its pass is then found by name by the `sparsec` command.
Its unit test (examples/custom_pass/test_skip_ffn.py) and the digits reproduction
(tests/examples/test_digits_reproduce.py) run as tests of their own.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sparsec.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
COMPILED = {  # recipe -> passes each program runs (None: the model's own forward), compiled for real below
    "janus_entry_points.yaml": {"understanding": 2, "generation_step": 3, "vq_decode": 0},
    "qwenimage_mmdit.yaml": {None: 2},
}
DRY_RUN = [p for p in EXAMPLES if p.name not in COMPILED]
CUSTOM_PASS = ROOT / "examples" / "custom_pass"


def _model(recipe: Path) -> str:
    """The model named on a `# model: ...` first line, else the default tiny Qwen2."""
    first = recipe.read_text().splitlines()[0]
    return first.split(":", 1)[1].strip() if first.startswith("# model:") else "builtin:tiny-qwen2"


@pytest.mark.parametrize("recipe", DRY_RUN, ids=[p.name for p in DRY_RUN])
def test_example_recipe_runs(recipe, capsys):
    assert main(["compile", "--model", _model(recipe), "--recipe", str(recipe), "--dry-run", "--quiet"]) == 0
    assert "pass " in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name, passes_run", COMPILED.items(), ids=list(COMPILED))
def test_example_compiles_to_onnx_with_parity(name, passes_run, tmp_path):
    """Each program's ONNX file agrees with its PyTorch program (the compile's parity check, cosine > 0.9999)."""
    recipe = ROOT / "examples" / name
    out = tmp_path / "out"
    assert main(["compile", "--model", _model(recipe), "--recipe", str(recipe), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    for program, count in passes_run.items():
        section, directory = (report["entry_points"][program], out / program) if program else (report, out)
        assert (directory / "model.onnx").stat().st_size > 0 and (directory / "program.pt2").is_file()
        assert len(section["passes"]) == count and all(p["modified"] for p in section["passes"])
        assert section["parity"]["metrics"]
        for metrics in section["parity"]["metrics"].values():
            assert metrics["cosine"] > 0.9999, (program, metrics)


def _run(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_custom_pass_package_installs_and_registers_by_entry_point(tmp_path):
    """`pip install examples/custom_pass` (into a target directory here) makes `skip_ffn` a pass name."""
    source, target = tmp_path / "custom_pass", tmp_path / "site"
    shutil.copytree(CUSTOM_PASS, source, ignore=shutil.ignore_patterns("__pycache__"))  # pip builds in the source tree
    installed = _run(
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--target",
        str(target),
        str(source),
        env=os.environ.copy(),
        cwd=tmp_path,
    )
    assert installed.returncode == 0, installed.stderr
    assert sorted(p.name for p in target.glob("sparsec_skip_ffn-*.dist-info"))  # installed as a distribution

    env = {**os.environ, "PYTHONPATH": str(target)}  # skip_ffn is importable from the installed package only
    listed = _run("-m", "sparsec.cli", "passes", env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "skip_ffn" in listed.stdout

    out = tmp_path / "out"
    compiled = _run(
        "-m",
        "sparsec.cli",
        "compile",
        "--recipe",
        str(CUSTOM_PASS / "recipe.yaml"),
        "--out",
        str(out),
        "--quiet",
        env=env,
        cwd=tmp_path,
    )
    assert compiled.returncode == 0, compiled.stderr
    (record,) = json.loads((out / "report.json").read_text())["passes"]
    (decisions,) = json.loads((out / "decisions.json").read_text())["passes"]
    assert record["name"] == "skip_ffn" and decisions == {"skipped": ["model.layers.3.mlp"]}
    assert record["parameters_after"] < record["parameters_before"]
