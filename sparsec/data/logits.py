"""A language model's logits held as the hidden states they are projected from, and projected a few rows at a time.

Logits are [batch, seq, vocab]: at a 262,144-token vocabulary one batch of 8 x 512 tokens is 4.3 GB in float32,
and a quality check holds two of them (the reference's and the candidate's). Yet they are one linear projection
of hidden states a few hundred times smaller. When a program's logits output is exactly `linear(hidden, weight[,
bias])` (`find_logits_head`), the checks run it with `outputs_from={projection: hidden}` (`Program.run`): the
logits are never computed whole, the reference keeps hidden states, and the metrics project `PROJECTED_BYTES` of
logits at a time (`ProjectedLogits`). A projected row is what the program's own projection computes for it; a
matrix product over fewer rows may round differently in the last bit (BLAS blocking), so metrics agree with those
of whole logits to float rounding, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node

PROJECTED_BYTES = 64 * 2**20  # logits projected at once: 64 tokens of a 262,144-token vocabulary in float32


@dataclass(frozen=True)
class ProjectedLogits:
    """Logits `linear(hidden, weight, bias)` [..., vocab], held as `hidden` [..., width].

    Indexing and `reshape` act on the token dimensions (never the last), like a tensor's; `rows` projects them.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.weight.shape[0]))

    def dim(self) -> int:
        return self.hidden.dim()

    def detach(self) -> ProjectedLogits:
        bias = None if self.bias is None else self.bias.detach()
        return ProjectedLogits(self.hidden.detach(), self.weight.detach(), bias)

    def __getitem__(self, index: Any) -> ProjectedLogits:
        return ProjectedLogits(self.hidden[index], self.weight, self.bias)

    def reshape(self, *shape: int) -> ProjectedLogits:
        """Reshape the token dimensions: the last of `shape` is the vocabulary (-1 or its size)."""
        if shape[-1] not in (-1, self.weight.shape[0]):
            raise ValueError(f"the last dimension of projected logits is the vocabulary ({self.weight.shape[0]})")
        return ProjectedLogits(self.hidden.reshape(*shape[:-1], self.hidden.shape[-1]), self.weight, self.bias)

    def rows(self) -> torch.Tensor:
        """The logits themselves (project only a few rows at a time: `chunk_rows`)."""
        return F.linear(self.hidden, self.weight, self.bias)

    def chunk_rows(self) -> int:
        """Rows of logits that make `PROJECTED_BYTES`: how many to project at once."""
        return max(1, PROJECTED_BYTES // (self.weight.shape[0] * self.weight.element_size()))


Logits = torch.Tensor | ProjectedLogits


def logit_rows(value: Logits) -> torch.Tensor:
    """`value` as a tensor: projected when it is `ProjectedLogits`, as is otherwise."""
    return value.rows() if isinstance(value, ProjectedLogits) else value


@dataclass(frozen=True)
class LogitsHead:
    """Where output `output` of a program is `linear(hidden, weight, bias)` and nothing else reads the projection:
    `outputs_from` runs the program up to `hidden`, `projector` makes its logits from what that run returned."""

    output: str
    projection: Node
    hidden: Node
    weight: str
    bias: str | None

    @property
    def outputs_from(self) -> dict[Node, Node]:
        return {self.projection: self.hidden}

    def project(self, outputs: dict[str, Any], tensor: Callable[[str], torch.Tensor]) -> dict[str, Any]:
        """The outputs of a run with `outputs_from`, the hidden states of `output` as `ProjectedLogits` with the
        projection's weight and bias taken from `tensor` (by state name)."""
        bias = None if self.bias is None else tensor(self.bias)
        return {**outputs, self.output: ProjectedLogits(outputs[self.output], tensor(self.weight), bias)}

    def projector(self, program, device: str | None = None) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """What turns the outputs of a run with `outputs_from` into logits (`project`) with the program's
        projection, read once, now (a lazily backed program reads it from its file; the run itself never does;
        moved to `device` if given), without grad: these logits are measured, never trained through."""
        held = {n: program.state_tensor(n).detach().to(device) for n in (self.weight, self.bias) if n is not None}
        return lambda outputs: self.project(outputs, held.__getitem__)


def find_logits_head(program, output: str = "logits") -> LogitsHead | None:
    """The `LogitsHead` of `program`'s output `output`, or None where that output is not a plain linear projection
    of 3-D hidden states by a state weight that only the output reads (soft-capped or scaled logits, a projection
    another output also returns): those are compared as whole logits."""
    if output not in program.output_names:
        return None
    produced = dict(zip(program.output_names, program.exported.graph_signature.user_outputs))[output]
    node = next((n for n in program.graph.nodes if n.name == produced), None)
    if node is None or node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
        return None
    hidden, weight, bias = (*node.args, None)[:3]
    if len(node.users) != 1 or next(iter(node.users)).op != "output":
        return None
    names = [None if n is None else program.state_name(n) for n in (weight, bias)]
    value = hidden.meta.get("val") if isinstance(hidden, Node) else None
    if names[0] is None or (bias is not None and names[1] is None) or not isinstance(value, torch.Tensor):
        return None
    if value.dim() != 3:
        return None
    return LogitsHead(output, node, hidden, names[0], names[1])


@dataclass(frozen=True)
class LogitsRun:
    """How a quality check runs a program (`logits_run`): with `outputs_from` (`Program.run`), then `logits` on
    each run's outputs."""

    outputs_from: dict[Node, Node] | None
    logits: Callable[[dict[str, Any]], dict[str, Any]]


def unobserved_head(program, observed: set[Node] | None = None) -> LogitsHead | None:
    """`program`'s `LogitsHead` where a run observing `observed` may skip the projection: found, and not observed."""
    head = program.analysis(find_logits_head)
    return None if head is None or head.projection in (observed or ()) else head


def logits_run(program, observed: set[Node] | None = None, device: str | None = None) -> LogitsRun:
    """Run `program` up to the hidden states of its logits and project them when read (with the projection on
    `device` if given), where `unobserved_head` finds its head; run it as it is otherwise."""
    head = unobserved_head(program, observed)
    if head is None:
        return LogitsRun(None, lambda outputs: outputs)
    return LogitsRun(head.outputs_from, head.projector(program, device))
