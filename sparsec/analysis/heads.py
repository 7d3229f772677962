"""Attention heads found from the graph: which tensors and shape literals carry the head dimension.

An *attention core* is an `aten.scaled_dot_product_attention` node, or its eager form: a softmax over
`matmul(q, k^T)` (through pointwise scale, mask add, tanh soft-cap) whose result (through casts and dropout) is
the left operand of `matmul(probs, v)`. Its head axis is dim -3 of q, k, v and the output.

From each core a small abstract interpretation propagates a *head layout*: each axis of a tensor is either
head-free (`None`) or a row-major tuple of factors `(kind, size)`: `g` (the KV group, size G), `r` (the query
head within its group, size R), `r*` (a broadcast copy of `r`: k/v after `repeat_kv`'s expand) and `o` (anything
else, e.g. head_dim). Query head h pairs with KV head h // R. The layout goes backwards from q/k/v to the
projections (`aten.linear`: the rows of their weights and biases are coupled) and forwards from the output to the
output projection (its weight's columns), op by op through view/reshape, transpose/permute, (un)squeeze,
expand, slices and splits along head-free axes (rotary's rotate_half), slices along the head axis (the
segments of a fused qkv projection), pointwise ops (a per-head parameter operand is coupled state, a per-head
operand computed elsewhere, such as ALiBi slopes, is refused) and reductions over head-free axes. Every value
reached must only be read inside the attention. Nothing depends on module names.

A reduction *over* a head axis (OLMo2's q/k RMSNorm over all H*d channels) makes the pruned model an
approximation: the norm's mean is then over the kept heads' channels only (what the Hugging Face model rebuilt
with fewer heads computes, not what the original computes). `Attention.approximate` says so; the quality gate
judges. Qwen3's norm over head_dim (weight [d], shared by all heads) is exact and is not sliced.

Example::
    (attention, *_) = find_attentions(program)
    attention.path, attention.num_heads, attention.num_kv_heads, attention.head_dim
    # ('model.layers.0.self_attn', 6, 2, 8)
    keep = torch.tensor([[True, True, True], [False, False, False]])  # [G, R]: keep KV group 0 only
    apply_heads(program, attention, keep)
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import sympy
import torch
from torch.fx import Node

from sparsec.analysis.dependency import linear_weight_node
from sparsec.analysis.match import Mismatch, NoMatch
from sparsec.analysis.vocabulary import (
    METADATA_ASSERT,
    PASSTHROUGH,
    REDUCTION_OPS,
    SPLIT_OPS,
    VIEW_OPS,
    common_path,
    describe,
    is_pointwise,
    module_path,
)
from sparsec.errors import PassError

aten = torch.ops.aten

Factor = tuple[str, int]  # (kind, size); kind in g, r, r*, o
HEAD_KINDS = ("g", "r", "r*")
SDPA = aten.scaled_dot_product_attention.default
SOFTMAX = frozenset({aten.softmax.int, aten._softmax.default})
# Ops that only reshape, the head layout regrouped through them; a flatten states no sizes, so pruning heads leaves
# it as it is (Cohere's interleaved rotary flattens pairs back into the head dimension).
RESHAPES = frozenset({*VIEW_OPS, aten.flatten.using_ints})
LAYER_NORM = aten.layer_norm.default
IDENTITY = frozenset({aten.contiguous.default, aten.detach.default, aten.type_as.default, *PASSTHROUGH})


class Segmented:
    """A head-carrying axis made of slices (segments): a fused projection's [q | k | v] rows.

    `parts`: start -> (size, factors) of each segment, filled as the slices of the fused value are met."""

    def __init__(self) -> None:
        self.parts: dict[int, tuple[int, tuple[Factor, ...]]] = {}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Segmented) and self.parts == other.parts

    __hash__ = None

    def __repr__(self) -> str:
        return f"Segmented({self.parts})"


AxisLayout = tuple[Factor, ...] | Segmented | None
Layout = tuple[AxisLayout, ...]


@dataclass(frozen=True)
class HeadParam:
    """A state tensor (a weight, bias or per-head norm weight) whose dim `dim` carries heads as `axis`."""

    name: str
    dim: int
    axis: AxisLayout


@dataclass
class Attention:
    """One attention found from its core, with everything indexed by its heads.

    Attributes:
        path: common module path of its projections (`model.layers.0.self_attn`).
        num_heads: query heads (G * R).
        num_kv_heads: KV heads (G); query head h reads KV head h // (num_heads // num_kv_heads).
        head_dim: size of a query head.
        core: the core's node names (the SDPA node, or the eager scores and output matmuls).
        core_path: the module path of the core's output node (`head_counts` is keyed by it).
        projections: the linears producing q/k/v (rows coupled); `output`: the output projection (columns).
        params: the coupled state tensors, the output projection's weight last.
        literals: (node, axis, layout) of every shape argument carrying heads, rewritten by `apply_heads`.
        segments: (slice or split node, source axis layout) of every slice or split taking segments of a fused
            projection.
        approximate: why the rewrite is not exact (a reduction over a head axis), empty when it is.
    """

    path: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    core: tuple[str, ...]
    core_path: str
    projections: tuple[str, ...]
    output: str
    params: tuple[HeadParam, ...]
    literals: tuple[tuple[Node, int, AxisLayout], ...] = ()
    segments: tuple[tuple[Node, Segmented], ...] = ()
    approximate: tuple[str, ...] = ()

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def output_weight(self) -> HeadParam:
        """The output projection's weight (its columns are the heads' outputs)."""
        return self.params[-1]

    def output_columns(self, head: int) -> torch.Tensor:
        """The output projection's input columns that query head `head` writes."""
        keep = torch.zeros(self.num_kv_heads, self.group_size, dtype=torch.bool)
        keep.view(-1)[head] = True
        return axis_indices(self.output_weight.axis, keep)


