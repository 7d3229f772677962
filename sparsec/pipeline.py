"""A pass pipeline over calibration data: the `PassManager` composed with what the data side provides.

The pass infrastructure (`sparsec.transform`) knows nothing of calibration data or quality; this module puts them
together, for the compiler and for anyone running passes from Python:

- `pass_context`: the `PassContext` with the calibration samples the passes decide on and the activation
  statistics over them (`StatisticsCache`, one forward pass per request);
- `quality_checks`: the `QualityInstrument` that measures every modifying pass on held-out samples against the
  program as it was before the first pass (`ReferenceOutputs`: kept while small, else recomputed per batch) and
  applies the gates; gates the caller set with no data to measure on are refused before any pass runs
  (`RecipeError`), the default gates are then reported unchecked;
- `run_passes`: both, around one `PassManager` run.

Example::

    split = calib.split(0.2, seed=0)
    records = run_passes(program, [DropDropout()], split.decision, holdout=split.holdout,
                         gates=QualityGates(min_cosine=0.99))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from sparsec.data.calibration import CalibrationSet, StatisticsCache
from sparsec.data.quality import QualityGates, compare_programs, describe_quality
from sparsec.data.reference import ReferenceOutputs
from sparsec.errors import QualityError, RecipeError
from sparsec.ir.program import Program
from sparsec.transform.pass_manager import Pass, PassContext, PassInstrument, PassManager, PassRecord, PassResult


def pass_context(
    program: Program, calibration: CalibrationSet | None = None, *, seed: int = 0, progress: bool = True
) -> PassContext:
    """The context passes on `program` decide in: `calibration` (None: no data) and its statistics over `program`."""
    statistics = StatisticsCache(program, calibration, progress=progress) if calibration is not None else None
    return PassContext(calibration=calibration, statistics=statistics, seed=seed, progress=progress)


class QualityInstrument(PassInstrument):
    """After every modifying pass, compares the outputs on `calibration` (the held-out samples, or the passes' own
    data without a split) with `reference` (the program's outputs on it before the first pass) into
    `record.quality` (`compare_programs`: agreement metrics, and perplexity for a causal LM), and applies `gates`:
    a failure raises `QualityError` (the manager undoes the pass), or with `keep_going` is written to
    `record.gate_failed` and the pipeline goes on from the program as the pass left it (a dry run shows every
    pass's decisions)."""

    def __init__(
        self,
        calibration: CalibrationSet,
        reference: ReferenceOutputs,
        gates: QualityGates | None,
        keep_going: bool = False,
    ) -> None:
        self.calibration = calibration
        self.reference = reference
        self.gates = gates
        self.keep_going = keep_going

    def after_pass(self, p: Pass, program: Program, ctx: PassContext, result: PassResult, record: PassRecord) -> None:
        if not result.modified:
            return
        record.quality = compare_programs(program, self.calibration, self.reference, progress=ctx.progress)
        failures = self.gates.failures(record.quality) if self.gates is not None else []
        if not failures:
            return
        failed = "; ".join(failures) + f" (measured on {self.calibration.num_tokens()} tokens: "
        failed += describe_quality(record.quality) + ")"
        if self.keep_going:
            record.gate_failed = failed
            return
        raise QualityError(
            f"quality gate failed: {failed}. Relax the recipe's `quality:` gates or make the pass less aggressive"
            + (
                " (these are the default gates of a recipe without a `quality:` section; "
                "`quality: {gates: off}` compiles ungated)."
                if self.gates.is_default
                else "."
            )
        )


class _Unchecked(PassInstrument):
    """Says on every modifying pass's record that the (default) gates were not checked: there was no data."""

    def after_pass(self, p: Pass, program: Program, ctx: PassContext, result: PassResult, record: PassRecord) -> None:
        if result.modified:
            record.unchecked = "no calibration data: the default quality gates were not checked"


def quality_checks(
    program: Program,
    measured_on: CalibrationSet | None,
    gates: QualityGates | None,
    *,
    keep_going: bool = False,
    progress: bool = True,
) -> list[PassInstrument]:
    """The checks that measure and gate every pass on `program` (`PassManager(checks=...)`): a `QualityInstrument`
    on `measured_on` (its reference outputs from the program as it is now, before any pass: computed now and kept
    while small, else recomputed per batch from a frozen copy, `ReferenceOutputs`) when there is data;
    without data, nothing measured, and gates the caller set are refused (`RecipeError`) while the default ones
    are reported unchecked (`PassRecord.unchecked`). A program without perplexity with `max_ppl_ratio` gates is
    refused now (`QualityGates.check_program`)."""
    gated = gates is not None and gates.gates and gates.bounds_set()
    if gated:
        gates.check_program(program)
        if measured_on is None and not gates.is_default:
            raise RecipeError(
                "quality gates are set, and there is no calibration data to check them on; give calibration "
                "data (the compile's calibration, or run_passes(calibration=...)) or drop the gates"
            )
    if measured_on is not None:
        reference = ReferenceOutputs(program, measured_on, progress=progress)
        return [QualityInstrument(measured_on, reference, gates, keep_going=keep_going)]
    return [_Unchecked()] if gated else []


def run_passes(
    program: Program,
    passes: Iterable[Pass],
    calibration: CalibrationSet | None = None,
    *,
    holdout: CalibrationSet | None = None,
    gates: QualityGates | None = None,
    keep_going: bool = False,
    seed: int = 0,
    progress: bool = True,
    prepare: Callable[[Pass, Program], Pass | None] | None = None,
    instruments: Iterable[PassInstrument] = (),
) -> list[PassRecord]:
    """Run `passes` on `program` in place (`PassManager`), deciding on `calibration` and measured and gated on
    `holdout` (the samples no pass sees, `CalibrationSplit.holdout`; None: on `calibration`) by `quality_checks`.
    `prepare` and `instruments` go to the `PassManager`. Returns the records."""
    passes = list(passes)
    ctx = pass_context(program, calibration, seed=seed, progress=progress)
    measured_on = holdout if holdout is not None else calibration
    checks = quality_checks(program, measured_on, gates, keep_going=keep_going, progress=progress) if passes else []
    manager = PassManager(passes, prepare=prepare, instruments=instruments, checks=checks)
    return manager.run(program, ctx)
