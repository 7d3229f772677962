"""Compile's parity options end to end: block-by-block parity, `export.pt2: false`."""

import pytest

from sparsec.compiler import compile_model
from sparsec.errors import RecipeError
from sparsec.recipe import Recipe


@pytest.mark.slow
def test_compile_with_block_parity_and_without_program_pt2(tmp_path):
    recipe = Recipe.from_dict({"export": {"pt2": False, "parity": {"mode": "blocks"}}})
    report = compile_model("builtin:tiny-qwen2", recipe, tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["decisions.json", "model.onnx", "report.json"]
    parity = report["parity"]
    assert parity["mode"] == "blocks" and parity["metrics"]["logits"]["cosine"] > 0.9999
    assert [k for k in parity["blocks"]["metrics"] if k.startswith("model.layers.")] == [
        f"model.layers.{i}" for i in range(4)
    ]
    assert all(m["cosine"] > 0.9999 for m in parity["blocks"]["metrics"].values())


def test_a_recipe_writing_neither_pt2_nor_onnx_is_refused():
    with pytest.raises(RecipeError, match="pt2: false with onnx: false"):
        Recipe.from_dict({"export": {"pt2": False, "onnx": False}})
    assert Recipe.from_dict({"export": {"pt2": False}}).export.pt2 is False


def test_parity_mode_is_validated():
    assert Recipe.from_dict({"export": {"parity": {"mode": "blocks"}}}).export.parity.mode == "blocks"
    with pytest.raises(RecipeError, match="mode"):
        Recipe.from_dict({"export": {"parity": {"mode": "halves"}}})


def test_auto_parity_checks_large_files_block_by_block():
    from sparsec.exporters.targets.onnxruntime import WHOLE_SESSION_MAX_FILE_BYTES as LIMIT
    from sparsec.exporters.targets.onnxruntime import parity_mode_for

    gib = 2**30
    assert parity_mode_for(LIMIT, "auto", 64 * gib) == "whole"
    assert parity_mode_for(LIMIT + 1, "auto", 64 * gib) == "blocks"  # the session would set the compile's peak
    assert parity_mode_for(LIMIT // 2, "auto", LIMIT // 2) == "blocks"  # about twice the file would not fit
    assert parity_mode_for(LIMIT // 2, "auto", None) == "whole"  # memory unknown
    assert parity_mode_for(LIMIT + 1, "whole", 1) == "whole" and parity_mode_for(1, "blocks", None) == "blocks"