def output_projection_input(program, attention: Attention) -> Node:
    """The value `attention`'s output projection reads: the heads' outputs side by side (`output_columns`)."""
    linears = program.graph.find_nodes(op="call_function", target=aten.linear.default)
    (projection,) = [n for n in linears if n.name == attention.output]
    return projection.args[0]


# ----- layout arithmetic ------------------------------------------------------------------------------------
def _expr(size) -> sympy.Expr:
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def _shape(node: Node) -> list[sympy.Expr] | None:
    value = node.meta.get("val")
    return [_expr(s) for s in value.shape] if isinstance(value, torch.Tensor) else None


def _heads(axis: AxisLayout) -> bool:
    return isinstance(axis, Segmented) or (axis is not None and any(k in HEAD_KINDS for k, _ in axis))


def _carries(layout: Layout) -> bool:
    return any(_heads(a) for a in layout)


def _clean(axis: tuple[Factor, ...]) -> AxisLayout:
    factors = tuple(f for f in axis if f[1] != 1)
    return factors if any(k in HEAD_KINDS for k, _ in factors) else None


def _regroup(node: Node, layout: Layout, src: list, dst: list) -> Layout:
    """The layout of a tensor of shape `dst` viewing a tensor of shape `src` with `layout` (row-major)."""
    atoms: list[list] = []
    for axis, size in zip(layout, src):
        if isinstance(axis, Segmented):
            raise Mismatch("a view of the segments of a fused projection (slice them first)", node)
        if axis is None:
            if size != 1:
                atoms.append(["o", size])
        else:
            atoms.extend([k, sympy.Integer(s)] for k, s in axis)
    out: list[AxisLayout] = []
    for size in dst:
        taken: list[Factor] = []
        rest = size
        while rest != 1:
            if not atoms:
                raise Mismatch("the view's sizes do not regroup its input's", node)
            kind, s = atoms[0]
            ratio = sympy.simplify(rest / s)
            if ratio.is_integer and ratio.is_positive:
                atoms.pop(0)
                taken.append((kind, s))
                rest = ratio
            elif kind == "o" and sympy.simplify(s / rest).is_integer:  # an opaque factor split in two
                taken.append(("o", rest))
                atoms[0] = ["o", sympy.simplify(s / rest)]
                rest = sympy.Integer(1)
            else:
                what = "a head factor" if kind in HEAD_KINDS else "a factor"
                raise Mismatch(f"{what} ({kind}={s}) straddles an axis boundary of the view", node)
        out.append(_clean(tuple((k, int(s)) if k in HEAD_KINDS or s.is_Integer else (k, s) for k, s in taken)))
    if any(s != 1 for _, s in atoms):
        raise Mismatch("the view's sizes do not regroup its input's", node)
    return tuple(out)


