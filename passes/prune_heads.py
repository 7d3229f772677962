"""`prune_heads`: remove attention heads, grouped-query attention kept coupled.

Which tensors a head owns is found from the graph by `sparsec.analysis.heads` (rows of the q/k/v projections and
their biases, per-head norm weights, columns of the output projection, the literal head counts of reshapes and
`repeat_kv`'s expand, the segment bounds of a fused qkv projection); this pass scores heads and selects.

- `unit: kv_group` (default): remove whole KV groups (a KV head with the query heads it serves). `keep`: KV
  groups kept per attention; `keep_ratio`: that fraction of them (rounded). For multi-head attention every head is
  its own group, so this removes heads.
- `unit: query`: remove the same number of query heads from every group (the KV heads all stay, the group size
  stays uniform). `keep`: query heads kept per group; `keep_ratio`: that fraction of the group size.

Importance (`importance`), per query head h:
- `activation` (default, needs calibration): mean over valid calibration tokens t of ||W_o[:, cols_h] a_h(t)||_2,
  the head's contribution through the output projection (a_h: its slice of the output projection's input);
- `magnitude`: ||W_o[:, cols_h]||_F, the weight the head writes through (no data); `random`: seeded.
A KV group's score is the sum of its query heads'. `scope: global` ranks units of every matched attention under
one threshold (`keep_ratio` only), so attentions keep different numbers of heads (each at least one unit).

`kept: {attention path: [[query heads kept in group 0], [... in group 1], ...]}` (`[]`: the group goes) pins
exactly which heads named attentions keep; compiling several entry points uses it (`replay`) to prune shared
attentions the same way in every program.

Exact: the result equals the model rebuilt with fewer heads (`num_attention_heads`, `num_key_value_heads`, the
same `head_dim`) and sliced weights. A norm over all H*d channels of q or k (OLMo2) then normalises over the kept
heads only: the decision record marks that attention `approximate`, and the quality gate judges.

Recipe:
    passes:
      - prune_heads: {keep_ratio: 0.5, unit: kv_group, where: "model.layers.*.self_attn"}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from sparsec.analysis.heads import (
    Attention,
    apply_heads,
    attention_misses,
    find_attentions,
    head_counts,
    output_projection_input,
)
from sparsec.analysis.importance import IMPORTANCES, Importance, head_contribution_sums, output_weight
from sparsec.data.calibration import CalibrationSet, token_vectors
from sparsec.errors import PassError
from sparsec.ir.paths import glob_match
from sparsec.ir.program import Program
from sparsec.transform.options import check_keep
from sparsec.transform.pass_manager import Pass, PassContext, PassResult


@dataclass(frozen=True)
class HeadImportance:
    """The range and mean of an attention's per-head scores."""

    min: float
    max: float
    mean: float


@dataclass(frozen=True, kw_only=True)
class AttentionDecision:
    """One attention pruned: head counts before and after, the heads and KV groups kept (indices before pruning),
    and `approximate`: what the rewrite cannot keep exact (a q/k norm over all heads), absent when exact."""

    path: str
    core_path: str
    heads_before: int
    heads_after: int
    kv_heads_before: int
    kv_heads_after: int
    head_dim: int
    kept_kv_heads: list[int]
    kept_heads: list[int]
    parameters_before: int
    parameters_after: int
    importance: HeadImportance
    approximate: list[str] | None = None


@dataclass(frozen=True)
class HeadsDecisions:
    """What `prune_heads` chose (decisions.json holds these fields): the importance, the unit and each attention's
    decision."""

    importance: str
    unit: str
    attentions: list[AttentionDecision]


@dataclass(frozen=True)
class HeadsPlan:
    """The matched attentions and the units (query heads or KV groups) each keeps; global scope decides the
    counts again in `run`, from the scores."""

    attentions: list[Attention]
    keep: list[int]


