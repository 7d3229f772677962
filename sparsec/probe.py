"""The sensitivity probe behind `sparsec analyze`: which component of a unified model tolerates compression.

It reproduces the analysis of "Understanding and Harnessing Sparsity in Unified Multimodal Models" (see
BRIEF.md): compress one component (understanding or generation, by component tags) at a time, in depth or in
width, over a sweep of ratios, and watch the quality of each task (understanding and generation inputs are
separate calibration sets) relative to the uncompressed model. Training-free and cheap: one statistics pass
per task, then a sweep point costs forward passes only. Compression is applied as a what-if rewrite of node
values while the program runs (`Program.run(rewrite=...)`), never by re-capturing or editing the graph:

- depth, ratio r: the round(r * n) most redundant of the component's n blocks are skipped (each stream's block
  output := its block input), ranked as `drop_layers` ranks them (mean cos(X_in, X_out) over the component's tokens, highest
  first). A block tagged with the component is skipped for every token. In a Mixture-of-Transformers layer
  (a `shared` block holding per-modality weight copies, selected by the family's modality mask) only the
  component's tokens skip it; the other modality still attends to them there.
- width, ratio r: every FFN of the component keeps its round((1 - r) * width) most important neurons
  (activation importance, as `slice_neurons`), the others are zeroed at the down projection's input, which is
  exactly what slicing them away computes.
- heads (`--kinds heads`, not in the default sweep), ratio r: every attention of the component keeps its
  round((1 - r) * heads) most important query heads (at least one; the head's contribution through the output
  projection, as `prune_heads` scores it); the others are zeroed at the output projection's input, which is
  exactly what removing those query heads computes. Which sets `prune_heads` can express is narrower (whole KV
  groups, or the same number of query heads in every group), so read this as each component's sensitivity.
- per unit: each block of the component skipped alone, each FFN sliced alone and each attention pruned alone by
  the sweep's largest ratio, which says which layers the model needs most.

A model without understanding / generation tags (a plain LLM: every region `shared`) is probed as one
component, `shared`: the whole model.

The statistics are the library's own: one `StatisticsCache.observed` pass per task (sample by sample), block
cosines summed by `sparsec.data.calibration.cosine_sum`, neuron magnitudes pooled by its `ChannelAccumulator`
and scored by `sparsec.analysis.importance.neuron_importance`.

Rankings and importances are pooled over all tasks that run the same program, so at a given ratio every task
sees the same compressed model. Dynamic sparsity: for each FFN and calibration sample, the set of its top
`top_fraction` neurons by mean |activation| over the sample's tokens; the report gives the mean Jaccard overlap
of these sets between samples of one task and between samples of different tasks, per FFN (low overlap:
activations vary by input, the signal that motivates converting an FFN to a mixture of experts).

Example::
    probe = Probe([Task("understanding", program, und_calib), Task("generation", program, gen_calib)])
    result = probe.run(ratios=(0.25, 0.5))
    write_report(result, "out/analysis")   # analysis.json, analysis.md, quality_*.png, sensitivity.png, ...
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import tempfile
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.fx import Node

from sparsec.analysis.blocks import residual_structure
from sparsec.analysis.ffn import Ffn
from sparsec.analysis.heads import Attention, find_attentions, output_projection_input
from sparsec.analysis.importance import head_contribution_sums, neuron_importance, output_weight
from sparsec.analysis.match import NoMatch
from sparsec.analysis.regions import region_index
from sparsec.data.calibration import CalibrationSet, ChannelAccumulator, ChannelStats, StatisticsCache, cosine_sum
from sparsec.data.quality import compare_outputs
from sparsec.data.reference import ReferenceOutputs
from sparsec.errors import SparsecError
from sparsec.families import entry_points, family_by_name
from sparsec.ir.program import Program, ValueRewrite
from sparsec.ir.tags import TagRule
from sparsec.progress import progress_bar

KINDS = ("depth", "width", "heads")
DEFAULT_KINDS = ("depth", "width")
COMPONENTS = ("understanding", "generation")
SHARED = "shared"
METRICS = ("auto", "top1", "cosine", "kl", "rel_l2")


class AnalysisError(SparsecError):
    """Bad analysis input: unknown component, a component with nothing to compress, mismatched tasks."""


def check_options(
    *,
    components: Sequence[str] | None = None,
    kinds: Sequence[str] = DEFAULT_KINDS,
    ratios: Sequence[float] = (0.5,),
    top_fraction: float = 0.1,
    metric: str = "auto",
) -> None:
    """`AnalysisError` for a probe option out of its range: the checks `Probe` makes, which `sparsec analyze` makes
    before it loads the model. `components`: None lets the probe choose (`Probe`)."""
    for label, values, allowed in (
        ("component", COMPONENTS if components is None else components, (*COMPONENTS, SHARED)),
        ("kind", kinds, KINDS),
    ):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise AnalysisError(f"unknown {label}(s) {bad or list(values)}; choose from {list(allowed)}")
    bad = [r for r in ratios if not 0 < r < 1]
    if bad or not ratios:
        raise AnalysisError(f"ratios must lie in (0, 1) (the fraction removed), got {list(ratios)}")
    if not 0 < top_fraction <= 1:
        raise AnalysisError(f"top_fraction must be in (0, 1], got {top_fraction}")
    if metric not in METRICS:
        raise AnalysisError(f"metric must be one of {list(METRICS)}, got {metric!r}")


@dataclass
class Task:
    """A task to watch: the program that serves it (an entry point) and its calibration inputs.

    `scored`: optional [N, S] bool, the positions where the task's answer is read (a classifier's label
    position, the positions that predict a generated image's tokens); quality is measured there (and on valid
    tokens) only. Default: every valid position, which dilutes a task scored at one position in many.
    """

    name: str
    program: Program
    calibration: CalibrationSet
    scored: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.scored is not None:
            first = next(iter(self.calibration.inputs.values()))
            if self.scored.dim() != 2 or self.scored.shape[0] != len(self.calibration) or not self.scored.any():
                raise AnalysisError(
                    f"task {self.name!r}: the scoring mask must be [N, S] with N = {len(self.calibration)} "
                    f"samples and at least one position set, got {tuple(self.scored.shape)}"
                    f" (inputs {tuple(first.shape)})"
                )
            self.scored = self.scored.bool()

    def score_masks(self) -> list[torch.Tensor | None]:
        """Per calibration batch: where outputs are compared (valid tokens, and scored positions if given)."""
        masks = []
        start = 0
        for batch in self.calibration.batches():
            valid = CalibrationSet.valid_mask(batch)
            size = next(iter(batch.values())).shape[0]
            if self.scored is not None:
                scored = self.scored[start : start + size]
                valid = scored if valid is None else valid & scored
            masks.append(valid)
            start += size
        return masks


@dataclass(frozen=True)
class BlockTarget:
    """A block the depth probe can skip: (input, output) of each residual stream it carries (two in an MMDiT
    block); `token_value` set: only tokens whose modality mask has this value skip it."""

    path: str
    streams: tuple[tuple[Node, Node], ...]
    token_value: int | None


@dataclass
class Targets:
    """What one component offers for compression in one program."""

    blocks: list[BlockTarget] = field(default_factory=list)
    ffns: list[Ffn] = field(default_factory=list)
    attentions: list[Attention] = field(default_factory=list)

    def units(self, kind: str) -> list:
        """The blocks (depth), FFNs (width) or attentions (heads)."""
        return {"depth": self.blocks, "width": self.ffns, "heads": self.attentions}[kind]

    def count(self, kind: str) -> int:
        return len(self.units(kind))


def component_targets(program: Program, component: str) -> Targets:
    """The blocks and FFNs of `component` in `program` (by component tags, see the module docstring)."""
    modality_mask = _modality_mask(program)
    regions = region_index(program)
    tag = program.tagger.tag
    ffns = regions.ffns()
    targets = Targets(
        ffns=[f for f in ffns if tag(f.path) == component],
        attentions=[a for a in find_attentions(program) if tag(a.path) == component],
    )
    paths = regions.paths
    for stack in regions.block_stacks():
        for region in stack.blocks:
            if tag(region.path) == component:
                token_value = None
            elif (
                tag(region.path) == "shared"
                and modality_mask is not None
                and any(tag(p) == component for p in paths if p.startswith(region.path + "."))
            ):
                token_value = 1 if component == "generation" else 0
            else:
                continue
            found = residual_structure(program).streams(region.path)
            if isinstance(found, NoMatch):
                raise SparsecError(f"cannot find the residual structure of {region.path}: {found.rule}")
            streams = tuple((s.input, s.output) for s in found)
            targets.blocks.append(BlockTarget(region.path, streams, token_value))
    return targets


def _modality_mask(program: Program) -> str | None:
    return family_by_name(program.family).modality_mask


def _token_select(
    value: torch.Tensor,
    batch: dict[str, torch.Tensor],
    modality_mask: str | None,
    token_value: int | None,
    valid_only: bool,
) -> torch.Tensor | None:
    """Bool mask over `value`'s token positions ([B, S] or packed [B*S]) of the wanted tokens; None when the
    value's rows are already one modality's gathered tokens (nothing to select)."""
    mask = CalibrationSet.valid_mask(batch) if valid_only else None
    first = next(iter(batch.values()))
    select = mask if mask is not None else torch.ones(first.shape[:2], dtype=torch.bool)
    if token_value is not None:
        select = select & (batch[modality_mask] == token_value)
    if value.dim() >= 3 and tuple(value.shape[:2]) == tuple(select.shape):
        return select
    if value.dim() == 2 and value.shape[0] == select.numel():
        return select.reshape(-1)
    return None


def _rows(value: torch.Tensor, select: torch.Tensor | None) -> torch.Tensor:
    return value[select] if select is not None else value.reshape(-1, value.shape[-1])


def _jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / max(len(a | b), 1)


def _mean_pairwise(sets_a: list[set[int]], sets_b: list[set[int]] | None) -> float | None:
    """Mean Jaccard over pairs within `sets_a` (b None) or across a x b; None without pairs."""
    pairs = itertools.combinations(sets_a, 2) if sets_b is None else itertools.product(sets_a, sets_b)
    values = [_jaccard(a, b) for a, b in pairs]
    return sum(values) / len(values) if values else None


@dataclass
class _ProgramStats:
    """Statistics pooled over the tasks of one program: the sum of each block's token cosines (by path and
    token value) and the channel statistics of each FFN's down projection input, by node name.

    `get` answers like `StatisticsCache.get`, so `neuron_importance` scores the neurons from these.
    """

    cos_sum: dict[tuple[str, int | None], float] = field(default_factory=dict)
    cos_tokens: dict[tuple[str, int | None], int] = field(default_factory=dict)
    channels: dict[str, ChannelAccumulator] = field(default_factory=dict)
    head_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    head_tokens: dict[str, int] = field(default_factory=dict)

    def head_importance(self, attention: Attention) -> torch.Tensor:
        """Mean contribution of each query head over the tokens seen; leading heads first if none was seen."""
        if not self.head_tokens.get(attention.path):
            return torch.arange(attention.num_heads, 0, -1, dtype=torch.float64)
        return self.head_sums[attention.path] / self.head_tokens[attention.path]

    def cosine(self, block: BlockTarget) -> float:
        key = (block.path, block.token_value)
        return self.cos_sum.get(key, 0.0) / max(self.cos_tokens.get(key, 0), 1)

    def get(self, nodes: Sequence[Node]) -> dict[str, ChannelStats]:
        return {n.name: self.channels[n.name].result() for n in nodes if n.name in self.channels}


class Probe:
    """Sweeps of depth and width compression per component, watched on every task.

    Besides the sweep, `run` measures each unit alone (`units` in the result): every block of a probed
    component skipped on its own, every FFN sliced on its own by the sweep's largest ratio.

    Args:
        tasks: the tasks; tasks may share a program (one model, two calibration sets) or not (entry points).
        components: which components to probe (`understanding`, `generation`, `shared`). None: understanding
            and generation where some program tags blocks or FFNs with them, else `shared` (a plain LLM,
            every region `shared`: the whole model is probed, and `untagged` is set).
        kinds: `depth`, `width`, `heads` (default: depth and width).
        strict: raise `AnalysisError` when a requested (component, kind) has nothing to compress anywhere;
            otherwise it is skipped and listed in the result with the reason.
        top_fraction: share of an FFN's neurons counted as highly active for the sparsity overlap.
        metric: the headline quality metric (`auto`: top-1 agreement for logits, cosine otherwise).
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        *,
        components: Sequence[str] | None = None,
        kinds: Sequence[str] = DEFAULT_KINDS,
        strict: bool = False,
        top_fraction: float = 0.1,
        metric: str = "auto",
        progress: bool = False,
    ) -> None:
        if not tasks:
            raise AnalysisError("no tasks to analyse: give at least one task (a program and its calibration set)")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise AnalysisError(f"task names must differ, got {names}")
        check_options(components=components, kinds=kinds, top_fraction=top_fraction, metric=metric)
        for task in tasks:
            have, want = sorted(task.calibration.inputs), sorted(task.program.input_names)
            if have != want:
                raise AnalysisError(
                    f"task {task.name!r}: calibration inputs {have} do not match the program's inputs {want}"
                )
        self.tasks = list(tasks)
        self.top_fraction = top_fraction
        self.metric = metric
        self.progress = progress
        self.programs: list[Program] = list({id(t.program): t.program for t in tasks}.values())
        self._stats: dict[int, _ProgramStats] | None = None
        self._top_sets: dict[str, dict[str, list[set[int]]]] = {}
        self.targets = {(id(p), c): component_targets(p, c) for p in self.programs for c in components or COMPONENTS}
        self.untagged = components is None and not any(t.count(k) for t in self.targets.values() for k in KINDS)
        if self.untagged:
            components = (SHARED,)
            self.targets = {(id(p), SHARED): component_targets(p, SHARED) for p in self.programs}
        self.components = tuple(components or COMPONENTS)
        self.combos: list[tuple[str, str]] = []
        self.skipped: list[dict] = []
        for component, kind in itertools.product(self.components, kinds):
            if any(self.targets[(id(p), component)].count(kind) for p in self.programs):
                self.combos.append((component, kind))
                continue
            what = {"depth": "blocks", "width": "FFNs", "heads": "prunable attentions"}[kind]
            reason = (
                f"component {component!r} has no {what} in any task's program, so there is nothing to "
                f"compress in {kind}"
                + (
                    " (depth needs residual blocks tagged with it, or per-modality weight "
                    "copies in a Mixture-of-Transformers layer)"
                    if kind == "depth"
                    else ""
                )
                + "; check `sparsec inspect` and tag its regions with a recipe `tags:` section"
            )
            if strict:
                raise AnalysisError(reason)
            self.skipped.append({"component": component, "kind": kind, "reason": reason})

    # ----- statistics ---------------------------------------------------------------------------
    def _collect(self) -> tuple[dict[int, _ProgramStats], dict[str, dict[str, list[set[int]]]]]:
        """One pass per task, sample by sample: block cosines, neuron magnitudes, per-sample top neurons."""
        stats = {id(p): _ProgramStats() for p in self.programs}
        top_sets: dict[str, dict[str, list[set[int]]]] = {}
        total = sum(len(t.calibration) for t in self.tasks)
        bar = progress_bar(total=total, desc="probe statistics", enabled=self.progress)
        for task in self.tasks:
            program = task.program
            mask_name = _modality_mask(program)
            pooled = stats[id(program)]
            blocks = {
                (b.path, b.token_value): b
                for (program_id, _), targets in self.targets.items()
                if program_id == id(program)
                for b in targets.blocks
            }.values()
            ffns = region_index(program).ffns()  # every FFN, shared ones too, for the sparsity overlap
            attentions = {
                a.path: a
                for (program_id, _), targets in self.targets.items()
                if program_id == id(program)
                for a in targets.attentions
            }.values()
            head_inputs = {a.path: output_projection_input(program, a) for a in attentions}
            weights = {a.path: output_weight(program, a) for a in attentions}
            watched = (
                {n for b in blocks for pair in b.streams for n in pair}
                | {f.down.args[0] for f in ffns}
                | set(head_inputs.values())
            )
            single = CalibrationSet(task.calibration.inputs, source=task.calibration.source, batch_size=1)
            for sample, held in StatisticsCache(program, single).observed(watched):
                for b in blocks:
                    key = (b.path, b.token_value)
                    for source, result in b.streams:
                        select = _token_select(held[result], sample, mask_name, b.token_value, valid_only=True)
                        x, y = _rows(held[source].float(), select), _rows(held[result].float(), select)
                        pooled.cos_sum[key] = pooled.cos_sum.get(key, 0.0) + cosine_sum(x, y)
                        pooled.cos_tokens[key] = pooled.cos_tokens.get(key, 0) + x.shape[0]
                for f in ffns:
                    h = held[f.down.args[0]]
                    rows = _rows(h.float(), _token_select(h, sample, None, None, valid_only=True)).abs()
                    if rows.shape[0] == 0:
                        continue
                    pooled.channels.setdefault(f.down.args[0].name, ChannelAccumulator()).add(rows)
                    k = max(1, math.ceil(self.top_fraction * rows.shape[1]))
                    top = set(rows.mean(0).topk(k).indices.tolist())
                    top_sets.setdefault(f.path, {}).setdefault(task.name, []).append(top)
                for a in attentions:
                    x = held[head_inputs[a.path]]
                    rows = _rows(x, _token_select(x, sample, None, None, valid_only=True))
                    sums = pooled.head_sums.get(a.path, torch.zeros(a.num_heads, dtype=torch.float64))
                    pooled.head_sums[a.path] = sums + head_contribution_sums(a, weights[a.path], rows)
                    pooled.head_tokens[a.path] = pooled.head_tokens.get(a.path, 0) + rows.shape[0]
                bar.update(1)
        bar.close()
        return stats, top_sets

    # ----- what-if rewrites ------------------------------------------------------------------------
    def plan(self, program: Program, component: str, kind: str, ratio: float, stats: _ProgramStats) -> dict:
        """What compressing `component` by `ratio` removes in `program`: skipped blocks, kept neurons per FFN or kept
        query heads per attention."""
        targets = self.targets[(id(program), component)]
        if kind == "depth":
            ranked = sorted(targets.blocks, key=stats.cosine, reverse=True)
            return {"skipped_blocks": ranked[: math.floor(ratio * len(ranked) + 0.5)]}
        if kind == "heads":
            kept_heads = []  # (attention, kept query heads): an Attention is no dict key
            for a in targets.attentions:
                keep = max(1, round((1 - ratio) * a.num_heads))
                kept_heads.append((a, stats.head_importance(a).topk(keep).indices.sort().values))
            return {"kept_heads": kept_heads}
        kept = {}
        seen = [f for f in targets.ffns if f.down.args[0].name in stats.channels]
        importance = dict(zip(seen, neuron_importance(program, seen, "activation", stats)))
        for f in targets.ffns:
            score = importance.get(f)
            if score is None:  # never active on any task's tokens: keep its leading neurons
                score = torch.arange(f.intermediate_size, 0, -1, dtype=torch.float32)
            keep = max(1, round((1 - ratio) * f.intermediate_size))
            kept[f] = score.topk(keep).indices.sort().values
        return {"kept_neurons": kept}

    @staticmethod
    def rewrites(program: Program, plan: dict, batch: dict[str, torch.Tensor]) -> dict[Node, ValueRewrite]:
        """`Program.run(rewrite=...)` entries carrying out `plan` on one batch."""
        mask_name = _modality_mask(program)
        out: dict[Node, ValueRewrite] = {}
        for block in plan.get("skipped_blocks", []):

            def skip(value, source, block=block):
                if block.token_value is None:
                    return source
                select = _token_select(value, batch, mask_name, block.token_value, valid_only=False)
                if select is None:
                    raise AnalysisError(f"cannot tell the tokens of {block.path}'s stream {tuple(value.shape)} apart")
                return torch.where(select.reshape(*select.shape, *([1] * (value.dim() - select.dim()))), source, value)

            for source, result in block.streams:
                out[result] = ValueRewrite(skip, reads=(source,))
        for attention, heads in plan.get("kept_heads", []):
            node = output_projection_input(program, attention)
            keep = torch.zeros(int(node.meta["val"].shape[-1]))
            for h in heads.tolist():
                keep[attention.output_columns(h)] = 1
            out[node] = ValueRewrite(lambda value, keep=keep: value * keep.to(value.dtype))
        for ffn, kept in plan.get("kept_neurons", {}).items():
            keep = torch.zeros(ffn.intermediate_size)
            keep[kept] = 1
            out[ffn.down.args[0]] = ValueRewrite(lambda value, keep=keep: value * keep.to(value.dtype))
        return out

    def statistics(self) -> dict[int, _ProgramStats]:
        """The pooled statistics behind every plan (collected on first use, then kept), by program id."""
        if self._stats is None:
            self._stats, self._top_sets = self._collect()
        return self._stats

    def compressed(
        self, task: Task, component: str, kind: str, ratio: float
    ) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """The task's program with `component` compressed in `kind` by `ratio`, as a callable `inputs -> outputs`.

        It is the model a sweep point measures, to score with a metric of your own (e.g. sampling images from
        a generator and judging them) instead of agreement with the uncompressed outputs:

            step = probe.compressed(task, "generation", "width", 0.5)
            logits = step(batch)["logits"]
        """
        if (component, kind) not in self.combos:
            raise AnalysisError(f"({component}, {kind}) is not probed here; probed: {self.combos}")
        plan = self.plan(task.program, component, kind, ratio, self.statistics()[id(task.program)])
        return lambda batch: task.program.run(batch, rewrite=self.rewrites(task.program, plan, batch))

    def outputs(self, task: Task, plan: dict) -> Iterator[dict[str, torch.Tensor]]:
        """The task's program outputs on its calibration batches with `plan` applied, one batch at a time."""
        return (task.program.run(b, rewrite=self.rewrites(task.program, plan, b)) for b in task.calibration.batches())

    # ----- the sweep ---------------------------------------------------------------------------------
    def _headline(self, metrics: dict[str, dict[str, float]]) -> tuple[str, str, float]:
        name = next((n for n in metrics if "logits" in n), next(iter(metrics)))
        metric = self.metric if self.metric != "auto" else ("top1" if "top1" in metrics[name] else "cosine")
        return name, metric, metrics[name][metric]

    def _measure(self, task: Task, plan: dict, reference: ReferenceOutputs) -> dict:
        """The task's quality with `plan` applied, relative to `reference` (its uncompressed outputs)."""
        metrics = compare_outputs(_lockstep(reference, self.outputs(task, plan), task.score_masks()))
        output, metric, value = self._headline(metrics)
        return {"value": value, "output": output, "metric": metric, "metrics": metrics}

    def _units(
        self, ratio: float, stats: dict[int, _ProgramStats], references: dict[str, ReferenceOutputs]
    ) -> list[dict]:
        """Each block of a probed component skipped alone, each FFN sliced alone by `ratio` (its neurons
        ranked as in the sweep), on every task whose program holds it: which layer the model needs most."""
        rows = []
        steps = [(c, k, t) for c, k in self.combos for t in self.tasks]
        for component, kind, task in progress_bar(steps, desc="probe per unit", enabled=self.progress):
            targets = self.targets[(id(task.program), component)]
            if kind == "depth":
                plans = [(b.path, {"skipped_blocks": [b]}) for b in targets.blocks]
            elif kind == "heads":
                kept = self.plan(task.program, component, kind, ratio, stats[id(task.program)])["kept_heads"]
                plans = [(a.path, {"kept_heads": [(a, heads)]}) for a, heads in kept]
            else:
                kept = self.plan(task.program, component, kind, ratio, stats[id(task.program)])["kept_neurons"]
                plans = [(f.path, {"kept_neurons": {f: kept[f]}}) for f in targets.ffns]
            for index, (path, plan) in enumerate(plans):
                row = {"component": component, "kind": kind, "index": index, "path": path, "task": task.name}
                row["ratio"] = 1.0 if kind == "depth" else ratio
                rows.append(row | self._measure(task, plan, references[task.name]))
        return rows

    def run(self, ratios: Sequence[float] = (0.125, 0.25, 0.375, 0.5), *, units: bool = True) -> dict:
        """Collect statistics, sweep every (component, kind, ratio) on every task, then (`units`) measure each
        block and FFN alone (FFNs at the largest ratio; `units: []` without); the result as a dict."""
        check_options(ratios=ratios)
        stats = self.statistics()
        references = {t.name: ReferenceOutputs(t.program, t.calibration) for t in self.tasks}  # programs not changed
        rows = []
        steps = [(c, k, r, t) for c, k in self.combos for r in ratios for t in self.tasks]
        for component, kind, ratio, task in progress_bar(steps, desc="probe sweep", enabled=self.progress):
            program = task.program
            plan = self.plan(program, component, kind, ratio, stats[id(program)])
            row = {"component": component, "kind": kind, "ratio": ratio, "task": task.name}
            if self.targets[(id(program), component)].count(kind) == 0:
                row.update(in_program=False, value=1.0, metrics=None)  # the task's program does not hold it
            else:
                row.update(in_program=True, **self._measure(task, plan, references[task.name]))
            if kind == "depth":
                row["skipped_blocks"] = [b.path for b in plan["skipped_blocks"]]
                count = self.targets[(id(program), component)].count(kind)
                row["actual_ratio"] = len(plan["skipped_blocks"]) / count if count else ratio
            elif kind == "heads":
                kept = plan["kept_heads"]
                row["kept_heads"] = {a.path: len(k) for a, k in kept}
                total = sum(a.num_heads for a, _ in kept)
                row["actual_ratio"] = 1 - sum(len(k) for _, k in kept) / total if total else ratio
            else:
                kept = plan["kept_neurons"]
                row["kept_width"] = {f.path: len(k) for f, k in kept.items()}
                total = sum(f.intermediate_size for f in kept)
                row["actual_ratio"] = 1 - sum(len(k) for k in kept.values()) / total if total else ratio
            rows.append(row)
        return {
            "tasks": {
                t.name: {"program_inputs": t.program.input_names, "calibration": t.calibration.describe()}
                for t in self.tasks
            },
            "metric": next((r["metric"] for r in rows if r.get("metric")), self.metric),
            "synthetic": [t.name for t in self.tasks if t.calibration.synthetic],
            "components": list(self.components),
            "untagged": self.untagged,
            "ratios": list(ratios),
            "targets": {
                c: {
                    k: sorted({x.path for p in self.programs for x in self.targets[(id(p), c)].units(k)}) for k in KINDS
                }
                for c in {c for c, _ in self.combos}
            },
            "sweep": rows,
            "units": self._units(max(ratios), stats, references) if units else [],
            "skipped": self.skipped,
            "sparsity": self._sparsity(self._top_sets),
        }

    def _sparsity(self, top_sets: dict[str, dict[str, list[set[int]]]]) -> list[dict]:
        component_of = {f.path: c for (_, c), t in self.targets.items() for f in t.ffns}
        out = []
        for path, by_task in top_sets.items():
            entry = {
                "ffn": path,
                "component": component_of.get(path, "shared"),
                "top_fraction": self.top_fraction,
                "within": {name: _mean_pairwise(sets, None) for name, sets in by_task.items()},
                "across": {
                    f"{a} vs {b}": _mean_pairwise(by_task[a], by_task[b])
                    for a, b in itertools.combinations(sorted(by_task), 2)
                },
            }
            out.append(entry)
        return out


