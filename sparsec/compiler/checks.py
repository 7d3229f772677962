"""What a compile checks before any work: the target, the output directory and the calibration files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sparsec.data.calibration import TOKENIZER_DIR, check_calibration_file
from sparsec.errors import SparsecError
from sparsec.exporters.targets import available_targets, get_target
from sparsec.families import family_for_directory
from sparsec.models import BUILTIN_PREFIX
from sparsec.recipe import Recipe
from sparsec.resources import read_json_object
from sparsec.staging import check_creatable

# and each target's `Target.artifacts`; TOKENIZER_DIR holds the model directory's tokenizer (`copy_tokenizer`)
ARTIFACTS = ("model.onnx", "model.onnx.data", "program.pt2", "report.json", "decisions.json", TOKENIZER_DIR)


def check_target(target: str, recipe: Recipe) -> None:
    """Fail fast, before the model is loaded, when `target` is not registered, cannot run here or does not fit the
    recipe: a target that needs the ONNX file (`Target.needs_onnx`) with `export.onnx: false`, then the target's own
    `Target.check` (e.g. `tensorrt`: the `tensorrt` module, CUDA torch and a GPU). The errors name what is missing
    and how to install it.

    Example::

        check_target("tensorrt", Recipe())
        # SparsecError: --target tensorrt needs TensorRT and an NVIDIA GPU: the Python module `tensorrt` is not ...
    """
    chosen = get_target(target)
    if chosen.needs_onnx and not recipe.export.onnx:
        raise SparsecError(f"--target {target} lowers the ONNX file; the recipe turns it off (export.onnx: false)")
    chosen.check(recipe)


def check_out_dir(out_dir: Path, entry_names: Sequence[str] = ()) -> None:
    """`SparsecError` unless `out_dir` can be created (`check_creatable`) and holds nothing but an earlier sparsec
    output (which the compile replaces)."""
    check_creatable(out_dir, "--out")
    if out_dir.is_dir():
        ours = set(ARTIFACTS).union(*(t.artifacts for t in available_targets().values()))
        foreign = [
            p.name for p in out_dir.iterdir() if p.name not in ours and not (p.is_dir() and p.name in entry_names)
        ]
        if foreign:
            raise SparsecError(
                f"--out {out_dir} holds files sparsec did not write ({foreign[:5]}); "
                "choose an empty or new directory (an earlier sparsec output is replaced)"
            )


def model_config(directory: Path) -> dict:
    """The checkpoint directory's config.json as read before the model loads; `SparsecError` unless a JSON object.
    A checkpoint in a layout of its family's own (BAGEL's) has none: its family says the language model's fields."""
    family = family_for_directory(directory)
    if family is not None:
        return family.directory_config(directory)
    fix = "restore it from the model's source or re-save it (model.config.save_pretrained(dir))"
    return read_json_object(directory / "config.json", fix)


def text_config(config: dict) -> dict:
    """The part of a config describing the (language) model: `text_config`, `llm_config` (the MoT), or all of it."""
    text = config.get("text_config") or config.get("llm_config") or config
    return text if isinstance(text, dict) else config


def check_calibration_files(model: str | Path, recipe: Recipe, calib: str | Path | None) -> None:
    """Every calibration file the compile will read, checked before the model loads (`check_calibration_file`):
    of a checkpoint directory, text files need its tokenizer and token ids must lie below config.json's
    `vocab_size` (its text model's); each program's own embedding table bounds them again after capture."""
    directory = None if str(model).startswith(BUILTIN_PREFIX) else Path(model)
    vocab = {}
    if directory is not None and ((directory / "config.json").is_file() or family_for_directory(directory)):
        size = text_config(model_config(directory)).get("vocab_size")
        if isinstance(size, int):
            vocab["input_ids"] = size
    files = [calib or recipe.calibration.file, *(recipe.calibration.files or {}).values()]
    for path in dict.fromkeys(f for f in files if f):
        check_calibration_file(path, tokenizer_dir=directory, vocab=vocab)
