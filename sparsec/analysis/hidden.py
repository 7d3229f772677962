"""The residual stream's hidden channels: which parameters and shape literals are coupled through them.

The stream's channel dimension starts at the token embedding (`aten.embedding` of a parameter) and runs, on the
last axis, through every op that keeps it there: residual adds, scales by a constant (Gemma's sqrt(hidden)
normalizer, kept as captured: the trained weights expect it), casts, dropout, norms (`aten.layer_norm`, or RMSNorm
spelled out as pow / mean / rsqrt / mul), per-channel parameters read pointwise (norm weights, biases, learned
position tables added to it), reshapes and views that keep the last axis (a literal width in their shape is
rewritten) and slicing on other axes (a pooler's token 0). It ends at linears: a linear reading the stream has its
weight *columns* coupled (q/k/v, gate/up, the LM head, a pooler); a linear whose output joins the stream (o_proj,
down_proj, fc2) has its *rows and bias* coupled. Tied embeddings are one tensor, sliced once. Everything is found
from the graph by following values in both directions (a value added to the stream carries its channels too),
never from module names.

Anything else that reads or produces a stream value (attention on it, a graph input such as `inputs_embeds`, the
width read as a number, a concatenation along the channels, MoE experts) is a reason, naming the op and node, and
`hidden_channel_group` returns it as a `NoMatch` before anything changes.

Exactness: removing channels is exact for every linear, embedding and pointwise op, but LayerNorm and RMSNorm then
normalise over the kept channels only (their mean / RMS changes), so the result equals the Hugging Face model
rebuilt with `hidden_size` = kept and the same weights sliced, not the original model: an approximation the quality
gate judges (Minitron distills afterwards).
"""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass

import torch
from torch.fx import Node

from sparsec.analysis.dependency import ParamSlice, linear_weight_node
from sparsec.analysis.experts import find_experts
from sparsec.analysis.match import Mismatch, NoMatch
from sparsec.analysis.vocabulary import METADATA_ASSERT, REDUCTION_OPS, VIEW_OPS, module_path
from sparsec.errors import PassError

aten = torch.ops.aten

# Ops applied channel by channel: every tensor operand with the channels on its last axis carries the same ones.
POINTWISE = {
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.neg.default,
    aten.pow.Tensor_Scalar,
    aten.rsqrt.default,
    aten.sqrt.default,
    aten.tanh.default,
    aten.gelu.default,
    aten.silu.default,
    aten.sigmoid.default,
    aten.relu.default,
    aten.abs.default,
    aten.where.self,
    aten.where.ScalarOther,
    aten.where.ScalarSelf,
    aten.masked_fill.Scalar,
    aten.clamp.default,
}
# One tensor in, the same tensor (values, shape) out.
UNARY = {
    aten.dropout.default,
    aten.to.dtype,
    aten.to.device,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
    aten.type_as.default,
}
# Views, reshapes and expands: `args[1]` is the output shape (a literal width in it is rewritten).
SHAPE_ARG_OPS = VIEW_OPS | {aten.expand.default}
# Read only the template's dtype and device; make a tensor of the sizes given (a literal width is rewritten).
NEW_TENSORS = {aten.new_zeros.default, aten.new_empty.default, aten.new_ones.default}


@dataclass(frozen=True)
class ShapeLiteral:
    """A literal hidden width in a node's arguments: `node.args[arg][index]` (a layer_norm's normalized_shape, a
    reshape to [tokens, H])."""

    node: Node
    arg: int
    index: int


