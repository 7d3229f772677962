"""Feed-forward networks found in the graph itself, not by module class names.

An FFN is found from its *down* projection backwards: a linear whose input is computed only by pointwise
ops from one or two other linears' outputs.

- gated (SwiGLU, GeGLU): `down(act(gate(x)) * up(x))`, gate and up reading the same `x`;
- plain (fc1 / act / fc2, as in ViT, SigLIP, MMDiT FeedForward): `down(act(up(x)))`;
- fused gated (Phi-3 `gate_up_proj`): one linear whose output is split in two halves (chunk / split),
  `down(act(half_g) * half_u)`.

Attention projections never match (a reshape or SDPA sits between them), and neither do chains whose
first projection also feeds something else (a timestep embedding read by every block's modulation), so
the finder is safe to run over a whole model.

Matchers say why: `match_ffn` returns a `NoMatch` (the rule broken, the node that broke it) instead of nothing,
and `ffn_misses` lists it for every linear no FFN holds (`sparsec inspect --why`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

from sparsec.analysis.match import Mismatch, NoMatch
from sparsec.analysis.vocabulary import (
    LINEAR,
    METADATA_ASSERT,
    PASSTHROUGH,
    SPLIT_OPS,
    common_path,
    describe,
    is_half_split,
    is_pointwise,
    module_path,
    same_dtype_and_shape,
    skip_passthrough,
)
from sparsec.ops.moe import ACTIVATIONS

aten = torch.ops.aten


@dataclass(frozen=True)
class Ffn:
    """A feed-forward network in the graph.

    Attributes:
        path: common module path of its linears (`model.layers.0.mlp`).
        kind: `gated` or `plain`.
        input: the hidden-state node entering the FFN.
        up: linear producing the value branch (`up_proj`; `fc1` for plain FFNs).
        gate: linear feeding the activation (`gate_proj`), None for plain FFNs.
        down: the output linear (`down_proj` / `fc2`).
        interior: pointwise nodes between up/gate and down (activation, product, casts, the split).
        intermediate_size: number of neurons (rows of up; half of them for a fused gate_up).
        gate_half: for `fused_gated`, which half of `up`'s output (0 or 1) is the gate; None otherwise.
    """

    path: str
    kind: str
    input: Node
    up: Node
    gate: Node | None
    down: Node
    interior: tuple[Node, ...]
    intermediate_size: int
    gate_half: int | None = None

    def row_blocks(self, role: str) -> tuple[int, int]:
        """(offset, size) of the rows of `up`'s weight that hold the `gate` or `up` half (fused) or all rows."""
        if self.gate_half is None:
            return 0, self.intermediate_size
        half = self.gate_half if role == "gate" else 1 - self.gate_half
        return half * self.intermediate_size, self.intermediate_size

    def describe(self) -> str:
        """`model.layers.0.mlp`, or where it is for an FFN of the top-level module."""
        return self.path or f"at the top level (output {self.down.name})"

    @property
    def linears(self) -> dict[str, Node]:
        roles = {"up": self.up, "down": self.down}
        if self.gate is not None:
            roles["gate"] = self.gate
        return roles

    def escaping_nodes(self) -> list[Node]:
        """Intermediate values (width `intermediate_size`) read by something outside the FFN.

        A width rewrite must refuse when this is not empty: slicing would change what those readers see.
        """
        inside = set(self.interior) | {self.down}
        produced = [self.up, *([self.gate] if self.gate is not None else []), *self.interior]
        return [n for n in produced if any(u not in inside and u.target is not METADATA_ASSERT for u in n.users)]


