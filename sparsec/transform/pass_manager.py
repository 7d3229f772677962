"""Pass infrastructure: the `Pass` contract, the registry, and the `PassManager` that checks every pass.

A pass is a small object in the style of torch.fx's pass infrastructure:

- `Options`: a dataclass of its recipe options (validated before any work starts, see `sparsec.transform.options`);
- `requires(program, ctx)`: preconditions; raise `PassError` naming what is missing;
- `run(program, ctx) -> PassResult`: rewrite `program.graph` in place and say whether anything changed;
- `ensures(program, ctx, result)`: postconditions on the rewritten program.

The manager runs them in stage order (`transform` before `lowering`, recipe order within a stage) and after
each modifying pass recompiles, prunes dead code and unused weights, verifies the program (lint, shape
re-propagation, parameter bookkeeping: see `Program.verify`) and checks quality on calibration data
against the program as it was before the first pass. A failed quality gate stops the pipeline.

Example (a custom pass):
    >>> @register_pass
    ... class DropDropout(Pass):
    ...     name = "drop_dropout"
    ...     def run(self, program, ctx):
    ...         nodes = program.graph.find_nodes(op="call_function", target=torch.ops.aten.dropout.default)
    ...         for n in nodes:
    ...             n.replace_all_uses_with(n.args[0])
    ...             program.graph.erase_node(n)
    ...         return PassResult(modified=bool(nodes), stats={"removed": len(nodes)})
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar, Literal

from sparsec.data.calibration import CalibrationSet, StatisticsCache
from sparsec.errors import PassError, QualityError, RecipeError
from sparsec.transform.options import as_dict, parse_section
from sparsec.ir.program import Program
from sparsec.data.quality import QualityGates, compare_programs

ENTRY_POINT_GROUP = "sparsec.passes"
STAGES = ("transform", "lowering")


@dataclass
class PassResult:
    """What a pass did.

    Attributes:
        modified: whether the graph changed (the manager verifies only then).
        stats: numbers worth reporting (e.g. `{"layers_dropped": 2}`).
        decisions: what the pass chose and why (e.g. per-layer scores); goes to report.json as is.
    """

    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    decisions: Any = None


@dataclass
class PassContext:
    """What passes share: calibration data, cached activation statistics, and a seed.

    Attributes:
        calibration: the calibration set, or None when the pipeline runs without data.
        statistics: per-node activation statistics, collected in one forward pass per request batch.
        seed: for passes with randomness.
    """

    calibration: CalibrationSet | None = None
    statistics: StatisticsCache | None = None
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
        self.options = options if options is not None else parse_section(self.Options, kwargs, self.name or type(self).__name__)

    @classmethod
    def from_recipe(cls, options: Any, where: str) -> "Pass":
        return cls(parse_section(cls.Options, options, where))

    def requires(self, program: Program, ctx: PassContext) -> None:
        """Raise `PassError` if the program is not something this pass can rewrite."""

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def ensures(self, program: Program, ctx: PassContext, result: PassResult) -> None:
        """Raise `PassError` if the rewritten program lacks a property this pass promises."""

    def targets(self, program: Program) -> list[str] | None:
        """Module paths this pass would change in `program`, for compiling several entry points that share
        weights (`sparsec.compiler`): `[]` skips the pass for that program (nothing to change there); the
        default `None` runs it on every entry point on its own. A pass that returns paths implements `replay`."""
        return None

    def replay(self, decisions: Any, shared: list[str]) -> "Pass":
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

        The default writes each key and its value, long lists summarised as `<N items>` (report.json has them
        in full); a pass whose decisions read better as a table overrides it (`drop_layers`: its ranking).
        """
        if not isinstance(decisions, dict):
            decisions = {"decisions": decisions}
        lines = []
        for key, value in decisions.items():
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                lines.append(f"  {key}:")
                lines += [f"    {compact(v)}" for v in value]
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


