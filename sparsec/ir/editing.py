"""Editing a program's state and signature: parameters, buffers and constants added and removed, uses rewired,
dead code and unread state pruned.

Contract: parameters are graph inputs, so "a weight is gone" has a precise meaning: no placeholder, no signature
entry, no tensor. Every function here keeps the three in step (the tensors through the program's `WeightStore`),
and `set_signature` is the one place the graph signature changes. `prune` establishes the meaning after a rewrite.
The functions take the `ExportedProgram` and its `WeightStore`; `Program`'s methods of the same names call them.
"""

from __future__ import annotations

import operator
from typing import Any, Literal

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputSpec,
    TensorArgument,
)
from torch.fx import Graph, Node

from sparsec.errors import SparsecError
from sparsec.ir.weights import WeightStore

aten = torch.ops.aten

STATE_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
StateKind = Literal["parameter", "buffer", "constant"]
_KIND = {"parameter": InputKind.PARAMETER, "buffer": InputKind.BUFFER, "constant": InputKind.CONSTANT_TENSOR}
_PLACEHOLDER_PREFIX = {"parameter": "p_", "buffer": "b_", "constant": "c_"}

# Checks torch.export leaves in the graph. They have no users, so plain DCE keeps them (they are impure)
# and they would pin otherwise-dead subgraphs. A metadata check guards a `.to()` cast of the same tensor in
# the same module: once that cast is gone, the check is dead too.
_METADATA_ASSERT = aten._assert_tensor_metadata.default
_CASTS = (aten.to.dtype, aten._to_copy.default)
RUNTIME_ASSERTS = frozenset(
    {
        aten._assert_tensor_metadata.default,
        aten._assert_scalar.default,
        aten._assert_async.default,
        aten._assert_async.msg,
        aten.sym_constrain_range_for_size.default,
        aten.sym_constrain_range.default,
    }
)


def state_placeholders(exported: ExportedProgram) -> dict[str, Node]:
    """Fully qualified state name (parameter, buffer, constant) -> its placeholder node."""
    nodes = {n.name: n for n in exported.graph_module.graph.find_nodes(op="placeholder")}
    return {
        spec.target: nodes[spec.arg.name]
        for spec in exported.graph_signature.input_specs
        if spec.kind in STATE_KINDS and spec.arg.name in nodes
    }


