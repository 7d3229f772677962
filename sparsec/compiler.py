"""`compile_model`: model -> capture -> passes (verified, quality-gated) -> program.pt2 + ONNX (+ parity) -> report.

Artifacts are written to a staging directory beside `out_dir` and moved into place only when every step
passed, so a failed quality gate or parity check leaves no model artifact behind (and an earlier
successful output in `out_dir` untouched).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .calibration import load_calibration
from .capture import capture
from .errors import SparsecError
from .models import load_model
from .pass_manager import PassContext, PassManager
from .recipe import Recipe

ARTIFACTS = ("model.onnx", "model.onnx.data", "program.pt2", "report.json")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise SparsecError(f"--out {out_dir} exists and is not a directory")
    if out_dir.is_dir():
        foreign = [p.name for p in out_dir.iterdir() if p.name not in ARTIFACTS]
        if foreign:
            raise SparsecError(
                f"--out {out_dir} holds files sparsec did not write ({foreign[:5]}); "
                "choose an empty or new directory (an earlier sparsec output is replaced)"
            )


def compile_model(
    model: str | Path,
    recipe: Recipe,
    out_dir: str | Path | None,
    *,
    calib: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    dry_run: bool = False,
) -> dict:
    """Compile `model` (a save_pretrained directory or `builtin:NAME`) with `recipe` into `out_dir`.

    Writes `program.pt2` (the transformed program, `torch.export.load`-able), `model.onnx` (unless the
    recipe turns ONNX off) and `report.json`, and returns the report. With `dry_run`, stops after the
    passes (their decisions, e.g. layer rankings, and quality are in the report) and writes nothing.

    Raises:
        SparsecError: bad model, recipe, calibration data or output directory (before any work where possible).
        QualityError: a quality gate or the ONNX parity check failed; nothing is written.

    Example:
        >>> report = compile_model("builtin:tiny-qwen2", Recipe.load("recipe.yaml"), "out/")
        >>> report["parity"]["metrics"]["logits"]["cosine"] > 0.9999
        True
    """
    say = log or (lambda _: None)
    if not dry_run:
        if out_dir is None:
            raise SparsecError("an output directory is needed unless dry_run is set")
        out_dir = Path(out_dir)
        _check_out_dir(out_dir)
    times: dict[str, float] = {}
    t0 = time.perf_counter()

    say(f"[sparsec] loading {model}")
    loaded = load_model(model)
    n_params = sum(p.numel() for p in loaded.model.parameters())

    say(f"[sparsec] capturing ({loaded.family.name}, {n_params:,} parameters)")
    t = time.perf_counter()
    example = loaded.family.example_inputs(loaded.model, recipe.capture.batch, recipe.capture.seq)
    program = capture(loaded.model, example, dynamic=recipe.capture.dynamic, family=loaded.family, tags=recipe.tags)
    times["capture"] = time.perf_counter() - t

    cal = recipe.calibration
    calibration = load_calibration(
        calib or cal.file,
        input_names=program.input_names,
        synthetic=loaded.family.example_inputs(loaded.model, cal.samples, cal.seq_len, seed=cal.seed + 1),
        tokenizer_dir=loaded.directory,
        samples=cal.samples,
        seq_len=cal.seq_len,
        batch_size=cal.batch_size,
    )
    if calibration.synthetic:
        say(f"[sparsec] calibration: {calibration.source}: no calibration file given, so importance scores are "
            "not meaningful (pass --calib FILE)")
    else:
        say(f"[sparsec] calibration: {len(calibration)} samples from {calibration.source}")

    say(f"[sparsec] running {len(recipe.passes)} pass(es)")
    t = time.perf_counter()
    ctx = PassContext(calibration=calibration, seed=cal.seed, progress=progress)
    records = PassManager(recipe.passes, gates=recipe.quality).run(program, ctx)
    times["passes"] = time.perf_counter() - t
    for r in records:
        q = "; ".join(f"{o} cos {m['cosine']:.4f}" for o, m in (r.quality or {}).items())
        say(f"[sparsec]   {r.name}: params {r.parameters_before:,} -> {r.parameters_after:,}" + (f" ({q})" if q else ""))

    report: dict[str, Any] = {
        "sparsec": __version__,
        "model": {"source": loaded.name, "family": loaded.family.name, "class": type(loaded.model).__name__,
                  "parameters": n_params},
        "recipe": recipe.source,
        "capture": {
            "example_shapes": {k: list(v.shape) for k, v in example.items()},
            "dynamic_dims": program.dynamic_dims,
            "ops": sum(1 for n in program.graph.nodes if n.op == "call_function"),
        },
        "calibration": calibration.describe(),
        "passes": [r.__dict__ for r in records],
        "parameters": {"before": n_params, "after": program.num_parameters()},
    }
    if dry_run:
        report["seconds"] = {k: round(v, 3) for k, v in {**times, "total": time.perf_counter() - t0}.items()}
        return json.loads(json.dumps(report, default=_jsonable))  # the same plain-JSON form as report.json

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        say("[sparsec] saving program.pt2")
        program.save(stage / "program.pt2")
        if recipe.export.onnx:
            from sparsec.exporters.onnx import export_onnx
            from sparsec.exporters.onnxruntime import check_parity

            say("[sparsec] exporting ONNX (torch.onnx.export, dynamo)")
            t = time.perf_counter()
            report["export"] = export_onnx(program, stage / "model.onnx", opset=recipe.export.opset,
                                           external_data=recipe.export.external_data,
                                           moe_lowering=recipe.export.moe_lowering)
            times["export"] = time.perf_counter() - t
            say("[sparsec] checking ONNX Runtime against PyTorch on calibration inputs")
            t = time.perf_counter()
            parity = recipe.export.parity
            report["parity"] = check_parity(program, stage / "model.onnx", calibration, samples=parity.samples,
                                            min_cosine=parity.min_cosine, max_rel_l2=parity.max_rel_l2)
            times["parity"] = time.perf_counter() - t
        report["artifacts"] = {p.name: p.stat().st_size for p in sorted(stage.iterdir())}
        times["total"] = time.perf_counter() - t0
        report["seconds"] = {k: round(v, 3) for k, v in times.items()}
        text = json.dumps(report, indent=2, default=_jsonable)
        (stage / "report.json").write_text(text + "\n")
        report = json.loads(text)
        _move_into_place(stage, out_dir)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    say(f"[sparsec] wrote {out_dir}/ ({', '.join(report['artifacts'])}) in {times['total']:.1f}s")
    return report


def _move_into_place(stage: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(old)
        os.replace(out_dir, old)
        os.replace(stage, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out_dir)
