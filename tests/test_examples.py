"""Every example recipe in examples/ is valid and runs (dry run, tiny model)."""

from pathlib import Path

import pytest

from sparsec.cli import main

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def _model(recipe: Path) -> str:
    """The model named on a `# model: ...` first line, else the default tiny Qwen2."""
    first = recipe.read_text().splitlines()[0]
    return first.split(":", 1)[1].strip() if first.startswith("# model:") else "builtin:tiny-qwen2"


@pytest.mark.parametrize("recipe", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_recipe_runs(recipe, capsys):
    assert main(["compile", "--model", _model(recipe), "--recipe", str(recipe), "--dry-run", "--quiet"]) == 0
    assert "pass " in capsys.readouterr().out