def axis_indices(axis: AxisLayout, keep: torch.Tensor) -> torch.Tensor:
    """The indices along a head-carrying axis that query heads `keep` ([G, R] bool) keep (row-major factors)."""
    parts = sorted(axis.parts.items()) if isinstance(axis, Segmented) else [(0, (None, axis))]
    kept_r = int(keep.sum(1).max())
    indices = []
    for start, (_, factors) in parts:
        n = math.prod(s for _, s in factors)
        flat, stride, coords = torch.arange(n), n, {}
        for kind, size in factors:
            stride //= size
            coords[kind] = (flat // stride) % size
        g = coords.get("g", torch.zeros(n, dtype=torch.long))  # G = 1: the size-1 factor is left out
        mask = keep[g, coords["r"]] if "r" in coords else keep.any(1)[g]
        if "r*" in coords:  # broadcast copies of the query heads: the first R' of them stay
            mask = mask & (coords["r*"] < kept_r)
        indices.append(mask.nonzero().squeeze(1) + start)
    return torch.cat(indices)


def _new_size(factors: tuple[Factor, ...], kept_g: int, kept_r: int) -> int:
    size = 1
    for kind, s in factors:
        size *= kept_g if kind == "g" else kept_r if kind in ("r", "r*") else int(s)
    return size


# ----- propagation -------------------------------------------------------------------------------------------
def _dim(node: Node, index: int, default, rank: int) -> int:
    value = node.args[index] if len(node.args) > index else node.kwargs.get("dim", default)
    return value % rank if rank else value


def _align(layout: Layout, rank: int, shape: list) -> Layout:
    """`layout` (of a broadcast result) seen from an operand of rank `rank` and `shape` (size-1 axes: none)."""
    tail = layout[len(layout) - rank :] if rank else ()
    return tuple(None if s == 1 else a for a, s in zip(tail, shape))


class _Propagation:
    """Head layouts over one attention's nodes, from its core outwards (see the module docstring)."""

    def __init__(self, program, core: tuple[Node, ...], initial: dict[Node, Layout], group_size: int) -> None:
        self.program = program
        self.core = set(core)
        self.group_size = group_size
        self.layouts: dict[Node, Layout] = {}
        self.projections: dict[Node, AxisLayout] = {}
        self.outputs: dict[Node, AxisLayout] = {}
        self.params: dict[str, HeadParam] = {}
        self.approximate: list[str] = []
        self.sinks: set[Node] = set()  # reductions over a head axis: their result carries no heads
        self.splits: set[Node] = set()  # splits of a fused projection into its q, k, v segments
        self.work: list[Node] = []
        self.fixed = set(core)
        for node, layout in initial.items():
            self._assign(node, layout)

    def _assign(self, node: Node, layout: Layout) -> None:
        if not _carries(layout):
            return
        if node in self.layouts:
            if self.layouts[node] != layout:
                raise Mismatch(f"reached with two head layouts ({self.layouts[node]} and {layout})", node)
            return
        self.layouts[node] = layout
        self.work.append(node)

    def run(self) -> None:
        while self.work:
            node = self.work.pop()
            layout = self.layouts[node]
            if node not in self.fixed and node not in self.projections:
                self._backward(node, layout)
            for user in list(node.users):
                self._forward(node, user, layout)

    # A node's inputs from its (known) output layout.
    def _backward(self, node: Node, layout: Layout) -> None:
        if node.op == "placeholder":
            name = self.program.state_name(node)
            if name is None:
                raise Mismatch("a model input carries heads", node)
            axes = [i for i, a in enumerate(layout) if _heads(a)]
            if len(axes) != 1:
                raise Mismatch(f"the state tensor {name} carries heads on {len(axes)} axes", node)
            self.params[name] = HeadParam(name, axes[0], layout[axes[0]])
            return
        if node.op != "call_function":
            raise Mismatch("not an operator", node)
        target = node.target
        if target is aten.linear.default:
            axes = [i for i, a in enumerate(layout) if _heads(a)]
            if axes != [len(layout) - 1]:
                raise Mismatch("a projection whose output carries heads on an axis other than the last", node)
            self.projections[node] = layout[-1]
            return
        if isinstance(layout[-1] if layout else None, Segmented) and target is not aten.linear.default:
            raise Mismatch("segments of a head axis computed by something other than a projection", node)
        for arg, arg_layout in self._inputs(node, layout):
            if isinstance(arg, Node):
                self._assign(arg, arg_layout)

    def _inputs(self, node: Node, layout: Layout) -> list[tuple[Node, Layout]]:
        target, args = node.target, node.args
        src = args[0] if args and isinstance(args[0], Node) else None
        shape = _shape(src) if src is not None else None
        out = _shape(node)
        if target is operator.getitem:
            if src.op == "call_function" and src.target in SPLIT_OPS:
                d = _dim(src, 2, 0, len(layout))
                if layout[d] is not None:  # one part of a fused projection split along its heads
                    self.splits.add(src)
                    sizes = [int(_expr(v.shape[d])) for v in src.meta["val"]]
                    start = sum(sizes[: args[1]])
                    return self._segment(node, src.args[0], layout, d, start, sizes[args[1]])
            return [(src, layout)]
        if target in RESHAPES:
            return [(src, _regroup(node, layout, out, shape))]
        if target is aten.transpose.int:
            a, b = args[1] % len(layout), args[2] % len(layout)
            swapped = list(layout)
            swapped[a], swapped[b] = layout[b], layout[a]
            return [(src, tuple(swapped))]
        if target is aten.permute.default:
            inverse = [None] * len(layout)
            for i, d in enumerate(args[1]):
                inverse[d % len(layout)] = layout[i]
            return [(src, tuple(inverse))]
        if target is aten.unsqueeze.default:
            d = args[1] % len(layout)
            return [(src, layout[:d] + layout[d + 1 :])]
        if target is aten.select.int:  # one index of an axis without heads (Persimmon's q | k | v of a fused view)
            d = args[1] % (len(layout) + 1)
            return [(src, layout[:d] + (None,) + layout[d:])]
        if target in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            return [(src, _regroup(node, layout, out, shape))]
        if target is aten.expand.default:
            aligned = layout[len(layout) - len(shape) :]
            result = []
            for a, s, o in zip(aligned, shape, out[len(out) - len(shape) :]):
                if s == o:
                    result.append(a)
                elif a is not None and any(k in ("g", "r") for k, _ in a):
                    raise Mismatch("an expand creates heads out of a broadcast", node)
                else:
                    result.append(None)
            return [(src, tuple(result))]
        if target is aten.slice.Tensor:
            d = _dim(node, 1, 0, len(layout))
            start, end = (args[2] if len(args) > 2 else 0) or 0, args[3] if len(args) > 3 else None
            full = out[d] == shape[d]
            if layout[d] is None or full:
                return [(src, layout)]
            if not isinstance(start, int) or not isinstance(end, int) or (len(args) > 4 and args[4] != 1):
                raise Mismatch("a strided or symbolic slice of a head axis", node)
            return self._segment(node, src, layout, d, start, int(out[d]))
        if target in SPLIT_OPS:
            d = _dim(node, 2, 0, len(layout))
            if layout[d] is not None:
                raise Mismatch("a split of a head axis not read through its parts", node)
            return [(src, layout)]
        if target is aten.index_select.default:
            if layout[args[1] % len(layout)] is not None:
                raise Mismatch("an index_select along a head axis", node)
            return [(src, layout)]
        if target is aten.cat.default:
            d = _dim(node, 1, 0, len(layout))
            if layout[d] is not None:
                raise Mismatch("a concatenation along a head axis", node)
            return [(t, layout) for t in args[0] if isinstance(t, Node)]
        if target is aten.stack.default:  # a new axis of its own (Cohere's rotary pairs): the inputs lack it
            d = _dim(node, 1, 0, len(layout))
            if layout[d] is not None:
                raise Mismatch("a stack whose new axis carries heads", node)
            return [(t, layout[:d] + layout[d + 1 :]) for t in args[0] if isinstance(t, Node)]
        if target in REDUCTION_OPS:
            dims = [d % len(shape) for d in args[1]]
            keep = (args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)) is True
            it = iter(layout)
            full = tuple(None if i in dims else (layout[i] if keep else next(it)) for i in range(len(shape)))
            return [(src, full)]
        if target in SOFTMAX:
            if layout[args[1] % len(layout)] is not None:
                raise Mismatch("a softmax over a head axis", node)
            return [(src, layout)]
        if target is LAYER_NORM:  # normalised over trailing axes without heads (Chameleon's q/k norm per head)
            if any(a is not None for a in layout[len(layout) - len(args[1]) :]):
                raise Mismatch("a layer norm over a head axis", node)
            return [(src, layout)]  # its weight and bias span those trailing axes: no heads in them
        if target in IDENTITY or is_pointwise(node):
            result = []
            for arg in node.all_input_nodes:
                arg_shape = _shape(arg)
                if arg_shape is None:
                    continue
                aligned = _align(layout, len(arg_shape), arg_shape)
                if _carries(aligned) and arg not in self.layouts and not self._may_carry(arg):
                    raise Mismatch(
                        f"its operand {arg.name} is per head but computed outside the attention "
                        f"({describe(arg)}); removing heads would change it",
                        node,
                    )
                result.append((arg, aligned))
            return result
        raise Mismatch(f"{describe(node)} is not an op the head layout passes through", node)

    def _segment(self, node: Node, src: Node, layout: Layout, d: int, start: int, size: int) -> list:
        """`node` is rows [start, start + size) of axis `d` of `src` (a fused projection's output)."""
        if isinstance(layout[d], Segmented):
            raise Mismatch("a segment of a segment of a head axis", node)
        known = self.layouts.get(src)
        if known is not None and not isinstance(known[d], Segmented):
            raise Mismatch(f"{src.name} is read whole and in segments", node)
        segmented = known[d] if known is not None else Segmented()
        segmented.parts[start] = (size, layout[d])
        if known is not None:  # another segment of a value already reached: extended in place
            return []
        return [(src, tuple(segmented if i == d else a for i, a in enumerate(layout)))]

    def _may_carry(self, arg: Node) -> bool:
        """Whether a per-head operand may join the attention: a state tensor, or a value computed from ones that
        carry heads (found as the propagation goes); not a value computed from non-head inputs (ALiBi slopes)."""
        if arg.op == "placeholder":
            return self.program.state_name(arg) is not None
        stack, seen = [arg], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in self.layouts or n.target is aten.linear.default:
                return True
            if n.op == "placeholder":
                continue
            stack.extend(n.all_input_nodes)
        return False

    # A user's output from one input's layout.
    def _forward(self, node: Node, user: Node, layout: Layout) -> None:
        if user in self.core or user.target is METADATA_ASSERT:
            return
        target = user.target
        if user.op != "call_function":
            raise Mismatch(f"{node.name}, which carries heads, is read by {user.op} {user.name}", user)
        if target is aten.sym_size.int:
            if layout[user.args[1]] is not None:
                raise Mismatch("the size of a head axis is read as a value", user)
            return
        if target is aten.linear.default:
            if user.args[0] is not node:
                raise Mismatch(f"{node.name}, which carries heads, is a linear's weight", user)
            axes = [i for i, a in enumerate(layout) if _heads(a)]
            if axes != [len(layout) - 1] or isinstance(layout[-1], Segmented):
                raise Mismatch("the output projection's input carries heads on an axis other than the last", user)
            self.outputs[user] = layout[-1]
            return
        out = self._output(node, user, layout)
        if out is not None:
            self._assign(user, out)

    def _output(self, node: Node, user: Node, layout: Layout) -> Layout | None:
        target, args = user.target, user.args
        out = _shape(user)
        src = _shape(node)
        if target is operator.getitem:
            return layout
        if isinstance(layout[-1] if layout else None, Segmented):
            if target in SPLIT_OPS:
                return None  # its parts reach it from q, k and v (checked when closing)
            if target is not aten.slice.Tensor:
                raise Mismatch("the segments of a fused projection are read other than through slices", user)
        if target in RESHAPES or target in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            return _regroup(user, layout, src, out)
        if target is aten.transpose.int:
            a, b = args[1] % len(layout), args[2] % len(layout)
            swapped = list(layout)
            swapped[a], swapped[b] = layout[b], layout[a]
            return tuple(swapped)
        if target is aten.permute.default:
            return tuple(layout[d % len(layout)] for d in args[1])
        if target is aten.unsqueeze.default:
            d = args[1] % len(out)
            return layout[:d] + (None,) + layout[d:]
        if target is aten.stack.default:
            d = _dim(user, 1, 0, len(out))
            return layout[:d] + (None,) + layout[d:]
        if target is aten.select.int:
            d = args[1] % len(layout)
            if layout[d] is not None:
                raise Mismatch("a select of one index of a head axis", user)
            return layout[:d] + layout[d + 1 :]
        if target is aten.expand.default:
            pad = len(out) - len(layout)
            result: list[AxisLayout] = [None] * pad
            for a, s, o in zip(layout, src, out[pad:]):
                if s == o:
                    result.append(a)
                elif int(o) == self.group_size and self.group_size > 1:
                    result.append((("r*", int(o)),))
                else:
                    result.append(None)
            return tuple(result)
        if target is aten.slice.Tensor:
            d = _dim(user, 1, 0, len(layout))
            axis = layout[d]
            if isinstance(axis, Segmented):
                start = args[2] if len(args) > 2 else 0
                part = axis.parts.get(start)
                if part is None:
                    return None  # a segment not reached yet: its own operand reaches it (checked when closing)
                return tuple(part[1] if i == d else a for i, a in enumerate(layout))
            if axis is not None and out[d] != src[d]:
                raise Mismatch("a slice of part of a head axis", user)
            return layout
        if target is LAYER_NORM:
            if any(a is not None for a in layout[len(layout) - len(args[1]) :]):
                raise Mismatch("a layer norm over a head axis", user)
            return layout
        if (
            target in SPLIT_OPS
            or target is aten.cat.default
            or target in SOFTMAX
            or target is aten.index_select.default
        ):
            return self._pass_same(node, user, layout)
        if target in REDUCTION_OPS:
            dims = {d % len(src) for d in args[1]}
            keep = (args[2] if len(args) > 2 else user.kwargs.get("keepdim", False)) is True
            if any(layout[d] is not None for d in dims):
                self.sinks.add(user)
                self.approximate.append(
                    f"{describe(user)} reduces over a head axis: after pruning it reduces over the "
                    "kept heads only (as the model rebuilt with fewer heads does)"
                )
            return tuple(None if d in dims else a for d, a in enumerate(layout) if keep or d not in dims)
        if target in IDENTITY or is_pointwise(user):
            return (None,) * (len(out) - len(layout)) + layout if len(out) >= len(layout) else None
        raise Mismatch(f"{describe(user)} reads {node.name}, which carries heads, and is not an op it passes", user)

    def _pass_same(self, node: Node, user: Node, layout: Layout) -> Layout:
        """Splits, concatenations, softmaxes and index_selects along a head-free axis keep the layout."""
        d = _dim(user, 2 if user.target in SPLIT_OPS else 1, 0, len(layout))
        if layout[d] is not None:
            raise Mismatch(f"{describe(user)} along a head axis", user)
        return layout

    def close(self) -> None:
        """Every value carrying heads is read only inside the attention; segments cover their axis."""
        for node, layout in self.layouts.items():
            for axis in layout:
                if isinstance(axis, Segmented):
                    size, covered = None, 0
                    for start, (length, _) in sorted(axis.parts.items()):
                        if start != covered:
                            raise Mismatch(f"rows [{covered}, {start}) of the fused projection are not q, k or v", node)
                        covered += length
                    size = _shape(node)[-1]
                    if covered != size:
                        raise Mismatch(f"rows [{covered}, {size}) of the fused projection are not q, k or v", node)
            for user in node.users:
                handled = (
                    user in self.layouts
                    or user in self.core
                    or user in self.outputs
                    or user in self.sinks
                    or user in self.splits
                    or user.target is METADATA_ASSERT
                    or user.target is aten.sym_size.int
                )
                if not handled:
                    raise Mismatch(f"{node.name}, which carries heads, is also read by {user.name} outside it", user)