@dataclass(frozen=True)
class HiddenGroup:
    """Everything coupled through the residual stream's `width` channels.

    `params`: the coupled tensors and the dimension each holds the channels on (one entry per tensor: a tied
    embedding appears once); `literals`: widths written into the graph; `readers`: the linears reading the stream
    (their inputs are the normalised values activation importance is measured at); `writers`: the linears whose
    outputs join it; `embeddings`: the `aten.embedding` nodes producing it; `outputs`: program outputs that carry
    the channels (an encoder's last hidden state), which narrow with them.
    """

    width: int
    params: tuple[ParamSlice, ...]
    literals: tuple[ShapeLiteral, ...]
    readers: tuple[Node, ...]
    writers: tuple[Node, ...]
    embeddings: tuple[Node, ...]
    outputs: tuple[str, ...] = ()

    def num_parameters(self, program) -> int:
        return sum(program.state_shape(p.name).numel() for p in self.params)

    def apply(self, program, kept: torch.Tensor) -> None:
        """Keep only channels `kept` (sorted, unique) in every coupled tensor and shape literal; metadata is
        re-inferred by the pass manager's verification."""
        kept = torch.as_tensor(kept, dtype=torch.long)
        if kept.dim() != 1 or kept.numel() == 0 or kept.min() < 0 or kept.max() >= self.width:
            raise PassError(f"hidden channels: kept indices must be in [0, {self.width}) and not empty")
        if len(kept.unique()) != len(kept):
            raise PassError("hidden channels: kept indices must be unique")
        for p in self.params:
            program.replace_state(p.name, program.state_tensor(p.name).index_select(p.dim, kept).contiguous())
        for lit in self.literals:
            args = list(lit.node.args)
            shape = list(args[lit.arg])
            shape[lit.index] = len(kept)
            args[lit.arg] = shape
            lit.node.args = tuple(args)


def _val(node) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _axis(dim: int, ndim: int) -> int:
    return dim % ndim if ndim else 0