def _lockstep(*iterables) -> Iterator[tuple]:
    """`zip`, without holding the previous items while the next ones are computed (zip keeps its last tuple)."""
    iterators = [iter(i) for i in iterables]
    while True:
        items = []
        for iterator in iterators:
            try:
                items.append(next(iterator))
            except StopIteration:
                return
        yield tuple(items)
        del items


# ----- report -----------------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _row(cells: Sequence[str]) -> str:
    """One markdown table row; a `|` inside a cell (a task name) is escaped, so the row keeps its columns."""
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _header(cells: Sequence[str]) -> list[str]:
    return [_row(cells), "|" + "---|" * len(cells)]


def _synthetic_note(result: dict) -> str:
    """The warning every output carries when some task ran on synthetic inputs; empty otherwise."""
    names = result["synthetic"]
    if not names:
        return ""
    tasks = "task" if len(names) == 1 else "tasks"
    return f"synthetic inputs ({tasks} {', '.join(names)}): the probe ran, its numbers say nothing about the model"


def format_markdown(result: dict) -> str:
    """The sweep, each unit alone and the sparsity overlap as markdown tables (every row as wide as its header)."""
    tasks = list(result["tasks"])
    lines = [f"# sparsec analyze: quality relative to the uncompressed model ({result['metric']})", ""]
    if _synthetic_note(result):
        lines += [f"**Warning: {_synthetic_note(result)}.**", ""]
    if result["untagged"]:
        lines += [
            "No region is tagged understanding or generation (every region is `shared`): the probe compresses "
            "the whole model. For a multimodal model, tag its components with a recipe `tags:` section.",
            "",
        ]
    lines += _header(["component", "kind", "ratio (actual)", *tasks])
    by_key: dict[tuple, dict[str, dict]] = {}
    for row in result["sweep"]:
        by_key.setdefault((row["component"], row["kind"], row["ratio"]), {})[row["task"]] = row
    for (component, kind, ratio), cells in by_key.items():
        values = [
            _fmt(cells[t]["value"]) + ("" if cells[t]["in_program"] else " (n/a)") if t in cells else "-" for t in tasks
        ]
        actual = sorted({f"{c['actual_ratio']:.3g}" for c in cells.values() if c["in_program"]})
        lines.append(_row([component, kind, f"{ratio:g} ({', '.join(actual) or '-'})", *values]))
    lines += [
        "",
        "Ratio: the fraction asked for; in brackets the fraction removed (whole blocks, whole neurons)."
        + (
            " (n/a): the task's program does not hold that component, so its quality is unchanged."
            if any(not r["in_program"] for r in result["sweep"])
            else ""
        ),
        "",
    ]
    for skipped in result["skipped"]:
        lines.append(f"- skipped {skipped['component']} / {skipped['kind']}: {skipped['reason']}")
    if result["units"]:
        ratio = next((u["ratio"] for u in result["units"] if u["kind"] in ("width", "heads")), None)
        lines += ["", "## Each block, FFN and attention alone", ""]
        lines += _header(["component", "kind", "#", "block / FFN / attention", *tasks])
        units: dict[tuple, dict[str, dict]] = {}
        for u in result["units"]:
            units.setdefault((u["component"], u["kind"], u["index"], u["path"]), {})[u["task"]] = u
        for (component, kind, index, path), cells in units.items():
            values = [_fmt(cells[t]["value"]) if t in cells else "-" for t in tasks]
            lines.append(_row([component, kind, str(index), path, *values]))
        lines += [
            "",
            "depth: the block alone skipped"
            + (
                ""
                if ratio is None
                else f"; width: the FFN alone with {ratio:.0%} of its neurons removed; heads: the attention alone "
                f"with {ratio:.0%} of its query heads removed"
            )
            + ". The lower the value, the more the model needs that unit; -: not in the task's program.",
        ]
    if result["sparsity"]:
        across = sorted({k for e in result["sparsity"] for k in e["across"]})
        lines += [
            "",
            f"## Dynamic sparsity: Jaccard overlap of each sample's top {result['sparsity'][0]['top_fraction']:.0%} "
            "neurons",
            "",
        ]
        lines += _header(["FFN", "component", *(f"within {t}" for t in tasks), *(f"across {a}" for a in across)])
        for e in result["sparsity"]:
            lines.append(
                _row(
                    [
                        e["ffn"],
                        e["component"],
                        *(_fmt(e["within"].get(t)) for t in tasks),
                        *(_fmt(e["across"].get(a)) for a in across),
                    ]
                )
            )
    return "\n".join(lines) + "\n"