# ----- cores -----------------------------------------------------------------------------------------------
def _follow(node: Node, steps: int = 8):
    for _ in range(steps):
        yield node
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], Node):
            return
        node = node.args[0]


def _repeat(k: Node) -> int:
    """R of a `repeat_kv` (unsqueeze, expand of the new axis to R, reshape) on the way back from k, else 1."""
    for node in _follow(k):
        if node.op != "call_function":
            return 1
        if node.target is aten.expand.default:
            src, out = _shape(node.args[0]), _shape(node)
            for s, o in zip(src, out[len(out) - len(src) :]):
                if s == 1 and o != 1 and o.is_Integer:
                    return int(o)
        elif node.target not in VIEW_OPS | IDENTITY | {aten.transpose.int}:
            return 1
    return 1


@dataclass(frozen=True)
class _Core:
    nodes: tuple[Node, ...]
    q: Node
    k: Node  # k, or k^T for the eager form (its head axis is still -3)
    v: Node
    out: Node
    scores: Node | None
    gqa: bool  # SDPA's enable_gqa: k/v hold G heads, not G * R


def _cores(program) -> list[_Core | NoMatch]:
    cores: list[_Core | NoMatch] = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is SDPA:
            q, k, v = node.args[:3]
            cores.append(_Core((node,), q, k, v, node, None, bool(node.kwargs.get("enable_gqa", False))))
        elif node.target in SOFTMAX:
            scores = node.args[0]
            while scores.op == "call_function" and (is_pointwise(scores) or scores.target in VIEW_OPS):
                scores = next(a for a in scores.args if isinstance(a, Node))
            if scores.target in (aten.bmm.default, aten.baddbmm.default):
                cores.append(
                    NoMatch(
                        "head-prunable attention",
                        module_path(node),
                        f"an eager attention in 3D {describe(scores)}, batch and heads flattened into one axis"
                        + (" (with a per-head bias added: ALiBi)" if scores.target is aten.baddbmm.default else ""),
                        scores.name,
                    )
                )
                continue
            if scores.target is not aten.matmul.default or _shape(scores) is None or len(_shape(scores)) != 4:
                continue
            users = [u for u in node.users if u.target is not METADATA_ASSERT]
            probs = node
            while len(users) == 1 and users[0].target in IDENTITY:
                probs = users[0]
                users = [u for u in probs.users if u.target is not METADATA_ASSERT]
            if len(users) != 1 or users[0].target is not aten.matmul.default or users[0].args[0] is not probs:
                continue
            out = users[0]
            cores.append(_Core((scores, out), scores.args[0], scores.args[1], out.args[1], out, scores, False))
    return cores


