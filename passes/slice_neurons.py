"""`slice_neurons`: width pruning. Keep the most important neurons of each matched FFN.

For an FFN `y = W_down(act(W_gate x) * (W_up x))` (or `W_2 act(W_1 x)`), neuron j is row j of W_gate and
W_up (and their biases) and column j of W_down. Which tensors are coupled is decided by the core's
dependency model (`sparsec.analysis.dependency.ffn_channel_group`), which refuses FFNs whose intermediate values
are read elsewhere; neurons are scored by `sparsec.analysis.importance` (`importance: activation` (default),
`magnitude` or `random`). This pass only selects.

`scope: per_layer` keeps the same fraction of every FFN; `scope: global` keeps the top neurons across all
matched FFNs under one threshold, so FFNs lose different amounts (each keeps at least `max(1, round_to)`).
Widths are rounded to the nearest multiple of `round_to` (kernel-friendly shapes), never above the
original width. Kept neurons stay in their original order.

MoE blocks' routed experts (`sparsec.analysis.experts`, fused [E, ...] weights) are sliced inside every
expert: each keeps the same number of its own most important neurons (scored over the tokens routed to it), so
the fused weights stay rectangular; `where` matches the experts' path or their MoE block's. Experts take
`keep` / `keep_ratio` per expert and are not part of `scope: global` or `kept`.

`kept: {ffn path: [indices]}` pins exactly which neurons named FFNs keep (the others follow `keep` /
`keep_ratio`); compiling several entry points uses it to slice shared FFNs the same way in every program.

Recipe:
    passes:
      - slice_neurons: {keep_ratio: 0.5, where: "model.layers.*.mlp", round_to: 8}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from sparsec.analysis.dependency import ChannelGroup, ffn_channel_group
from sparsec.analysis.experts import MoeExperts, expert_channel_group, expert_neuron_importance, find_experts
from sparsec.analysis.ffn import Ffn
from sparsec.analysis.importance import Importance, neuron_importance
from sparsec.analysis.regions import region_index
from sparsec.errors import PassError
from sparsec.ir.program import Program
from sparsec.transform.options import check_keep
from sparsec.transform.pass_manager import Pass, PassContext, PassResult


@dataclass(frozen=True)
class ImportanceSummary:
    """An FFN's neuron importance: its quantiles, mean, and the least important neuron kept."""

    min: float
    median: float
    max: float
    mean: float
    kept_min: float


@dataclass(frozen=True)
class FfnDecision:
    """One dense FFN sliced: its widths, parameters before and after, importance, and the neurons kept (in
    order)."""

    path: str
    kind: str
    width_before: int
    width_after: int
    parameters_before: int
    parameters_after: int
    importance: ImportanceSummary
    kept_indices: list[int]


@dataclass(frozen=True)
class ExpertsDecision:
    """One MoE block's experts sliced: `kept_indices[e]` are the neurons expert `e` keeps."""

    path: str
    experts: int
    width_before: int
    width_after: int
    parameters_before: int
    parameters_after: int
    kept_indices: list[list[int]]


@dataclass(frozen=True, kw_only=True)
class NeuronsDecisions:
    """What `slice_neurons` chose (decisions.json holds these fields): the importance and scope, each dense
    FFN's decision, and each MoE block's (`experts`, absent where none matched)."""

    importance: str
    scope: str
    ffns: list[FfnDecision]
    experts: list[ExpertsDecision] | None = None


@dataclass(frozen=True)
class FfnPlan:
    """One matched FFN, its channel group and the width it keeps (global scope decides it again in `run`)."""

    ffn: Ffn
    group: ChannelGroup
    keep: int


@dataclass(frozen=True)
class ExpertsPlan:
    """One matched MoE block's experts, their channel group and the width every expert keeps."""

    experts: MoeExperts
    group: ChannelGroup
    keep: int


@dataclass(frozen=True)
class NeuronsPlan:
    """What `requires` checked and `run` slices: the dense FFNs and the MoE blocks' experts."""

    ffns: list[FfnPlan]
    experts: list[ExpertsPlan]