class _Walk:
    """One propagation of the channel dimension over the graph (see the module docstring)."""

    def __init__(self, program, seed: Node) -> None:
        self.program = program
        self.width = int(program.state_shape(program.state_name(seed.args[0]))[1])
        self.stream: set[Node] = set()
        self.queue: deque[Node] = deque()
        self.params: dict[str, ParamSlice] = {}
        self.literals: dict[tuple[Node, int, int], ShapeLiteral] = {}
        self.readers: dict[Node, None] = {}
        self.writers: dict[Node, None] = {}
        self.embeddings: dict[Node, None] = {}
        self.outputs: list[str] = []
        self.join(seed)

    # ----- bookkeeping --------------------------------------------------------------------------------
    def refuse(self, node: Node, why: str) -> Mismatch:
        return Mismatch(f"{node.name} ({node.target}) {why}; the hidden channels cannot be sliced in this graph", node)

    def carries(self, node) -> bool:
        """Whether a value has the hidden width on its last axis (a candidate for the stream)."""
        value = _val(node)
        return value is not None and value.dim() >= 1 and value.shape[-1] == self.width

    def join(self, node: Node) -> None:
        if node not in self.stream:
            self.stream.add(node)
            self.queue.append(node)

    def couple(self, weight: Node, dim: int, reader: Node) -> None:
        name = self.program.state_name(weight)
        if name is None:
            raise self.refuse(reader, f"reads {weight.name}, computed in the graph, as a weight on the hidden channels")
        known = self.params.get(name)
        if known is not None and known.dim != dim:
            raise self.refuse(reader, f"holds the hidden channels of {name} on dim {dim}, elsewhere on dim {known.dim}")
        self.params[name] = ParamSlice(name, dim)

    def literal(self, node: Node, arg: int) -> None:
        shape = node.args[arg]
        last = shape[-1]
        if isinstance(last, Node):
            raise self.refuse(node, "sets the hidden width from a computed size")
        if last == self.width:
            self.literals[(node, arg, len(shape) - 1)] = ShapeLiteral(node, arg, len(shape) - 1)
        elif last != -1:
            raise self.refuse(node, f"reshapes the hidden channels to a last axis of {last}")

    # ----- propagation ---------------------------------------------------------------------------------
    def run(self) -> _Walk:
        while self.queue:
            node = self.queue.popleft()
            self.backward(node)
            for user in list(node.users):
                self.forward(node, user)
        return self

    def keeps_last_axis(self, node: Node) -> bool:
        """For a shape op on a stream value (`node.args[0]`): whether the channels stay whole on the last axis."""
        source, out, t = _val(node.args[0]), _val(node), node.target
        if source is None or out is None or out.dim() == 0 or out.shape[-1] != self.width:
            return False
        if t in UNARY:
            return True
        if t in SHAPE_ARG_OPS:
            self.literal(node, 1)
            return True
        if t is aten.unsqueeze.default:
            return _axis(node.args[1], out.dim()) != out.dim() - 1
        if t is aten.squeeze.dim:
            return _axis(node.args[1], source.dim()) != source.dim() - 1
        if t is aten.transpose.int:
            return source.dim() - 1 not in {_axis(a, source.dim()) for a in node.args[1:3]}
        if t is aten.permute.default:
            return _axis(node.args[1][-1], source.dim()) == source.dim() - 1
        if t in (aten.slice.Tensor, aten.select.int, aten.index_select.default):
            dim = node.args[1] if len(node.args) > 1 else 0
            return _axis(dim, source.dim()) != source.dim() - 1
        if t is aten.index.Tensor:
            return len(node.args[1]) < source.dim()
        return False

    def off_last_axis(self, node: Node, dim: int) -> bool:
        """Whether `dim` of `node`'s value is not its last axis (the channels' place)."""
        ndim = _val(node).dim()
        return _axis(dim, ndim) != ndim - 1

    SHAPE_OPS = (
        SHAPE_ARG_OPS
        | UNARY
        | {
            aten.unsqueeze.default,
            aten.squeeze.dim,
            aten.transpose.int,
            aten.permute.default,
            aten.slice.Tensor,
            aten.select.int,
            aten.index_select.default,
            aten.index.Tensor,
        }
    )

    def refuse_moe(self, node: Node) -> None:
        if getattr(node.target, "namespace", None) == "sparsec":
            raise self.refuse(
                node,
                "is sparsec's MoE operator on the stream: slice_hidden does not rewrite its router and experts; "
                "run slice_hidden before ffn_to_moe",
            )

    def backward(self, node: Node) -> None:
        """How `node`, a stream value, got its channels: couple the tensors and join the operands it came from."""
        self.refuse_moe(node)
        if node.op == "placeholder":
            name = self.program.state_name(node)
            if name is None:
                raise self.refuse(node, "is a graph input carrying the hidden channels (inputs_embeds?)")
            self.couple(node, len(self.program.state_shape(name)) - 1, node)
            return
        t = node.target
        if t is aten.linear.default:  # a writer: rows and bias
            weight, transposed = linear_weight_node(node)
            self.couple(weight, 1 if transposed else 0, node)
            if len(node.args) > 2 and isinstance(node.args[2], Node):
                self.couple(node.args[2], 0, node)
            self.writers[node] = None
        elif t is aten.embedding.default:
            self.embeddings[node] = None
            self.join(node.args[0])
        elif t in POINTWISE:
            for arg in node.all_input_nodes:
                value = _val(arg)
                if value is None or value.dim() == 0 or value.shape[-1] == 1:
                    continue  # a scalar or a per-token value broadcasts over the channels
                if value.shape[-1] != self.width:
                    raise self.refuse(node, f"combines the stream with {arg.name} of shape {tuple(value.shape)}")
                self.join(arg)
        elif t is aten.layer_norm.default:
            self.literal(node, 1)
            self.join(node.args[0])
            for arg in node.args[2:4]:
                if isinstance(arg, Node):
                    self.join(arg)
        elif t in self.SHAPE_OPS and self.keeps_last_axis(node):
            self.join(node.args[0])
        elif t is aten.cat.default and _axis(node.args[1] if len(node.args) > 1 else 0, _val(node).dim()) != (
            _val(node).dim() - 1
        ):
            for arg in node.args[0]:
                self.join(arg)
        elif t in REDUCTION_OPS and self.carries(node.args[0]):
            self.join(node.args[0])
        elif t in NEW_TENSORS:
            self.literal(node, 1)
        elif t is aten.index_copy.default and self.off_last_axis(node, node.args[1]):
            self.join(node.args[0])
            self.join(node.args[3])
        else:
            raise self.refuse(node, "produces a value with the hidden channels in a way slice_hidden cannot follow")

    def forward(self, node: Node, user: Node) -> None:
        """What `user` does with the stream value `node`."""
        self.refuse_moe(user)
        t = user.target
        if user.op == "output":
            self.outputs.append(node.name)
        elif t is METADATA_ASSERT or (t in NEW_TENSORS and node is user.args[0]):
            return
        elif t is aten.index_copy.default and node is not user.args[2]:
            if not self.off_last_axis(user, user.args[1]):
                raise self.refuse(user, f"copies {node.name} along the hidden channels")
            self.join(user)
        elif t is operator.getitem or user.op != "call_function":
            raise self.refuse(user, f"reads the stream value {node.name}")
        elif t is aten.linear.default:
            if node is user.args[0] or node is user.args[1]:  # a reader: weight columns (a tied LM head: the table)
                weight, transposed = linear_weight_node(user)
                self.couple(weight, 0 if transposed else 1, user)
                self.readers[user] = None
                self.join(user.args[0])
                if not transposed:
                    self.join(weight)
            else:  # the bias: the output joins the stream
                self.join(user)
        elif t is aten.embedding.default:
            if node is not user.args[0]:
                raise self.refuse(user, f"indexes an embedding with the stream value {node.name}")
            self.join(user)
        elif t in POINTWISE or t is aten.layer_norm.default:
            self.join(user)
        elif t in REDUCTION_OPS:
            dims = user.args[1] if len(user.args) > 1 else None
            ndim = _val(node).dim()
            if dims is None or (ndim - 1) in {_axis(d, ndim) for d in dims}:
                return  # a mean / RMS over the channels: changes meaning when they go, the quality gate judges
            self.join(user)
        elif t is aten.sym_size.int:
            if _axis(user.args[1], _val(node).dim()) == _val(node).dim() - 1:
                raise self.refuse(user, f"reads the hidden width of {node.name} as a number")
        elif t in self.SHAPE_OPS:
            if t is aten.type_as.default and node is not user.args[0]:
                return  # only the dtype is read
            if node is not user.args[0] or not self.keeps_last_axis(user):
                raise self.refuse(user, f"moves the hidden channels of {node.name} off the last axis")
            self.join(user)
        elif t is aten.cat.default:
            ndim = _val(user).dim()
            if _axis(user.args[1] if len(user.args) > 1 else 0, ndim) == ndim - 1:
                raise self.refuse(user, f"concatenates {node.name} along the hidden channels")
            self.join(user)
        else:
            raise self.refuse(user, f"reads the stream value {node.name}")