def _head_layout(rank: int, factors: tuple[Factor, ...]) -> Layout:
    return tuple(_clean(factors) if i == rank - 3 else None for i in range(rank))


def match_attention(program, core: _Core) -> Attention | NoMatch:
    """The attention around `core`, or why its heads cannot be followed to its projections."""
    q_shape, k_shape = _shape(core.q), _shape(core.k)
    path = module_path(core.out)
    if q_shape is None or k_shape is None or len(q_shape) != 4:
        return NoMatch("head-prunable attention", path, "q/k are not 4D [batch, heads, seq, dim]", core.out.name)
    hq, hk = int(q_shape[-3]), int(k_shape[-3])
    if core.gqa or hk != hq:
        if hq % hk:
            return NoMatch(
                "head-prunable attention", path, f"{hq} query heads do not group over {hk} KV heads", core.out.name
            )
        g, r, kv = hk, hq // hk, (("g", hk),)
    else:
        r = _repeat(core.k)
        if hq % r:
            return NoMatch("head-prunable attention", path, f"{hq} heads do not group by the repeat {r}", core.k.name)
        g = hq // r
        kv = (("g", g), ("r*", r))
    heads = (("g", g), ("r", r))
    initial = {core.q: _head_layout(4, heads), core.k: _head_layout(4, kv), core.v: _head_layout(4, kv)}
    initial[core.out] = _head_layout(len(_shape(core.out)), heads)
    if core.scores is not None:
        initial[core.scores] = _head_layout(4, heads)
    try:
        prop = _Propagation(program, core.nodes, initial, r)
        prop.run()
        prop.close()
    except Mismatch as miss:  # raised anywhere in the propagation: the rule and the node it stopped at
        return NoMatch("head-prunable attention", path, f"{miss.rule} at {describe(miss.node)}", miss.node.name)
    if len(prop.outputs) != 1 or not prop.projections:
        return NoMatch(
            "head-prunable attention", path, f"{len(prop.outputs)} output projections (one is needed)", core.out.name
        )
    ((output, out_axis),) = prop.outputs.items()
    params: list[HeadParam] = list(prop.params.values())
    for linear, axis in prop.projections.items():
        weight, transposed = linear_weight_node(linear)
        name = program.state_name(weight)
        if name is None:
            return NoMatch(
                "head-prunable attention", path, "a projection's weight is computed, not a parameter", linear.name
            )
        params.append(HeadParam(name, 1 if transposed else 0, axis))
        bias = linear.args[2] if len(linear.args) > 2 else None
        if isinstance(bias, Node) and program.state_name(bias) is not None:
            params.append(HeadParam(program.state_name(bias), 0, axis))
    weight, transposed = linear_weight_node(output)
    if program.state_name(weight) is None:
        return NoMatch("head-prunable attention", path, "the output projection's weight is computed", output.name)
    params.append(HeadParam(program.state_name(weight), 0 if transposed else 1, out_axis))
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        return NoMatch("head-prunable attention", path, f"a state tensor is coupled twice ({names})", output.name)
    literals = []
    for node, layout in prop.layouts.items():
        if node.op == "call_function" and node.target in VIEW_OPS | {aten.expand.default}:
            for i, (axis, literal) in enumerate(zip(layout, node.args[1])):
                if _heads(axis) and isinstance(literal, int) and literal != -1:
                    literals.append((node, i, axis))
    segments = []
    for node, layout in prop.layouts.items():
        for user in node.users:
            if user.target is aten.slice.Tensor and isinstance(layout[_dim(user, 1, 0, len(layout))], Segmented):
                segments.append((user, layout[_dim(user, 1, 0, len(layout))]))
            elif user in prop.splits:
                segments.append((user, layout[_dim(user, 2, 0, len(layout))]))
    return Attention(
        path=common_path([*prop.projections, output]),
        num_heads=hq,
        num_kv_heads=g,
        head_dim=int(q_shape[-1]),
        core=tuple(n.name for n in core.nodes),
        core_path=path,
        projections=tuple(n.name for n in prop.projections),
        output=output.name,
        params=tuple(params),
        literals=tuple(literals),
        segments=tuple(segments),
        approximate=tuple(prop.approximate),
    )


