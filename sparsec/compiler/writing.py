"""The compile's files: the report as plain JSON, its decisions split off into decisions.json, the tokenizer copied."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from sparsec.data.calibration import TOKENIZER_DIR, tokenizer_files


def plain_json(report: dict[str, Any]) -> dict[str, Any]:
    """`report` in report.json's plain-JSON form (tensors as lists, paths as strings, numpy scalars as numbers)."""
    return json.loads(json.dumps(report, default=_jsonable))


def write_report(directory: Path, report: dict[str, Any]) -> None:
    """report.json and decisions.json of `report` (plain JSON) into `directory` (`split_decisions`)."""
    written, decisions = split_decisions(report)
    (directory / "report.json").write_text(json.dumps(written, indent=2) + "\n")
    (directory / "decisions.json").write_text(json.dumps(decisions) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def copy_tokenizer(model_dir: Path | None, directory: Path) -> None:
    """Copy the model directory's tokenizer (the `TOKENIZER_FILES` it has) into `directory/tokenizer/`, so the
    artifact tokenizes text inputs on its own and as the compile did (`sparsec run --calib FILE.txt`). A model
    without tokenizer files (a built-in) gets none.

    config.json is not copied: it describes the model before compression, a trap beside a compressed one (the
    compile's `report.json` states the resulting architecture). transformers reads its `model_type` to pick the
    tokenizer class (over tokenizer_config.json's), so the copy's tokenizer_config.json names the class the model
    directory's tokenizer loads as: the copy loads as that class, with or without config.json. (Where transformers
    cannot load the source's tokenizer, its files are copied as they are.)"""
    present = [name for name in tokenizer_files(model_dir) if name != "config.json"]
    if not present:
        return
    target = directory / TOKENIZER_DIR
    target.mkdir()
    for name in present:
        shutil.copyfile(model_dir / name, target / name)
    from transformers import AutoTokenizer

    try:
        loaded_as = type(AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)).__name__
    except Exception:  # transformers cannot load the source's tokenizer either: the copy is as good as it is
        return
    settings_path = target / "tokenizer_config.json"
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    if settings.get("tokenizer_class") != loaded_as:
        settings_path.write_text(json.dumps({**settings, "tokenizer_class": loaded_as}, indent=2) + "\n")


def split_decisions(report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(report.json's content, decisions.json's content): every pass's `decisions` (kept neuron indices, expert
    partitions: most of a report's bytes) move to decisions.json, in the report's own nesting (`passes`, or
    `entry_points.NAME.passes`), and report.json's pass record names where they are (`decisions.json#/passes/0`,
    a JSON pointer)."""
    written = json.loads(json.dumps(report))
    decisions: dict[str, Any] = {}
    for name, program in written.get("entry_points", {"": written}).items():
        prefix = f"entry_points/{name}/" if name else ""
        held = decisions.setdefault("entry_points", {}).setdefault(name, {}) if name else decisions
        held["passes"] = [p["decisions"] for p in program.get("passes", [])]
        for i, p in enumerate(program.get("passes", [])):
            p["decisions"] = f"decisions.json#/{prefix}passes/{i}"
    return written, decisions
