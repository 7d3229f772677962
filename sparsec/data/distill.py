"""Tune some of a program's parameters so that its outputs match reference (teacher) outputs.

Passes that change what a model computes and can recover by training (the MoE pass's `adapt:`) use this:
the rewritten program runs end to end with autograd (ATen graphs are differentiable, and sparsec's custom
ops register autograd formulas), the loss is the relative squared L2 error of every floating-point output
against the teacher's, over valid tokens only, plus optional per-node auxiliary losses (a load-balancing
term read off the MoE nodes' router inputs). Adam, fixed steps over the calibration batches in order,
seeded: the same inputs give the same weights. The trained parameters are copies put in place of the old
ones (`Program.replace_state`), so a snapshot taken before still holds the weights as they were.

Example::

    teacher = calibration.reference_outputs(program)            # before the rewrite
    history = distill(program, ["model.layers.0.mlp.moe.router_weight"], calibration, teacher, steps=100)
    history["loss_before"], history["loss_after"]               # over all calibration batches
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx import Interpreter, Node

from sparsec.data.calibration import CalibrationSet, token_vectors
from sparsec.errors import SparsecError
from sparsec.ir.program import Program
from sparsec.progress import progress_bar

NodeLoss = Callable[[Node, tuple, Any], "torch.Tensor | None"]


def output_loss(
    outputs: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], mask: torch.Tensor | None
) -> torch.Tensor:
    """Mean over float outputs of ||student - teacher||^2 / ||teacher||^2 on valid tokens."""
    losses = []
    for name, ref in teacher.items():
        if not ref.is_floating_point():
            continue
        got, want = token_vectors(outputs[name].float(), mask), token_vectors(ref.float(), mask)
        losses.append((got - want).square().sum() / want.square().sum().clamp_min(1e-12))
    if not losses:
        raise SparsecError("distillation needs at least one floating-point program output")
    return torch.stack(losses).mean()


def distill(
    program: Program,
    trainable: Sequence[str],
    calibration: CalibrationSet,
    teacher: Sequence[dict[str, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    node_loss: NodeLoss | None = None,
    progress: bool = False,
    description: str = "distill",
) -> dict[str, float]:
    """Train the parameters named `trainable` (copies replace them in `program`); return the loss over all
    batches before and after.

    `teacher[i]` holds the reference outputs of calibration batch i; `node_loss(node, args, value)` may add
    a term at any node (return None elsewhere).
    """
    parameters = set(program.parameter_names())
    not_parameters = [name for name in trainable if name not in parameters]
    if not_parameters:
        raise SparsecError(f"distill trains parameters only; {not_parameters[:5]} are not parameters of the program")
    for name in trainable:
        program.replace_state(name, program.state_tensor(name))  # a copy: the tensor before stays as it was
    params = {name: program.state_tensor(name) for name in trainable}
    saved = {name: p.requires_grad for name, p in program.exported.state_dict.items()}
    for name, p in program.exported.state_dict.items():
        p.requires_grad_(name in params)
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    batches = list(calibration.batches())
    if len(batches) != len(teacher):
        raise SparsecError(f"{len(teacher)} teacher outputs for {len(batches)} calibration batches")
    graph_module = program.graph_module

    class _Student(Interpreter):
        extra: list[torch.Tensor] = []

        def run_node(self, n: Node) -> Any:
            value = super().run_node(n)
            if node_loss is not None and n.op == "call_function":
                args = torch.fx.node.map_arg(n.args, lambda a: self.env[a])
                term = node_loss(n, args, value)
                if term is not None:
                    self.extra.append(term)
            return value

    def loss_of(index: int) -> torch.Tensor:
        student = _Student(graph_module)
        student.extra = []
        outputs = program.named_outputs(student.run(*program.flat_args(batches[index])))
        loss = output_loss(outputs, teacher[index], CalibrationSet.valid_mask(batches[index]))
        return loss + torch.stack(student.extra).sum() if student.extra else loss

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(loss_of(i)) for i in range(len(batches))) / len(batches)

    before = mean_loss()
    try:
        with torch.enable_grad():
            for step in progress_bar(range(steps), desc=description, enabled=progress):
                loss = loss_of(step % len(batches))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for name, p in program.exported.state_dict.items():
            p.requires_grad_(saved[name])
    return {"loss_before": before, "loss_after": mean_loss(), "steps": steps}