def _pointwise_cone(root: Node) -> tuple[list[Node], list[Node], Node | None]:
    """The linears feeding `root` through pointwise ops only, the pointwise nodes in between, and the first
    node of any other kind (view, matmul, softmax, a split not into halves, ...) met on the way, else None."""
    linears: list[Node] = []
    interior: list[Node] = []
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_function" and node.target is LINEAR:
            linears.append(node)
        elif is_pointwise(node) or is_half_split(node):
            interior.append(node)
            stack.extend(node.all_input_nodes)
        elif node.op == "placeholder" and _is_broadcast_scalar(node.meta.get("val")):
            continue  # a lifted constant or a learned parameter of one element (xIELU's alphas): the same for every neuron
        else:
            return linears, interior, node
    return linears, interior, None


def _is_broadcast_scalar(value) -> bool:
    """One element, whatever its shape ([], [1]): it acts on every neuron alike, so slicing or splitting the neurons
    leaves it as it is. A per-neuron parameter would have to be sliced with them and stops the match."""
    return isinstance(value, torch.Tensor) and value.numel() == 1


def _split_source(node: Node) -> Node | None:
    """The split a node is (or takes an item of), None if it is no split."""
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], Node):
        node = node.args[0]
    return node if node.op == "call_function" and node.target in SPLIT_OPS else None


def _cone_mismatch(down: Node, blocker: Node) -> Mismatch:
    split = _split_source(blocker)
    if split is not None:
        return Mismatch(
            f"the input of {down.name} splits {describe(split)} but not into two halves of "
            "the last dimension, as a fused gate_up projection is",
            split,
        )
    return Mismatch(
        f"the input of {down.name} is not computed by pointwise ops from one or two linears: "
        f"{describe(blocker)} lies on the way",
        blocker,
    )


def _product_sides(down: Node, hidden: Node, look_through) -> list[tuple[list[Node], list[Node]]]:
    """The pointwise cones of the two factors of `hidden` (a product); `Mismatch` if they are not an FFN's."""
    if hidden.target is not aten.mul.Tensor or not all(isinstance(a, Node) for a in hidden.args[:2]):
        raise Mismatch(f"the input of {down.name} is not a product act(gate) * up: it is {describe(hidden)}", hidden)
    sides = []
    for arg in hidden.args[:2]:
        linears, interior, blocker = _pointwise_cone(look_through(arg))
        if blocker is not None:
            raise _cone_mismatch(down, blocker)
        sides.append((linears, interior))
    return sides


def match_ffn(down: Node) -> Ffn | NoMatch:
    """The FFN whose down projection is the linear `down`, or the rule it breaks (see the module docstring)."""
    try:
        return _ffn(down)
    except Mismatch as miss:
        return miss.no_match("FFN", module_path(down))


