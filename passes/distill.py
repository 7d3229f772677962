"""`distill`: recover what earlier passes lost by training the compressed program against the dense one.

The teacher is the program as it was before the first pass of the recipe (`PassContext.reference`); the student
is the program as the earlier passes left it (blocks dropped, FFNs or heads sliced, the hidden width cut, FFNs
turned into MoEs). Training (`sparsec.data.distill`) runs both as graph modules, the student under autograd:

- loss: KL(teacher || student) of the logits on valid tokens (`attention_mask`), plus `hidden_mse` times the mean
  relative squared error of the residual stream at the block boundaries both programs have (matched by block
  path; none after `slice_hidden`, whose boundaries differ in width);
- `trainable`: globs of parameter names (`sparsec.ir.paths`); by default the parameters of the blocks the earlier
  passes changed: a block whose parameters are not the dense program's tensors any more (a pass replaces what it
  changes), and, for each block `drop_layers` removed, the block that now follows it (the last remaining block for
  a dropped last block). The decisions list them and why;
- `mode`: `end_to_end` trains the whole student against the whole teacher, `steps` steps over the calibration
  batches in order; `block_local` trains each changed block on its own to reproduce the teacher's output of that
  block from the teacher's input of it (relative squared error), `steps` steps per block, the teacher run layer by
  layer with one boundary's activations cached for all batches (`Program.run_segmented`: a lazily read model holds
  one block's weights). Block-local needs every changed block to have a dense counterpart of the same width;
- Adam at `lr`, linear warmup over the first `warmup` fraction of steps, then `schedule` (cosine decay to 0, or
  constant), gradients clipped to norm 1; float32 master copies of bf16/fp16 weights; `batch_size` re-batches the
  calibration samples (default: the calibration batches). Deterministic (`seed`).

Defaults (`distill: {}`): end-to-end, 100 steps at lr 1e-4 with cosine decay after 5 % warmup, no hidden-state
term. KL on the logits is the loss that matches what the model is judged on (next-token distributions); at 1e-4
Adam moves every trained weight by about 1e-4 per step, small against weights of a pretrained model (~1e-2),
so the loss falls steadily without overshooting, and the cosine decay settles it; on small models it lowered the
calibration KL and the held-out next-token loss in every case tested (sliced, dropped, MoE). More steps recover
more; each costs a forward of the teacher and a forward and backward of the student on one batch.

It reports the loss (KL plus the weighted hidden term) over the calibration batches before and after training: the
data it trained on. Held-out quality comes from the quality gates that run after the pass.

Cost: end-to-end holds the student's weights, their float32 master copies and Adam's two moments for the trained
parameters (16 bytes per trained parameter) and one batch's activations for backward; the teacher's weights that
the student no longer shares are read from the checkpoint for each step's teacher forward (a model loaded in
memory) or held (a built-in model). Nothing holds the teacher's outputs for more than one batch.

Recipe:
    passes:
      - slice_neurons: {keep_ratio: 0.5}
      - distill: {}                                    # end-to-end on the sliced blocks, 100 steps
      - distill: {mode: block_local, steps: 50, hidden_mse: 0.0}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.fx import Node

from sparsec.analysis.regions import region_index
from sparsec.data.distill import (
    Block,
    Schedule,
    TrainingReport,
    TrainingSettings,
    train_block_local,
    train_end_to_end,
)
from sparsec.errors import PassError
from sparsec.ir.paths import glob_match
from sparsec.ir.program import Program
from sparsec.transform.pass_manager import Pass, PassContext, PassResult


@dataclass
class ChangedBlock:
    """A block the default `trainable` covers, and why: `changed` (its parameters are not the dense ones) or
    `after_dropped` (a block removed before it, named in `dropped`)."""

    path: str
    reason: Literal["changed", "after_dropped"]
    dropped: list[str]


@dataclass
class DistillPlan:
    """What `run` trains: parameter names, the blocks behind the default choice (empty with `trainable` globs), the
    block boundaries the hidden-state term compares, and the blocks block-local training cuts out."""

    trainable: list[str]
    blocks: list[ChangedBlock]
    boundaries: list[tuple[str, str]]
    local: list[Block]


@dataclass
class DistillDecisions:
    """The pass's decisions: what it trained (`trainable_from`: `changed_blocks` or `globs`) and the training."""

    trainable_from: Literal["changed_blocks", "globs"]
    blocks: list[ChangedBlock]
    training: TrainingReport | None


def _shape(node: Node) -> tuple | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _block_outputs(program: Program) -> dict[str, Node]:
    return {b.path: b.outputs()[-1] for b in region_index(program).blocks() if b.outputs()}


def shared_boundaries(program: Program, reference: Program) -> list[tuple[str, str]]:
    """(program node, reference node) names of the block boundaries both programs have, matched by block path, where
    the residual stream has the same shape (after `slice_hidden` none has)."""
    theirs = _block_outputs(reference)
    return [
        (node.name, theirs[path].name)
        for path, node in _block_outputs(program).items()
        if path in theirs and _shape(theirs[path]) == _shape(node)
    ]


