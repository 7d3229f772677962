"""`compile_model`: model -> capture -> passes (verified, quality-gated) -> program.pt2 + ONNX (+ parity) -> report.

Artifacts are written to a staging directory beside `out_dir` and moved into place only when every step
passed, so a failed quality gate or parity check leaves no model artifact behind (and an earlier
successful output in `out_dir` untouched).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from sparsec import __version__, resources
from sparsec.analysis.regions import block_boundaries
from sparsec.capture import capture
from sparsec.data.calibration import (
    TOKENIZER_DIR,
    check_calibration_file,
    describe_split,
    embedding_sizes,
    load_calibration,
    tokenizer_files,
)
from sparsec.data.parity import ProgramReference
from sparsec.data.quality import describe_quality
from sparsec.errors import SparsecError
from sparsec.exporters.targets import Target, available_targets, get_target
from sparsec.families import entry_points, family_for_directory
from sparsec.models import BUILTIN_PREFIX, load_model, parse_device, parse_dtype
from sparsec.recipe import Recipe
from sparsec.resources import (
    DTYPE_BYTES,
    GiB,
    MemoryEstimate,
    check_fits,
    checkpoint_facts,
    estimate_compile,
    read_json_object,
    release_freed_memory,
)
from sparsec.transform.pass_manager import Pass, PassContext, PassInstrument, PassManager

# and each target's `Target.artifacts`; TOKENIZER_DIR holds the model directory's tokenizer (`_copy_tokenizer`)
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _check_out_dir(out_dir: Path, entry_names: Sequence[str] = ()) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise SparsecError(f"--out {out_dir} exists and is not a directory")
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


def compile_model(
    model: str | Path,
    recipe: Recipe,
    out_dir: str | Path | None,
    *,
    calib: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    dry_run: bool = False,
    target: str = "onnxruntime",
    dtype: str | None = None,
    device: str | None = None,
    lazy: bool | None = None,
) -> dict:
    """Compile `model` (a save_pretrained directory or `builtin:NAME`) with `recipe` into `out_dir`.

    Writes `program.pt2` (the transformed program, `torch.export.load`-able; unless `export.pt2: false`), `model.onnx` (unless the
    recipe turns ONNX off), `report.json`, `decisions.json` and `tokenizer/` (the model directory's tokenizer, when
    it has one: `_copy_tokenizer`), and returns the report: report.json's content with
    each pass's `decisions` inline (in the files, they are in decisions.json and the pass record names where,
    `decisions.json#/passes/0`). With `dry_run`, stops after the passes (their decisions, e.g. layer rankings, and
    quality are in the report) and writes nothing. Files and directories get the modes the umask allows.

    Quality gates (`recipe.quality`; a recipe without a `quality:` section gets `QualityGates.default()`) are checked
    after every pass, on the held-out calibration samples (`calibration.holdout`, a fifth by default,
    `CalibrationSet.split`): the passes decide on the other samples and never see these. `report["quality_gates"]`
    records the gates (`QualityGates.describe()`, with `checked`, and `measured_on`: `held_out`, or `decision` with
    `calibration.holdout: 0`), and says `gated: false` when nothing was gated (`quality: {gates: off}`);
    `report["calibration"]["split"]` has each side's samples and tokens (`CalibrationSplit.describe`). A causal LM's
    passes report `perplexity`, `dense_perplexity` and `ppl_ratio` on the held-out samples; `max_ppl_ratio` on any
    other program is refused after capture, before calibration (`QualityGates.check_program`). A synthetic
    calibration set (no file) is split the same way.

    `target`: a registered target's name (`sparsec.exporters.targets`; built-in: `onnxruntime` (CPU),
    `onnxruntime-cuda`, `tensorrt` (also writes `model.engine`), `aotinductor` (writes `model.aoti.pt2`, no ONNX file)),
    checked before any work (`check_target`). The ONNX file is lowered as the target asks (`Target.lowering`: by
    default in `recipe.export.precision`), the target builds its artifact from it, or from the program when
    `Target.builds_from_onnx` is False (`Target.build`), and backend parity (`sparsec.data.parity`) runs the
    artifact on calibration inputs against the program (`Target.parity`).

    `dtype` / `device` (None: the recipe's `model:` section; see `sparsec.models.load_model`): the model loads in
    the checkpoint's dtype by default and every PyTorch step runs in it. A half-precision program lowered for an
    FP32 target is written as FP32 ONNX (weights converted as they are written), and parity uses the tolerances
    of the coarser of the program's and the ONNX file's precision. Before loading a checkpoint directory, the
    peak memory is estimated from its headers and printed; a compile whose weights and parity session cannot fit
    in the available memory is refused (`sparsec.resources`).

    Weights read lazily (`lazy`; None decides): a checkpoint directory whose estimated peak exceeds half the
    available memory (`LAZY_ABOVE`) is captured without its weights (`load_model(weights="lazy")`); each pass reads the weights it decides
    from, one tensor at a time, and the tensors it puts in their place (sliced FFNs) are written to scratch files
    in TMPDIR (`Program.spill_to`, removed at the end). Calibration then runs layer by layer and onloads each
    block's weights when the block runs (`Program.run_segmented`): statistics, quality gates and the parity
    reference equal the in-memory ones, with one block's weights in memory instead of the model's. After the
    passes, the transformed program's weights are read into memory to be written (refused first, nothing written,
    when they cannot fit). A weight-only dry run (passes that need no calibration data, `Pass.needs_calibration`:
    `drop_layers` by `layers`, `slice_neurons` by `magnitude` or `random`; no `quality:` gates of the recipe's own)
    never runs the model: calibration is skipped, the passes report no quality metrics and the default gates are
    reported unchecked (`quality_gates.checked: false`); a 14B model's weight-only dry run fits in 2 GB. Lazy
    reading is for one program on the CPU. `lazy=True` insists (`SparsecError` naming why it cannot), `lazy=False`
    loads the model whole. `report["model"]["weights"]` says which (`lazy` / `memory`).

    With the recipe's `entry_points` (e.g. Janus' `[understanding, generation_step, vq_decode]`, see
    `sparsec.families.janus`), each entry point is captured and compiled as its own program into `out_dir/NAME/`,
    with one `report.json` (per entry point under `entry_points`). Every pass runs on each program it has
    something to change in (`Pass.targets`); weights shared by several programs are changed the same way in
    all of them: the first program decides, later ones repeat its decisions (`Pass.replay`). Calibration:
    `calibration.files[NAME]`, else `calibration.file` (a file holding several programs' inputs serves each
    with the inputs it takes), else synthetic inputs.

    Raises:
        SparsecError: bad model, recipe, calibration data or output directory (before any work where possible).
        QualityError: a quality gate or the backend parity check failed; nothing is written.

    Example::
        report = compile_model("builtin:tiny-qwen2", Recipe.load("recipe.yaml"), "out/")
        report["parity"]["metrics"]["logits"]["cosine"] > 0.9999
        # True
    """
    say = log or (lambda _: None)
    dtype = dtype or recipe.model.dtype
    parse_dtype(dtype)
    device = parse_device(device or recipe.model.device)
    # the targets' checks see the dtype and device the model will have
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, dtype=dtype, device=str(device)))
    if not dry_run:
        if out_dir is None:
            raise SparsecError("an output directory is needed unless dry_run is set")
        out_dir = Path(out_dir)
        _check_out_dir(out_dir, recipe.entry_points)
        check_target(target, recipe)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    blocker = _lazy_blocker(recipe, device)
    if lazy and (blocker or str(model).startswith(BUILTIN_PREFIX)):
        raise SparsecError(
            f"cannot read the weights of {model} lazily: " + (blocker or "a built-in model has no checkpoint files")
        )
    if not str(model).startswith(BUILTIN_PREFIX) and Path(model).is_dir():
        estimate = _memory_estimate(Path(model), recipe, dtype, target if not dry_run and recipe.export.onnx else None)
        if estimate is not None:
            if lazy is None:
                available = resources.available_memory()
                lazy = blocker is None and available is not None and estimate.total > LAZY_ABOVE * available
            shown = estimate.lazy() if lazy else estimate
            say(
                f"[sparsec] {shown.describe()}"
                + (
                    f" with weights read lazily, until the transformed program is read to be written (weights in"
                    f" memory: {estimate.total / GiB:.1f} GiB)"
                    if lazy
                    else ""
                )
                + f"; {_available()} available"
            )
            check_fits(shown, f"compiling {model}", could_read_lazily=not lazy and not blocker)
    lazy = bool(lazy)
    runs_model = not lazy or _runs_model(recipe, dry_run)
    _check_calibration_files(model, recipe, calib)

    say(
        f"[sparsec] loading {model}"
        + (
            " (weights read lazily from its files: "
            + ("each block's when it runs" if runs_model else "nothing needs to run the model")
            + ")"
            if lazy
            else ""
        )
    )
    t = time.perf_counter()
    loaded = load_model(model, dtype=dtype, device=device, weights="lazy" if lazy else True)
    times["load"] = time.perf_counter() - t
    n_params = sum(p.numel() for p in loaded.model.parameters())
    model_facts = {
        "source": loaded.name,
        "family": loaded.family.name,
        "class": type(loaded.model).__name__,
        "parameters": n_params,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(device),
        "weights": "lazy" if lazy else "memory",
    }
    units = _units(loaded, recipe, calib)
    tokenizer_dir = loaded.directory

    say(f"[sparsec] capturing ({loaded.family.name}, {n_params:,} parameters)")
    t = time.perf_counter()
    spill = Path(tempfile.mkdtemp(prefix="sparsec-spill-")) if lazy else None  # TMPDIR, removed at the end
    try:
        for unit in units:
            unit.capture(recipe)
            loaded.attach_weights(unit.program)  # lazy: read from the files; loaded: snapshots refer to them
            if lazy:
                unit.program.spill_to(spill)  # sliced weights go to scratch files, not into memory
        times["capture"] = time.perf_counter() - t
        for unit in units:
            if not runs_model:
                unit.report["calibration"] = {
                    "skipped": "weights read lazily: no pass needs data and the recipe sets no quality gate, "
                    "so the model is not run (no quality metrics)"
                }
                continue
            unit.load_calibration(loaded, recipe, say, onload=lazy)
            unit.entry = None  # the program holds what it needs: drop the model, so weights a pass replaces are freed
        del loaded
        release_freed_memory()

        say(
            f"[sparsec] running {len(recipe.passes)} pass(es)"
            + (f" on {len(units)} entry points" if recipe.entry_points else "")
        )
        t = time.perf_counter()
        decided: dict[int, list[tuple[list[str], Any]]] = {}  # recipe pass -> (targets, decisions) per program so far
        for unit in units:
            unit.run_passes(recipe, decided, progress, say)
        times["passes"] = time.perf_counter() - t
        if lazy and not dry_run:
            t = time.perf_counter()
            for unit in units:
                _check_materialized_fits(unit.program, recipe, target)
                say(
                    f"[sparsec] reading the transformed program's {unit.program.parameter_bytes() / GiB:.1f} GiB of weights"
                )
                unit.program.materialize()  # what the program holds now: kept weights and the spilled ones
                release_freed_memory()
            times["read"] = time.perf_counter() - t
    finally:
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)

    report: dict[str, Any] = {
        "sparsec": __version__,
        "model": model_facts,
        "recipe": recipe.source,
        "target": None if dry_run else target,
        "quality_gates": _gates_report(recipe, not runs_model),
    }
    report.update(_program_reports(units, recipe))
    if dry_run:
        report["seconds"] = {k: round(v, 3) for k, v in {**times, "total": time.perf_counter() - t0}.items()}
        return json.loads(json.dumps(report, default=_jsonable))  # the same plain-JSON form as report.json

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for unit in units:
            directory = stage / unit.name if recipe.entry_points else stage
            directory.mkdir(exist_ok=True)
            _copy_tokenizer(tokenizer_dir, directory)
            unit.write(directory, recipe, get_target(target), times, say)
        report.update(_program_reports(units, recipe))  # now with export, parity and artifacts
        times["total"] = time.perf_counter() - t0
        report["seconds"] = {k: round(v, 3) for k, v in times.items()}
        report = json.loads(json.dumps(report, default=_jsonable))
        written, decisions = _split_decisions(report)
        (stage / "report.json").write_text(json.dumps(written, indent=2) + "\n")
        (stage / "decisions.json").write_text(json.dumps(decisions) + "\n")
        _make_readable(stage)
        _move_into_place(stage, out_dir)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    say(f"[sparsec] wrote {out_dir}/ in {times['total']:.1f}s")
    return report


class _Unit:
    """One program being compiled: the model's forward, or one of its entry points."""

    def __init__(self, name: str, entry, calib: str | Path | None) -> None:
        self.name = name
        self.entry = entry
        self.calib = calib
        self.program = None
        self.calibration = None
        self.split = None
        self.captured_parameters = 0
        self.report: dict[str, Any] = {}

    def capture(self, recipe: Recipe) -> None:
        shape = recipe.capture
        example = self.entry.example_inputs(shape.batch, shape.seq)
        dynamic = self.entry.dynamic_dims if shape.dynamic else False
        self.program = capture(self.entry.module, example, dynamic=dynamic, family=self.entry.family, tags=recipe.tags)
        recipe.quality.check_program(self.program)
        self.captured_parameters = self.program.num_parameters()
        self.report["capture"] = {
            "example_shapes": {k: list(v.shape) for k, v in example.items()},
            "dynamic_dims": self.program.dynamic_dims,
            "dim_bounds": self.program.dim_bounds,
            "ops": sum(1 for n in self.program.graph.nodes if n.op == "call_function"),
        }

    def load_calibration(self, loaded, recipe: Recipe, say: Callable[[str], None], onload: bool = False) -> None:
        """The program's calibration set, split into the samples the passes decide on and those the gates measure on
        (`calibration.holdout`); layer-sequential with `calibration.sequential`, or `onload` (weights read lazily:
        each block's are read when it runs, `Program.run_segmented`)."""
        cal = recipe.calibration
        self.calibration = load_calibration(
            self.calib,
            input_names=self.program.input_names,
            synthetic=self.entry.example_inputs(cal.samples, cal.seq_len, cal.seed + 1),
            tokenizer_dir=loaded.directory,
            samples=cal.samples,
            seq_len=cal.seq_len,
            batch_size=cal.batch_size,
            vocab=embedding_sizes(self.program),
            static_shapes=None if self.program.dynamic_dims else self.report["capture"]["example_shapes"],
        )
        if cal.sequential or onload:
            self.calibration.cuts = block_boundaries
        self.split = self.calibration.split(cal.holdout, cal.seed)
        label = f"[sparsec] calibration{f' ({self.name})' if recipe.entry_points else ''}"
        if self.calibration.synthetic:
            say(
                f"{label}: {self.calibration.source}: no calibration file given, so importance scores are "
                "not meaningful (pass --calib FILE)"
            )
        else:
            say(f"{label}: {len(self.calibration)} samples from {self.calibration.source}")
        say(f"{label}: {describe_split(self.split.describe())}")
        self.report["calibration"] = {**self.calibration.describe(), "split": self.split.describe()}

    def run_passes(
        self,
        recipe: Recipe,
        decided: dict[int, list[tuple[list[str], Any]]],
        progress: bool,
        say: Callable[[str], None],
    ) -> None:
        """Run the recipe's passes; a pass repeats earlier programs' decisions on the weights it shares with them."""
        ran: list[tuple[Pass, list[str] | None]] = []
        skipped: list[str] = []

        def prepare(p: Pass, program) -> Pass | None:
            targets = p.targets(program) if recipe.entry_points else None
            if targets is not None and not targets:
                skipped.append(p.name)
                return None
            run = p
            for earlier_targets, decisions in decided.get(id(p), []) if targets else []:
                shared = sorted(set(targets) & set(earlier_targets))
                if shared:
                    say(
                        f"[sparsec]   {p.name} ({self.name}): repeating the decisions on {len(shared)} shared target(s)"
                    )
                    run = p.replay(decisions, shared)
                    break
            ran.append((p, targets))
            return run

        split = self.split
        ctx = PassContext(calibration=split and split.decision, seed=recipe.calibration.seed, progress=progress)
        label = f" ({self.name})" if recipe.entry_points else ""
        records = PassManager(
            recipe.passes,
            gates=recipe.quality,
            prepare=prepare,
            instruments=[_PassProgress(say, label)],
            holdout=split and split.holdout,
        ).run(self.program, ctx)
        for (p, targets), record in zip(ran, records):
            if targets:
                decided.setdefault(id(p), []).append((targets, record.decisions))
        self.report["passes"] = [r.__dict__ for r in records]
        if skipped:
            self.report["passes_skipped"] = {name: "nothing to change in this program" for name in skipped}
        self.report["parameters"] = {"before": self.captured_parameters, "after": self.program.num_parameters()}

    def write(
        self, directory: Path, recipe: Recipe, target: Target, times: dict[str, float], say: Callable[[str], None]
    ) -> None:
        """program.pt2 (unless `export.pt2: false`), model.onnx (lowered as `target` asks; none for a target that
        builds from the program, `Target.builds_from_onnx`), the target's artifact, and backend parity, which
        releases the program (`self.program` is None afterwards)."""
        label = f" ({self.name})" if recipe.entry_points else ""
        if recipe.export.pt2:
            say(f"[sparsec] saving program.pt2{label}")
            self.program.save(directory / "program.pt2")
        export, lowering = recipe.export, target.lowering(recipe)
        program_precision = _program_precision(self.program)
        t = time.perf_counter()
        onnx_path = None
        if target.builds_from_onnx:
            if not export.onnx:
                self._record_artifacts(directory)
                return
            onnx_path = self._export_onnx(directory, export, lowering, program_precision, label, say)
            times["export"] = times.get("export", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
        self.report.update(
            target.build(
                self.program,
                onnx_path,
                directory,
                recipe,
                self.calibration,
                log=lambda line: say(f"[sparsec] {line}{label}"),
            )
        )
        times["build"] = times.get("build", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        say(f"[sparsec] checking --target {target.name} against PyTorch on calibration inputs{label}")
        parity_precision = max(program_precision, lowering.precision, key=PRECISION_ORDER.index)
        reference = ProgramReference(self.program, self.calibration, export.parity.samples, release=self._release)
        self.report["parity"] = target.parity(reference, directory, export.parity, parity_precision)
        times["parity"] = times.get("parity", 0.0) + time.perf_counter() - t
        self._record_artifacts(directory)

    def _export_onnx(
        self,
        directory: Path,
        export: Any,
        lowering: Any,
        program_precision: str,
        label: str,
        say: Callable[[str], None],
    ) -> Path:
        """`model.onnx` in `directory`, lowered as the target asks (`lowering`); the export facts go in the report."""
        from sparsec.exporters.lowering.onnx import export_onnx

        onnx_path = directory / "model.onnx"
        upcast = program_precision != "fp32" and lowering.precision != program_precision
        convert = lowering.precision not in ("fp32", program_precision)
        say(f"[sparsec] exporting ONNX{label} (torch.onnx.export, dynamo)")
        fp32_path = directory / "model.fp32.onnx" if convert else onnx_path
        self.report["export"] = export_onnx(
            self.program,
            fp32_path,
            opset=export.opset,
            external_data=export.external_data,
            moe_lowering=export.moe_lowering,
            scatter_reduction=lowering.scatter_reduction,
            upcast=upcast,
        )
        if convert:
            from sparsec.exporters.lowering.precision import convert_precision

            say(f"[sparsec] converting ONNX to {lowering.precision} (norms, softmax, router kept fp32){label}")
            self.report["export"]["precision"] = convert_precision(
                fp32_path, onnx_path, lowering.precision, keep_ops=export.keep_fp32
            )
            for path in (fp32_path, fp32_path.with_name(fp32_path.name + ".data")):
                path.unlink(missing_ok=True)
            data = onnx_path.with_name(onnx_path.name + ".data")  # the export facts now describe the converted file
            self.report["export"].update(
                path=onnx_path.name,
                external_data=data.name if data.exists() else None,
                bytes=onnx_path.stat().st_size + (data.stat().st_size if data.exists() else 0),
            )
        return onnx_path

    def _release(self) -> None:
        """Drop the program once parity holds its reference outputs: nothing after parity reads it (the report keeps
        plain facts), so its weights are freed before the backend's session opens."""
        self.program = None
        release_freed_memory()

    def _record_artifacts(self, directory: Path) -> None:
        self.report["artifacts"] = {
            p.relative_to(directory).as_posix(): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()
        }


class _PassProgress(PassInstrument):
    """A line when each pass starts and one when it is done (parameters, quality, seconds): a long pipeline
    says where it is as it goes, not after the last pass."""

    def __init__(self, say: Callable[[str], None], label: str) -> None:
        self.say, self.label = say, label

    def before_pass(self, p: Pass, program, ctx: PassContext) -> None:
        self.say(f"[sparsec]   {p.name}{self.label} ...")

    def after_pass(self, p: Pass, program, ctx: PassContext, result, record) -> None:
        release_freed_memory()  # the weights the pass dropped or replaced (and its snapshot of them)
        q = describe_quality(record.quality)
        self.say(
            f"[sparsec]   {record.name}{self.label}: params {record.parameters_before:,} -> "
            f"{record.parameters_after:,}" + (f" ({q})" if q else "") + f", {record.seconds:.1f}s"
        )


LAZY_ABOVE = 0.5
"""`compile_model(lazy=None)` reads weights lazily when the in-memory estimate exceeds this share of the available
memory: the estimate leaves out allocator slack and transient copies, lazy reading gives the same results, and on
the CPU it costs little time next to the model's runs (README "Real-size models")."""

PRECISION_ORDER = ("fp32", "fp16", "bf16")  # finest to coarsest: parity is judged at the coarser of two
_PRECISION_OF = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def _lazy_blocker(recipe: Recipe, device: torch.device) -> str | None:
    """Why this compile needs the weights in memory (None: it can read them lazily; see `compile_model`)."""
    if recipe.entry_points:
        return "the recipe compiles several entry points, which share weights"
    if device.type != "cpu":
        return f"lazily read weights are read onto the CPU, and --device is {device}"
    return None


def _runs_model(recipe: Recipe, dry_run: bool) -> bool:
    """Whether a lazily read compile runs the model: always but for a weight-only dry run (no pass decides from
    calibration data, no `quality:` gates of the recipe's own; the default gates are then reported unchecked)."""
    return (
        not dry_run
        or any(p.needs_calibration() for p in recipe.passes)
        or bool(recipe.quality.gates and not recipe.quality.is_default)
    )


def _gates_report(recipe: Recipe, unrun: bool) -> dict[str, Any]:
    """`QualityGates.describe()`, with `checked: false` and why when the model never ran (a weight-only lazy dry run),
    and `measured_on` when it ran: `held_out` (the calibration samples no pass saw) or `decision` (`calibration.holdout:
    0`: the samples the passes decided on)."""
    gates = recipe.quality.describe()
    if unrun and gates["gated"]:
        gates["checked"] = False
        gates["unchecked"] = "weights read lazily: the model was not run, so these gates could not be checked"
    else:
        gates["checked"] = gates["gated"]
    if not unrun:
        gates["measured_on"] = "held_out" if recipe.calibration.holdout else "decision"
    return gates


def _program_precision(program) -> str:
    """`fp32`, `fp16` or `bf16`: the dtype holding most of the program's floating-point parameter bytes."""
    by_dtype: dict[torch.dtype, int] = {}
    for name in program.parameter_names():
        tensor = program.exported.state_dict[name]  # a meta tensor for a lazily backed one: nothing is read
        if tensor.is_floating_point():
            by_dtype[tensor.dtype] = by_dtype.get(tensor.dtype, 0) + tensor.nbytes
    return _PRECISION_OF.get(max(by_dtype, key=by_dtype.get), "fp32") if by_dtype else "fp32"


def _config(directory: Path) -> dict:
    """The checkpoint directory's config.json as read before the model loads; `SparsecError` unless a JSON object.
    A checkpoint in a layout of its family's own (BAGEL's) has none: its family says the language model's fields."""
    family = family_for_directory(directory)
    if family is not None:
        return family.directory_config(directory)
    fix = "restore it from the model's source or re-save it (model.config.save_pretrained(dir))"
    return read_json_object(directory / "config.json", fix)


def _text_config(config: dict) -> dict:
    """The part of a config describing the (language) model: `text_config`, `llm_config` (the MoT), or all of it."""
    text = config.get("text_config") or config.get("llm_config") or config
    return text if isinstance(text, dict) else config


def _memory_estimate(directory: Path, recipe: Recipe, dtype: str, target: str | None):
    """The compile's `MemoryEstimate` from the checkpoint headers and config.json (None when they say too little)."""
    elements, by_dtype = checkpoint_facts(directory)
    if not elements:
        return None
    config = _config(directory)
    text = _text_config(config)
    load_bytes = DTYPE_BYTES[dtype] if dtype != "auto" else max(1, round(sum(by_dtype.values()) / elements))
    session = 0
    if target is not None:
        file_bytes = elements * _onnx_bytes_per_element(recipe, target)
        session = _parity_session_bytes(file_bytes, recipe, int(text.get("num_hidden_layers") or 1))
    cal = recipe.calibration
    return estimate_compile(
        elements,
        load_bytes,
        parity_session=session,
        calibration_tokens=cal.samples * cal.seq_len,
        batch_tokens=min(cal.batch_size, cal.samples) * cal.seq_len,
        output_width=int(text.get("vocab_size") or config.get("vocab_size") or 0),
        hidden=int(text.get("hidden_size") or 0),
        layers=int(text.get("num_hidden_layers") or 0),
    )


def _onnx_bytes_per_element(recipe: Recipe, target: str) -> int:
    """Bytes per weight in the ONNX file the target lowers to: 4 for FP32, else 2."""
    return 4 if get_target(target).lowering(recipe).precision == "fp32" else 2


def _parity_session_bytes(file_bytes: int, recipe: Recipe, layers: int) -> int:
    """The parity session's bytes for an ONNX file of `file_bytes`: the whole model's, or one block's where parity
    will run block by block (`parity_mode_for`, as the ONNX Runtime target decides)."""
    from sparsec.exporters.targets.onnxruntime import SESSION_BYTES_PER_FILE_BYTE, parity_mode_for

    mode = parity_mode_for(file_bytes, recipe.export.parity.mode, resources.available_memory())
    return int(SESSION_BYTES_PER_FILE_BYTE * (file_bytes if mode == "whole" else file_bytes // max(layers, 1)))


def _check_materialized_fits(program, recipe: Recipe, target: str) -> None:
    """Before a lazily read program's weights are read into memory for writing: `SparsecError` (exit 2, nothing
    written) when they and the parity session cannot fit in the memory available now."""
    weights = program.parameter_bytes()
    session = 0
    if recipe.export.onnx and get_target(target).builds_from_onnx:
        file_bytes = program.num_parameters() * _onnx_bytes_per_element(recipe, target)
        session = _parity_session_bytes(file_bytes, recipe, max(len(block_boundaries(program)), 1))
    check_fits(MemoryEstimate(weights, 0, session), "writing the transformed program")


def _available() -> str:
    available = resources.available_memory()
    return f"{available / GiB:.1f} GiB" if available is not None else "unknown"


def _program_reports(units: list[_Unit], recipe: Recipe) -> dict[str, Any]:
    """The programs' report sections: at the top level for one program, under `entry_points` for several."""
    if not recipe.entry_points:
        return units[0].report
    return {"entry_points": {u.name: u.report for u in units}}


def _check_calibration_files(model: str | Path, recipe: Recipe, calib: str | Path | None) -> None:
    """Every calibration file the compile will read, checked before the model loads (`check_calibration_file`):
    of a checkpoint directory, text files need its tokenizer and token ids must lie below config.json's
    `vocab_size` (its text model's); each program's own embedding table bounds them again after capture."""
    directory = None if str(model).startswith(BUILTIN_PREFIX) else Path(model)
    vocab = {}
    if directory is not None and ((directory / "config.json").is_file() or family_for_directory(directory)):
        size = _text_config(_config(directory)).get("vocab_size")
        if isinstance(size, int):
            vocab["input_ids"] = size
    files = [calib or recipe.calibration.file, *(recipe.calibration.files or {}).values()]
    for path in dict.fromkeys(f for f in files if f):
        check_calibration_file(path, tokenizer_dir=directory, vocab=vocab)


def _units(loaded, recipe: Recipe, calib: str | Path | None) -> list[_Unit]:
    """The programs to compile: the model's forward, or the recipe's entry points (checked before any work)."""
    entries = dict(entry_points(loaded.model))
    if not recipe.entry_points:
        name, entry = next(iter(entries.items()))
        return [_Unit(name, entry, calib or recipe.calibration.file)]
    unknown = [e for e in recipe.entry_points if e not in entries]
    if unknown:
        raise SparsecError(
            f"entry_points: {unknown} are not entry points of this {loaded.family.name} model; it has {sorted(entries)}"
        )
    files = recipe.calibration.files or {}
    return [
        _Unit(name, entries[name], files.get(name) or calib or recipe.calibration.file) for name in recipe.entry_points
    ]


def _copy_tokenizer(model_dir: Path | None, directory: Path) -> None:
    """Copy the model directory's tokenizer (the `TOKENIZER_FILES` it has, config.json included: transformers picks
    the tokenizer class by its model_type) into `directory/tokenizer/`, so the artifact tokenizes text inputs on its
    own and as the compile did (`sparsec run --calib FILE.txt`). A model without tokenizer files (a built-in) gets none.
    """
    present = tokenizer_files(model_dir)
    if not present:
        return
    (directory / TOKENIZER_DIR).mkdir()
    for name in present:
        shutil.copyfile(model_dir / name, directory / TOKENIZER_DIR / name)


def _split_decisions(report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
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


def _make_readable(stage: Path) -> None:
    """Give the staged directories and files the modes the umask allows (0o777 / 0o666 & ~umask), as a plain
    `mkdir` and `open` would: `tempfile.mkdtemp` made the stage 0o700, which no service account could read."""
    umask = os.umask(0)
    os.umask(umask)
    for directory, _, files in os.walk(stage):
        os.chmod(directory, 0o777 & ~umask)
        for name in files:
            os.chmod(Path(directory) / name, 0o666 & ~umask)


def _move_into_place(stage: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(old)
        os.replace(out_dir, old)
        os.replace(stage, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out_dir)
