"""`slice_hidden`: width pruning of the residual stream. Keep the most important hidden (embedding) channels.

A hidden channel c is column c of every embedding table (token, learned positions, token types), entry c of every
norm's weight and bias, column c of every projection reading the stream (q/k/v, gate/up, fc1, the LM head, a
pooler) and row c (and bias entry c) of every projection writing it (o_proj, down_proj, fc2). Which tensors and
shape literals are coupled is decided from the graph by `sparsec.analysis.hidden.hidden_channel_group`, which
refuses, naming the op, graphs it cannot follow (MoE experts, `inputs_embeds`, ...); this pass only scores and
selects. Kept channels stay in their original order.

Exactness: with channels removed, LayerNorm and RMSNorm normalise over fewer channels, so the result equals the
Hugging Face model rebuilt with `hidden_size` = kept (same heads, head_dim and intermediate size) and the same
weights sliced, but not the original model: an approximation, which the quality gate judges (Minitron distills
afterwards). A constant scale of the embeddings (Gemma's sqrt(hidden_size) normalizer) keeps its original value:
the trained weights expect it.

Importance:
- `activation` (default, needs calibration; as Minitron): score_c = sum over the normalised inputs of the
  projections reading the stream (the outputs of the norms feeding them, and the LM head's input) of
  E[|x_c|] over valid calibration tokens;
- `magnitude` (no data): ||E[:, c]||_2 (the token embedding's column) * ||[W_1[:, c]; W_2[:, c]; ...]||_2 (the
  columns of every projection reading the stream), independent of how a family parametrises its norm weights;
- `random`: a seeded baseline.

The stream is one tensor through the whole model, so there is no `where`: a MoT model's understanding and generation
copies share it and are sliced together.

Recipe:
    passes:
      - slice_hidden: {keep_ratio: 0.75, round_to: 8}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from sparsec.analysis.dependency import linear_weight
from sparsec.analysis.hidden import HiddenGroup, hidden_channel_group
from sparsec.analysis.importance import Importance
from sparsec.analysis.match import NoMatch
from sparsec.errors import PassError
from sparsec.ir.program import Program
from sparsec.transform.options import check_keep
from sparsec.transform.pass_manager import Pass, PassContext, PassResult


def _channel_group(program: Program) -> HiddenGroup:
    """The stream's channel group; `PassError` saying why when the graph cannot be sliced."""
    group = hidden_channel_group(program)
    if isinstance(group, NoMatch):
        raise PassError(f"slice_hidden: {group.rule}")
    return group


@dataclass(frozen=True, kw_only=True)
class HiddenDecisions:
    """What `slice_hidden` chose (decisions.json holds these fields).

    Attributes:
        importance: how channels were scored.
        approximate: whether the result differs from the original model (channels were removed: the norms
            normalise over fewer of them); `exactness` says how.
        width_before, width_after: the residual stream's width.
        kept_indices: the channels kept, in order.
        sliced: every tensor sliced, with the dimension.
        shape_literals: the graph's shape constants rewritten to the new width.
        outputs_narrowed: the program outputs now `width_after` wide.
    """

    importance: str
    approximate: bool
    exactness: str
    width_before: int
    width_after: int
    kept_indices: list[int]
    parameters_before: int
    parameters_after: int
    sliced: dict[str, int]
    shape_literals: list[str]
    outputs_narrowed: list[str]


@dataclass(frozen=True)
class HiddenPlan:
    """The residual stream's channel group and the width it keeps."""

    group: HiddenGroup
    keep: int


