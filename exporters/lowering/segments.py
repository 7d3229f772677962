"""Block boundaries in the ONNX file, so that parity can check a model too big for one session block by block.

`torch.onnx.export(dynamo=True)` decomposes the program again before translating it, so the ONNX value names are
the decomposed graph's FX names (`add_338`), not the program's (`add_9`): names alone do not map the two. The
boundaries are therefore marked explicitly: `export_onnx` adds every boundary value as an extra graph output named
`sparsec_boundary_<program node name>` for the export, then removes those outputs before the file is written. The
values keep their names inside the graph, and the file's metadata (`sparsec.parity_segments`) lists the segments.

Segments (`parity_segments`), in order: `stem` (what is computed before the blocks: the embedding output the first
block reads, rotary tables, masks), one per block of every block stack (`RegionIndex.blocks`; compared: the values
the block hands on, its residual stream), and `head` (the model outputs, from the last block's stream). A
segment's ONNX subgraph (`segment_model`) runs from the boundary values it reads, fed with the program's own
values, to the values it is compared on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from sparsec.analysis.regions import region_index
from sparsec.errors import SparsecError

BOUNDARY_PREFIX = "sparsec_boundary_"
METADATA_KEY = "sparsec.parity_segments"
HEAD = "head"
STEM = "stem"


@dataclass(frozen=True)
class Segment:
    """One part of the model checked on its own: `outputs` are the program node names it is compared on (for the
    head: the program's output names)."""

    name: str
    outputs: tuple[str, ...]


def boundary_name(node_name: str) -> str:
    """The ONNX value name of the program value `node_name` marked as a boundary."""
    return BOUNDARY_PREFIX + node_name


def _is_tensor(node) -> bool:
    return node.op == "call_function" and isinstance(node.meta.get("val"), torch.Tensor)


def parity_segments(program) -> tuple[list[Segment], list[str]]:
    """The program's segments and the boundary node names to mark (every tensor a block reads from outside it or
    hands on). No segments (and nothing to mark) when the program has no block stack."""
    blocks = region_index(program).blocks()
    if not blocks:
        return [], []
    in_block = {n: b.path for b in blocks for n in b.nodes}
    boundaries: dict[str, None] = {}
    segments = []
    stem: dict[str, None] = {}
    for block in blocks:
        inside = set(block.nodes)
        for node in block.nodes:
            for arg in node.all_input_nodes:
                if arg not in inside and _is_tensor(arg):
                    boundaries[arg.name] = None
                    if arg not in in_block and arg.meta["val"].is_floating_point():
                        stem[arg.name] = None
        outputs = [n.name for n in block.outputs() if _is_tensor(n) and n.meta["val"].is_floating_point()]
        boundaries.update(dict.fromkeys(outputs))
        segments.append(Segment(block.path, tuple(outputs)))
    head = Segment(HEAD, tuple(program.output_names))
    return ([Segment(STEM, tuple(stem))] if stem else []) + segments + [head], list(boundaries)


def segments_metadata(segments: list[Segment]) -> str:
    """The segments as the JSON stored under `METADATA_KEY` in the ONNX file."""
    return json.dumps([[s.name, list(s.outputs)] for s in segments])


def read_segments(model) -> list[Segment]:
    """The segments an ONNX `ModelProto` was exported with; `SparsecError` if it has none."""
    found = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in found:
        raise SparsecError(
            "block-by-block parity needs the block boundaries export_onnx marks in the ONNX file "
            f"(metadata {METADATA_KEY}), and this file has none (no block stack was found, or it was "
            "written by another tool); use export.parity.mode: whole"
        )
    return [Segment(name, tuple(outputs)) for name, outputs in json.loads(found[METADATA_KEY])]


def _subgraph_reads(node) -> list[str]:
    """Every value name the graphs in `node`'s attributes read (a superset of their outer-scope reads)."""
    import onnx

    names = []
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for graph in graphs:
            for inner in graph.node:
                names += list(inner.input) + _subgraph_reads(inner)
    return names


def segment_model(model, outputs: list[str], stops: set[str]):
    """The subgraph of `model` (an `onnx.ModelProto`, external data not loaded) computing `outputs` from the values
    in `stops`, the graph inputs and the initializers it needs, as a `ModelProto` (initializers still referring to
    the original external data file). Returns it and its input names."""
    from onnx import helper

    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {i.name: i for i in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    types = {v.name: v for v in [*graph.input, *graph.output, *graph.value_info]}
    missing = [o for o in outputs if o not in producers]
    if missing:
        raise SparsecError(
            f"the ONNX graph has no values {missing[:3]} (a boundary lost in a later rewrite of the "
            "file); use export.parity.mode: whole"
        )
    nodes, feeds, used, seen = set(), {}, {}, set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if name in initializers:
            used[name] = initializers[name]
        elif name in graph_inputs or (name in stops and name not in outputs):
            feeds[name] = None
        elif name in producers:
            node = producers[name]
            if id(node) not in nodes:
                nodes.add(id(node))
                stack += list(node.input) + _subgraph_reads(node)
    untyped = [n for n in [*feeds, *outputs] if n not in types]
    if untyped:
        raise SparsecError(f"the ONNX graph has no type for {untyped[:3]}; use export.parity.mode: whole")
    sub = helper.make_graph(
        [n for n in graph.node if id(n) in nodes],
        f"{graph.name}_segment",
        [types[n] for n in feeds],
        [types[n] for n in outputs],
        list(used.values()),
    )
    result = helper.make_model(
        sub, ir_version=model.ir_version, opset_imports=list(model.opset_import), functions=list(model.functions)
    )
    return result, list(feeds)


def onnx_dtype_to_torch(elem_type: int) -> torch.dtype:
    """The torch dtype of an ONNX tensor element type."""
    import onnx

    return {
        onnx.TensorProto.FLOAT: torch.float32,
        onnx.TensorProto.FLOAT16: torch.float16,
        onnx.TensorProto.BFLOAT16: torch.bfloat16,
        onnx.TensorProto.DOUBLE: torch.float64,
        onnx.TensorProto.INT64: torch.int64,
        onnx.TensorProto.INT32: torch.int32,
        onnx.TensorProto.BOOL: torch.bool,
        onnx.TensorProto.INT8: torch.int8,
        onnx.TensorProto.UINT8: torch.uint8,
    }[elem_type]
