"""Fuzzing the command line's input contract: whatever a checkpoint file or a recipe holds, `sparsec` ends in exit 0
(ok), 1 (a quality check failed) or 2 (bad input, named), never 3 (a bug) or a Python traceback, and never leaves
a half-written `--out`. The CLI runs in-process (`main(argv)`); examples are derandomized, so CI runs the same
ones every time."""

import contextlib
import copy
import io
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import make_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsec.cli import main

pytestmark = pytest.mark.slow

FUZZ = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SMALL_CALIBRATION = {"samples": 4, "seq_len": 8, "batch_size": 2, "seed": 0}


def run_cli(argv: list[str]) -> tuple[int, str]:
    """`main(argv)`'s exit code and what it wrote to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def assert_contract(code: int, err: str, out: Path) -> None:
    assert code in (0, 1, 2), err
    assert "Traceback" not in err and "internal error" not in err, err
    assert not out.exists(), "a dry run wrote its --out"
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == [], "staging left behind"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz") / "model"
    make_model("tiny-qwen2").save_pretrained(directory)
    (directory.parent / "recipe.yaml").write_text(yaml.safe_dump({"calibration": SMALL_CALIBRATION}))
    return directory


@FUZZ
@given(data=st.data())
def test_corrupt_checkpoint_files_never_crash(saved, data):
    original = (saved / "model.safetensors").read_bytes()
    header_end = 8 + struct.unpack("<Q", original[:8])[0]
    # mostly in or near the header, where a change is seen; a change in the tensor data is just other weights
    position = st.one_of(st.integers(0, header_end + 64), st.integers(0, header_end), st.integers(0, len(original) - 1))
    kind = data.draw(st.sampled_from(["truncate", "flip", "overwrite"]), label="kind")
    at = data.draw(position, label="at")
    if kind == "truncate":
        corrupted = original[:at]
    elif kind == "flip":
        corrupted = bytearray(original)
        corrupted[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    else:
        junk = data.draw(st.binary(min_size=1, max_size=16), label="bytes")
        corrupted = original[:at] + junk + original[at + len(junk) :]
    with tempfile.TemporaryDirectory() as scratch:
        model = Path(scratch) / "model"
        shutil.copytree(saved, model)
        (model / "model.safetensors").write_bytes(bytes(corrupted))
        out = Path(scratch) / "out"
        recipe = str(saved.parent / "recipe.yaml")
        for argv in (
            ["inspect", "--model", str(model)],
            ["compile", "--model", str(model), "--recipe", recipe, "--dry-run", "--quiet", "--out", str(out)],
        ):
            assert_contract(*run_cli(argv), out)


BASE_RECIPE = {
    "capture": {"batch": 2, "seq": 8, "dynamic": True},
    "calibration": dict(SMALL_CALIBRATION),
    "quality": {"min_cosine": 0.5},
    "passes": [
        {"drop_layers": {"layers": [1], "kind": "block"}},
        {"slice_neurons": {"keep_ratio": 0.5, "importance": "magnitude"}},
    ],
}

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 64),
    st.floats(-2, 2),
    st.sampled_from([float("nan"), float("inf"), -0.0, 1e30]),
    st.text(max_size=6),
    st.lists(st.integers(-2, 6), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(-1, 3), max_size=2),
)


def _paths(value, prefix=()):
    """Every (container, key) path in a nested recipe, containers first."""
    found = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found.append((*prefix, key))
        found += _paths(child, (*prefix, key))
    return found


def _at(recipe, path):
    for key in path:
        recipe = recipe[key]
    return recipe


@st.composite
def mutated_recipes(draw):
    recipe = copy.deepcopy(BASE_RECIPE)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(recipe)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _at(recipe, path[:-1]), path[-1]
        action = draw(st.sampled_from(["delete", "replace", "rename"]))
        if action == "delete":
            del parent[key]
        elif action == "replace":
            parent[key] = draw(JUNK)
        elif isinstance(parent, dict):  # an unknown key, or an unknown pass name
            parent[draw(st.text(min_size=1, max_size=8))] = parent.pop(key)
    return recipe


@FUZZ
@given(recipe=mutated_recipes())
def test_mutated_recipes_never_crash(saved, recipe):
    with tempfile.TemporaryDirectory() as scratch:
        path, out = Path(scratch) / "recipe.yaml", Path(scratch) / "out"
        path.write_text(yaml.safe_dump(recipe))
        assert_contract(*run_cli(["compile", "--recipe", str(path), "--dry-run", "--quiet", "--out", str(out)]), out)
