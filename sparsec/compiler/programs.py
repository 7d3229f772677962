"""One program of a compile (the model's forward, or one of its entry points) through the stages that act on it:
capture, calibration, passes, and writing (program.pt2, the ONNX file, the target's artifact, backend parity)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sparsec.analysis.architecture import as_report as architecture_report
from sparsec.analysis.regions import block_boundaries
from sparsec.capture import capture
from sparsec.compiler.shared import SharedDecisions
from sparsec.data.calibration import describe_split, embedding_sizes, load_calibration
from sparsec.data.parity import ProgramReference
from sparsec.data.quality import describe_quality
from sparsec.exporters.targets import Target
from sparsec.pipeline import run_passes
from sparsec.recipe import Recipe
from sparsec.resources import release_freed_memory
from sparsec.transform.pass_manager import Pass, PassContext, PassInstrument

PRECISION_ORDER = ("fp32", "fp16", "bf16")  # finest to coarsest: parity is judged at the coarser of two
_PRECISION_OF = {torch.float16: "fp16", torch.bfloat16: "bf16"}


class ProgramCompile:
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
        self, recipe: Recipe, shared: SharedDecisions, *, keep_going: bool, progress: bool, say: Callable[[str], None]
    ) -> None:
        """Run the recipe's passes (`sparsec.pipeline.run_passes`: deciding on the split's decision samples, gated on
        its held-out ones); with entry points, a pass repeats earlier programs' decisions on the weights it shares
        with them (`SharedDecisions`). `keep_going` (a dry run): a failed gate is recorded, the passes go on."""
        label = f" ({self.name})" if recipe.entry_points else ""
        instruments: list[PassInstrument] = [_PassProgress(say, label)]
        decisions = shared.for_program(self.name, say) if recipe.entry_points else None
        if decisions is not None:
            instruments.insert(0, decisions)
        split = self.split
        records = run_passes(
            self.program,
            recipe.passes,
            split and split.decision,
            holdout=split and split.holdout,
            gates=recipe.quality,
            keep_going=keep_going,
            seed=recipe.calibration.seed,
            progress=progress,
            prepare=decisions and decisions.prepare,
            instruments=instruments,
        )
        self.report["passes"] = [r.__dict__ for r in records]
        if decisions is not None and decisions.skipped:
            self.report["passes_skipped"] = {name: "nothing to change in this program" for name in decisions.skipped}
        self.report["parameters"] = {"before": self.captured_parameters, "after": self.program.num_parameters()}
        self.report["architecture"] = architecture_report(self.program)

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


def _program_precision(program) -> str:
    """`fp32`, `fp16` or `bf16`: the dtype holding most of the program's floating-point parameter bytes."""
    by_dtype: dict[torch.dtype, int] = {}
    for name in program.parameter_names():
        tensor = program.exported.state_dict[name]  # a meta tensor for a lazily backed one: nothing is read
        if tensor.is_floating_point():
            by_dtype[tensor.dtype] = by_dtype.get(tensor.dtype, 0) + tensor.nbytes
    return _PRECISION_OF.get(max(by_dtype, key=by_dtype.get), "fp32") if by_dtype else "fp32"
