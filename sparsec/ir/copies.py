"""Copies of an `ExportedProgram`: a graph and signature of their own, over the same tensors.

Contract: no tensor is copied; later graph rewrites of the original leave the copy alone. How the copy's weight
store relates to the original's is the caller's choice (`WeightStore.shared_with`, `WeightStore.frozen_onto`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, OutputKind, OutputSpec, TensorArgument
from torch.fx import Graph, GraphModule, Node

from sparsec.errors import SparsecError
from sparsec.ir.editing import RUNTIME_ASSERTS


def without_runtime_asserts(exported: ExportedProgram, extra_outputs: Sequence[str]) -> ExportedProgram:
    """`exported` without runtime-assert nodes, sharing its state dicts; its graph also returns the nodes named in
    `extra_outputs`, after the user outputs, as a flat tuple (`Program.without_runtime_asserts`)."""
    graph = Graph()
    env: dict[Node, Node] = {}
    outputs = graph.graph_copy(exported.graph_module.graph, env)
    signature, call_graph = exported.graph_signature, list(exported.module_call_graph)
    if extra_outputs:
        by_name = {new.name: new for old, new in env.items() if old.name in extra_outputs}
        missing = [n for n in extra_outputs if n not in by_name]
        if missing:
            raise SparsecError(f"without_runtime_asserts: the program has no nodes {missing[:5]}")
        outputs = (*outputs, *(by_name[n] for n in extra_outputs))
        extra_specs = [OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(name=n), None) for n in extra_outputs]
        signature = ExportGraphSignature(list(signature.input_specs), [*signature.output_specs, *extra_specs])
        flat = torch.utils._pytree.tree_structure(tuple(range(len(outputs))))  # the copy returns a flat tuple
        top = dataclasses.replace(call_graph[0], signature=dataclasses.replace(call_graph[0].signature, out_spec=flat))
        call_graph = [top, *call_graph[1:]]
    graph.output(outputs)
    for node in reversed(list(graph.nodes)):
        if node.target in RUNTIME_ASSERTS:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    gm = GraphModule(exported.graph_module, graph)
    return ExportedProgram(
        root=gm,
        graph=gm.graph,
        graph_signature=signature,
        state_dict=exported.state_dict,
        range_constraints=exported.range_constraints,
        module_call_graph=call_graph,
        constants=exported.constants,
        verifiers=exported.verifiers,  # the captured IR's own verifier: it admits in-place ops such as index_put_
    )


def detached(exported: ExportedProgram) -> ExportedProgram:
    """`exported` with its own graph, signature and state dicts, holding the same tensors."""
    graph = Graph()
    graph.output(graph.graph_copy(exported.graph_module.graph, {}))
    gm = GraphModule(exported.graph_module, graph)
    signature = exported.graph_signature
    return ExportedProgram(
        root=gm,
        graph=gm.graph,
        graph_signature=ExportGraphSignature(list(signature.input_specs), list(signature.output_specs)),
        state_dict=dict(exported.state_dict),
        range_constraints=exported.range_constraints,
        module_call_graph=list(exported.module_call_graph),
        constants=dict(exported.constants),
        verifiers=exported.verifiers,
    )
