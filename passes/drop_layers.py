"""`drop_layers`: depth pruning. Remove whole blocks, attention sublayers or MLP sublayers from a block stack.

A dropped sublayer becomes the identity on the residual stream: its residual add `stream + branch` is
replaced by `stream`, and the branch (norm, projections, attention or FFN) dies with its weights; in a
post-norm block (BERT) the layer norm after that add stays, as if the sublayer output zeros. A dropped block
hands on its input: each stream's output is replaced by the stream entering it, and the whole block (post-norms
included) dies. A parallel-residual block (attention and MLP summed into one add) drops only as a whole. Shared
inputs (rotary cos/sin, masks) are untouched and keep serving the remaining blocks.

Selection is explicit (`layers: [i, ...]`, block indices in the stack) or by score (`count:` / `ratio:`):
with `score: cosine`, a unit's score is the mean over valid calibration tokens of cos(X_in, X_out), its
input and output on the residual stream (the residual included); the most similar, i.e. the most
redundant, units go first. `kind: joint` ranks attention and MLP sublayers together; `iterative: true`
drops one unit at a time and re-scores the rest on the changed model.

Recipe:
    passes:
      - drop_layers: {ratio: 0.25, kind: block, where: "model.layers.*"}
      - drop_layers: {layers: [3, 5], kind: attn}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from torch.fx import Node

from sparsec.analysis.blocks import ResidualBlock, Sublayer, residual_structure
from sparsec.analysis.match import NoMatch
from sparsec.analysis.regions import BlockStack, region_index
from sparsec.analysis.vocabulary import LINEAR, skip_noop_casts, skip_passthrough
from sparsec.errors import PassError
from sparsec.ir.program import Program
from sparsec.tables import decision_lines
from sparsec.transform.pass_manager import Pass, PassContext, PassResult


@dataclass(frozen=True)
class _Unit:
    """Something that can be dropped: a whole block (`blocks`: its residual streams), or one kind of sublayer
    of a block (in every stream of a multi-stream block: both attention branches of an MMDiT block's joint
    attention)."""

    label: str  # "model.layers.3" or "model.layers.3:attn"
    path: str
    streams: tuple[tuple[Sublayer, ...], ...]  # per residual stream, its sublayers in this unit
    blocks: tuple[ResidualBlock, ...] = ()  # a whole block: each stream's output is replaced by its input

    @property
    def sublayers(self) -> tuple[Sublayer, ...]:
        return tuple(s for stream in self.streams for s in stream)

    @property
    def pairs(self) -> list[tuple]:
        """(input, output) of the unit on each stream: the values its score compares."""
        if self.blocks:
            return [(b.sublayers[0].stream_in, b.output) for b in self.blocks]
        return [(stream[0].stream_in, stream[-1].residual_add) for stream in self.streams]

    def bypassed(self) -> list[tuple[Node, Node]]:
        """(node replaced, the stream value that takes its place): a block's last stream node (its final
        residual add, or a post-norm's layer norm) by its input; a sublayer's residual add by its stream."""
        if self.blocks:
            return [(skip_passthrough(b.output), b.sublayers[0].stream_in) for b in self.blocks]
        return [(s.residual_add, s.stream_in) for s in reversed(self.sublayers)]


@dataclass(frozen=True)
class DropRound:
    """One round of iterative dropping: every unit's score, and the one dropped."""

    scores: dict[str, float]
    dropped: str


@dataclass(frozen=True, kw_only=True)
class DropDecisions:
    """What `drop_layers` chose and why (decisions.json holds these fields; absent ones are None here).

    Attributes:
        stack: the block stack's path (`model.layers`).
        kind: the unit dropped (`block`, `attn`, `mlp`, `joint`).
        units: how many units of that kind the stack had.
        scores: each unit's score (label -> mean cosine of its input and output; the first round's when
            iterative); None for explicit layers.
        ranking: the labels by descending score (scored, one-shot only).
        rounds: the rounds of iterative dropping, in order.
        reason: why these units went.
        parameters: per dropped unit, the weights that left with it.
        dropped: the dropped units' labels (`model.layers.3`, `model.layers.3:mlp`).
    """

    stack: str
    kind: str
    units: int
    scores: dict[str, float] | None = None
    ranking: list[str] | None = None
    rounds: list[DropRound] | None = None
    reason: str
    parameters: dict[str, list[str]]
    dropped: list[str]