def fake_mode(graph: Graph) -> Any:
    """The fake-tensor mode of the graph's shape metadata (None if its placeholders carry none)."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode([n.meta.get("val") for n in graph.find_nodes(op="placeholder")])


def set_signature(
    exported: ExportedProgram, *, inputs: list[InputSpec] | None = None, outputs: list[OutputSpec] | None = None
) -> None:
    """The one place the graph signature changes: new input and/or output specs, the others kept."""
    signature = exported.graph_signature
    exported._graph_signature = ExportGraphSignature(
        list(signature.input_specs) if inputs is None else list(inputs),
        list(signature.output_specs) if outputs is None else list(outputs),
    )


def add_state(
    exported: ExportedProgram, weights: WeightStore, name: str, value: torch.Tensor, kind: StateKind, persistent: bool
) -> Node:
    """`Program.add_state`: add a parameter, buffer or constant tensor and return its placeholder node.

    The placeholder, its signature entry (after the other state of its kind, in torch.export's order:
    parameters, buffers, constants) and the tensor (a copy of `value`) are added together; the placeholder
    carries shape metadata, so new nodes reading it can be shape-inferred at once. A non-persistent buffer
    lives with the constants, as torch.export keeps it. For rewrites that introduce tensors (an MoE router,
    stacked experts, the real and imaginary parts of a complex table).
    """
    if kind not in _KIND:
        raise SparsecError(f"unknown state kind {kind!r}; use one of {sorted(_KIND)}")
    ep, graph = exported, exported.graph_module.graph
    if name in ep.state_dict or name in ep.constants:
        raise SparsecError(f"the program already has a tensor named {name!r}; pick another name")
    order = STATE_KINDS[: STATE_KINDS.index(_KIND[kind]) + 1]
    specs = list(ep.graph_signature.input_specs)
    position = max((i for i, s in enumerate(specs) if s.kind in order), default=-1) + 1
    placeholders = graph.find_nodes(op="placeholder")
    anchor = graph.inserting_after(placeholders[position - 1]) if position else graph.inserting_before(placeholders[0])
    with anchor:
        node = graph.placeholder(_PLACEHOLDER_PREFIX[kind] + name.replace(".", "_"))
    tensor = value.detach().clone()
    if kind == "parameter":
        tensor = torch.nn.Parameter(tensor, requires_grad=False)
    mode = fake_mode(graph)
    if mode is not None:
        node.meta["val"] = mode.from_tensor(tensor, static_shapes=True)
    specs.insert(
        position, InputSpec(_KIND[kind], TensorArgument(node.name), name, persistent if kind == "buffer" else None)
    )
    set_signature(ep, inputs=specs)
    weights.add(name, tensor, in_state_dict=kind == "parameter" or (kind == "buffer" and persistent))
    return node


def remove_state(exported: ExportedProgram, weights: WeightStore, name: str) -> None:
    """`Program.remove_state`: placeholder, signature entry and tensor of a state tensor nobody reads."""
    node = state_placeholders(exported).get(name)
    if node is None:
        raise SparsecError(f"the program has no state tensor named {name!r}")
    if node.users:
        raise SparsecError(
            f"cannot remove {name!r}: {[u.name for u in node.users][:5]} still read it; "
            "rewire them first (prune() removes state once nothing reads it)"
        )
    exported.graph_module.graph.erase_node(node)
    set_signature(exported, inputs=[s for s in exported.graph_signature.input_specs if s.arg.name != node.name])
    weights.drop(name)


def replace_uses(exported: ExportedProgram, node: Node, replacement: Node, except_in: Node | None) -> None:
    """Make every user of `node` (but `except_in`) read `replacement`, program outputs included."""
    node.replace_all_uses_with(replacement, delete_user_cb=lambda user: user is not except_in)
    specs = []
    for spec in exported.graph_signature.output_specs:
        if isinstance(spec.arg, TensorArgument) and spec.arg.name == node.name:
            spec = OutputSpec(spec.kind, TensorArgument(replacement.name), spec.target)
        specs.append(spec)
    set_signature(exported, outputs=specs)


def prune(exported: ExportedProgram, weights: WeightStore) -> list[str]:
    """`Program.prune`: dead-code-eliminate, then remove every state tensor nobody reads (returned by name)."""

    def is_impure(node: Node) -> bool:
        # An unused random op (SDPA carries the `nondeterministic_seeded` tag for dropout) is dead in inference.
        return (
            node.is_impure(impure_random=False)
            and not _is_dead_metadata_assert(node)
            and not _is_dead_inplace_update(node)
        )

    while exported.graph_module.graph.eliminate_dead_code(is_impure_node=is_impure):
        pass
    removed = [name for name, node in state_placeholders(exported).items() if not node.users]
    for name in removed:
        remove_state(exported, weights, name)
    return removed


def _module_of(node: Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


def _is_dead_metadata_assert(node: Node) -> bool:
    if node.target is not _METADATA_ASSERT or not node.args or not isinstance(node.args[0], Node):
        return False
    module = _module_of(node)
    return not any(u.target in _CASTS and _module_of(u) == module for u in node.args[0].users)


def _is_dead_inplace_update(node: Node) -> bool:
    """An unused in-place op (`x /= x.sum()` in a router, `k[..., :n] = ...` into a fresh tensor) whose written
    tensor, with every view of it, is read by no node after it: removing it changes no value."""
    target = node.target
    if node.op != "call_function" or node.users or not isinstance(target, torch._ops.OpOverload):
        return False
    written = [
        a for a, s in zip(node.args, target._schema.arguments) if s.alias_info is not None and s.alias_info.is_write
    ]
    if len(written) != 1 or not isinstance(written[0], Node):
        return False
    root = written[0]
    while root.op == "call_function" and _may_alias(root) and isinstance(root.args[0], Node):
        root = root.args[0]  # back through views to the tensor they view
    if root.op != "call_function" or _may_alias(root):
        return False  # a graph input, state or a value of unknown aliasing: the write is observable
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    group, stack = set(), [root]
    while stack:
        member = stack.pop()
        if member in group:
            continue
        group.add(member)
        for user in member.users:
            if user.op == "call_function" and _may_alias(user) and user.args and user.args[0] is member:
                stack.append(user)  # a view of the tensor
            elif order[user] > order[node] and not (_writes(user) and not user.users):
                return False  # read after the write (later unused writes read nothing anyone sees)
    return True


def _writes(node: Node) -> bool:
    """Whether the node is an ATen op that writes one of its arguments in place."""
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and any(
        a.alias_info is not None and a.alias_info.is_write for a in target._schema.arguments
    )


def _may_alias(node: Node) -> bool:
    """Whether the node's value may share memory with another value (a view, or not an ATen op at all)."""
    if node.target is operator.getitem and isinstance(node.args[0], Node):  # one output of a multi-output op
        return _may_alias(node.args[0])
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return True
    return any(r.alias_info is not None for r in node.target._schema.returns)