HIDDEN_STREAM = "residual stream of sliceable hidden channels"


def hidden_channel_group(program) -> HiddenGroup | NoMatch:
    """The residual stream's channels and every tensor and literal coupled through them, or a `NoMatch` naming the
    op and node where the graph reads them in a way slicing cannot honour (see the module docstring).

    Example::
        group = hidden_channel_group(program)
        group.width, [(p.name, p.dim) for p in group.params][:2]
        # (64, [('model.embed_tokens.weight', 1), ('model.layers.0.self_attn.o_proj.weight', 0)])
        group.apply(program, kept=torch.arange(48))   # keep the first 48 channels
    """
    seeds = [
        n
        for n in program.graph.find_nodes(op="call_function", target=aten.embedding.default)
        if program.state_name(n.args[0]) is not None
    ]
    if not seeds:
        return NoMatch(
            HIDDEN_STREAM, "", "the graph has no token embedding (aten.embedding of a parameter) to start from"
        )
    experts = find_experts(program)
    if experts:
        return NoMatch(
            HIDDEN_STREAM,
            "",
            f"the model has MoE experts ({experts[0].path}, ...) whose fused [E, ...] weights "
            "slice_hidden does not rewrite; slice the hidden channels of the dense model (before ffn_to_moe)",
        )
    try:
        walk = _Walk(program, seeds[0]).run()
    except Mismatch as miss:
        return miss.no_match(HIDDEN_STREAM, module_path(miss.node))
    return HiddenGroup(
        width=walk.width,
        params=tuple(walk.params.values()),
        literals=tuple(walk.literals.values()),
        readers=tuple(walk.readers),
        writers=tuple(walk.writers),
        embeddings=tuple(walk.embeddings),
        outputs=tuple(walk.outputs),
    )
