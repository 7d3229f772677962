"""Dependency model: which parameters are coupled through one channel dimension.

Slicing an FFN's neurons is only correct if every tensor indexed by the intermediate (neuron) dimension
is sliced the same way: rows of up (and gate), their biases, columns of down, and any per-neuron tensor
read on the way (a scale, say). A weight stored transposed (GPT-2's Conv1D, [in, out]) is sliced along the
other dimension. `ffn_channel_group` finds that set from the graph (a networkx graph of the
values carrying the neuron dimension and the weights feeding them) and refuses, naming the reader, when
something outside the FFN also reads an intermediate value: slicing would change what it sees.

This is the "what is coupled" half (as in Torch-Pruning's dependency graph); importance and selection
live in the passes that use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
from torch.fx import Node

from sparsec.analysis.ffn import Ffn
from sparsec.analysis.vocabulary import SPLIT_OPS
from sparsec.errors import PassError
from sparsec.ir.canonical import transposed_source

aten = torch.ops.aten


@dataclass(frozen=True)
class ParamSlice:
    """A state tensor indexed by the group's channel dimension along `dim`.

    `offsets`: where each block of channels starts along `dim` (a fused gate_up weight holds two blocks).
    """

    name: str
    dim: int
    offsets: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class ChannelGroup:
    """Parameters coupled through one channel dimension of size `width` (an FFN's neurons).

    Example::
        group = ffn_channel_group(program, ffn)
        [(p.name, p.dim) for p in group.params]
        # [('model.layers.0.mlp.gate_proj.weight', 0), ('model.layers.0.mlp.up_proj.weight', 0),
         # ('model.layers.0.mlp.down_proj.weight', 1)]
        group.apply(program, kept=torch.arange(64))   # keep the first 64 neurons
    """

    path: str
    width: int
    params: tuple[ParamSlice, ...]
    splits: tuple[Node, ...] = ()

    def num_parameters(self, program) -> int:
        return sum(program.state_shape(p.name).numel() for p in self.params)

    def apply(self, program, kept: torch.Tensor) -> None:
        """Keep only channels `kept` (sorted, unique) in every coupled tensor.

        A 2D `kept` [E, K] keeps channels per slice along dim 0 (row e for slice e: the experts of fused MoE
        weights), the same count in each, so the tensors stay rectangular.
        """
        kept = torch.as_tensor(kept, dtype=torch.long)
        rows = kept if kept.dim() == 2 else kept[None]
        if (
            rows.numel() == 0
            or rows.min() < 0
            or rows.max() >= self.width
            or any(len(r.unique()) != len(r) for r in rows)
        ):
            raise PassError(f"{self.path}: kept indices must be unique, in [0, {self.width}) and not empty")
        for p in self.params:
            tensor = program.state_tensor(p.name)
            index = torch.cat([kept + offset for offset in p.offsets], dim=-1)
            if kept.dim() == 2:
                sliced = torch.stack([t.index_select(p.dim - 1, i) for t, i in zip(tensor, index)])
            else:
                sliced = tensor.index_select(p.dim, index)
            program.replace_state(p.name, sliced.contiguous())
        k = rows.shape[1]
        for split in self.splits:  # a fused projection is split into halves of the new width
            if split.target is aten.split.Tensor:
                split.args = (split.args[0], k, *split.args[2:])
            elif split.target is aten.split_with_sizes.default:
                split.args = (split.args[0], [k, k], *split.args[2:])


def _state_args(program, node: Node) -> list[Node]:
    return [a for a in node.all_input_nodes if program.state_name(a) is not None]


def ffn_channel_group(program, ffn: Ffn) -> ChannelGroup:
    """The parameters coupled through `ffn`'s neuron dimension; `PassError` if it cannot be sliced safely."""
    escaping = ffn.escaping_nodes()
    if escaping:
        readers = sorted({u.name for n in escaping for u in n.users if u not in ffn.interior and u is not ffn.down})
        raise PassError(
            f"{ffn.path}: the FFN's intermediate values ({[n.name for n in escaping]}) are also read by {readers} "
            "outside the FFN; slicing its neurons would change what they see, so it is left alone"
        )
    producers = [n for n in (ffn.gate, ffn.up) if n is not None]
    graph = nx.DiGraph()
    channel_nodes = [*producers, *ffn.interior]
    for node in channel_nodes:
        for arg in node.all_input_nodes:
            graph.add_edge(arg, node)
    graph.add_edge(ffn.down.args[0], ffn.down)
    carrying = set()
    for producer in producers:
        carrying |= ({producer} | nx.descendants(graph, producer)) & (nx.ancestors(graph, ffn.down))
    params: list[ParamSlice] = []
    offsets = (0,) if ffn.gate_half is None else (0, ffn.intermediate_size)  # a fused weight: both halves
    for linear in producers:  # rows of the producing projections (columns of a transposed weight), their biases
        weight, transposed = linear_weight_node(linear)
        params.append(ParamSlice(_state_name(program, weight, linear), 1 if transposed else 0, offsets))
        bias = linear.args[2] if len(linear.args) > 2 else None
        if isinstance(bias, Node):
            params.append(ParamSlice(_state_name(program, bias, linear), 0, offsets))
    weight, transposed = linear_weight_node(ffn.down)  # columns of down; its bias is not coupled
    params.append(ParamSlice(_state_name(program, weight, ffn.down), 0 if transposed else 1))
    for node in carrying - set(producers):
        for arg in _state_args(program, node):
            shape = program.state_shape(program.state_name(arg))
            if len(shape) == 0 or shape.numel() == 1:
                continue  # a scalar broadcasts over every neuron
            if shape[-1] == ffn.intermediate_size and all(d == 1 for d in shape[:-1]):
                params.append(ParamSlice(program.state_name(arg), len(shape) - 1))
            else:
                raise PassError(
                    f"{ffn.path}: {node.name} reads {program.state_name(arg)} of shape "
                    f"{tuple(shape)}, which is not per-neuron; cannot slice this FFN"
                )
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise PassError(f"{ffn.path}: a weight is shared between the FFN's projections ({names}); cannot slice it")
    splits = tuple(n for n in ffn.interior if n.target in SPLIT_OPS)
    return ChannelGroup(ffn.path, ffn.intermediate_size, tuple(params), splits)


def linear_weight_node(linear: Node) -> tuple[Node, bool]:
    """The weight an `aten.linear` node reads and whether it is stored transposed ([in, out]: GPT-2's Conv1D,
    read through a `t`; see `sparsec.ir.canonical`)."""
    source = transposed_source(linear.args[1])
    return (linear.args[1], False) if source is None else (source, True)


def _state_name(program, node: Node, linear: Node) -> str:
    name = program.state_name(node)
    if name is None:
        raise PassError(f"{linear.name}: its weight or bias {node.name} is computed in the graph, not a parameter")
    return name


def linear_weight(program, linear: Node) -> torch.Tensor:
    """The [out, in] weight of an `aten.linear` node (a transposed view of a weight stored [in, out])."""
    weight, transposed = linear_weight_node(linear)
    tensor = program.state_tensor(_state_name(program, weight, linear))
    return tensor.t() if transposed else tensor