def _ffn(down: Node) -> Ffn:
    if not isinstance(down.args[0], Node):
        raise Mismatch(f"the input of {down.name} is not a graph value", down)
    hidden = skip_passthrough(down.args[0])
    linears, interior, blocker = _pointwise_cone(down.args[0])
    if blocker is not None:
        raise _cone_mismatch(down, blocker)
    gate_half = None
    if len(linears) == 1 and any(n.target in SPLIT_OPS for n in interior):
        (up,) = linears
        sides = _product_sides(down, hidden, lambda a: a)
        activated = [any(n.target not in PASSTHROUGH and not is_half_split(n) for n in side[1]) for side in sides]
        if activated.count(True) != 1:
            raise Mismatch(
                f"exactly one half of the split {up.name} must go through an activation, {activated.count(True)} do",
                hidden,
            )
        picks = [n for n in sides[activated.index(True)][1] if n.target is operator.getitem]
        if len(picks) != 1:
            raise Mismatch(
                f"the activated factor of {hidden.name} must take one half of {up.name}, it takes {len(picks)}", hidden
            )
        gate, gate_half = None, int(picks[0].args[1])
    elif len(linears) == 1:
        (up,) = linears
        if all(n.target in PASSTHROUGH for n in interior):
            raise Mismatch(f"no activation between {up.name} and {down.name}: two linears back to back", up)
        gate = None
    elif len(linears) == 2:
        sides = _product_sides(down, hidden, skip_passthrough)
        if any(len(s[0]) != 1 for s in sides):
            raise Mismatch(
                f"each factor of {hidden.name} must come from one linear, they come from {[len(s[0]) for s in sides]}",
                hidden,
            )
        activated = [any(n.target not in PASSTHROUGH for n in s[1]) for s in sides]
        if activated.count(True) != 1:
            raise Mismatch(
                f"exactly one factor of {hidden.name} must go through an activation, {activated.count(True)} do",
                hidden,
            )
        gate_side = activated.index(True)
        gate, up = sides[gate_side][0][0], sides[1 - gate_side][0][0]
        if skip_passthrough(gate.args[0]) is not skip_passthrough(up.args[0]):
            raise Mismatch(f"gate {gate.name} and up {up.name} read different inputs", gate)
    elif not linears:
        raise Mismatch(f"no linear feeds the input of {down.name} through pointwise ops", hidden)
    else:
        raise Mismatch(
            f"{len(linears)} linears feed the input of {down.name} "
            f"({', '.join(sorted(n.name for n in linears))}); an FFN has one or two",
            hidden,
        )
    inside = set(interior) | {down}
    for producer in (up, gate):
        if producer is None:
            continue
        outside = [u for u in producer.users if u not in inside and u.target is not METADATA_ASSERT]
        if outside:  # e.g. one timestep embedding read by every block's modulation
            raise Mismatch(f"{producer.name} is also read outside the FFN, by {outside[0].name}", producer)
    width = up.args[1].meta["val"].shape[0] // (1 if gate_half is None else 2)
    return Ffn(
        path=common_path([n for n in (up, gate, down) if n is not None]),
        kind="fused_gated" if gate_half is not None else "plain" if gate is None else "gated",
        input=skip_passthrough(up.args[0]),
        up=up,
        gate=gate,
        down=down,
        interior=tuple(interior),
        intermediate_size=int(width),
        gate_half=gate_half,
    )


ACTIVATION_OPS = {aten.silu.default: "silu", aten.relu.default: "relu", aten.gelu.default: "gelu"}


def ffn_activation(ffn: Ffn) -> str | NoMatch:
    """The FFN's activation as a `sparsec.ops.moe.ACTIVATIONS` name, checking that it computes exactly
    `down(act(gate x) * up x)` (gated, fused gated) or `down(act(up x))` (plain) and nothing else.

    Rewrites that re-implement the FFN (the MoE operator) need this; a `NoMatch` names the ops otherwise.
    Casts that keep the dtype and inactive dropouts (`train=False` or `p=0`) are looked through; an activation
    spelled out as arithmetic (`gelu_new`) is recognised by what its ops compute.
    """
    seen: set[Node] = set()

    def identity(node: Node) -> bool:
        if node.target is aten.dropout.default:
            return node.args[2] is False or node.args[1] == 0
        return same_dtype_and_shape(node, node.args[0])

    def strip(node: Node) -> Node:
        while (
            node.op == "call_function"
            and node.target in PASSTHROUGH
            and isinstance(node.args[0], Node)
            and identity(node)
        ):
            seen.add(node)
            node = node.args[0]
        return node

    def half(node: Node, which: int) -> bool:  # `getitem(split(up), which)` of a fused projection
        if node.target is not operator.getitem or node.args[1] != which:
            return False
        split = node.args[0]
        seen.update((node, split))
        return split.target in SPLIT_OPS and strip(split.args[0]) is ffn.up

    def activation(node: Node, source) -> str | None:
        if node.op != "call_function" or node.target not in ACTIVATION_OPS or not source(strip(node.args[0])):
            return None
        seen.add(node)
        name = ACTIVATION_OPS[node.target]
        if name == "gelu":
            approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            name = "gelu_tanh" if approximate == "tanh" else "gelu"
        return name

    if ffn.gate_half is None:
        gate_source, up_source = (lambda n: n is ffn.gate), (lambda n: n is ffn.up)
    else:
        gate_source, up_source = (lambda n: half(n, ffn.gate_half)), (lambda n: half(n, 1 - ffn.gate_half))
    hidden = strip(ffn.down.args[0])
    found = None
    if ffn.kind == "plain":
        found = activation(hidden, up_source)
    elif (
        hidden.op == "call_function"
        and hidden.target is aten.mul.Tensor
        and all(isinstance(a, Node) for a in hidden.args)
    ):
        seen.add(hidden)
        a, b = (strip(arg) for arg in hidden.args)
        found = activation(a, gate_source) if up_source(b) else activation(b, gate_source) if up_source(a) else None
    if found is None or set(ffn.interior) - seen:
        found = _computed_activation(ffn)
    if found is None:
        ops = sorted({str(n.target) for n in ffn.interior})
        return NoMatch(
            "FFN of a supported activation",
            ffn.path,
            f"the ops between its projections ({ops}) are not act(gate x) * up x or act(fc1 x) with "
            f"an elementwise activation sparsec's MoE operator knows ({sorted(ACTIVATIONS)})",
        )
    return found