def _attention_matches(program) -> list[Attention | NoMatch]:
    return [c if isinstance(c, NoMatch) else match_attention(program, c) for c in _cores(program)]


def find_attentions(program) -> list[Attention]:
    """Every attention whose heads are followed from its core to its projections, in graph order."""
    return [a for a in program.analysis(_attention_matches) if isinstance(a, Attention)]


def attention_misses(program) -> list[NoMatch]:
    """Why each attention core found in the graph cannot have its heads pruned."""
    return [a for a in program.analysis(_attention_matches) if isinstance(a, NoMatch)]


@dataclass(frozen=True)
class HeadShape:
    """An attention core's query heads, KV heads and head width, read from the shapes of its inputs."""

    heads: int
    kv_heads: int
    head_dim: int


def head_shapes(program) -> dict[str, HeadShape | NoMatch]:
    """The `HeadShape` of every attention core by the module path of its output, whether or not its heads can be
    pruned (`find_attentions` finds those): an attention left with one head included; a `NoMatch` where a core's
    heads cannot be read (batch and heads flattened into one axis)."""
    shapes: dict[str, HeadShape | NoMatch] = {}
    for core in _cores(program):
        if isinstance(core, NoMatch):
            shapes[core.path] = core
            continue
        q, k = _shape(core.q), _shape(core.k)
        hq, hk = int(q[-3]), int(k[-3])
        kv = hk if core.gqa or hk != hq else hq // _repeat(core.k)
        shapes[module_path(core.out)] = HeadShape(hq, kv, int(q[-1]))
    return shapes


