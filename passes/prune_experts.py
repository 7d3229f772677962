"""`prune_experts`: remove whole experts from MoE blocks by how much calibration data uses them.

For each matched MoE block (router + routed experts, `sparsec.analysis.experts`), experts are ranked over the
valid calibration tokens by `criterion`:

- `frequency`: the share of token-expert pairs the router sends to the expert;
- `mass`: the share of the routed output it produces, sum over its tokens of ||w_te * expert_e(x_t)||
  (a rarely chosen expert with large outputs ranks above a frequent one whose weight is small).

The `keep` (or `keep_ratio` of E) best stay, in their original order; the others leave every per-expert tensor
(fused gate_up / down weights) and the router loses their rows, so the router's softmax and top-k choose among
the kept experts: exactly the model with those experts deleted (NVIDIA ModelOpt's MoE expert pruning, e.g.
Qwen3-30B-A3B 128 -> 96 experts). The top-k stays valid: keeping fewer experts than a block's top-k is refused
before anything changes, and so is a router with the expert count written into its graph (group-limited
routing). A shared expert, if any, is no routed expert and is not touched.

Recipe:
    passes:
      - prune_experts: {keep_ratio: 0.75, criterion: frequency}
      - prune_experts: {keep: 6, criterion: mass, where: "model.layers.*.mlp"}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from sparsec.analysis.experts import (
    MoeExperts,
    expert_misses,
    expert_slices,
    find_experts,
    remove_experts,
    routing_statistics,
)
from sparsec.errors import PassError
from sparsec.ir.program import Program
from sparsec.transform.pass_manager import Pass, PassContext, PassResult


@dataclass(frozen=True)
class BlockDecision:
    """One MoE block pruned: the experts kept and removed (router indices before pruning), each expert's
    routing frequency and mass on the calibration tokens, and the parameters before and after."""

    path: str
    experts_path: str
    experts_before: int
    experts_after: int
    top_k: int
    kept_experts: list[int]
    removed_experts: list[int]
    frequency: list[float]
    mass: list[float]
    parameters_before: int
    parameters_after: int


@dataclass(frozen=True)
class ExpertsDecisions:
    """What `prune_experts` chose (decisions.json holds these fields): the criterion, and each block's decision."""

    criterion: str
    blocks: list[BlockDecision]


@dataclass(frozen=True)
class BlockPlan:
    """One matched MoE block and the number of its experts that stay."""

    experts: MoeExperts
    keep: int


class PruneExperts(Pass):
    """Remove the least used experts of every matched MoE block (routing frequency or routed output mass)."""

    name = "prune_experts"

    @dataclass
    class Options:
        keep: int | None = None
        keep_ratio: float | None = None
        criterion: Literal["frequency", "mass"] = "frequency"
        where: str = "**"

        def __post_init__(self) -> None:
            if (self.keep_ratio is None) == (self.keep is None):
                raise ValueError("give exactly one of keep, keep_ratio")
            if self.keep_ratio is not None and not 0 < self.keep_ratio <= 1:
                raise ValueError(f"keep_ratio: must be in (0, 1], got {self.keep_ratio}")
            if self.keep is not None and self.keep < 1:
                raise ValueError(f"keep: must be >= 1, got {self.keep}")

    def _blocks(self, program: Program) -> list[MoeExperts]:
        blocks = find_experts(program, self.options.where)
        if not blocks:
            misses = "; ".join(str(m) for m in expert_misses(program)[:2])
            known = [e.block_path for e in find_experts(program)]
            raise PassError(
                f"prune_experts: where={self.options.where!r} matches no MoE block; MoE blocks in this model: "
                f"{known[:6] or 'none'}" + (f". Top-k ops that choose no experts: {misses}" if misses else "")
            )
        return blocks

    def _keep(self, experts: MoeExperts) -> int:
        o, count = self.options, experts.num_experts
        k = o.keep if o.keep is not None else round(o.keep_ratio * count)
        if k > count:
            raise PassError(f"prune_experts: keep {k} exceeds the {count} experts of {experts.block_path}")
        if k < experts.top_k:
            raise PassError(
                f"prune_experts: keeping {k} of the {count} experts of {experts.block_path} is fewer than its "
                f"top-k {experts.top_k} (every token is routed to {experts.top_k} experts); keep at least "
                f"{experts.top_k}"
            )
        return k

    def requires(self, program: Program, ctx: PassContext) -> list[BlockPlan]:
        """The plan: each matched MoE block with the number of experts it keeps."""
        plan = [BlockPlan(e, self._keep(e)) for e in self._blocks(program)]
        for p in plan:
            expert_slices(program, p.experts)  # refuses routers it cannot follow, before anything changes
        calibration = ctx.require_calibration(self.name)
        if calibration.num_tokens() == 0:
            raise PassError("prune_experts: the calibration set has no valid token (attention_mask is all 0)")
        return plan

    @torch.no_grad()
    def run(self, program: Program, ctx: PassContext, plan: list[BlockPlan]) -> PassResult:
        stats = routing_statistics(program, ctx.calibration, [p.experts for p in plan])
        decisions = []
        for p, s in zip(plan, stats):
            e, k = p.experts, p.keep
            score = s[self.options.criterion]
            kept = torch.argsort(-score, stable=True)[:k].sort().values
            names = [name for name, _ in expert_slices(program, e)]
            before = sum(program.state_shape(n).numel() for n in names)
            if k < e.num_experts:
                remove_experts(program, e, kept)
            decisions.append(
                BlockDecision(
                    path=e.block_path,
                    experts_path=e.path,
                    experts_before=e.num_experts,
                    experts_after=k,
                    top_k=e.top_k,
                    kept_experts=kept.tolist(),
                    removed_experts=sorted(set(range(e.num_experts)) - set(kept.tolist())),
                    frequency=[round(float(v), 6) for v in s["frequency"]],
                    mass=[round(float(v), 6) for v in s["mass"]],
                    parameters_before=before,
                    parameters_after=sum(program.state_shape(n).numel() for n in names),
                )
            )
        return PassResult(
            modified=any(d.experts_after < d.experts_before for d in decisions),
            stats={
                "moe_blocks": len(decisions),
                "experts_before": sum(d.experts_before for d in decisions),
                "experts_after": sum(d.experts_after for d in decisions),
            },
            decisions=ExpertsDecisions(criterion=self.options.criterion, blocks=decisions),
        )

    def ensures(self, program: Program, ctx: PassContext, result: PassResult) -> None:
        counts = {e.block_path: e.num_experts for e in find_experts(program)}
        for d in result.decisions.blocks:
            if counts.get(d.path) != d.experts_after:
                raise PassError(f"prune_experts: {d.path} does not have the reported {d.experts_after} experts")

    def targets(self, program: Program) -> list[str]:
        return [e.block_path for e in find_experts(program, self.options.where)]