class PruneHeads(Pass):
    """Remove attention heads (whole KV groups, or query heads evenly from every group)."""

    name = "prune_heads"

    @dataclass
    class Options:
        keep_ratio: float | None = None
        keep: int | None = None
        unit: Literal["kv_group", "query"] = "kv_group"
        where: str = "**"
        importance: Importance = "activation"
        scope: Literal["per_layer", "global"] = "per_layer"
        seed: int = 0
        kept: dict[str, list[list[int]]] | None = None

        def __post_init__(self) -> None:
            check_keep(self.keep_ratio, self.keep)
            if self.keep is not None and self.scope == "global":
                raise ValueError("scope: 'global' spreads one budget over all attentions; give it keep_ratio")
            if self.importance not in IMPORTANCES:
                raise ValueError(f"importance: must be one of {IMPORTANCES}, got {self.importance!r}")

    def _attentions(self, program: Program) -> list[Attention]:
        return [a for a in find_attentions(program) if glob_match(a.path, self.options.where)]

    def _units(self, attention: Attention) -> int:
        return attention.num_kv_heads if self.options.unit == "kv_group" else attention.group_size

    def _target(self, attention: Attention) -> int:
        o, units = self.options, self._units(attention)
        what = "KV groups" if o.unit == "kv_group" else "query heads per KV group"
        k = o.keep if o.keep is not None else round(o.keep_ratio * units)
        if k < 1:
            raise PassError(
                f"prune_heads: keep_ratio {o.keep_ratio} leaves {attention.path} none of its {units} {what}; raise it"
                + (
                    "; its KV heads serve one query head each: use unit: kv_group"
                    if o.unit == "query" and units == 1
                    else ""
                )
            )
        if k > units:
            raise PassError(f"prune_heads: keep {k} exceeds the {units} {what} of {attention.path}")
        return k

    def requires(self, program: Program, ctx: PassContext) -> HeadsPlan:
        """The matched attentions and the units each keeps (global scope decides them in `run`)."""
        attentions = self._attentions(program)
        if not attentions:
            found = [a.path for a in find_attentions(program)]
            misses = "; ".join(str(m) for m in attention_misses(program)[:3])
            raise PassError(
                f"prune_heads: where={self.options.where!r} matches no attention; attentions found: "
                f"{found[:6] or 'none'}{' ...' if len(found) > 6 else ''}"
                + (f". Attention cores whose heads cannot be pruned: {misses}" if misses else "")
            )
        pinned = self.options.kept or {}
        paths = {a.path: a for a in attentions}
        for path, heads in pinned.items():
            if path not in paths:
                raise PassError(f"prune_heads: kept names {path!r}, not an attention matched by where")
            _keep_mask(paths[path], heads)
        targets = [self._target(a) for a in attentions]
        if self.needs_calibration():
            ctx.require_calibration(self.name)
        return HeadsPlan(attentions, targets)

    def needs_calibration(self) -> bool:
        return self.options.importance == "activation"

    # ----- importance ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _scores(self, program: Program, ctx: PassContext, attentions: list[Attention]) -> list[torch.Tensor]:
        """[G, R] score per query head of each attention."""
        kind = self.options.importance
        if kind == "random":
            gen = torch.Generator().manual_seed(self.options.seed)
            return [torch.rand(a.num_kv_heads, a.group_size, generator=gen) for a in attentions]
        weights = [output_weight(program, a) for a in attentions]  # [out, in]
        if kind == "magnitude":
            return [
                torch.tensor([float(w[:, a.output_columns(h)].norm()) for h in range(a.num_heads)]).view(
                    a.num_kv_heads, a.group_size
                )
                for a, w in zip(attentions, weights)
            ]
        nodes = {a.output: output_projection_input(program, a) for a in attentions}
        sums = [torch.zeros(a.num_heads, dtype=torch.double) for a in attentions]
        tokens = 0
        for batch, values in ctx.statistics.observed(nodes.values(), "head importance"):
            mask = CalibrationSet.valid_mask(batch)
            for i, a in enumerate(attentions):
                x = token_vectors(values[nodes[a.output]], mask)
                sums[i] += head_contribution_sums(a, weights[i], x)
            tokens += x.shape[0]
        return [(s / max(tokens, 1)).float().view(a.num_kv_heads, a.group_size) for s, a in zip(sums, attentions)]

    def _unit_scores(self, score: torch.Tensor) -> torch.Tensor:
        return score.sum(1) if self.options.unit == "kv_group" else score

    def _keep(self, attention: Attention, score: torch.Tensor, k: int) -> torch.Tensor:
        keep = torch.zeros(attention.num_kv_heads, attention.group_size, dtype=torch.bool)
        if self.options.unit == "kv_group":
            keep[score.sum(1).topk(k).indices] = True
        else:
            keep.scatter_(1, score.topk(k, dim=1).indices, True)
        return keep

    def _global_targets(self, attentions: list[Attention], scores: list[torch.Tensor]) -> list[int]:
        units = [self._unit_scores(s) for s in scores]
        total = round(self.options.keep_ratio * sum(u.numel() for u in units))
        if total < 1:
            raise PassError(f"prune_heads: keep_ratio {self.options.keep_ratio} keeps no heads; raise it")
        threshold = torch.cat([u.reshape(-1) for u in units]).topk(total).values.min()
        per = 1 if self.options.unit == "kv_group" else None
        return [max(1, int((u >= threshold).sum()) // (per or a.num_kv_heads)) for a, u in zip(attentions, units)]

    # ----- rewrite ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, program: Program, ctx: PassContext, plan: HeadsPlan) -> PassResult:
        attentions, targets = plan.attentions, plan.keep
        scores = self._scores(program, ctx, attentions)
        if self.options.scope == "global":
            targets = self._global_targets(attentions, scores)
        pinned = self.options.kept or {}
        decisions = []
        for a, score, k in zip(attentions, scores, targets):
            keep = _keep_mask(a, pinned[a.path]) if a.path in pinned else self._keep(a, score, k)
            before = sum(program.state_shape(p.name).numel() for p in a.params)
            kept_groups = keep.any(1).nonzero().squeeze(1).tolist()
            if not bool(keep.all()):
                apply_heads(program, a, keep)
            decisions.append(
                AttentionDecision(
                    path=a.path,
                    core_path=a.core_path,
                    heads_before=a.num_heads,
                    heads_after=int(keep.sum()),
                    kv_heads_before=a.num_kv_heads,
                    kv_heads_after=len(kept_groups),
                    head_dim=a.head_dim,
                    kept_kv_heads=kept_groups,
                    kept_heads=keep.view(-1).nonzero().squeeze(1).tolist(),
                    parameters_before=before,
                    parameters_after=sum(program.state_shape(p.name).numel() for p in a.params),
                    importance=HeadImportance(min=float(score.min()), max=float(score.max()), mean=float(score.mean())),
                    approximate=list(a.approximate) if a.approximate else None,
                )
            )
        stats = {
            "attentions": len(decisions),
            "heads_before": sum(d.heads_before for d in decisions),
            "heads_after": sum(d.heads_after for d in decisions),
            "kv_heads_before": sum(d.kv_heads_before for d in decisions),
            "kv_heads_after": sum(d.kv_heads_after for d in decisions),
        }
        modified = stats["heads_after"] < stats["heads_before"]
        result = HeadsDecisions(importance=self.options.importance, unit=self.options.unit, attentions=decisions)
        return PassResult(modified=modified, stats=stats, decisions=result)

    def targets(self, program: Program) -> list[str]:
        return [a.path for a in self._attentions(program)]

    def replay(self, decisions: dict, shared: list[str]) -> PruneHeads:
        """The same heads kept in the `shared` attentions (as `kept`); the others decided by the options."""
        kept = {d["path"]: _kept_lists(d) for d in decisions["attentions"] if d["path"] in shared}
        return PruneHeads(dataclasses.replace(self.options, kept={**(self.options.kept or {}), **kept}))

    def ensures(self, program: Program, ctx: PassContext, result: PassResult) -> None:
        counts = head_counts(program)
        for d in result.decisions.attentions:
            if counts.get(d.core_path) != (d.heads_after, d.kv_heads_after):
                raise PassError(
                    f"prune_heads: {d.path} does not have the reported {d.heads_after} heads / {d.kv_heads_after} KV heads"
                )


def _kept_lists(decision: dict) -> list[list[int]]:
    """`kept_heads` of a decision as a list of kept query heads per KV group ([] for a removed group)."""
    r = decision["heads_before"] // decision["kv_heads_before"]
    groups: list[list[int]] = [[] for _ in range(decision["kv_heads_before"])]
    for h in decision["kept_heads"]:
        groups[h // r].append(h % r)
    return groups


def _keep_mask(attention: Attention, groups: list[list[int]]) -> torch.Tensor:
    """`kept` for one attention (query heads kept, per KV group, by index within the group) as a [G, R] mask."""
    g, r = attention.num_kv_heads, attention.group_size
    if len(groups) != g or any(not all(0 <= i < r for i in heads) for heads in groups):
        raise PassError(
            f"prune_heads: kept[{attention.path!r}] must list, for each of {g} KV groups, heads in [0, {r})"
        )
    keep = torch.zeros(g, r, dtype=torch.bool)
    for i, heads in enumerate(groups):
        keep[i, heads] = True
    counts = {len(set(h)) for h in groups} - {0}
    if len(counts) != 1:
        raise PassError(
            f"prune_heads: kept[{attention.path!r}] must keep the same number of query heads in every kept KV group "
            f"(the group size stays uniform), got {[len(h) for h in groups]}"
        )
    return keep
