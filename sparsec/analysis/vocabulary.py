"""The words every analysis uses: sets of ops, predicates and walks over single nodes, and where a node was computed.

This is the bottom of `sparsec.analysis`: it imports nothing of it, and every matcher (FFNs, residual blocks, MoE
experts, attention heads, the hidden stream) reads ops through these names, so that "a view", "a split into halves"
or "pointwise" means the same thing to all of them. The view/reshape ops themselves are the IR's
(`sparsec.ir.canonical.VIEW_OPS`, re-exported here), since capture's canonicalisation reads them too.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Node

from sparsec.ir.canonical import VIEW_OPS
from sparsec.ir.paths import normalize
from sparsec.ir.program import same_meta

__all__ = [
    "LINEAR",
    "METADATA_ASSERT",
    "PASSTHROUGH",
    "REDUCTION_OPS",
    "SPLIT_OPS",
    "VIEW_OPS",
    "common_path",
    "describe",
    "is_half_split",
    "is_pointwise",
    "module_path",
    "module_stack",
    "same_dtype_and_shape",
    "skip_noop_casts",
    "skip_passthrough",
]

aten = torch.ops.aten

LINEAR = aten.linear.default
# Casts, copies and (eval-mode) dropouts: the value they return is the one they read.
PASSTHROUGH = frozenset(
    {aten.dropout.default, aten.clone.default, aten.alias.default, aten.to.dtype, aten._to_copy.default}
)
SPLIT_OPS = frozenset({aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default})
REDUCTION_OPS = frozenset({aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.var.correction})
# A check torch.export leaves after a cast: it reads a value without using it, so no reader of that value.
METADATA_ASSERT = aten._assert_tensor_metadata.default

_EXPORT_PLACEHOLDER = "_empty_nn_module_stack_from_metadata_hook"


def module_stack(node: Node) -> list[tuple[str, str]]:
    """The (module path, module type name) pairs a node was computed under, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, (path, typ) in stack.items():
        path = normalize(path)
        # torch.export labels top-level symbolic-size nodes with a placeholder entry, not a module
        if path and not str(key).startswith(_EXPORT_PLACEHOLDER):
            out.append((path, typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ))))
    return out


def module_path(node: Node) -> str:
    """The innermost module path of a node ('' for nodes outside any submodule, e.g. placeholders)."""
    stack = module_stack(node)
    return stack[-1][0] if stack else ""


def common_path(nodes: list[Node]) -> str:
    """Longest common module path; a container (`net` of `net.0`, `net.2`) gives way to its owner."""
    parts = [module_path(n).split(".") for n in nodes]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    if common and all(len(p) > len(common) and p[len(common)].isdigit() for p in parts):
        common.pop()
    return ".".join(common)


def describe(node: Node, where: bool = False) -> str:
    """A node as messages name it: `mul_3 (mul.Tensor)`; with `where`, also the module it was computed in
    (`mul_3 (mul.Tensor, in model.layers.0.mlp)`, `... top level)`)."""
    if node.op != "call_function":
        return node.name
    op = getattr(node.target, "__name__", node.target)
    if not where:
        return f"{node.name} ({op})"
    path = module_path(node)
    return f"{node.name} ({op}, {'in ' + path if path else 'top level'})"


UNTAGGED_POINTWISE = {torch.ops.aten.hardswish.default}  # elementwise ops torch does not tag `pointwise`


def is_pointwise(node: Node) -> bool:
    """An op computed element by element (torch's `pointwise` tag, or `UNTAGGED_POINTWISE`), or a cast, copy or
    dropout."""
    target = node.target
    return node.op == "call_function" and (
        target in PASSTHROUGH
        or target in UNTAGGED_POINTWISE
        or (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags)
    )


def is_half_split(node: Node) -> bool:
    """A split of the last dimension into two equal halves, or a `getitem` taking one of them."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return isinstance(node.args[0], Node) and is_half_split(node.args[0])
    if node.target not in SPLIT_OPS:
        return False
    value = node.args[0].meta.get("val") if isinstance(node.args[0], Node) else None
    if value is None:
        return False
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if dim not in (-1, value.dim() - 1):
        return False
    width = value.shape[-1]
    size = node.args[1]
    if node.target is aten.chunk.default:
        return size == 2
    if node.target is aten.split.Tensor:
        return 2 * size == width
    return len(size) == 2 and size[0] == size[1]


def skip_passthrough(node: Node) -> Node:
    """Follow dtype casts, clones and (eval-mode) dropouts back to the value they pass through."""
    while node.op == "call_function" and node.target in PASSTHROUGH and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def same_dtype_and_shape(a: Node, b: Node) -> bool:
    """Whether two nodes' values have the same dtype and shape (`a` a tensor)."""
    value = a.meta.get("val")
    return isinstance(value, torch.Tensor) and same_meta(value, b.meta.get("val"))


def skip_noop_casts(node: Node) -> Node:
    """Follow casts and copies that change neither dtype nor shape back to their source (same value)."""
    while (
        node.op == "call_function"
        and node.target in PASSTHROUGH - {aten.dropout.default}
        and isinstance(node.args[0], Node)
        and same_dtype_and_shape(node, node.args[0])
    ):
        node = node.args[0]
    return node
