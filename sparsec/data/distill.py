"""Train some of a program's parameters so that it computes what a reference (teacher) program computes.

The recovery training behind the `distill` pass and `ffn_to_moe`'s `adapt`. The student is the program being
compressed, the teacher the same model before compression (`Program.frozen_copy`, which `PassContext.reference`
holds). Both run as their graph modules, called directly: the student under autograd (ATen graphs are
differentiable, and sparsec's custom ops register autograd formulas), the teacher without. Values inside the graph
that a loss reads (block boundaries, an MoE node's input) are extra graph outputs of a copy of the graph
(`Program.without_runtime_asserts(extra_outputs=...)`), so nothing runs node by node.

Losses, on valid tokens only (`attention_mask`):
- `logits`: KL(teacher || student) of the next-token distributions, mean over tokens; any other floating-point
  output: relative squared error ||s - t||^2 / ||t||^2;
- `hidden_mse` > 0: plus that weight times the mean relative squared error of the residual stream at the block
  boundaries student and teacher share (`sparsec.analysis.regions.block_boundaries`, matched by block path and
  shape);
- an `AuxiliaryLoss` (the MoE load-balancing term), read off extra graph outputs and the trained tensors.

Memory stays bounded: the teacher's outputs are recomputed for each step's batch, never kept for all batches, and
where the logits are a plain projection (`find_logits_head`) both programs return the hidden states and the KL
projects a few rows at a time with its gradient (`sparsec.data.projected_kl`): no batch's logits are held whole.
Trained parameters get float32 master copies (a bf16 program trains in float32 and gets its weights back in bf16);
the program's tensors are never changed in place: the result replaces them (`Program.replace_state`), so a
snapshot taken before (the `PassManager`'s) still holds the weights as they were. Adam, seeded, deterministic:
the same inputs give the same weights.

Two modes: `train_end_to_end` (the whole student against the whole teacher) and `train_block_local` (each block
with trained parameters on its own, reproducing the teacher's block output from the teacher's block input,
cached for all batches at one boundary at a time; the teacher runs layer by layer, `Program.run_segmented`, so a
lazily read teacher holds one block's weights).

Example::

    reference = program.frozen_copy()                       # before the rewrite
    ...                                                     # passes rewrite `program`
    report = train_end_to_end(program, reference, ["model.layers.0.mlp.up_proj.weight"], calibration,
                              TrainingSettings(steps=100))
    report.loss_before, report.loss_after                  # mean KL over the calibration batches
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch.fx import Graph, GraphModule, Node

from sparsec.data.calibration import CalibrationSet, token_vectors
from sparsec.data.logits import Logits, ProjectedLogits, find_logits_head, logit_rows, logits_run
from sparsec.data.projected_kl import projected_kl
from sparsec.errors import SparsecError
from sparsec.ir.program import Program
from sparsec.progress import progress_bar

Schedule = Literal["constant", "cosine"]


@dataclass(frozen=True)
class TrainingSettings:
    """How to train: `steps` optimizer steps of Adam at peak `lr`, linear warmup over `warmup` steps, then
    `schedule` (constant, or cosine decay to 0); gradients clipped to norm `clip`; `hidden_mse` weights the
    block-boundary term; `batch_size` re-batches the calibration samples (None: the calibration batches)."""

    steps: int = 100
    lr: float = 1e-4
    schedule: Schedule = "cosine"
    warmup: int = 0
    hidden_mse: float = 0.0
    batch_size: int | None = None
    clip: float = 1.0
    seed: int = 0

    def rate(self, step: int) -> float:
        """The learning rate at optimizer step `step` (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / (self.warmup + 1)
        if self.schedule == "constant":
            return self.lr
        span = max(1, self.steps - self.warmup)
        return self.lr * 0.5 * (1 + math.cos(math.pi * (step - self.warmup) / span))


@dataclass
class AuxiliaryLoss:
    """An extra loss term: `compute(values, state)` from the values of the graph nodes named `nodes` (extra graph
    outputs, in that order) and the tensors the student runs with (`state(name)`, trained ones with gradients)."""

    nodes: list[str]
    compute: Callable[[list[torch.Tensor], Callable[[str], torch.Tensor]], torch.Tensor]


@dataclass
class BlockLoss:
    """Block-local training of one block: relative squared error of its output before and after."""

    block: str
    parameters: int
    loss_before: float
    loss_after: float


@dataclass
class TrainingReport:
    """What training did. `loss_before` / `loss_after`: the mean end-to-end loss (KL of the logits, plus the
    hidden-state term when weighted) over the calibration batches, the data it trained on; held-out quality is
    what the quality gates measure."""

    mode: Literal["end_to_end", "block_local"]
    trained: list[str]
    trained_parameters: int
    steps: int
    tokens_per_step: float
    lr: float
    schedule: Schedule
    loss_before: float
    loss_after: float
    seconds: float
    blocks: list[BlockLoss] = field(default_factory=list)


def kl_logits(student: Logits, teacher: Logits, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over valid tokens of KL(softmax(teacher) || softmax(student)), computed in float32; a few rows of
    logits at a time where the student's are `ProjectedLogits` (`projected_kl`)."""
    if isinstance(student, ProjectedLogits):
        return projected_kl(token_vectors(student, mask), token_vectors(teacher, mask))
    s = token_vectors(student, mask).float().log_softmax(-1)
    teacher = logit_rows(teacher)
    t = token_vectors(teacher, mask).float().log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def relative_error(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """||s - t||^2 / ||t||^2 over valid tokens, float32."""
    s, t = token_vectors(student, mask).float(), token_vectors(teacher, mask).float()
    return (s - t).square().sum() / t.square().sum().clamp_min(1e-12)


def output_loss(student: Mapping[str, Any], teacher: Mapping[str, Any], mask) -> torch.Tensor:
    """KL of `logits`, relative squared error of the other floating-point outputs; their sum."""
    terms = [
        kl_logits(student[name], ref, mask) if name == "logits" else relative_error(student[name], ref, mask)
        for name, ref in teacher.items()
        if isinstance(ref, ProjectedLogits) or (isinstance(ref, torch.Tensor) and ref.is_floating_point())
    ]
    if not terms:
        raise SparsecError("distillation needs at least one floating-point program output")
    return torch.stack(terms).sum()


class _Runner:
    """A program's graph module with extra outputs, called on a batch with given state tensors. Where its logits
    are a plain projection (`find_logits_head`), the module returns the hidden states instead and the call the
    logits as `ProjectedLogits` with the projection's state tensors: the loss projects them a few rows at a time."""

    def __init__(self, program: Program, extra: Sequence[str]) -> None:
        graph, env = Graph(), {}
        outputs = graph.graph_copy(program.graph, env)
        by_name = {old.name: new for old, new in env.items()}
        self.head = program.analysis(find_logits_head)
        if self.head is not None:
            projection, hidden = env[self.head.projection], env[self.head.hidden]
            outputs = tuple(hidden if o is projection else o for o in outputs)
        graph.output((*outputs, *(by_name[name] for name in extra)))
        if self.head is not None:
            graph.erase_node(projection)
        self.program = program
        self.module = GraphModule(program.graph_module, graph)
        self.extra = len(extra)

    def __call__(
        self, batch: Mapping[str, torch.Tensor], state: Callable[[str], torch.Tensor]
    ) -> tuple[dict[str, Any], list[torch.Tensor]]:
        flat = self.module(*self.program.flat_args(batch, state))
        extra = list(flat[len(flat) - self.extra :]) if self.extra else []
        outputs = self.program.named_outputs(flat)
        return (outputs if self.head is None else self.head.project(outputs, state)), extra


class _Masters:
    """Float32 master copies of the trained parameters; the student reads them cast to its dtype."""

    def __init__(self, program: Program, trainable: Sequence[str], frozen: Sequence[str]) -> None:
        self.program = program
        self.dtypes, self.masters = {}, {}
        for name in trainable:
            tensor = program.state_tensor(name)
            self.dtypes[name] = tensor.dtype
            self.masters[name] = tensor.detach().float().clone().requires_grad_(True)
        self.frozen = {name: program.state_tensor(name).detach() for name in frozen}

    def __call__(self, name: str) -> torch.Tensor:
        master = self.masters.get(name)
        if master is None:
            return self.frozen[name]
        return master if self.dtypes[name] == torch.float32 else master.to(self.dtypes[name])

    def write_back(self) -> None:
        for name, master in self.masters.items():
            self.program.replace_state(name, master.detach().to(self.dtypes[name]))


def _check_trainable(program: Program, trainable: Sequence[str]) -> None:
    if not trainable:
        raise SparsecError("nothing to train: the list of trainable parameters is empty")
    parameters = set(program.parameter_names())
    not_parameters = [name for name in trainable if name not in parameters]
    if not_parameters:
        raise SparsecError(f"distill trains parameters only; {not_parameters[:5]} are not parameters of the program")
    floating = [n for n in trainable if not program.state_tensor(n).is_floating_point()]
    if floating:
        raise SparsecError(f"distill trains floating-point parameters only; {floating[:5]} are not")


def _batches(calibration: CalibrationSet, settings: TrainingSettings) -> list[dict[str, torch.Tensor]]:
    if settings.batch_size is not None:
        calibration = replace(calibration, batch_size=settings.batch_size)
    return list(calibration.batches())


def _tokens(batch: Mapping[str, torch.Tensor]) -> int:
    mask = CalibrationSet.valid_mask(batch)
    if mask is not None:
        return int(mask.sum())
    return int(next(iter(batch.values())).shape[:2].numel())


def _step(optimizer: torch.optim.Adam, loss: torch.Tensor, parameters: list[torch.Tensor], rate: float, clip: float):
    for group in optimizer.param_groups:
        group["lr"] = rate
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(parameters, clip)
    optimizer.step()


def train_end_to_end(
    student: Program,
    teacher: Program,
    trainable: Sequence[str],
    calibration: CalibrationSet,
    settings: TrainingSettings,
    *,
    boundaries: Sequence[tuple[str, str]] = (),
    auxiliary: AuxiliaryLoss | None = None,
    progress: bool = False,
    description: str = "distill",
) -> TrainingReport:
    """Train `trainable` so that `student` reproduces `teacher` on the calibration batches (module docstring); the
    trained tensors replace the student's. `boundaries`: (student node, teacher node) names of the block boundaries
    the `hidden_mse` term compares (unused when it is 0)."""
    start = time.perf_counter()
    _check_trainable(student, trainable)
    torch.manual_seed(settings.seed)
    batches = _batches(calibration, settings)
    pairs = list(boundaries) if settings.hidden_mse > 0 else []
    aux_nodes = auxiliary.nodes if auxiliary is not None else []
    student_run = _Runner(student, [s for s, _ in pairs] + aux_nodes)
    teacher_run = _Runner(teacher, [t for _, t in pairs])
    state = _Masters(student, trainable, [n for n in student.state_placeholders() if n not in set(trainable)])
    # the student's tensors the teacher shares (unchanged by the passes); None: the teacher's own, read for each
    # step's forward when it reads them from the checkpoint, so the replaced weights are never all held twice
    teacher_state: dict[str, torch.Tensor | None] = {}

    def teacher_tensor(name: str) -> torch.Tensor:
        if name not in teacher_state:
            teacher_state[name] = (
                state.frozen[name] if name in state.frozen and student.shares_state(teacher, name) else None
            )
        held = teacher_state[name]
        return held if held is not None else teacher.state_tensor(name)

    def loss_of(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            want, want_hidden = teacher_run(batch, teacher_tensor)
        got, extra = student_run(batch, state)
        mask = CalibrationSet.valid_mask(batch)
        loss = output_loss(got, want, mask)
        if pairs:
            hidden = torch.stack([relative_error(s, t, mask) for s, t in zip(extra, want_hidden)]).mean()
            loss = loss + settings.hidden_mse * hidden
        if auxiliary is not None:
            loss = loss + auxiliary.compute(extra[len(pairs) :], state)
        return loss

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(loss_of(b)) for b in batches) / len(batches)

    before = mean_loss()
    parameters = list(state.masters.values())
    optimizer = torch.optim.Adam(parameters, lr=settings.lr)
    with torch.enable_grad():
        for step in progress_bar(range(settings.steps), desc=description, enabled=progress):
            loss = loss_of(batches[step % len(batches)])
            _step(optimizer, loss, parameters, settings.rate(step), settings.clip)
    after = mean_loss()
    state.write_back()
    return TrainingReport(
        mode="end_to_end",
        trained=list(trainable),
        trained_parameters=sum(p.numel() for p in parameters),
        steps=settings.steps,
        tokens_per_step=sum(_tokens(b) for b in batches) / len(batches),
        lr=settings.lr,
        schedule=settings.schedule,
        loss_before=before,
        loss_after=after,
        seconds=round(time.perf_counter() - start, 3),
    )


@dataclass(frozen=True)
class Block:
    """A block for block-local training, by node names: the student computes it from the value `start` (the
    residual stream before it) to `end` (its output); the teacher's output of the same block is `teacher_end`.
    The block's other inputs (masks, rotary tables) must be nodes of the same name in the teacher."""

    path: str
    start: str
    end: str
    teacher_end: str


@dataclass
class _Span:
    """One student block cut out of the graph as a graph module whose placeholders are `inputs`: state names (the
    student's tensors, `state`) or node names (the teacher's values: the residual stream, masks, rotary tables)."""

    block: Block
    module: GraphModule
    inputs: list[str]
    state: set[str]
    trainable: list[str]


def _cut(student: Program, teacher: Program, block: Block, trainable: set[str]) -> _Span:
    order = list(student.graph.nodes)
    by_name = {n.name: n for n in order}
    teacher_nodes = {n.name for n in teacher.graph.nodes}
    start, end = by_name[block.start], by_name[block.end]
    segment = [n for n in order[order.index(start) + 1 : order.index(end) + 1] if n.op != "placeholder"]
    inside = set(segment)
    graph, env, inputs, state = Graph(), {}, [], set()
    for node in segment:
        for arg in node.all_input_nodes:
            if arg in inside or arg in env:
                continue
            name = student.state_name(arg) or arg.name
            if name != arg.name:
                state.add(name)
            elif arg.name not in teacher_nodes:
                raise SparsecError(
                    f"block-local training: block {block.path} reads {arg.name}, which the dense program does not "
                    "compute; use mode: end_to_end"
                )
            env[arg] = graph.placeholder(arg.name)
            env[arg].meta = dict(arg.meta)
            inputs.append(name)
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[end])
    module = GraphModule(student.graph_module, graph)
    return _Span(block, module, inputs, state, sorted(state & trainable))


def train_block_local(
    student: Program,
    teacher: Program,
    blocks: Sequence[Block],
    trainable: Sequence[str],
    calibration: CalibrationSet,
    settings: TrainingSettings,
    *,
    progress: bool = False,
    description: str = "distill (block-local)",
) -> TrainingReport:
    """Train each of `blocks` that reads parameters of `trainable` to map the teacher's input of that block to the
    teacher's output of it (relative squared error on valid tokens), `settings.steps` steps per block, one block
    after the other; the teacher runs layer by layer over all batches once (`Program.run_segmented`) and each
    block trains when its boundary has been computed for every batch. The report's losses are end to end."""
    start = time.perf_counter()
    _check_trainable(student, trainable)
    torch.manual_seed(settings.seed)
    batches = _batches(calibration, settings)
    spans = [s for s in (_cut(student, teacher, b, set(trainable)) for b in blocks) if s.trainable]
    covered = {n for s in spans for n in s.trainable}
    outside = [n for n in trainable if n not in covered]
    if outside:
        raise SparsecError(
            f"block-local training trains parameters of blocks only; {outside[:5]} are outside every block: "
            "use mode: end_to_end, or leave them out of `trainable`"
        )
    before = _mean_output_loss(student, teacher, batches)
    wanted = {n for s in spans for n in [s.block.teacher_end, *[i for i in s.inputs if i not in s.state]]}
    nodes = {n for n in teacher.graph.nodes if n.name in wanted}
    values: dict[str, list[torch.Tensor | None]] = {n.name: [None] * len(batches) for n in nodes}
    pending = list(spans)
    results: list[BlockLoss] = []

    def observe(index: int, node: Node, value) -> None:
        values[node.name][index] = value

    def train_ready(_done: int, _total: int) -> None:
        while pending and all(v is not None for v in values[pending[0].block.teacher_end]):
            span = pending.pop(0)
            results.append(_train_span(student, span, values, batches, settings, progress, description))
            needed = {n for s in pending for n in [s.block.teacher_end, *s.inputs]}
            for name in list(values):
                if name not in needed:
                    values[name] = [None] * len(batches)

    cuts = [n for n in teacher.graph.nodes if n.name in {s.block.teacher_end for s in spans}]
    for _ in teacher.run_segmented(batches, cuts, observe, nodes, on_segment=train_ready):
        pass
    after = _mean_output_loss(student, teacher, batches)
    return TrainingReport(
        mode="block_local",
        trained=list(trainable),
        trained_parameters=sum(student.state_shape(n).numel() for n in trainable),
        steps=settings.steps * len(spans),
        tokens_per_step=sum(_tokens(b) for b in batches) / len(batches),
        lr=settings.lr,
        schedule=settings.schedule,
        loss_before=before,
        loss_after=after,
        seconds=round(time.perf_counter() - start, 3),
        blocks=results,
    )


def _train_span(
    student: Program,
    span: _Span,
    values: Mapping[str, list[torch.Tensor | None]],
    batches: list[dict[str, torch.Tensor]],
    settings: TrainingSettings,
    progress: bool,
    description: str,
) -> BlockLoss:
    """Train one block on the teacher's boundary values of every batch; its trained tensors replace the student's."""
    state = _Masters(student, span.trainable, [n for n in span.state if n not in span.trainable])

    def loss_of(index: int) -> torch.Tensor:
        args = [state(name) if name in span.state else values[name][index] for name in span.inputs]
        got = span.module(*args)
        return relative_error(got, values[span.block.teacher_end][index], CalibrationSet.valid_mask(batches[index]))

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(loss_of(i)) for i in range(len(batches))) / len(batches)

    before = mean_loss()
    parameters = list(state.masters.values())
    optimizer = torch.optim.Adam(parameters, lr=settings.lr)
    with torch.enable_grad():
        for step in progress_bar(range(settings.steps), desc=f"{description}: {span.block.path}", enabled=progress):
            _step(optimizer, loss_of(step % len(batches)), parameters, settings.rate(step), settings.clip)
    after = mean_loss()
    state.write_back()
    return BlockLoss(span.block.path, sum(p.numel() for p in parameters), before, after)


def _mean_output_loss(student: Program, teacher: Program, batches: list[dict[str, torch.Tensor]]) -> float:
    """The end-to-end output loss (KL of the logits) over `batches`, each program run as it is."""
    total = 0.0
    runs = [(program, logits_run(program)) for program in (student, teacher)]
    with torch.no_grad():
        for batch in batches:
            got, want = (run.logits(program.run(batch, outputs_from=run.outputs_from)) for program, run in runs)
            total += float(output_loss(got, want, CalibrationSet.valid_mask(batch)))
    return total / len(batches)