@dataclass(frozen=True)
class DropPlan:
    """What `requires` checked and `run` drops: the stack, its droppable units, and how many of them go."""

    stack: BlockStack
    units: list[_Unit]
    count: int


class DropLayers(Pass):
    """Drop blocks / attention / MLP sublayers, chosen explicitly or by calibration cosine similarity."""

    name = "drop_layers"

    @dataclass
    class Options:
        layers: list[int] | None = None
        count: int | None = None
        ratio: float | None = None
        score: Literal["cosine"] = "cosine"
        kind: Literal["block", "attn", "mlp", "joint"] = "block"
        iterative: bool = False
        where: str | None = None

        def __post_init__(self) -> None:
            chosen = [k for k in ("layers", "count", "ratio") if getattr(self, k) is not None]
            if len(chosen) != 1:
                raise ValueError(f"give exactly one of layers, count, ratio (got {chosen or 'none'})")
            if self.layers is not None:
                if not self.layers:
                    raise ValueError("layers: must name at least one block index")
                if len(set(self.layers)) != len(self.layers):
                    raise ValueError(f"layers: duplicate indices in {self.layers}")
                if self.kind == "joint":
                    raise ValueError("kind: 'joint' ranks sublayers by score; use count or ratio with it")
                if self.iterative:
                    raise ValueError("iterative: re-scoring needs count or ratio, not explicit layers")
            if self.count is not None and self.count < 1:
                raise ValueError(f"count: must be >= 1, got {self.count}")
            if self.ratio is not None and not 0 < self.ratio < 1:
                raise ValueError(f"ratio: must be in (0, 1), got {self.ratio}")

    # ----- analysis (no changes to the program) ---------------------------------------------------------
    def _stack(self, program: Program) -> tuple[BlockStack, int]:
        """The one block stack to work on (restricted to `where`) and its full number of blocks."""
        regions = region_index(program)
        stacks = regions.block_stacks()
        names = [f"{s.path}.*" for s in stacks]
        selected = {b.path for b in regions.blocks(self.options.where or "**")}
        matched = [(BlockStack(s.path, [b for b in s.blocks if b.path in selected]), len(s.blocks)) for s in stacks]
        matched = [(s, n) for s, n in matched if s.blocks]
        if not matched:
            raise PassError(
                f"drop_layers: where={self.options.where!r} matches no block; "
                f"block stacks in this model: {names or 'none'}"
            )
        if len(matched) > 1:
            where = f"where={self.options.where!r}" if self.options.where else "this model"
            raise PassError(
                f"drop_layers: {where} spans {len(matched)} block stacks {[s.path for s, _ in matched]}; "
                f"choose one with `where:`, e.g. {names[0]!r}"
            )
        return matched[0]

    def _units(self, program: Program, stack: BlockStack) -> list[_Unit]:
        """Droppable units of the stack, skipping blocks and sublayers an earlier drop already removed."""
        structure = residual_structure(program)
        kinds = {"block": None, "attn": ("attn",), "mlp": ("mlp",), "joint": ("attn", "mlp")}[self.options.kind]
        units = []
        for region in stack.blocks:
            if not any(n.target is LINEAR for n in region.nodes):
                continue  # dropped earlier
            streams = structure.streams(region.path)
            if isinstance(streams, NoMatch):
                raise PassError(f"drop_layers: cannot find the residual structure of {region.path}: {streams.rule}")
            if kinds is None:
                units.append(_Unit(region.path, region.path, tuple(s.sublayers for s in streams), tuple(streams)))
                continue
            if any(s.kind == "parallel" for stream in streams for s in stream.sublayers):
                raise PassError(
                    f"drop_layers: block {region.path} is a parallel-residual block: its attention and MLP read the "
                    "same input and their sum is added to the stream once, so neither is a sublayer of its own; "
                    f"kind {self.options.kind!r} cannot drop one of them, drop whole blocks (kind: block)"
                )
            for k in kinds:
                found = tuple((s.sublayer(k),) for s in streams if s.sublayer(k))
                if found:
                    units.append(_Unit(f"{region.path}:{k}", region.path, found))
        if not units:
            raise PassError(f"drop_layers: no {self.options.kind} unit left in {stack.path}")
        return units

    def _plan(self, program: Program) -> DropPlan:
        """Check everything and decide how many units go, before touching the graph."""
        stack, stack_size = self._stack(program)
        units = self._units(program, stack)
        o = self.options
        if o.layers is not None:
            indices = [b.index for b in stack.blocks]
            bad = [i for i in o.layers if i not in indices]
            if bad:
                raise PassError(
                    f"drop_layers: layers {bad} out of range; the selected blocks of {stack.path} "
                    f"are {indices[0]}..{indices[-1]}" + (f" (where={o.where!r})" if o.where else "")
                )
            n_drop = len(o.layers)
        else:
            n_drop = o.count if o.count is not None else round(o.ratio * len(units))
            if n_drop == 0:
                raise PassError(f"drop_layers: ratio {o.ratio} of {len(units)} units rounds to dropping none; raise it")
            if n_drop > len(units):
                raise PassError(f"drop_layers: count {n_drop} exceeds the {len(units)} {o.kind} units selected")
        if n_drop >= len(units) and len(stack.blocks) == stack_size:
            raise PassError(
                f"drop_layers: would drop all {len(units)} {o.kind} units of {stack.path}; "
                "at least one must stay (lower count/ratio or list fewer layers)"
            )
        return DropPlan(stack, units, n_drop)

    def requires(self, program: Program, ctx: PassContext) -> DropPlan:
        """The plan: the stack, its droppable units and how many of them go."""
        plan = self._plan(program)
        if self.needs_calibration():
            ctx.require_calibration(self.name)
        return plan

    def needs_calibration(self) -> bool:
        """Scores need data; explicit `layers` do not."""
        return self.options.layers is None

    # ----- rewrite ------------------------------------------------------------------------------------
    @staticmethod
    def _bypass(program: Program, unit: _Unit, replaced: dict[Node, Node]) -> None:
        """Replace the unit's stream nodes by the streams they add to (no-op casts on the way die with the
        branch).

        `replaced` maps the nodes already bypassed to what took their place: a unit's stream input may be the
        output of a unit dropped just before it (consecutive blocks), which is gone from the graph by then.
        """
        for node, stream in unit.bypassed():
            while stream in replaced:
                stream = replaced[stream]
            stream = skip_noop_casts(stream)
            node.replace_all_uses_with(stream)
            program.graph.erase_node(node)
            replaced[node] = stream

    @staticmethod
    def _live_state(program: Program) -> set[str]:
        """Weights the program's outputs still depend on."""
        live, stack = set(), list(program.graph.find_nodes(op="output"))
        while stack:
            node = stack.pop()
            if node not in live:
                live.add(node)
                stack.extend(node.all_input_nodes)
        return {name for node in live if (name := program.state_name(node)) is not None}

    def _drop(self, program: Program, units: list[_Unit]) -> dict[str, list[str]]:
        """Bypass the units; per unit, the weights that left with it (shared ones, such as an MMDiT block's
        modulation read by both its attention and MLP sublayers, stay while another sublayer reads them)."""
        before = self._live_state(program)
        read = {
            u.label: {
                program.state_name(a)
                for n in (*(n for s in u.sublayers for n in s.nodes), *(n for b in u.blocks for n in b.norms))
                for a in n.all_input_nodes
            }
            for u in units
        }
        replaced: dict[Node, Node] = {}
        for unit in units:
            self._bypass(program, unit, replaced)
        gone = before - self._live_state(program)
        return {label: sorted(n for n in names if n in gone) for label, names in read.items()}

    def _scores(self, units: list[_Unit], ctx: PassContext) -> dict[str, float]:
        """Mean over valid tokens of cos(input, output) of the unit, averaged over its streams."""
        sims = ctx.statistics.cosine([pair for u in units for pair in u.pairs])
        return {u.label: round(sum(sims[(a.name, b.name)] for a, b in u.pairs) / len(u.pairs), 6) for u in units}

    def run(self, program: Program, ctx: PassContext, plan: DropPlan) -> PassResult:
        stack, units, n_drop = plan.stack, plan.units, plan.count
        o = self.options
        scores = ranking = rounds = None
        if not o.iterative:
            if o.layers is not None:
                wanted = {f"{stack.path}.{i}" for i in o.layers}
                chosen = [u for u in units if u.path in wanted]
                reason = "explicit layers"
            else:
                scores = self._scores(units, ctx)
                ordered = sorted(units, key=lambda u: -scores[u.label])
                chosen = ordered[:n_drop]
                ranking = [u.label for u in ordered]
                reason = f"highest {o.score} similarity of input and output (most redundant)"
            parameters = self._drop(program, chosen)
            dropped = [u.label for u in chosen]
        else:
            dropped, rounds, parameters = [], [], {}
            for _ in range(n_drop):
                round_scores = self._scores(units, ctx)
                best = max(units, key=lambda u: round_scores[u.label])
                rounds.append(DropRound(scores=round_scores, dropped=best.label))
                parameters.update(self._drop(program, [best]))
                program.recompile()
                program.prune()
                dropped.append(best.label)
                fresh = BlockStack(
                    stack.path,
                    [region_index(program).region(b.path) for b in stack.blocks if b.path in region_index(program)],
                )
                units = self._units(program, fresh)
            scores = rounds[0].scores
            reason = f"iterative: highest {o.score} similarity, re-scored after each drop"
        decisions = DropDecisions(
            stack=stack.path,
            kind=o.kind,
            units=len(plan.units),
            scores=scores,
            ranking=ranking,
            rounds=rounds,
            reason=reason,
            parameters=parameters,
            dropped=dropped,
        )
        return PassResult(modified=True, stats={"dropped": len(dropped), "units": decisions.units}, decisions=decisions)

    @classmethod
    def describe_decisions(cls, decisions: dict) -> list[str]:
        """The units ranked by score, the dropped ones marked, then the other decisions (the parameters of each
        unit and the iterative rounds are left to decisions.json)."""
        lines = []
        scores = decisions.get("scores")
        if isinstance(scores, dict):
            dropped = set(decisions.get("dropped", []))
            lines.append(f"  {'rank':>4}  {'score':>9}  unit")
            for rank, (unit, score) in enumerate(sorted(scores.items(), key=lambda kv: -kv[1]), 1):
                lines.append(f"  {rank:>4}  {score:>9.6f}  {unit}" + ("  <- dropped" if unit in dropped else ""))
        rest = {k: v for k, v in decisions.items() if k not in ("scores", "ranking", "parameters", "rounds")}
        return lines + decision_lines(rest)

    def targets(self, program: Program) -> list[str]:
        return [b.path for b in region_index(program).blocks(self.options.where or "**")]

    def replay(self, decisions: dict, shared: list[str]) -> DropLayers:
        """The same blocks (or sublayers of them) dropped, as explicit `layers` of the same stack."""
        if self.options.kind == "joint":
            raise PassError(
                "drop_layers: kind joint cannot be repeated in another entry point (it may drop only one "
                "sublayer of a block); use kind attn or mlp, or restrict `where` to one entry point"
            )
        layers = sorted({int(label.split(":")[0].rsplit(".", 1)[1]) for label in decisions["dropped"]})
        return DropLayers(
            dataclasses.replace(
                self.options, layers=layers, count=None, ratio=None, iterative=False, where=f"{decisions['stack']}.*"
            )
        )

    def ensures(self, program: Program, ctx: PassContext, result: PassResult) -> None:
        left = set(program.state_placeholders())
        kept = sorted(n for names in result.decisions.parameters.values() for n in names if n in left)
        if kept:
            raise PassError(f"drop_layers: weights of dropped units are still in the program: {kept[:5]}")