class SliceNeurons(Pass):
    """Slice FFN neurons (gated or plain) by calibration activation, weight magnitude or at random."""

    name = "slice_neurons"

    @dataclass
    class Options:
        keep_ratio: float | None = None
        keep: int | None = None
        where: str = "**"
        importance: Importance = "activation"
        scope: Literal["per_layer", "global"] = "per_layer"
        round_to: int = 1
        seed: int = 0
        kept: dict[str, list[int]] | None = None

        def __post_init__(self) -> None:
            check_keep(self.keep_ratio, self.keep)
            if self.keep is not None and self.scope == "global":
                raise ValueError("scope: 'global' spreads one budget over all FFNs; give it keep_ratio, not keep")
            if self.round_to < 1:
                raise ValueError(f"round_to: must be >= 1, got {self.round_to}")

    # ----- analysis ---------------------------------------------------------------------------------------
    def _experts(self, program: Program) -> list[MoeExperts]:
        return find_experts(program, self.options.where)

    def _ffn_plans(self, program: Program) -> list[FfnPlan]:
        """Each matched FFN with its channel group and kept width (global scope decides the widths again in
        `run`, from the scores)."""
        regions = region_index(program)
        ffns = regions.ffns(self.options.where) if self._experts(program) else None
        ffns = regions.require_ffns(self.options.where, self.name) if ffns is None else ffns
        pinned = self.options.kept or {}
        paths = {f.path: f for f in ffns}
        for path, indices in pinned.items():
            if path not in paths:
                raise PassError(
                    f"slice_neurons: kept names {path!r}, which is not an FFN matched by where="
                    f"{self.options.where!r} (matched: {sorted(paths)[:6]})"
                )
            width = paths[path].intermediate_size
            if not indices or len(set(indices)) != len(indices) or not all(0 <= i < width for i in indices):
                raise PassError(f"slice_neurons: kept[{path!r}] must list distinct neuron indices in [0, {width})")
        return [
            FfnPlan(
                ffn,
                ffn_channel_group(program, ffn),
                len(pinned[ffn.path]) if ffn.path in pinned else self._target(ffn.path, ffn.intermediate_size),
            )
            for ffn in ffns
        ]

    def _round(self, k: int, width: int) -> int:
        r = self.options.round_to
        return min(width, max(r, int(round(k / r)) * r))

    def _target(self, path: str, width: int, what: str = "") -> int:
        """The kept width of one FFN (or of each expert) under `keep` / `keep_ratio` and `round_to`."""
        o = self.options
        k = o.keep if o.keep is not None else round(o.keep_ratio * width)
        if k < 1:
            raise PassError(
                f"slice_neurons: keep_ratio {o.keep_ratio} leaves zero of the {width} neurons of {path}{what}; raise it"
            )
        if k > width:
            raise PassError(f"slice_neurons: keep {k} exceeds the {width} neurons of {path}{what}")
        return self._round(k, width)

    def requires(self, program: Program, ctx: PassContext) -> NeuronsPlan:
        """The plan: each matched FFN with its channel group and kept width, and each matched MoE block's experts
        with their channel group and the width every expert keeps."""
        ffns = self._ffn_plans(program)
        experts = self._experts(program)
        if experts and self.options.scope == "global":
            raise PassError(
                f"slice_neurons: scope 'global' ranks dense FFN neurons against each other; where={self.options.where!r} "
                f"also matches MoE experts ({experts[0].path}, ...), which keep keep_ratio of each expert; narrow where"
            )
        expert_plans = [
            ExpertsPlan(e, expert_channel_group(program, e), self._target(e.path, e.intermediate_size, " (per expert)"))
            for e in experts
        ]
        if self.needs_calibration():
            ctx.require_calibration(self.name)
        return NeuronsPlan(ffns, expert_plans)

    def needs_calibration(self) -> bool:
        """Activation importance needs data; magnitude and random do not."""
        return self.options.importance == "activation"

    def _global_targets(self, ffns: list[Ffn], scores: list[torch.Tensor]) -> list[int]:
        total = round(self.options.keep_ratio * sum(f.intermediate_size for f in ffns))
        floor = max(1, self.options.round_to)
        if total < floor * len(ffns):
            raise PassError(
                f"slice_neurons: keep_ratio {self.options.keep_ratio} keeps {total} neurons in all, "
                f"fewer than {floor} per FFN for {len(ffns)} FFNs; raise it"
            )
        threshold = torch.cat(scores).topk(total).values.min()
        return [self._round(max(floor, int((s >= threshold).sum())), f.intermediate_size) for f, s in zip(ffns, scores)]

    # ----- rewrite ------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, program: Program, ctx: PassContext, plan: NeuronsPlan) -> PassResult:
        ffns = [p.ffn for p in plan.ffns]
        pinned = self.options.kept or {}
        scores = neuron_importance(program, ffns, self.options.importance, ctx.statistics, self.options.seed)
        targets = [p.keep for p in plan.ffns]
        if self.options.scope == "global":
            free = [i for i, f in enumerate(ffns) if f.path not in pinned]
            for i, k in zip(free, self._global_targets([ffns[i] for i in free], [scores[i] for i in free])):
                targets[i] = k
        decisions = []
        for ffn, group, score, k in zip(ffns, (p.group for p in plan.ffns), scores, targets):
            kept = torch.tensor(sorted(pinned[ffn.path])) if ffn.path in pinned else score.topk(k).indices.sort().values
            before = group.num_parameters(program)
            if k < ffn.intermediate_size:
                group.apply(program, kept)
            q = torch.quantile(score.double(), torch.tensor([0.0, 0.5, 1.0], dtype=torch.double)).tolist()
            decisions.append(
                FfnDecision(
                    path=ffn.path,
                    kind=ffn.kind,
                    width_before=ffn.intermediate_size,
                    width_after=k,
                    parameters_before=before,
                    parameters_after=group.num_parameters(program),
                    importance=ImportanceSummary(
                        min=q[0], median=q[1], max=q[2], mean=float(score.mean()), kept_min=float(score[kept].min())
                    ),
                    kept_indices=kept.tolist(),
                )
            )
        expert_decisions = self._slice_experts(program, ctx, plan.experts)
        modified = any(d.width_after < d.width_before for d in [*decisions, *expert_decisions])
        stats = {
            "ffns": len(decisions),
            "neurons_before": sum(d.width_before for d in decisions),
            "neurons_after": sum(d.width_after for d in decisions),
        }
        if plan.experts:
            stats["moe_blocks"] = len(expert_decisions)
        result = NeuronsDecisions(
            importance=self.options.importance,
            scope=self.options.scope,
            ffns=decisions,
            experts=expert_decisions if plan.experts else None,
        )
        return PassResult(modified=modified, stats=stats, decisions=result)

    def _slice_experts(self, program: Program, ctx: PassContext, plan: list[ExpertsPlan]) -> list[ExpertsDecision]:
        """Each expert of each planned MoE block keeps its `k` most important neurons (in their order)."""
        if not plan:
            return []
        experts = [p.experts for p in plan]
        scores = expert_neuron_importance(program, experts, self.options.importance, ctx.calibration, self.options.seed)
        decisions = []
        for p, score in zip(plan, scores):
            e, group, k = p.experts, p.group, p.keep
            kept = score.topk(k, dim=1).indices.sort(dim=1).values
            before = group.num_parameters(program)
            if k < e.intermediate_size:
                group.apply(program, kept)
            decisions.append(
                ExpertsDecision(
                    path=e.path,
                    experts=e.num_experts,
                    width_before=e.intermediate_size,
                    width_after=k,
                    parameters_before=before,
                    parameters_after=group.num_parameters(program),
                    kept_indices=kept.tolist(),
                )
            )
        return decisions

    def targets(self, program: Program) -> list[str]:
        return [f.path for f in region_index(program).ffns(self.options.where)] + [
            e.path for e in self._experts(program)
        ]

    def replay(self, decisions: dict, shared: list[str]) -> SliceNeurons:
        """The same neurons kept in the `shared` FFNs (as `kept`); the others decided by the options."""
        kept = {d["path"]: d["kept_indices"] for d in decisions["ffns"] if d["path"] in shared}
        return SliceNeurons(dataclasses.replace(self.options, kept={**(self.options.kept or {}), **kept}))

    def ensures(self, program: Program, ctx: PassContext, result: PassResult) -> None:
        for decision in result.decisions.ffns:
            ffn = next((f for f in region_index(program).ffns() if f.path == decision.path), None)
            if ffn is None or ffn.intermediate_size != decision.width_after:
                raise PassError(
                    f"slice_neurons: {decision.path} does not have the reported width {decision.width_after}"
                )
        widths = {e.path: e.intermediate_size for e in find_experts(program)}
        for decision in result.decisions.experts or []:
            if widths.get(decision.path) != decision.width_after:
                raise PassError(
                    f"slice_neurons: the experts {decision.path} do not have the reported width {decision.width_after}"
                )