class SliceHidden(Pass):
    """Slice the residual stream's hidden channels by calibration activation, weight magnitude or at random."""

    name = "slice_hidden"

    @dataclass
    class Options:
        keep_ratio: float | None = None
        keep: int | None = None
        importance: Importance = "activation"
        round_to: int = 8
        seed: int = 0
        where: str = "**"
        kept: list[int] | None = None

        def __post_init__(self) -> None:
            check_keep(self.keep_ratio, self.keep, decided_elsewhere=self.kept is not None)
            if self.round_to < 1:
                raise ValueError(f"round_to: must be >= 1, got {self.round_to}")
            if self.where != "**":
                raise ValueError(
                    f"where={self.where!r}: the residual stream is one tensor through the whole model (a MoT "
                    "model's understanding and generation copies share it), so its channels are sliced everywhere "
                    "or nowhere; remove where"
                )

    def _target(self, width: int) -> int:
        o = self.options
        k = o.keep if o.keep is not None else round(o.keep_ratio * width)
        if k < 1:
            raise PassError(f"slice_hidden: keep_ratio {o.keep_ratio} leaves zero of the {width} hidden channels")
        if k > width:
            raise PassError(f"slice_hidden: keep {k} exceeds the {width} hidden channels")
        r = o.round_to
        return min(width, max(r, int(round(k / r)) * r))

    def requires(self, program: Program, ctx: PassContext) -> HiddenPlan:
        """The plan: the stream's channel group and the kept width; refuses before any change."""
        group = _channel_group(program)
        kept = self.options.kept
        if kept is not None:
            if not kept or len(set(kept)) != len(kept) or not all(0 <= i < group.width for i in kept):
                raise PassError(f"slice_hidden: kept must list distinct channel indices in [0, {group.width})")
            return HiddenPlan(group, len(kept))
        k = self._target(group.width)
        if self.needs_calibration():
            ctx.require_calibration(self.name)
        return HiddenPlan(group, k)

    def needs_calibration(self) -> bool:
        """Activation importance needs data; magnitude and random do not."""
        return self.options.importance == "activation"

    def _scores(self, program: Program, ctx: PassContext, group: HiddenGroup) -> torch.Tensor:
        kind = self.options.importance
        if kind == "activation":
            points = list(dict.fromkeys(r.args[0] for r in group.readers))
            stats = ctx.statistics.get(points)
            return torch.stack([stats[p.name].mean_abs.float() for p in points]).sum(0)
        if kind == "magnitude":
            table = program.state_tensor(program.state_name(group.embeddings[0].args[0])).float()
            columns = torch.stack([linear_weight(program, r).float().pow(2).sum(0) for r in group.readers])
            return table.norm(dim=0) * columns.sum(0).sqrt()
        return torch.rand(group.width, generator=torch.Generator().manual_seed(self.options.seed))

    @torch.no_grad()
    def run(self, program: Program, ctx: PassContext, plan: HiddenPlan) -> PassResult:
        group, k = plan.group, plan.keep
        if self.options.kept is not None:
            kept = torch.tensor(sorted(self.options.kept))
        else:
            kept = self._scores(program, ctx, group).topk(k).indices.sort().values
        before = group.num_parameters(program)
        if k < group.width:
            group.apply(program, kept)
        decisions = HiddenDecisions(
            importance=self.options.importance,
            approximate=k < group.width,
            exactness="norms normalise over the kept channels: equals the model rebuilt with hidden_size = "
            "width_after and these weights sliced, not the original model; the quality gate judges",
            width_before=group.width,
            width_after=k,
            kept_indices=kept.tolist(),
            parameters_before=before,
            parameters_after=group.num_parameters(program),
            sliced={p.name: p.dim for p in group.params},
            shape_literals=[lit.node.name for lit in group.literals],
            outputs_narrowed=list(group.outputs),
        )
        stats = {
            "hidden_before": group.width,
            "hidden_after": k,
            "tensors": len(group.params),
            "readers": len(group.readers),
            "writers": len(group.writers),
        }
        return PassResult(modified=k < group.width, stats=stats, decisions=decisions)

    def targets(self, program: Program) -> list[str]:
        """The coupled tensors: entry points sharing any of them slice the same channels (`replay`)."""
        return [p.name for p in _channel_group(program).params]

    def replay(self, decisions: dict, shared: list[str]) -> SliceHidden:
        """The same channels kept (as `kept`): the stream is one group, so a shared tensor pins all of it."""
        return SliceHidden(dataclasses.replace(self.options, kept=decisions["kept_indices"]))

    def ensures(self, program: Program, ctx: PassContext, result: PassResult) -> None:
        group = _channel_group(program)
        k = result.decisions.width_after
        wrong = [p.name for p in group.params if program.state_shape(p.name)[p.dim] != k]
        if group.width != k or wrong or len(group.params) != len(result.decisions.sliced):
            raise PassError(f"slice_hidden: the stream is not {k} channels wide everywhere after slicing ({wrong[:3]})")