def _plots(result: dict, directory: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    note = _synthetic_note(result)

    def save(fig, name: str) -> str:
        if note:
            fig.suptitle(textwrap.fill(note, int(12 * fig.get_figwidth())), color="tab:red", fontsize=9)
        fig.tight_layout()
        fig.savefig(directory / name, dpi=120, bbox_inches="tight")  # the image grows to hold the legends
        plt.close(fig)
        return name

    def legend_beside(ax) -> None:
        """The legend right of the axes, never over a curve (it names up to a line per component and task)."""
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)

    def curves(ax, rows: list[dict], x: str, y: str) -> None:
        """One curve per (component, task) of `rows`, sorted along `x`."""
        for (component, task), group in itertools.groupby(
            sorted(rows, key=lambda r: (r["component"], r["task"], r[x])), key=lambda r: (r["component"], r["task"])
        ):
            group = list(group)
            ax.plot(
                [r[x] for r in group],
                [r[y] for r in group],
                marker="o",
                linestyle="--" if component == "generation" else "-",
                label=f"compress {component}, task {task}",
            )

    written = []
    for kind in KINDS:
        rows = [r for r in result["sweep"] if r["kind"] == kind]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(9, 4))  # 3 inches for the legend
        starts = [
            {**r, "actual_ratio": 0.0, "value": 1.0} for r in {(r["component"], r["task"]): r for r in rows}.values()
        ]
        curves(ax, starts + rows, "actual_ratio", "value")
        ax.set_xlabel(
            {
                "depth": "blocks skipped (fraction)",
                "width": "FFN neurons removed (fraction)",
                "heads": "query heads removed (fraction)",
            }[kind]
        )
        ax.set_ylabel(f"{result['metric']} vs uncompressed")
        ax.set_title(f"{kind} compression")
        ax.grid(alpha=0.3)
        legend_beside(ax)
        written.append(save(fig, f"quality_{kind}.png"))
    kinds = [k for k in KINDS if any(u["kind"] == k for u in result["units"])]
    if kinds:
        fig, axes = plt.subplots(1, len(kinds), figsize=(9 * len(kinds), 4), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            units = [u for u in result["units"] if u["kind"] == kind]
            curves(ax, units, "index", "value")
            what = {"depth": "block", "width": "FFN", "heads": "attention"}[kind]
            ax.set_xlabel(f"{what} (index among the component's {what}s, graph order)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(f"{result['metric']} vs uncompressed")
            ax.set_title(
                "each block skipped alone"
                if kind == "depth"
                else f"each {what} alone, {units[0]['ratio']:.0%} of its "
                + ("neurons" if kind == "width" else "query heads")
                + " removed"
            )
            ax.grid(alpha=0.3)
            legend_beside(ax)
        written.append(save(fig, "sensitivity.png"))
    if result["sparsity"]:
        components = sorted({e["component"] for e in result["sparsity"]})
        fig, axes = plt.subplots(1, len(components), figsize=(9 * len(components), 4), squeeze=False)
        for ax, component in zip(axes[0], components):
            entries = [e for e in result["sparsity"] if e["component"] == component]
            series = {f"within {t}": [e["within"].get(t) for e in entries] for t in result["tasks"]}
            series.update({f"across {a}": [e["across"].get(a) for e in entries] for a in entries[0]["across"]})
            values = []
            for label, column in series.items():
                points = [(i, v) for i, v in enumerate(column) if v is not None]
                if points:
                    ax.plot(*zip(*points), marker="o", label=label)
                    values += [v for _, v in points]
            if values:  # the axis spans the data (overlaps near 0.1 stay readable), within [0, 1]
                pad = max(0.1 * (max(values) - min(values)), 0.02)
                ax.set_ylim(max(0.0, min(values) - pad), min(1.0, max(values) + pad))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel(f"{component} FFN (index, graph order)")
            ax.set_ylabel("Jaccard overlap of top neurons")
            ax.set_title(f"{component} FFNs")
            ax.grid(alpha=0.3)
            legend_beside(ax)
        written.append(save(fig, "sparsity.png"))
    return written


def write_report(result: dict, out: str | os.PathLike) -> list[str]:
    """Write analysis.json, analysis.md and the PNG plots to `out` (staged beside it, moved in at the end)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (stage / "analysis.json").write_text(json.dumps(result, indent=2))
        (stage / "analysis.md").write_text(format_markdown(result))
        files = ["analysis.json", "analysis.md", *_plots(result, stage)]
        out.mkdir(exist_ok=True)
        for name in files:
            os.replace(stage / name, out / name)
        return files
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# ----- tasks from a loaded model (the command line) -------------------------------------------------------
def synthetic_task_inputs(entry, task: str, samples: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs for a task on an entry point; with a modality mask (Mixture-of-Transformers) the
    `understanding` task has no generation tokens and the `generation` task is a prompt (first quarter)
    followed by generation tokens. Fine for checking the probe runs, meaningless for its findings."""
    inputs = entry.example_inputs(samples, seq, seed)
    mask = entry.family.modality_mask
    if mask is not None and mask in inputs:
        is_gen = torch.zeros_like(inputs[mask])
        if task == "generation":
            is_gen[:, max(1, seq // 4) :] = 1
        inputs[mask] = is_gen
    return inputs


def _score_mask(path: str | None) -> torch.Tensor | None:
    """The `score_mask` tensor of a .safetensors task file (where the task is scored), if it has one."""
    if not path or not str(path).endswith(".safetensors"):
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("score_mask") if "score_mask" in f.keys() else None


def task_entry(entries: dict, task: str, entry_name: str | None) -> str:
    """The entry point serving `task`: as asked, else one named like the task, else the one the family maps
    the task to (`Family.task_entry_points`; Janus: `generation` -> `generation_step`), else the model's
    first entry point (its forward)."""
    if entry_name is not None:
        if entry_name not in entries:
            raise AnalysisError(f"task {task!r}: unknown entry point {entry_name!r}; this model has {sorted(entries)}")
        return entry_name
    if task in entries:
        return task
    first = next(iter(entries))
    mapped = entries[first].family.task_entry_points.get(task)
    return mapped if mapped in entries else first


def default_tasks(model: torch.nn.Module, tags: Sequence[TagRule] = ()) -> list[str]:
    """The tasks probed when none is given (all on synthetic inputs): `understanding` and `generation` for a model
    whose family (or `tags`) tags regions with those components or marks generation tokens (a Mixture-of-Transformers
    modality mask); else one task on the model's first entry point, named after it (`forward`): a plain LLM has no
    understanding or generation to tell apart, and its one component is `shared`, the whole model."""
    first = next(iter(entry_points(model).values()))
    family = first.family
    if family.modality_mask or any(rule.tag in COMPONENTS for rule in (*family.tags, *tags)):
        return list(COMPONENTS)
    return [first.name]


def load_tasks(
    model: torch.nn.Module,
    specs: dict[str, tuple[str | None, str | None]],
    *,
    tags=(),
    capture_batch: int = 2,
    capture_seq: int = 16,
    samples: int = 16,
    seq: int = 32,
    batch_size: int = 8,
    tokenizer_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> list[Task]:
    """Tasks from `{name: (entry point or None, calibration file or None)}`: each entry point used is captured
    once (tasks on the same entry point share its program); no file means synthetic inputs (announced). Text
    files are tokenized with the tokenizer in `tokenizer_dir` (the model directory)."""
    from sparsec.data.calibration import embedding_sizes, load_calibration

    entries = dict(entry_points(model))
    programs: dict[str, Program] = {}
    tasks = []
    for name, (entry_name, path) in specs.items():
        entry = entries[task_entry(entries, name, entry_name)]
        if entry.name not in programs:
            programs[entry.name] = entry.capture(capture_batch, capture_seq, tags=tags)
        program = programs[entry.name]
        synthetic = None if path else synthetic_task_inputs(entry, name, samples, seq, seed=len(tasks) + 1)
        calibration = load_calibration(
            path,
            input_names=program.input_names,
            synthetic=synthetic,
            batch_size=batch_size,
            tokenizer_dir=tokenizer_dir,
            vocab=embedding_sizes(program),
        )
        if calibration.synthetic:
            log(
                f"task {name} ({entry.name}): no calibration file, using {calibration.source}: the probe runs, "
                "its findings mean nothing"
            )
        tasks.append(Task(name, program, calibration, scored=_score_mask(path)))
    return tasks
