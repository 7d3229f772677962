"""Weights shared by several entry points (Janus' understanding and generation programs): changed the same way in
every program. The first program a pass runs on decides; a later one repeats its decisions on the targets they
share. What a pass needs for that is a protocol the compiler checks, not a hook on every pass:

- `ChangesTargets`: `targets(program)`, the module paths the pass would change there (`[]`: nothing, the pass is
  skipped for that program). A pass without it runs on every program on its own.
- `Replays`: `replay(decisions, shared)`, a pass repeating `decisions` (its `PassResult.decisions` in another
  program) on the `shared` targets, the others decided as usual. A pass with targets but without it is refused
  when a target is shared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from sparsec.errors import PassError
from sparsec.ir.program import Program
from sparsec.transform.pass_manager import Pass, PassContext, PassInstrument, PassRecord, PassResult


@runtime_checkable
class ChangesTargets(Protocol):
    def targets(self, program: Program) -> list[str]: ...


@runtime_checkable
class Replays(Protocol):
    def replay(self, decisions: Any, shared: list[str]) -> Pass: ...


@dataclass(frozen=True)
class Decided:
    """What a recipe pass decided in one program, on which targets."""

    targets: list[str]
    decisions: Any


class SharedDecisions:
    """The decisions of every recipe pass in the programs compiled so far; `for_program` gives the next program's
    side (`ProgramDecisions`)."""

    def __init__(self) -> None:
        self.decided: dict[Pass, list[Decided]] = {}

    def for_program(self, name: str, say: Callable[[str], None]) -> ProgramDecisions:
        return ProgramDecisions(self, name, say)


class ProgramDecisions(PassInstrument):
    """One program's passes against the shared decisions: `prepare` (for `PassManager(prepare=...)`) picks the pass
    to run, and as an instrument it records what each pass decided once the pass is done (checks passed)."""

    def __init__(self, shared: SharedDecisions, name: str, say: Callable[[str], None]) -> None:
        self.shared = shared
        self.name = name
        self.say = say
        self.skipped: list[str] = []
        self._running: tuple[Pass, list[str]] | None = None  # the recipe pass now running, and its targets here

    def prepare(self, p: Pass, program: Program) -> Pass | None:
        self._running = None
        if not isinstance(p, ChangesTargets):
            return p
        targets = p.targets(program)
        if not targets:
            self.skipped.append(p.name)
            return None
        self._running = (p, targets)
        for earlier in self.shared.decided.get(p, []):
            shared = sorted(set(targets) & set(earlier.targets))
            if not shared:
                continue
            if not isinstance(p, Replays):
                raise PassError(
                    f"{p.name}: cannot repeat its decisions in another entry point, and {shared[:3]} are shared by "
                    "several; restrict the pass's `where` to one entry point's weights"
                )
            self.say(f"[sparsec]   {p.name} ({self.name}): repeating the decisions on {len(shared)} shared target(s)")
            return p.replay(earlier.decisions, shared)
        return p

    def after_pass(self, p: Pass, program: Program, ctx: PassContext, result: PassResult, record: PassRecord) -> None:
        if self._running is not None:
            recipe_pass, targets = self._running
            self.shared.decided.setdefault(recipe_pass, []).append(Decided(targets, record.decisions))
            self._running = None
