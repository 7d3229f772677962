"""Structural patterns found in the graph itself, not by module class names.

An FFN is found from its *down* projection backwards: a linear whose input is computed only by pointwise
ops from one or two other linears' outputs.

- gated (SwiGLU, GeGLU): `down(act(gate(x)) * up(x))`, gate and up reading the same `x`;
- plain (fc1 / act / fc2, as in ViT, SigLIP, MMDiT FeedForward): `down(act(up(x)))`.

Attention projections never match (a reshape or SDPA sits between them), so the finder is safe to run
over a whole model. Fused gate_up projections (one linear split in two) are not matched yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from .regions import module_path

aten = torch.ops.aten

LINEAR = aten.linear.default
PASSTHROUGH = frozenset(
    {aten.dropout.default, aten.clone.default, aten.alias.default, aten.to.dtype, aten._to_copy.default}
)
_ASSERT = aten._assert_tensor_metadata.default


def _is_pointwise(node: Node) -> bool:
    target = node.target
    return node.op == "call_function" and (
        target in PASSTHROUGH or (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags)
    )


def skip_passthrough(node: Node) -> Node:
    """Follow dtype casts, clones and (eval-mode) dropouts back to the value they pass through."""
    while node.op == "call_function" and node.target in PASSTHROUGH and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def _pointwise_cone(root: Node) -> tuple[list[Node], list[Node]] | None:
    """The linears feeding `root` through pointwise ops only, and the pointwise nodes in between.

    None if any other op (view, matmul, softmax, ...) lies on the way.
    """
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
        elif _is_pointwise(node):
            interior.append(node)
            stack.extend(node.all_input_nodes)
        elif node.op == "placeholder" and getattr(node.meta.get("val"), "ndim", None) == 0:
            continue  # a lifted scalar constant
        else:
            return None
    return linears, interior


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
        interior: pointwise nodes between up/gate and down (activation, product, casts).
        intermediate_size: number of neurons (rows of up).
    """

    path: str
    kind: str
    input: Node
    up: Node
    gate: Node | None
    down: Node
    interior: tuple[Node, ...]
    intermediate_size: int

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
        return [n for n in produced if any(u not in inside and u.target is not _ASSERT for u in n.users)]


def _common_path(nodes: list[Node]) -> str:
    parts = [module_path(n).split(".") for n in nodes]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _as_ffn(down: Node) -> Ffn | None:
    if not isinstance(down.args[0], Node):
        return None
    hidden = skip_passthrough(down.args[0])
    cone = _pointwise_cone(down.args[0])
    if cone is None:
        return None
    linears, interior = cone
    if len(linears) == 1:
        (up,) = linears
        if all(n.target in PASSTHROUGH for n in interior):
            return None  # two linears back to back: no activation, not an FFN
        gate = None
    elif len(linears) == 2 and hidden.target is aten.mul.Tensor:
        sides = [_pointwise_cone(skip_passthrough(a)) if isinstance(a, Node) else None for a in hidden.args[:2]]
        if any(s is None or len(s[0]) != 1 for s in sides):
            return None
        activated = [any(n.target not in PASSTHROUGH for n in s[1]) for s in sides]
        if activated.count(True) != 1:
            return None
        gate_side = activated.index(True)
        gate, up = sides[gate_side][0][0], sides[1 - gate_side][0][0]
        if skip_passthrough(gate.args[0]) is not skip_passthrough(up.args[0]):
            return None
    else:
        return None
    width = up.args[1].meta["val"].shape[0]
    return Ffn(
        path=_common_path([n for n in (up, gate, down) if n is not None]),
        kind="plain" if gate is None else "gated",
        input=skip_passthrough(up.args[0]),
        up=up,
        gate=gate,
        down=down,
        interior=tuple(interior),
        intermediate_size=int(width),
    )


def find_ffns(program) -> list[Ffn]:
    """Every FFN of the program, in graph order."""
    found = []
    for node in program.graph.find_nodes(op="call_function", target=LINEAR):
        ffn = _as_ffn(node)
        if ffn is not None:
            found.append(ffn)
    return found