def _computed_activation(ffn: Ffn) -> str | None:
    """The activation of `sparsec.ops.moe.ACTIVATIONS` an FFN's pointwise ops compute when they are not one ATen
    activation op (GPT-2's and Phi's `gelu_new`, BLOOM's GELU: `tanh`, `pow`, `mul`, `add`; Nemotron's squared
    ReLU: `relu`, `square`; CLIP's `quick_gelu`), found by running those ops on probe values in float64:
    `act(g) * u` (gated) or `act(u)` (plain) within 1e-6 of one activation, else None."""
    if ffn.gate_half is not None:
        return None
    gen = torch.Generator().manual_seed(0)
    probe = torch.linspace(-8, 8, 257, dtype=torch.float64)
    values = {ffn.gate if ffn.gate is not None else ffn.up: probe}
    if ffn.gate is not None:
        values[ffn.up] = torch.randn(probe.shape, generator=gen, dtype=torch.float64)
    order = {n: i for i, n in enumerate(ffn.down.graph.nodes)}

    def value(arg):
        if isinstance(arg, Node):
            if arg not in values:
                raise LookupError(arg.name)
            return values[arg]
        if isinstance(arg, (list, tuple)):
            return type(arg)(value(a) for a in arg)
        return arg

    try:
        for node in sorted(ffn.interior, key=order.__getitem__):
            kwargs = {k: v for k, v in node.kwargs.items() if k not in ("dtype", "device", "layout")}
            values[node] = node.target(*value(node.args), **value(kwargs))
        out = values[ffn.down.args[0]].to(torch.float64)
    except (LookupError, RuntimeError, TypeError):
        return None
    up = values[ffn.up] if ffn.gate is not None else 1.0
    for name, act in ACTIVATIONS.items():
        if out.shape == probe.shape and torch.allclose(out, act(probe) * up, rtol=1e-6, atol=1e-6):
            return name
    return None


def find_ffns(program) -> list[Ffn]:
    """Every FFN of the program, in graph order."""
    return [m for m in _ffn_matches(program) if isinstance(m, Ffn)]


def ffn_misses(program) -> list[NoMatch]:
    """Why each linear that is no part of an FFN is not an FFN's down projection, in graph order.

    The candidates `sparsec inspect` lists and "matches no FFN" errors quote: an attention projection reads a
    reshape, a projection read twice escapes, a split is not into halves.
    """
    matches = _ffn_matches(program)
    used = {n for m in matches if isinstance(m, Ffn) for n in m.linears.values()}
    return [
        m
        for m, node in zip(matches, program.graph.find_nodes(op="call_function", target=LINEAR))
        if isinstance(m, NoMatch) and node not in used
    ]


def _ffn_matches(program) -> list[Ffn | NoMatch]:
    return program.analysis(_match_every_linear)


def _match_every_linear(program) -> list[Ffn | NoMatch]:
    return [match_ffn(node) for node in program.graph.find_nodes(op="call_function", target=LINEAR)]