# ----- registry -------------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Pass]] = {}
_entry_points_loaded = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Register a pass class under `cls.name` (usable as a decorator). Re-registering a name replaces it."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)) or not cls.name:
        raise TypeError("register_pass takes a Pass subclass with a non-empty `name`")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass")
    _REGISTRY[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        cls = ep.load()
        if getattr(cls, "name", None) != ep.name:
            raise RecipeError(f"entry point {ep.name!r} ({ep.value}) loads a pass named {getattr(cls, 'name', None)!r}")
        register_pass(cls)


def available_passes() -> dict[str, type[Pass]]:
    """All registered passes by name: built-ins, entry points of installed packages, `register_pass` calls."""
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    passes = available_passes()
    if name not in passes:
        raise RecipeError(f"unknown pass {name!r}; registered passes: {sorted(passes) or 'none'}")
    return passes[name]


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


class PassManager:
    """Runs passes in order with verification and quality checks after each one.

    Args:
        passes: pass instances; stably sorted by stage (`transform`, then `lowering`).
        gates: quality thresholds checked after every pass (None: metrics are reported, nothing gated).
        verify: run `Program.verify()` after every modifying pass (leave on; off only to profile).
        prepare: called right before each pass with the program as it is then; returns the pass to run (e.g.
            one repeating decisions made in another entry point) or None to skip it.

    Example:
        >>> manager = PassManager([DropDropout()], gates=QualityGates(min_cosine=0.99))
        >>> records = manager.run(program, PassContext(calibration=calib))
    """

    def __init__(self, passes: Iterable[Pass], gates: QualityGates | None = None, verify: bool = True,
                 prepare: Callable[[Pass, Program], Pass | None] | None = None) -> None:
        passes = list(passes)
        self.passes: list[Pass] = sorted(passes, key=lambda p: STAGES.index(p.stage))
        self.gates = gates
        self.verify = verify
        self.prepare = prepare

    def run(self, program: Program, ctx: PassContext | None = None) -> list[PassRecord]:
        ctx = ctx or PassContext()
        if ctx.calibration is not None and ctx.statistics is None:
            ctx.statistics = StatisticsCache(program, ctx.calibration, progress=ctx.progress)
        reference = None
        if ctx.calibration is not None and self.passes:
            reference = ctx.calibration.reference_outputs(program, progress=ctx.progress)
        records = []
        for p in self.passes:
            run = self.prepare(p, program) if self.prepare is not None else p
            if run is not None:
                records.append(self._run_one(run, program, ctx, reference))
        return records

    def _run_one(self, p: Pass, program: Program, ctx: PassContext, reference: Sequence[dict] | None) -> PassRecord:
        start = time.perf_counter()
        p.requires(program, ctx)
        before = program.num_parameters()
        state_before = set(program.state_placeholders())
        result = p.run(program, ctx)
        if not isinstance(result, PassResult):
            raise PassError(f"pass {p.name!r} returned {type(result).__name__}; run() must return a PassResult")
        if result.modified:
            program.recompile()
            program.prune()
            if self.verify:
                program.verify()
        removed = sorted(state_before - set(program.state_placeholders()))
        p.ensures(program, ctx, result)
        quality = None
        if reference is not None and result.modified:
            quality = compare_programs(program, ctx.calibration, reference, progress=ctx.progress)
        record = PassRecord(
            name=p.name,
            options=as_dict(p.options),
            modified=result.modified,
            parameters_before=before,
            parameters_after=program.num_parameters(),
            removed_state=removed,
            stats=result.stats,
            decisions=result.decisions,
            quality=quality,
            seconds=round(time.perf_counter() - start, 3),
        )
        if quality is not None and self.gates is not None:
            failures = self.gates.failures(quality)
            if failures:
                raise QualityError(
                    f"quality gate failed after pass {p.name!r}: " + "; ".join(failures)
                    + ". Relax the recipe's `quality:` gates or make the pass less aggressive."
                )
        return record
