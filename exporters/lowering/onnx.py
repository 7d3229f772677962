"""ONNX lowering through `torch.onnx.export(dynamo=True)`.

The program's runtime-assert nodes are dropped on a copy first (ONNX has no meaning for them; Janus does
not lower with them). Dynamic dimensions keep the program's names (`batch`, `seq`) in the ONNX file,
inputs and outputs keep the program's names (`input_ids`, `logits`). Models over 1.5 GiB of weights are
written with external data (`model.onnx.data`) unless told otherwise. Block boundaries are marked in the file for
block-by-block parity (`sparsec.exporters.lowering.segments`).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Literal

import onnx_ir as ir

from sparsec.errors import SparsecError
from sparsec.exporters.lowering.onnx_moe import CONTRIB_GATINGS, MoeLowering, moe_translation
from sparsec.exporters.lowering.segments import METADATA_KEY, boundary_name, parity_segments, segments_metadata
from sparsec.ir.program import Program

MATCH_STATE = ("_graph", "_match", "_current_node", "_tracer")  # onnxscript 0.5-0.7
EXTERNAL_DATA_THRESHOLD = int(1.5 * 2**30)
HALF_TYPES = {ir.DataType.BFLOAT16: "bf16", ir.DataType.FLOAT16: "fp16"}


def upcast_to_fp32(model: ir.Model) -> dict[str, int]:
    """Retype a half-precision (BF16 / FP16) export to FP32, in place; return what was retyped.

    A program captured in the checkpoint's dtype (bf16) exports with half-precision ops, which ONNX Runtime's CPU
    provider cannot run (it has no BF16 MatMul). This makes every half value FP32: value types, `Cast` targets,
    constants in attributes, and initializers. Initializers become `ir.LazyTensor`s converting the program's
    tensor when the file is written, one at a time: no FP32 copy of the model is ever held in memory.
    The result computes the program's function in FP32 (the parity check compares it at the program's precision).
    """
    counts = {"values": 0, "casts": 0, "initializers": 0, "attributes": 0}
    graph = model.graph
    nodes = list(ir.traversal.RecursiveGraphIterator(graph))
    values = [*graph.inputs, *graph.outputs, *graph.initializers.values(), *(o for n in nodes for o in n.outputs)]
    for value in dict.fromkeys(values):
        if value.dtype in HALF_TYPES:
            value.dtype = ir.DataType.FLOAT
            counts["values"] += 1
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.dtype in HALF_TYPES:
            value.const_value = ir.LazyTensor(
                lambda tensor=tensor: ir.tensor(tensor.numpy().astype("float32")),
                dtype=ir.DataType.FLOAT,
                shape=tensor.shape,
                name=tensor.name,
            )
            counts["initializers"] += 1
    for node in nodes:
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.INT and name in ("to", "dtype") and attr.value in HALF_TYPES:
                node.attributes[name] = ir.AttrInt64(name, ir.DataType.FLOAT)
                counts["casts"] += 1
            elif attr.type == ir.AttributeType.TENSOR and attr.value.dtype in HALF_TYPES:
                node.attributes[name] = ir.AttrTensor(name, ir.tensor(attr.value.numpy().astype("float32")))
                counts["attributes"] += 1
    return counts


def _name_dynamic_dims(model: ir.Model, program: Program) -> dict[str, dict[int, str]]:
    """Rename export's symbolic dims (`s43`) to the program's dim names (`batch`), everywhere in the graph; return
    the named dims of each input, `{input: {axis: name}}` (the exporter's internal symbols never leave here).

    Done on the exporter's in-memory `onnx_ir` model before it is saved, whose initializers still reference the
    program's tensors: the file is written once, weights streamed to external data, never loaded back.
    """
    renames: dict[str, str] = {}
    named: dict[str, dict[int, str]] = {}
    inputs = {v.name: v for v in model.graph.inputs}
    for name, axes in program.dynamic_dims.items():
        shape = inputs[name].shape if name in inputs else None
        for axis, dim_name in axes.items():
            if (
                shape is not None
                and axis < len(shape)
                and isinstance(shape[axis], ir.SymbolicDim)
                and shape[axis].value
            ):
                renames[shape[axis].value] = dim_name
                named.setdefault(name, {})[axis] = dim_name
    values = [*model.graph.inputs, *model.graph.outputs]
    values += [out for node in ir.traversal.RecursiveGraphIterator(model.graph) for out in node.outputs]
    for value in values:
        if value.shape is None:
            continue
        dims = [
            ir.SymbolicDim(renames[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in renames else d
            for d in value.shape
        ]
        if any(isinstance(d, ir.SymbolicDim) and d.value in renames for d in value.shape):
            value.shape = ir.Shape(dims)
    return named


def _forget_matched_graphs() -> None:
    """Drop what onnxscript's module-level rewrite rules keep from their last match.

    `SimplePatternMatcher.match` stores the graph it matched and the match (`MATCH_STATE`) and never lets go; the
    rules live at module level in `onnxscript.rewriter`, and that graph's values hold the program's weights (torch
    tensors), so without this the program could not be freed before the parity session opens (tested in
    `tests/exporters/test_export_memory.py`: a weight of the exported program is freed with the program).
    """
    from onnxscript.rewriter import RewriteRule, RewriteRuleSet

    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("onnxscript.rewriter"):
            continue
        for value in list(vars(module).values()):
            rules = value.rules if isinstance(value, RewriteRuleSet) else [value]
            for rule in rules:
                matcher = getattr(rule, "_matcher", None) if isinstance(rule, RewriteRule) else None
                for state in MATCH_STATE if matcher is not None else ():
                    if getattr(matcher, state, None) is not None:
                        setattr(matcher, state, None)  # match() sets each of them anew


def export_onnx(
    program: Program,
    path: str | Path,
    *,
    opset: int = 18,
    external_data: bool | Literal["auto"] = "auto",
    moe_lowering: MoeLowering = "standard",
    scatter_reduction: bool = True,
    upcast: bool = False,
) -> dict:
    """Write `program` to `path` as ONNX and return facts for the report (sizes, ops, dims, seconds).

    `moe_lowering`: how `sparsec::moe` nodes lower (see `sparsec.exporters.lowering.onnx_moe`): `standard` (plain ONNX,
    any runtime) or `contrib` (ONNX Runtime's `com.microsoft::MoE`, standard ops where it cannot express the FFN).
    `scatter_reduction=False` lowers `standard` without `ScatterND(reduction="add")`, which TensorRT's parser lacks.
    `upcast`: a program in BF16 / FP16 is written as an FP32 model (`upcast_to_fp32`, weights converted while
    they are written); the facts then hold `upcast_from`. A lazily backed program (weights read from the
    checkpoint, `Program.lazy_state`) is materialised first: its weights are read into memory.

    Example::
        export_onnx(program, "out/model.onnx")["dynamic_dims"]
        # {'input_ids': {0: 'batch', 1: 'seq'}, 'attention_mask': {0: 'batch', 1: 'seq'}}
    """
    import torch

    path = Path(path)
    complex_nodes = [
        n.name
        for n in program.graph.nodes
        if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dtype.is_complex
    ]
    if complex_nodes:
        raise SparsecError(
            f"the program computes complex values ({', '.join(complex_nodes[:5])}{', ...' if len(complex_nodes) > 5 else ''}), "
            "which ONNX cannot express; run the `real_rotary` pass first (recipe: `- real_rotary: {}`)"
        )
    if moe_lowering == "contrib":
        moe_nodes = program.graph.find_nodes(op="call_function", target=torch.ops.sparsec.moe.default)
        refused = sorted({n.args[10] for n in moe_nodes} - set(CONTRIB_GATINGS))
        if refused:
            raise SparsecError(
                f"moe_lowering contrib: ONNX Runtime's com.microsoft::MoE weights experts by a softmax and cannot "
                f"express gating {', '.join(refused)} (the paper's 1 + raw logit); use moe_lowering: standard "
                "(recipe `export: {moe_lowering: standard}`)"
            )
    if external_data == "auto":
        external_data = program.parameter_bytes() > EXTERNAL_DATA_THRESHOLD
    start = time.perf_counter()
    program.materialize()
    segments, boundaries = parity_segments(program)  # marked for block-by-block parity (exporters.lowering.segments)
    lowered = program.without_runtime_asserts(extra_outputs=boundaries)
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms" x4
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch-internal pytree deprecations
            onnx_program = torch.onnx.export(
                lowered.exported,
                (),
                input_names=program.input_names,
                output_names=[*program.output_names, *map(boundary_name, boundaries)],
                opset_version=opset,
                dynamo=True,
                custom_translation_table={
                    torch.ops.sparsec.moe.default: moe_translation(moe_lowering, scatter_reduction)
                },
                verbose=False,
            )
    except Exception as exc:
        raise SparsecError(
            f"ONNX export failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:500]}. "
            "A rewrite may have introduced an op without an ONNX translation; see the traceback above."
        ) from exc
    finally:
        registration_log.setLevel(level)
        _forget_matched_graphs()
    model = onnx_program.model
    for _ in boundaries:  # the values stay in the graph under their boundary names; the file has the real outputs
        model.graph.outputs.pop()
    if segments:
        model.metadata_props[METADATA_KEY] = segments_metadata(segments)
    dynamic_dims = _name_dynamic_dims(model, program)
    half = sorted({HALF_TYPES[v.dtype] for v in model.graph.initializers.values() if v.dtype in HALF_TYPES})
    if upcast and half:
        upcast_to_fp32(model)
    onnx_program.save(str(path), external_data=bool(external_data))
    data_file = path.with_name(path.name + ".data")
    ops: dict[str, int] = {}
    for node in model.graph:  # top-level ops, as in the file's graph.node
        key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        ops[key] = ops.get(key, 0) + 1
    return {
        "path": path.name,
        "opset": opset,
        "external_data": data_file.name if data_file.exists() else None,
        "bytes": path.stat().st_size + (data_file.stat().st_size if data_file.exists() else 0),
        "dynamic_dims": dynamic_dims,
        "inputs": [v.name for v in model.graph.inputs],
        "outputs": [v.name for v in model.graph.outputs],
        "op_counts": dict(sorted(ops.items())),
        "seconds": round(time.perf_counter() - start, 3),
        **({"upcast_from": "/".join(half)} if upcast and half else {}),
    }
