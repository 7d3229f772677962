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
as in TVM) check and measure it: its own `VerifyInstrument` (`Program.verify`: lint, shape re-propagation,
parameter bookkeeping; then the pass's `ensures`) and `TimingInstrument`, and those the caller composes: checks
(the quality gates on held-out calibration data, `sparsec.pipeline`) and observers (progress lines, a graph dump).
The manager knows nothing of calibration data, quality or presentation: the driver builds the `PassContext`
(statistics included) and the instruments. Any exception raised while a pass runs, from `requires` to the last
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NoReturn

from sparsec.errors import PassError, RecipeError, VerificationError
from sparsec.ir.program import Program
from sparsec.registry import Registry
from sparsec.transform.options import as_dict, parse_section

if TYPE_CHECKING:  # annotations only: the manager never builds or reads calibration data
    from sparsec.data.calibration import CalibrationSet, StatisticsCache

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

    Built by the driver (`sparsec.pipeline.pass_context`), which owns the data; the manager only hands it on.

    Attributes:
        calibration: the calibration samples the passes decide on, or None when the pipeline runs without data.
            In a compile, the held-out samples the quality gates measure on are never here
            (`CalibrationSet.split`, `sparsec.pipeline.run_passes(holdout=...)`).
        statistics: per-node activation statistics over `calibration` and the program being transformed,
            collected in one forward pass per request batch (set whenever `calibration` is).
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({as_dict(self.options)})"


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
    gate_failed: str | None = None  # the failed gates, where the checks record a failure instead of raising (dry run)


# ----- instruments ----------------------------------------------------------------------------------------
class PassInstrument:
    """Hooks around every pass the `PassManager` runs (TVM's pass instruments); subclass and override either.

    `before_pass` runs before the pass's `requires`; `after_pass` after its `run`, recompile and prune, with the
    pass's result and its record, which an instrument may complete (`TimingInstrument` sets `seconds`, the quality
    check of `sparsec.pipeline` `quality`). Instruments nest: `before_pass` is called in list order and `after_pass`
    in reverse, so the first instrument is the outermost. An exception from a hook fails the pass like any other
    (re-raised naming the pass; the program restored).

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


class VerifyInstrument(PassInstrument):
    """After every modifying pass, `Program.verify()` (the IR's invariants); then the pass's own `ensures`."""

    def after_pass(self, p: Pass, program: Program, ctx: PassContext, result: PassResult, record: PassRecord) -> None:
        if result.modified:
            program.verify()
        p.ensures(program, ctx, result)


# ----- manager --------------------------------------------------------------------------------------------
class PassManager:
    """Runs passes in order; instruments verify, check and time each one; a failed pass leaves no trace.

    Args:
        passes: pass instances; stably sorted by stage (`transform`, then `lowering`).
        verify: verify the program after every modifying pass and check the pass's `ensures` (the
            `VerifyInstrument`; leave on, off only to profile).
        prepare: called right before each pass with the program as it is then; returns the pass to run (e.g.
            one repeating decisions made in another entry point) or None to skip it.
        instruments: observers, outermost: their `after_pass` sees the program verified, checked and the record
            complete (its `seconds` included).
        checks: instruments that judge each pass (the quality gates, `sparsec.pipeline`): inside the timing, so
            their time counts as the pass's, and outside the verification, so they measure a verified program.

    Example::

        records = PassManager([DropDropout()], instruments=[DumpGraph("graphs/")]).run(program, PassContext())
    """

    def __init__(
        self,
        passes: Iterable[Pass],
        verify: bool = True,
        prepare: Callable[[Pass, Program], Pass | None] | None = None,
        instruments: Iterable[PassInstrument] = (),
        checks: Iterable[PassInstrument] = (),
    ) -> None:
        passes = list(passes)
        self.passes: list[Pass] = sorted(passes, key=lambda p: STAGES.index(p.stage))
        self.verify = verify
        self.prepare = prepare
        self.instruments = list(instruments)
        self.checks = list(checks)

    def run(self, program: Program, ctx: PassContext | None = None) -> list[PassRecord]:
        """Run every pass on `program` in place; return their records. Raises what a pass raised, naming it."""
        ctx = ctx or PassContext()
        if ctx.calibration is not None and ctx.statistics is None:
            raise TypeError(
                "PassContext(calibration=...) without statistics: build it with sparsec.pipeline.pass_context "
                "(or run the passes with sparsec.pipeline.run_passes)"
            )
        if ctx.reference is None and any(p.needs_reference() for p in self.passes):
            ctx.reference = program.frozen_copy()
        instruments = [*self.instruments, TimingInstrument(), *self.checks]
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
