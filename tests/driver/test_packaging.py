"""The built wheel ships sparsec, sparsec.passes and sparsec.exporters, and no top-level passes/exporters."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("sparsec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {"sparsec"} <= top and not top & {"passes", "exporters", "tests", "examples"}
    for required in (
        "sparsec/__init__.py",
        "sparsec/passes/__init__.py",
        "sparsec/exporters/lowering/onnx.py",
        "sparsec/exporters/targets/onnxruntime.py",
        "sparsec/recipes/default.yaml",
    ):
        assert required in names
    packages = [p.relative_to(ROOT).as_posix() for p in (ROOT / "sparsec").rglob("__init__.py")]
    assert [p for p in packages if p not in names] == []  # every subpackage ships (pyproject's package list)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "sparsec = sparsec.cli:main" in text


def test_installed_namespaces_resolve_to_repo_folders():
    import sparsec.exporters
    import sparsec.passes

    assert Path(sparsec.passes.__file__).parent.name == "passes"
    assert Path(sparsec.exporters.__file__).parent.name == "exporters"


def test_ci_runs_the_readme_test_command():
    """`.ci/run` runs exactly the README's test command (lint, format check, import contract, the suite)."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("Run the tests (this is exactly what `.ci/run` runs):", 1)[1].split("```bash\n", 1)[1]
    command = block.split("\n```", 1)[0].strip()
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == command
