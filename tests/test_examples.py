"""Every example recipe in examples/ is valid and runs (dry run, tiny model)."""

from pathlib import Path

import pytest

from sparsec.cli import main

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("recipe", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_recipe_runs(recipe, capsys):
    assert main(["compile", "--model", "builtin:tiny-qwen2", "--recipe", str(recipe), "--dry-run", "--quiet"]) == 0
    assert "pass " in capsys.readouterr().out
