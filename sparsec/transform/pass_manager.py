"""Pass infrastructure: the `Pass` contract, the registry, and the `PassManager` that checks every pass.

A pass is a small object in the style of torch.fx's pass infrastructure:

- `Options`: a dataclass of its recipe options (validated before any work starts, see `sparsec.transform.options`);
- `requires(program, ctx) -> plan`: preconditions, checked before anything changes; raise `PassError` naming
  what is missing. What it works out on the way (the FFNs matched, the units to drop, the widths to keep) it
  returns as its *plan* (any object, or None), and the manager hands that plan to `run`: nothing is worked
  out twice, and `run` acts on exactly what `requires` checked;
- `run(program, ctx, plan) -> PassResult`: rewrite `program.graph` in place and say whether anything changed.
  State tensors are replaced (`program.replace_state`, `add_state`), never modified in place;
- `ensures(program, ctx, result)`: postconditions on the rewritten, verified program.

The manager runs passes in stage order (`transform` before `lowering`, recipe order within a stage). After each
modifying pass it recompiles and prunes dead code and unused weights; then its *instruments* (`PassInstrument`,
as in TVM) check and measure it: `VerifyInstrument` (`Program.verify`: lint, shape re-propagation, parameter
bookkeeping; then the pass's `ensures`), `QualityInstrument` (outputs on held-out calibration data, which no pass
sees, against the program as it was before the first pass, and the gates) and `TimingInstrument`; users add
their own (e.g. one that dumps the graph after every pass). Any exception raised while a pass runs, from `requires` to the last
instrument, is re-raised with its type kept and the pass named, with the passes before it
(`after pass 'slice_neurons' (passes before it: drop_layers): shape propagation failed ...`), and the program
is restored to what it was before that pass (`Program.snapshot` / `restore`): a failed gate leaves nothing
half-rewritten.

Example (a custom pass)::

    @register_pass
    class DropDropout(Pass):
        name = "drop_dropout"

        def requires(self, program, ctx):
            return program.graph.find_nodes(op="call_function", target=torch.ops.aten.dropout.default)

        def run(self, program, ctx, plan):
            for n in plan:
                n.replace_all_uses_with(n.args[0])
                program.graph.erase_node(n)
            return PassResult(modified=bool(plan), stats={"removed": len(plan)})
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NoReturn

from sparsec.data.calibration import CalibrationSet, StatisticsCache
from sparsec.data.quality import QualityGates, compare_programs, describe_quality
from sparsec.errors import PassError, QualityError, RecipeError, VerificationError
from sparsec.ir.program import Program
from sparsec.registry import Registry
from sparsec.transform.options import as_dict, parse_section

ENTRY_POINT_GROUP = "sparsec.passes"
STAGES = ("transform", "lowering")


@dataclass
class PassResult:
    """What a pass did.

    Attributes:
        modified: whether the graph changed (the manager verifies only then).
        stats: numbers worth reporting (e.g. `{"layers_dropped": 2}`).
        decisions: what the pass chose and why (e.g. per-layer scores): a dataclass of the pass's own (its fields
            the contract, e.g. `DropDecisions`), or plain JSON data. `ensures` reads it as the pass made it; the
            `PassRecord`, report.json and decisions.json hold it as plain data (`plain_decisions`).
    """

    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    decisions: Any = None


def plain_decisions(decisions: Any) -> Any:
    """`decisions` as plain JSON data: a dataclass (nested ones too) as a dict of its fields, where a field that
    defaults to None and is None is left out (an optional entry, absent when it does not apply); lists and
    dicts item by item; anything else as it is."""
    if dataclasses.is_dataclass(decisions) and not isinstance(decisions, type):
        return {
            f.name: plain_decisions(value)
            for f in dataclasses.fields(decisions)
            if not ((value := getattr(decisions, f.name)) is None and f.default is None)
        }
    if isinstance(decisions, list):
        return [plain_decisions(v) for v in decisions]
    if isinstance(decisions, tuple):
        return tuple(plain_decisions(v) for v in decisions)
    if isinstance(decisions, dict):
        return {k: plain_decisions(v) for k, v in decisions.items()}
    return decisions


@dataclass
class PassContext:
    """What passes share: calibration data, cached activation statistics, the dense reference, and a seed.

    Attributes:
        calibration: the calibration samples the passes decide on, or None when the pipeline runs without data.
            In a compile, the held-out samples the quality gates measure on are never here
            (`CalibrationSet.split`, `PassManager(holdout=...)`).
        statistics: per-node activation statistics, collected in one forward pass per request batch.
        reference: the program as it was before the first pass (`Program.frozen_copy`: it shares the weights and
            reads the ones passes replace from the checkpoint, so it costs no memory for them), the teacher of
            recovery training (`distill`); the `PassManager` sets it when it is None and a pass needs it
            (`Pass.needs_reference`).
        seed: for passes with randomness.
    """

    calibration: CalibrationSet | None = None
    statistics: StatisticsCache | None = None
    reference: Program | None = None
    seed: int = 0
    progress: bool = True

    def require_calibration(self, pass_name: str) -> CalibrationSet:
        if self.calibration is None:
            raise PassError(f"pass {pass_name!r} needs calibration data; add a `calibration:` section or --calib FILE")
        return self.calibration


class Pass:
    """Base class for rewrite passes. Subclasses set `name`, optionally `Options` and `stage`."""

    name: ClassVar[str] = ""
    stage: ClassVar[Literal["transform", "lowering"]] = "transform"

    @dataclass
    class Options:
        pass

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("pass either an Options instance or keyword options, not both")
        self.options = (
            options if options is not None else parse_section(self.Options, kwargs, self.name or type(self).__name__)
        )

    @classmethod
    def from_recipe(cls, options: Any, where: str) -> Pass:
        return cls(parse_section(cls.Options, options, where))

    def needs_calibration(self) -> bool:
        """Whether this pass, with its options, decides from calibration data (`requires` asks for it).

        True unless a pass says otherwise; `sparsec.compiler` reads weights lazily (a model too big for memory,
        `compile --dry-run`) only when no pass needs data. A pass that overrides it asks for data exactly then.
        """
        return True

    def needs_reference(self) -> bool:
        """Whether this pass, with its options, reads `PassContext.reference` (the dense program: recovery
        training). False unless a pass says otherwise; the `PassManager` keeps a reference only when some pass
        needs it, since on a device it holds the weights the passes replace."""
        return False

    def requires(self, program: Program, ctx: PassContext) -> Any:
        """Raise `PassError` if the program is not something this pass can rewrite; return the plan for `run`.

        Must not change the program. The plan (None by default) is whatever `run` needs from this analysis.
        """
        return None

    def run(self, program: Program, ctx: PassContext, plan: Any) -> PassResult:
        """Rewrite `program` in place following `plan` (what `requires` returned just before)."""
        raise NotImplementedError

    def ensures(self, program: Program, ctx: PassContext, result: PassResult) -> None:
        """Raise `PassError` if the rewritten program lacks a property this pass promises."""

    def targets(self, program: Program) -> list[str] | None:
        """Module paths this pass would change in `program`, for compiling several entry points that share
        weights (`sparsec.compiler`): `[]` skips the pass for that program (nothing to change there); the
        default `None` runs it on every entry point on its own. A pass that returns paths implements `replay`."""
        return None

    def replay(self, decisions: Any, shared: list[str]) -> Pass:
        """A pass that repeats `decisions` (this pass's `PassResult.decisions` in another entry point) on the
        `shared` target paths, so weights shared by entry points are changed the same way in every program;
        targets not in `shared` are decided as usual."""
        raise PassError(
            f"{self.name}: cannot repeat its decisions in another entry point, and {shared[:3]} are shared by "
            "several; restrict the pass's `where` to one entry point's weights"
        )

    @classmethod
    def describe_decisions(cls, decisions: Any) -> list[str]:
        """This pass's `PassResult.decisions` as indented lines, for `sparsec compile --dry-run`.

        The default writes each key and its value, long lists summarised as `<N items>` (decisions.json has them
        in full), and a list of records (one per FFN) as a table of their plain values (`table_lines`); a pass
        whose decisions read better otherwise overrides it (`drop_layers`: its ranking).
        """
        if not isinstance(decisions, dict):
            decisions = {"decisions": decisions}
        lines = []
        for key, value in decisions.items():
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                lines.append(f"  {key}:")
                lines += table_lines([_plain_columns(compact(v)) for v in value], indent=4)
            else:
                lines.append(f"  {key}: {compact(value)}")
        return lines

    def __repr__(self) -> str:
        return f"{type(self).__name__}({as_dict(self.options)})"


def compact(value: Any, limit: int = 8) -> Any:
    """`value` with lists longer than `limit` (kept indices, expert membership) as `<N items>` and floats to 6
    significant digits: decisions short enough to read."""
    if isinstance(value, dict):
        return {k: compact(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return f"<{len(value)} items>" if len(value) > limit else [compact(v, limit) for v in value]
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


def _plain_columns(record: dict, prefix: str = "") -> dict[str, Any]:
    """`record`'s scalar values, nested records flattened (`importance.min`); lists and `<N items>` left out."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_plain_columns(value, f"{prefix}{key}."))
        elif not isinstance(value, list) and not (isinstance(value, str) and value.endswith(" items>")):
            out[f"{prefix}{key}"] = value
    return out


def table_lines(rows: Sequence[Mapping[str, Any]], width: int = 100, indent: int = 0) -> list[str]:
    """`rows` (records with the same keys) as aligned text columns no wider than `width`: columns that do not
    fit go to a further table below, which repeats the first column (the row's name).

    Example:
        >>> print("\\n".join(table_lines([{"pass": "drop_layers", "params": "181,312 -> 144,192"}])))
        pass         params
        drop_layers  181,312 -> 144,192
    """
    if not rows:
        return []
    keys = list(dict.fromkeys(k for row in rows for k in row))
    cells = {k: [k] + ["" if row.get(k) is None else str(row.get(k)) for row in rows] for k in keys}
    widths = {k: max(len(c) for c in cells[k]) for k in keys}
    groups: list[list[str]] = []
    for key in keys[1:]:
        if groups and indent + sum(widths[k] + 2 for k in [keys[0], *groups[-1], key]) - 2 <= width:
            groups[-1].append(key)
        else:
            groups.append([key])
    lines = []
    for group in groups or [[]]:
        columns = [keys[0], *group]
        for i in range(len(rows) + 1):
            lines.append(" " * indent + "  ".join(cells[k][i].ljust(widths[k]) for k in columns).rstrip())
    return lines


# ----- registry -------------------------------------------------------------------------------------------
def _checked_pass(cls: Any, others: Mapping[str, type[Pass]]) -> type[Pass]:
    if not (isinstance(cls, type) and issubclass(cls, Pass)) or not cls.name:
        raise TypeError(f"register_pass takes a Pass subclass with a non-empty `name`, got {cls!r}")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass")
    return cls


PASS_REGISTRY: Registry[type[Pass]] = Registry(
    "pass", "passes", group=ENTRY_POINT_GROUP, prepare=_checked_pass, error=RecipeError
)
register_pass = PASS_REGISTRY.register  # `@register_pass`, `register_pass(cls)`, `register_pass(cls, replace=True)`
get_pass = PASS_REGISTRY.get


def available_passes() -> dict[str, type[Pass]]:
    """All registered passes by name, sorted: built-ins and installed packages (the `sparsec.passes` entry-point
    group), `register_pass` calls."""
    return dict(sorted(PASS_REGISTRY.items().items()))


# ----- manager --------------------------------------------------------------------------------------------
@dataclass
class PassRecord:
    """One pass's entry in the report."""

    name: str
    options: dict[str, Any]
    modified: bool
    parameters_before: int
    parameters_after: int
    removed_state: list[str]
    stats: dict[str, Any]
    decisions: Any
    quality: dict[str, dict[str, float]] | None
    seconds: float
    unchecked: str | None = None  # why the gates were not checked after this modifying pass (no data to run on)


# ----- instruments ----------------------------------------------------------------------------------------
class PassInstrument:
    """Hooks around every pass the `PassManager` runs (TVM's pass instruments); subclass and override either.

    `before_pass` runs before the pass's `requires`; `after_pass` after its `run`, recompile and prune, with
    the pass's result and its record, which an instrument may complete (the built-in ones set `quality` and
    `seconds`). Instruments nest: `before_pass` is called in list order and `after_pass` in reverse, so the
    first instrument is the outermost. An exception from a hook fails the pass like any other (re-raised
    naming the pass; the program restored).

    Example (dump the graph after every pass)::

        class DumpGraph(PassInstrument):
            def __init__(self, directory):
                self.directory, self.count = Path(directory), 0

            def after_pass(self, p, program, ctx, result, record):
                self.count += 1
                (self.directory / f"{self.count:02d}_{p.name}.txt").write_text(str(program.graph))

        PassManager(passes, instruments=[DumpGraph()]).run(program, ctx)
    """

    def before_pass(self, p: Pass, program: Program, ctx: PassContext) -> None:
        """Called before the pass's `requires`."""

    def after_pass(self, p: Pass, program: Program, ctx: PassContext, result: PassResult, record: PassRecord) -> None:
        """Called after the pass's `run`, recompile and prune (inner instruments' `after_pass` already ran)."""


class TimingInstrument(PassInstrument):
    """Sets `record.seconds`: wall time from before `requires` to after the inner instruments' checks."""

    def __init__(self) -> None:
        self._start = 0.0

    def before_pass(self, p: Pass, program: Program, ctx: PassContext) -> None:
        self._start = time.perf_counter()

    def after_pass(self, p: Pass, program: Program, ctx: PassContext, result: PassResult, record: PassRecord) -> None:
        record.seconds = round(time.perf_counter() - self._start, 3)


class QualityInstrument(PassInstrument):
    """After every modifying pass, compares the outputs on `calibration` (the held-out samples, or the passes' own
    data without a split) with `reference` (the program's outputs on it before the first pass) into
    `record.quality` (`compare_programs`: agreement metrics, and perplexity for a causal LM), and raises
    `QualityError` when `gates` fail."""

    def __init__(self, calibration: CalibrationSet, reference: Sequence[dict], gates: QualityGates | None) -> None:
        self.calibration = calibration
        self.reference = reference
        self.gates = gates

    def after_pass(self, p: Pass, program: Program, ctx: PassContext, result: PassResult, record: PassRecord) -> None:
        if not result.modified:
            return
        record.quality = compare_programs(program, self.calibration, self.reference, progress=ctx.progress)
        failures = self.gates.failures(record.quality) if self.gates is not None else []
        if failures:
            raise QualityError(
                "quality gate failed: "
                + "; ".join(failures)
                + f" (measured on {self.calibration.num_tokens()} tokens: {describe_quality(record.quality)})"
                + ". Relax the recipe's `quality:` gates or make the pass less aggressive"
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


class VerifyInstrument(PassInstrument):
    """After every modifying pass, `Program.verify()` (the IR's invariants); then the pass's own `ensures`."""

    def after_pass(self, p: Pass, program: Program, ctx: PassContext, result: PassResult, record: PassRecord) -> None:
        if result.modified:
            program.verify()
        p.ensures(program, ctx, result)


# ----- manager --------------------------------------------------------------------------------------------
class PassManager:
    """Runs passes in order; instruments verify, gate and time each one; a failed pass leaves no trace.

    Args:
        passes: pass instances; stably sorted by stage (`transform`, then `lowering`).
        gates: quality thresholds checked after every pass (None: metrics are reported, nothing gated). Gates the
            caller set (not `QualityGates.default()`) with no data to measure on (no `holdout`, no
            `ctx.calibration`) are refused (`RecipeError`) before any pass runs; the default gates are then left
            unchecked, and every record says so (`PassRecord.unchecked`).
        verify: verify the program after every modifying pass and check the pass's `ensures` (the
            `VerifyInstrument`; leave on, off only to profile).
        prepare: called right before each pass with the program as it is then; returns the pass to run (e.g.
            one repeating decisions made in another entry point) or None to skip it.
        instruments: extra `PassInstrument`s, outside the built-in ones: their `after_pass` sees the program
            verified and the record complete.
        holdout: the calibration samples the quality checks run on (`CalibrationSplit.holdout`): no pass sees them
            (`ctx.calibration` holds the others), so the gates judge the passes on data they did not decide on.
            None: the checks run on `ctx.calibration`, the data the passes decided on.

    Example::

        split = calib.split(0.2, seed=0)
        manager = PassManager([DropDropout()], gates=QualityGates(min_cosine=0.99), holdout=split.holdout)
        records = manager.run(program, PassContext(calibration=split.decision))
    """

    def __init__(
        self,
        passes: Iterable[Pass],
        gates: QualityGates | None = None,
        verify: bool = True,
        prepare: Callable[[Pass, Program], Pass | None] | None = None,
        instruments: Iterable[PassInstrument] = (),
        holdout: CalibrationSet | None = None,
    ) -> None:
        passes = list(passes)
        self.passes: list[Pass] = sorted(passes, key=lambda p: STAGES.index(p.stage))
        self.gates = gates
        self.holdout = holdout
        self.verify = verify
        self.prepare = prepare
        self.instruments = list(instruments)

    def run(self, program: Program, ctx: PassContext | None = None) -> list[PassRecord]:
        """Run every pass on `program` in place; return their records. Raises what a pass raised, naming it."""
        ctx = ctx or PassContext()
        measured_on = self.holdout if self.holdout is not None else ctx.calibration
        gated = self.gates is not None and self.gates.gates and self.gates.bounds_set()
        if gated:
            self.gates.check_program(program)
            if measured_on is None and not self.gates.is_default:
                raise RecipeError(
                    "quality gates are set, and there is no calibration data to check them on; give calibration "
                    "data (PassContext(calibration=...), or the compile's calibration) or drop the gates"
                )
        if ctx.calibration is not None and ctx.statistics is None:
            ctx.statistics = StatisticsCache(program, ctx.calibration, progress=ctx.progress)
        if ctx.reference is None and any(p.needs_reference() for p in self.passes):
            ctx.reference = program.frozen_copy()
        instruments = [*self.instruments, TimingInstrument()]
        if measured_on is not None and self.passes:
            reference = measured_on.reference_outputs(program, progress=ctx.progress)
            instruments.append(QualityInstrument(measured_on, reference, self.gates))
        elif gated:
            instruments.append(_Unchecked())
        if self.verify:
            instruments.append(VerifyInstrument())
        records: list[PassRecord] = []
        for p in self.passes:
            ran = [r.name for r in records]
            try:
                chosen = self.prepare(p, program) if self.prepare is not None else p
            except Exception as exc:
                _reraise(exc, f"before pass {p.name!r}", ran)
            if chosen is not None:
                records.append(self._run_one(chosen, program, ctx, instruments, ran))
        return records

    def _run_one(
        self, p: Pass, program: Program, ctx: PassContext, instruments: list[PassInstrument], ran: list[str]
    ) -> PassRecord:
        snapshot = program.snapshot()
        phase = "in"
        try:
            for instrument in instruments:
                instrument.before_pass(p, program, ctx)
            before = program.num_parameters()
            state_before = set(program.state_placeholders())
            plan = p.requires(program, ctx)
            result = p.run(program, ctx, plan)
            if not isinstance(result, PassResult):
                raise PassError(f"run() returned {type(result).__name__}; it must return a PassResult")
            changed = program.changed_in_place(snapshot)
            if changed:
                raise VerificationError(
                    f"the pass changed state tensors in place ({changed[:5]}); replace them with "
                    "program.replace_state(name, new_tensor) instead, so that a failed pass can be undone"
                )
            phase = "after"
            if result.modified:
                program.recompile()
                program.prune()
            record = PassRecord(
                name=p.name,
                options=as_dict(p.options),
                modified=result.modified,
                parameters_before=before,
                parameters_after=program.num_parameters(),
                removed_state=sorted(state_before - set(program.state_placeholders())),
                stats=result.stats,
                decisions=plain_decisions(result.decisions),
                quality=None,
                seconds=0.0,
            )
            for instrument in reversed(instruments):
                instrument.after_pass(p, program, ctx, result, record)
        except Exception as exc:
            program.restore(snapshot)
            _reraise(exc, f"{phase} pass {p.name!r}", ran)
        return record


def _reraise(exc: Exception, where: str, ran: list[str]) -> NoReturn:
    """Raise `exc` again with `where` and the passes that ran before in front of its message, type kept.

    An exception type whose constructor takes something other than a message is raised as it is, with that text
    as a PEP 678 note: `__notes__` set directly, as `add_note` (Python 3.11+) does, so it works on 3.10 too
    (where tracebacks do not print notes; the CLI's internal-error line does).
    """
    message = f"{where} ({'passes before it: ' + ', '.join(ran) if ran else 'the first pass'}): {exc}"
    try:
        renamed = type(exc)(message)
        renamed.__dict__.update(exc.__dict__)
    except Exception:
        renamed = None
    if renamed is None:
        exc.__notes__ = [*getattr(exc, "__notes__", []), message]
        raise exc
    raise renamed from exc
