"""`compile_model`: model -> capture -> passes (verified, quality-gated) -> program.pt2 + ONNX (+ parity) -> report.

The compile is a sequence of named stages (`STAGES`) over one `Compilation`, the state they share and the report
they fill in: `check` (target, output directory, before any work), `memory` (the estimate and lazy reading,
`sparsec.compiler.memory`), `load`, `capture`, `calibrate`, `passes`, `read` (a lazily read program's weights,
before writing) and `write`. The per-program work is `ProgramCompile`'s (`sparsec.compiler.programs`).

Artifacts are written to a staging directory beside `out_dir` and moved into place only when every step
passed, so a failed quality gate or parity check leaves no model artifact behind (and an earlier
successful output in `out_dir` untouched).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsec import __version__
from sparsec.compiler.checks import ARTIFACTS, check_calibration_files, check_out_dir, check_target
from sparsec.compiler.memory import MemoryPlan, check_materialized_fits, plan_memory
from sparsec.compiler.programs import ProgramCompile
from sparsec.compiler.shared import SharedDecisions
from sparsec.compiler.writing import copy_tokenizer, plain_json, write_report
from sparsec.errors import SparsecError
from sparsec.exporters.targets import get_target
from sparsec.families import entry_points
from sparsec.models import load_model, parse_device, parse_dtype
from sparsec.recipe import Recipe
from sparsec.resources import GiB, release_freed_memory
from sparsec.staging import make_readable, move_into_place, signals_as_exceptions, stage_beside

__all__ = ["ARTIFACTS", "STAGES", "Compilation", "Stage", "check_target", "compile_model"]


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

    Writes `program.pt2` (the transformed program, `torch.export.load`-able; unless `export.pt2: false`),
    `model.onnx` (unless the recipe turns ONNX off), `report.json`, `decisions.json` and `tokenizer/` (the model
    directory's tokenizer, when it has one: `writing.copy_tokenizer`), and returns the report: report.json's content
    with each pass's `decisions` inline (in the files, they are in decisions.json and the pass record names where,
    `decisions.json#/passes/0`). With `dry_run`, stops after the passes (their decisions, e.g. layer rankings, and
    quality are in the report) and writes nothing; it checks the target and recipe as the compile does, and a failed
    gate does not stop it: the pass's record says why (`gate_failed`), and the later passes run on the program as
    that pass left it, so every pass's decisions are shown. Files and directories get the modes the umask allows; a
    staging directory beside `out_dir` holds them until every step passed, and is removed on an error, Ctrl-C,
    SIGTERM or SIGHUP (`sparsec.staging`).

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
    peak memory is estimated from its headers and the recipe and printed; a compile whose estimate (weights,
    calibration, parity session) cannot fit in the available memory is refused (`sparsec.resources`).

    Weights read lazily (`lazy`; None decides): a checkpoint directory whose estimated peak exceeds half the
    available memory (`resources.LAZY_ABOVE`) is captured without its weights (`load_model(weights="lazy")`); each
    pass reads the weights it decides from, one tensor at a time, and the tensors it puts in their place (sliced
    FFNs) are written to scratch files in TMPDIR (`Program.spill_to`, removed at the end). Calibration then runs
    layer by layer and onloads each block's weights when the block runs (`Program.run_segmented`): statistics,
    quality gates and the parity reference equal the in-memory ones, with one block's weights in memory instead of
    the model's. After the passes, the transformed program's weights are read into memory to be written (refused
    first, nothing written, when they cannot fit). A weight-only dry run (passes that need no calibration data,
    `Pass.needs_calibration`: `drop_layers` by `layers`, `slice_neurons` by `magnitude` or `random`; no `quality:`
    gates of the recipe's own) never runs the model: calibration is skipped, the passes report no quality metrics
    and the default gates are reported unchecked (`quality_gates.checked: false`); a 14B model's weight-only dry run
    fits in 2 GB. Lazy reading is for one program on the CPU. `lazy=True` insists (`SparsecError` naming why it
    cannot), `lazy=False` loads the model whole. `report["model"]["weights"]` says which (`lazy` / `memory`).

    With the recipe's `entry_points` (e.g. Janus' `[understanding, generation_step, vq_decode]`, see
    `sparsec.families.janus`), each entry point is captured and compiled as its own program into `out_dir/NAME/`,
    with one `report.json` (per entry point under `entry_points`). Every pass runs on each program it has something
    to change in (`ChangesTargets`); weights shared by several programs are changed the same way in all of them: the
    first program decides, later ones repeat its decisions (`Replays`; `sparsec.compiler.shared`). Calibration:
    `calibration.files[NAME]`, else `calibration.file` (a file holding several programs' inputs serves each with the
    inputs it takes), else synthetic inputs.

    Raises:
        SparsecError: bad model, recipe, calibration data or output directory (before any work where possible).
        Terminated: SIGTERM or SIGHUP arrived; nothing is written.
        QualityError: a quality gate or the backend parity check failed; nothing is written.

    Example::
        report = compile_model("builtin:tiny-qwen2", Recipe.load("recipe.yaml"), "out/")
        report["parity"]["metrics"]["logits"]["cosine"] > 0.9999
        # True
    """
    dtype = dtype or recipe.model.dtype
    parse_dtype(dtype)
    device = parse_device(device or recipe.model.device)
    # the targets' checks see the dtype and device the model will have
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, dtype=dtype, device=str(device)))
    if not dry_run and out_dir is None:
        raise SparsecError("an output directory is needed unless dry_run is set")
    compilation = Compilation(
        model=model,
        recipe=recipe,
        out_dir=None if dry_run else Path(out_dir),
        calib=calib,
        target=target,
        dtype=dtype,
        device=device,
        lazy=lazy,
        dry_run=dry_run,
        progress=progress,
        say=log or (lambda _: None),
    )
    with signals_as_exceptions():
        try:
            for stage in STAGES:
                if stage.when(compilation):
                    stage.run(compilation)
        finally:
            compilation.remove_spill()
        return compilation.report()


