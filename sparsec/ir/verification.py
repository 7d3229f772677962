"""Verification: the invariants every pass must keep, checked after each one, and the shape metadata they rest on.

Contract: `verify(program)` returns when the graph is well formed (lint), placeholders, signature and tensors
agree, every node's shapes still compute with fake tensors (dynamic dims included) and torch.export's own verifier
accepts the program; otherwise it raises `VerificationError` naming the broken invariant. Shape metadata
(`meta["val"]`) is re-inferred only for nodes a rewrite touched: each node remembers the inputs its value was
inferred from (`mark_inferred`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.export import ExportedProgram
from torch.fx import Graph, Node

from sparsec.errors import VerificationError
from sparsec.ir.editing import fake_mode, state_placeholders
from sparsec.ir.weights import WeightStore

_INPUTS_KEY = "sparsec_inputs"  # node meta: the inputs its meta["val"] was inferred from


def same_meta(old: Any, new: Any) -> bool:
    """Same shapes (symbolic dims compared by name), dtypes and structure."""
    if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
        return old.dtype == new.dtype and [str(d) for d in old.shape] == [str(d) for d in new.shape]
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return len(old) == len(new) and all(same_meta(a, b) for a, b in zip(old, new))
    return type(old) is type(new) and str(old) == str(new)


def _input_names(node: Node) -> str:
    """The node's arguments, with nodes by name: changes when it is rewired or a constant argument changes."""
    return str(torch.fx.node.map_arg((node.args, node.kwargs), lambda a: a.name))


def mark_inferred(graph: Graph) -> None:
    """Record that every node's shape metadata was inferred from its present inputs (a graph as captured)."""
    for node in graph.nodes:
        node.meta[_INPUTS_KEY] = _input_names(node)


def verify(exported: ExportedProgram, weights: WeightStore) -> None:
    """`Program.verify` (see the module docstring)."""
    ep, graph = exported, exported.graph_module.graph
    try:
        graph.lint()
    except Exception as exc:
        raise VerificationError(f"graph lint failed: {exc}") from exc

    placeholders = [n.name for n in graph.find_nodes(op="placeholder")]
    signature = [s.arg.name for s in ep.graph_signature.input_specs]
    if placeholders != signature:
        raise VerificationError(
            f"graph placeholders and the program signature disagree: only in graph "
            f"{sorted(set(placeholders) - set(signature))}, only in signature {sorted(set(signature) - set(placeholders))}"
        )
    state = set(state_placeholders(ep))  # every state entry of the signature: placeholders agree with it
    orphans = (set(ep.state_dict) | {k for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}) - state
    if orphans:
        raise VerificationError(f"tensors kept in the program that no graph input uses: {sorted(orphans)[:8]}")

    try:
        infer_shapes(ep, weights)
    except Exception as exc:
        raise VerificationError(f"shape propagation failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    try:
        ep.validate()
    except Exception as exc:
        raise VerificationError(f"torch.export verifier rejected the program: {exc}") from exc


def infer_shapes(exported: ExportedProgram, weights: WeightStore) -> None:
    """Re-infer `meta["val"]` (fake tensors, symbolic dims) for nodes a rewrite touched.

    A node is re-inferred when its inputs are not the ones its value was inferred from (rewired or
    new) or an input's shape changed; the rest keep their captured metadata. Incremental, so it is
    cheap, and it never re-runs ops nobody touched (some meta kernels, e.g. masked_scatter, do not
    re-run under symbolic shapes).
    """
    graph = exported.graph_module.graph
    placeholders = graph.find_nodes(op="placeholder")
    mode = fake_mode(graph)
    changed: set[Node] = set()
    for name, node in state_placeholders(exported).items():
        if "val" not in node.meta:  # replaced by `replace_state`
            held = weights.held(name)
            if held.device.type == "meta":  # spilled to a file: fake it on the device the graph was captured on
                device = next(
                    (p.meta["val"].device for p in placeholders if isinstance(p.meta.get("val"), torch.Tensor)),
                    torch.device("cpu"),
                )
                node.meta["val"] = mode.fake_tensor_converter.from_meta_and_device(mode, held, device)
            else:
                node.meta["val"] = mode.from_tensor(held, static_shapes=True)
            changed.add(node)
    env: dict[Node, Any] = {n: n.meta.get("val") for n in placeholders}
    with mode:
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            inputs = _input_names(node)
            clean = node.meta.get(_INPUTS_KEY) == inputs and not any(a in changed for a in node.all_input_nodes)
            if clean and "val" in node.meta:
                env[node] = node.meta["val"]
                continue
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: env[a])
            value = node.target(*args, **kwargs)
            if "val" not in node.meta or not same_meta(node.meta["val"], value):
                changed.add(node)
                node.meta["val"] = value
            env[node] = node.meta["val"]
            node.meta[_INPUTS_KEY] = inputs