def head_counts(program) -> dict[str, tuple[int, int]]:
    """(query heads, KV heads) of every attention core by the module path of its output (`head_shapes`)."""
    shapes = head_shapes(program).items()
    return {path: (shape.heads, shape.kv_heads) for path, shape in shapes if isinstance(shape, HeadShape)}


def apply_heads(program, attention: Attention, keep: torch.Tensor) -> None:
    """Keep only query heads `keep` ([G, R] bool) of `attention`: KV groups with no kept query head go.

    Every kept group must keep the same number of query heads (the group size stays uniform). Slices the rows
    and columns of every coupled tensor and rewrites the literal head counts of views, reshapes and expands
    and the segment bounds of a fused projection; shapes are re-inferred by `Program.verify`.
    """
    keep = torch.as_tensor(keep, dtype=torch.bool)
    g, r = attention.num_kv_heads, attention.group_size
    if tuple(keep.shape) != (g, r):
        raise PassError(f"{attention.path}: keep must be [{g}, {r}] (KV groups x query heads per group)")
    counts = keep.sum(1)
    kept_r = int(counts.max())
    if kept_r == 0 or not all(int(c) in (0, kept_r) for c in counts):
        raise PassError(
            f"{attention.path}: every kept KV group must keep the same number of query heads, got {counts.tolist()}"
        )
    kept_g = int((counts > 0).sum())
    for p in attention.params:
        tensor = program.state_tensor(p.name)
        program.replace_state(p.name, tensor.index_select(p.dim, axis_indices(p.axis, keep)).contiguous())
    for node, i, axis in attention.literals:
        shape = list(node.args[1])
        shape[i] = _new_size(axis, kept_g, kept_r)
        node.args = (node.args[0], shape, *node.args[2:])
    for node, segmented in attention.segments:
        sizes = [_new_size(factors, kept_g, kept_r) for _, (_, factors) in sorted(segmented.parts.items())]
        if node.target is aten.slice.Tensor:
            starts = sorted(segmented.parts)
            i = starts.index(node.args[2])
            node.args = (node.args[0], node.args[1], sum(sizes[:i]), sum(sizes[: i + 1]), *node.args[4:])
        else:  # a split or chunk of the fused projection: into the new segment sizes
            node.target = aten.split_with_sizes.default
            node.args = (node.args[0], sizes, _dim(node, 2, 0, 0))