@dataclass
class ModelFacts:
    """The report's `model` section: what was loaded, and how its weights are held."""

    source: str
    family: str
    model_class: str
    parameters: int
    dtype: str
    device: str
    weights: str  # `lazy` (read from the checkpoint files as needed) or `memory`

    def describe(self) -> dict[str, Any]:
        facts = dataclasses.asdict(self)
        facts["class"] = facts.pop("model_class")
        return {k: facts[k] for k in ("source", "family", "class", "parameters", "dtype", "device", "weights")}


@dataclass
class Compilation:
    """What the stages share: the caller's choices (resolved), what each stage found, and the report's parts."""

    model: str | Path
    recipe: Recipe
    out_dir: Path | None  # None for a dry run
    calib: str | Path | None
    target: str
    dtype: str
    device: torch.device
    lazy: bool | None  # as asked; `memory.lazy` as decided
    dry_run: bool
    progress: bool
    say: Callable[[str], None]
    memory: MemoryPlan | None = None
    loaded: Any = None  # the `LoadedModel`, until calibration no longer needs it
    facts: ModelFacts | None = None
    tokenizer_dir: Path | None = None
    programs: list[ProgramCompile] = field(default_factory=list)
    shared: SharedDecisions = field(default_factory=SharedDecisions)
    spill: Path | None = None  # scratch files of lazily read weights a pass replaced (TMPDIR)
    times: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    written: dict[str, Any] | None = None  # the report as written, once the `write` stage ran

    def report(self) -> dict[str, Any]:
        """The report (plain JSON): the compile's facts, then each program's sections (at the top level for one
        program, under `entry_points` for several), then the seconds each timed stage took."""
        if self.written is not None:
            return self.written
        report: dict[str, Any] = {
            "sparsec": __version__,
            "model": self.facts.describe(),
            "recipe": self.recipe.source,
            "target": None if self.dry_run else self.target,
            "quality_gates": _gates_report(self.recipe, not self.memory.runs_model),
        }
        if self.recipe.entry_points:
            report["entry_points"] = {p.name: p.report for p in self.programs}
        else:
            report.update(self.programs[0].report)
        seconds = {**self.times, "total": time.perf_counter() - self.started}
        report["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        return plain_json(report)

    def remove_spill(self) -> None:
        if self.spill is not None:
            shutil.rmtree(self.spill, ignore_errors=True)
            self.spill = None


@dataclass(frozen=True)
class Stage:
    """A named step of the compile. `timed`: its seconds go to `report["seconds"][name]`; `when`: whether it runs
    in this compile."""

    name: str
    step: Callable[[Compilation], None]
    timed: bool = False
    when: Callable[[Compilation], bool] = lambda c: True

    def run(self, compilation: Compilation) -> None:
        start = time.perf_counter()
        self.step(compilation)
        if self.timed:
            compilation.times[self.name] = time.perf_counter() - start


def _check(c: Compilation) -> None:
    """Before any work: the output directory (not for a dry run, which writes nothing) and the target, which sees the
    recipe as the compile would lower it (a dry run refuses what the compile would)."""
    if c.out_dir is not None:
        check_out_dir(c.out_dir, c.recipe.entry_points)
    check_target(c.target, c.recipe)


def _plan_memory(c: Compilation) -> None:
    parity_target = c.target if not c.dry_run and c.recipe.export.onnx else None
    c.memory = plan_memory(
        c.model,
        c.recipe,
        dtype=c.dtype,
        device=c.device,
        target=parity_target,
        lazy=c.lazy,
        dry_run=c.dry_run,
        say=c.say,
    )
    check_calibration_files(c.model, c.recipe, c.calib)


def _load(c: Compilation) -> None:
    lazy = c.memory.lazy
    how = "each block's when it runs" if c.memory.runs_model else "nothing needs to run the model"
    c.say(f"[sparsec] loading {c.model}" + (f" (weights read lazily from its files: {how})" if lazy else ""))
    c.loaded = load_model(c.model, dtype=c.dtype, device=c.device, weights="lazy" if lazy else True)
    c.facts = ModelFacts(
        source=c.loaded.name,
        family=c.loaded.family.name,
        model_class=type(c.loaded.model).__name__,
        parameters=sum(p.numel() for p in c.loaded.model.parameters()),
        dtype=str(c.loaded.dtype).removeprefix("torch."),
        device=str(c.device),
        weights="lazy" if lazy else "memory",
    )
    c.tokenizer_dir = c.loaded.directory
    c.programs = _programs(c.loaded, c.recipe, c.calib)


def _capture(c: Compilation) -> None:
    c.say(f"[sparsec] capturing ({c.facts.family}, {c.facts.parameters:,} parameters)")
    if c.memory.lazy:
        c.spill = Path(tempfile.mkdtemp(prefix="sparsec-spill-"))  # TMPDIR, removed at the end
    for program in c.programs:
        program.capture(c.recipe)
        c.loaded.attach_weights(program.program)  # lazy: read from the files; loaded: snapshots refer to them
        if c.spill is not None:
            program.program.spill_to(c.spill)  # sliced weights go to scratch files, not into memory


def _calibrate(c: Compilation) -> None:
    for program in c.programs:
        if not c.memory.runs_model:
            program.report["calibration"] = {
                "skipped": "weights read lazily: no pass needs data and the recipe sets no quality gate, "
                "so the model is not run (no quality metrics)"
            }
            continue
        program.load_calibration(c.loaded, c.recipe, c.say, onload=c.memory.lazy)
        program.entry = None  # the program holds what it needs: drop the model, so weights a pass replaces are freed
    c.loaded = None
    release_freed_memory()


def _passes(c: Compilation) -> None:
    c.say(
        f"[sparsec] running {len(c.recipe.passes)} pass(es)"
        + (f" on {len(c.programs)} entry points" if c.recipe.entry_points else "")
    )
    for program in c.programs:
        program.run_passes(c.recipe, c.shared, keep_going=c.dry_run, progress=c.progress, say=c.say)


def _read(c: Compilation) -> None:
    """A lazily read program's weights into memory, to be written (refused first when they cannot fit)."""
    for program in c.programs:
        check_materialized_fits(program.program, c.recipe, c.target)
        c.say(
            f"[sparsec] reading the transformed program's {program.program.parameter_bytes() / GiB:.1f} GiB of weights"
        )
        program.program.materialize()  # what the program holds now: kept weights and the spilled ones
        release_freed_memory()
    c.remove_spill()


def _write(c: Compilation) -> None:
    """Every program's files into a staging directory beside `out_dir`, then report.json and decisions.json, then
    the whole moved into place; the staging directory is removed whatever happens."""
    stage = stage_beside(c.out_dir)
    try:
        for program in c.programs:
            directory = stage / program.name if c.recipe.entry_points else stage
            directory.mkdir(exist_ok=True)
            copy_tokenizer(c.tokenizer_dir, directory)
            program.write(directory, c.recipe, get_target(c.target), c.times, c.say)
        report = c.report()
        write_report(stage, report)
        make_readable(stage)
        move_into_place(stage, c.out_dir)
        c.written = report
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    c.say(f"[sparsec] wrote {c.out_dir}/ in {report['seconds']['total']:.1f}s")


STAGES: tuple[Stage, ...] = (
    Stage("check", _check),
    Stage("memory", _plan_memory),
    Stage("load", _load, timed=True),
    Stage("capture", _capture, timed=True),
    Stage("calibrate", _calibrate),
    Stage("passes", _passes, timed=True),
    Stage("read", _read, timed=True, when=lambda c: c.memory.lazy and not c.dry_run),
    Stage("write", _write, when=lambda c: not c.dry_run),
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


def _programs(loaded, recipe: Recipe, calib: str | Path | None) -> list[ProgramCompile]:
    """The programs to compile: the model's forward, or the recipe's entry points (checked before any work)."""
    entries = dict(entry_points(loaded.model))
    if not recipe.entry_points:
        name, entry = next(iter(entries.items()))
        return [ProgramCompile(name, entry, calib or recipe.calibration.file)]
    unknown = [e for e in recipe.entry_points if e not in entries]
    if unknown:
        raise SparsecError(
            f"entry_points: {unknown} are not entry points of this {loaded.family.name} model; it has {sorted(entries)}"
        )
    files = recipe.calibration.files or {}
    return [
        ProgramCompile(name, entries[name], files.get(name) or calib or recipe.calibration.file)
        for name in recipe.entry_points
    ]