def local_blocks(program: Program, reference: Program, trainable: set[str]) -> list[Block]:
    """The blocks of `program` holding `trainable` parameters, for block-local training: each from the boundary
    before it (the previous block's output, or the residual input of the first block) to its output, with the
    reference's output of the same block. `PassError` for a block without a counterpart of the same shape."""
    blocks = region_index(program).blocks()
    theirs = _block_outputs(reference)
    reference_nodes = {n.name for n in reference.graph.nodes}
    found = []
    for index, block in enumerate(blocks):
        if not block.outputs() or not trainable.intersection(block.parameters):
            continue
        end = block.outputs()[-1]
        previous = blocks[index - 1].outputs() if index > 0 else []
        start = previous[-1] if previous else next((n for n in block.inputs() if _shape(n) == _shape(end)), None)
        other = theirs.get(block.path)
        if start is None or other is None or _shape(other) != _shape(end) or start.name not in reference_nodes:
            raise PassError(
                f"distill: block {block.path} has no counterpart of the same shape in the dense program (a pass "
                "changed the residual width, e.g. slice_hidden), so it cannot be trained block-local; use mode: end_to_end"
            )
        found.append(Block(block.path, start.name, end.name, other.name))
    return found


def changed_blocks(program: Program, reference: Program) -> list[ChangedBlock]:
    """The blocks of `program` that differ from `reference` (the dense program), see the module docstring."""
    blocks = {b.path: b for b in region_index(program).blocks()}
    changed: dict[str, ChangedBlock] = {}
    for path, block in blocks.items():
        if any(not program.shares_state(reference, name) for name in block.parameters):
            changed[path] = ChangedBlock(path, "changed", [])
    for stack in region_index(reference).block_stacks():
        paths = [b.path for b in stack.blocks]
        for i, path in enumerate(paths):
            if path in blocks:
                continue
            after = [p for p in paths[i + 1 :] if p in blocks] or [p for p in reversed(paths[:i]) if p in blocks]
            if not after:
                continue
            entry = changed.setdefault(after[0], ChangedBlock(after[0], "after_dropped", []))
            entry.dropped.append(path)
    order = list(blocks)
    return sorted(changed.values(), key=lambda c: order.index(c.path))


class Distill(Pass):
    """Train the compressed program to reproduce the dense one (logit KL, optional block-boundary MSE)."""

    name = "distill"

    @dataclass
    class Options:
        trainable: list[str] | None = None
        mode: Literal["end_to_end", "block_local"] = "end_to_end"
        steps: int = 100
        lr: float = 1e-4
        batch_size: int | None = None
        schedule: Schedule = "cosine"
        warmup: float = 0.05
        hidden_mse: float = 0.0
        seed: int = 0

        def __post_init__(self) -> None:
            if self.steps < 1:
                raise ValueError(f"steps: must be >= 1, got {self.steps}")
            if self.lr <= 0:
                raise ValueError(f"lr: must be > 0, got {self.lr}")
            if self.batch_size is not None and self.batch_size < 1:
                raise ValueError(f"batch_size: must be >= 1 (or null: the calibration batches), got {self.batch_size}")
            if not 0 <= self.warmup < 1:
                raise ValueError(f"warmup: a fraction of the steps in [0, 1), got {self.warmup}")
            if self.hidden_mse < 0:
                raise ValueError(f"hidden_mse: must be >= 0, got {self.hidden_mse}")
            if self.trainable is not None and not self.trainable:
                raise ValueError("trainable: give at least one glob of parameter names, or leave it out")

    def settings(self) -> TrainingSettings:
        o = self.options
        return TrainingSettings(
            steps=o.steps,
            lr=o.lr,
            schedule=o.schedule,
            warmup=int(o.warmup * o.steps),
            hidden_mse=o.hidden_mse,
            batch_size=o.batch_size,
            seed=o.seed,
        )

    def needs_reference(self) -> bool:
        return True

    def requires(self, program: Program, ctx: PassContext) -> DistillPlan:
        ctx.require_calibration(self.name)
        if ctx.reference is None:
            raise PassError("distill: no dense reference program; run it through the PassManager (sparsec compile)")
        o = self.options
        parameters = program.parameter_names()
        blocks: list[ChangedBlock] = []
        if o.trainable is None:
            blocks = changed_blocks(program, ctx.reference)
            names = {n for b in blocks for n in region_index(program).region(b.path).parameters}
            trainable = [n for n in parameters if n in names]
        else:
            unmatched = [g for g in o.trainable if not any(glob_match(n, g) for n in parameters)]
            if unmatched:
                raise PassError(
                    f"distill: trainable globs {unmatched} match no parameter; parameters look like {parameters[:3]}"
                )
            trainable = [n for n in parameters if any(glob_match(n, g) for g in o.trainable)]
        trainable = [n for n in trainable if program.state_shape(n).numel()]
        local = local_blocks(program, ctx.reference, set(trainable)) if o.mode == "block_local" and trainable else []
        boundaries = shared_boundaries(program, ctx.reference) if o.hidden_mse > 0 else []
        return DistillPlan(trainable, blocks, boundaries, local)

    def run(self, program: Program, ctx: PassContext, plan: DistillPlan) -> PassResult:
        o = self.options
        source = "changed_blocks" if o.trainable is None else "globs"
        if not plan.trainable:
            decisions = DistillDecisions(source, plan.blocks, None)
            return PassResult(modified=False, stats={"trained_parameters": 0}, decisions=decisions)
        if o.mode == "end_to_end":
            report = train_end_to_end(
                program,
                ctx.reference,
                plan.trainable,
                ctx.calibration,
                self.settings(),
                boundaries=plan.boundaries,
                progress=ctx.progress,
            )
        else:
            report = train_block_local(
                program,
                ctx.reference,
                plan.local,
                plan.trainable,
                ctx.calibration,
                self.settings(),
                progress=ctx.progress,
            )
        stats = {
            "mode": o.mode,
            "trained_parameters": report.trained_parameters,
            "steps": report.steps,
            "loss_before": report.loss_before,
            "loss_after": report.loss_after,
            "seconds": report.seconds,
        }
        decisions = DistillDecisions(source, plan.blocks, report)
        return PassResult(modified=True, stats=stats, decisions=decisions)
