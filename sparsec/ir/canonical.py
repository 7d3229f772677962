"""Canonical linears: projections that models write without `nn.Linear` become `aten.linear` nodes at capture.

The structural matchers (FFNs, attention projections) and the width rewrites look for `aten.linear`. Two common
spellings of a projection capture as something else:

- `x @ weight.T` (Falcon's `FalconLinear`): `matmul(x, t(weight))` (`t`, `numpy_T`, `transpose(0, 1)` or
  `permute([1, 0])` of a 2-D weight) becomes `linear(x, weight)`; a bias added after it stays an `add`.
- GPT-2's `Conv1D`, a weight stored transposed ([in, out]) and `addmm`:
  `view(addmm(bias, view(x, [-1, in]), weight), [..., out])` becomes `linear(x, t(weight), bias)`. The weight
  keeps its stored layout (and its checkpoint name); `linear_weight_node` finds it through the `t`.

Both compute the same values (the tests compare with the eager model); the rewrite only renames the ops.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

aten = torch.ops.aten

TRANSPOSES = frozenset({aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default})
# Ops that give a value a new shape and nothing else (what every analysis calls a view or reshape).
VIEW_OPS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})


def transposed_source(node: Node) -> Node | None:
    """The 2-D value `node` transposes (`t`, `numpy_T`, `transpose(0, 1)`, `permute([1, 0])`), else None."""
    if node.op != "call_function" or node.target not in TRANSPOSES or not isinstance(node.args[0], Node):
        return None
    value = node.args[0].meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        return None
    if node.target is aten.transpose.int and sorted(d % 2 for d in node.args[1:3]) != [0, 1]:
        return None
    if node.target is aten.permute.default and [d % 2 for d in node.args[1]] != [1, 0]:
        return None
    return node.args[0]


def _is_weight(node: Node, weights: set[str]) -> bool:
    return node.op == "placeholder" and node.name in weights


def canonicalize_linears(graph: Graph, weights: set[str]) -> int:
    """Rewrite the projections above into `aten.linear` in place; returns how many. `weights`: the placeholder
    names of parameters and buffers (a projection's weight is state, not an activation)."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.matmul.default and len(node.args) == 2 and isinstance(node.args[1], Node):
            weight = transposed_source(node.args[1])
            x = node.args[0]
            if weight is None or not _is_weight(weight, weights) or not isinstance(x, Node):
                continue
            with graph.inserting_before(node):
                linear = graph.call_function(aten.linear.default, (x, weight))
            _replace(node, linear)
            count += 1
        elif node.target is aten.addmm.default and len(node.users) == 1:
            bias, flat, weight = node.args[:3]
            (out,) = node.users
            if not (
                all(isinstance(a, Node) for a in (bias, flat, weight))
                and _is_weight(weight, weights)
                and _is_weight(bias, weights)
                and flat.target in VIEW_OPS
                and out.target in VIEW_OPS
                and not node.kwargs
            ):
                continue
            x = flat.args[0]
            x_val, out_val = x.meta.get("val"), out.meta.get("val")
            if not (isinstance(x_val, torch.Tensor) and isinstance(out_val, torch.Tensor)) or (
                [str(d) for d in x_val.shape[:-1]] != [str(d) for d in out_val.shape[:-1]]
            ):
                continue
            with graph.inserting_before(node):
                w_t = graph.call_function(aten.t.default, (weight,))
                linear = graph.call_function(aten.linear.default, (x, w_t, bias))
            _replace(out, linear)
            w_t.meta = {k: v for k, v in linear.meta.items() if k != "tensor_meta"} | {"val": weight.meta["val"].t()}
            graph.erase_node(node)
            if not flat.users:
                graph.erase_node(flat)
            count += 1
    return count


def _replace(old: Node, new: Node) -> None:
    new.meta = dict(old.meta)
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)
