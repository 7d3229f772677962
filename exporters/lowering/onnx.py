"""ONNX lowering through `torch.onnx.export(dynamo=True)`.

The program's runtime-assert nodes are dropped on a copy first (ONNX has no meaning for them; Janus does
not lower with them). Dynamic dimensions keep the program's names (`batch`, `seq`) in the ONNX file,
inputs and outputs keep the program's names (`input_ids`, `logits`). Models over 1.5 GiB of weights are
written with external data (`model.onnx.data`) unless told otherwise.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Literal

import onnx

from sparsec.errors import SparsecError
from sparsec.exporters.lowering.onnx_moe import MoeLowering, moe_translation
from sparsec.ir.program import Program

EXTERNAL_DATA_THRESHOLD = int(1.5 * 2**30)


def _name_dynamic_dims(model: onnx.ModelProto, program: Program) -> dict[str, str]:
    """Rename export's symbolic dims (`s43`) to the program's dim names (`batch`), everywhere in the graph."""
    renames: dict[str, str] = {}
    inputs = {i.name: i for i in model.graph.input}
    for name, axes in program.dynamic_dims.items():
        if name not in inputs:
            continue
        dims = inputs[name].type.tensor_type.shape.dim
        for axis, dim_name in axes.items():
            if axis < len(dims) and dims[axis].dim_param:
                renames[dims[axis].dim_param] = dim_name
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]
    return renames


def export_onnx(
    program: Program,
    path: str | Path,
    *,
    opset: int = 18,
    external_data: bool | Literal["auto"] = "auto",
    moe_lowering: MoeLowering = "standard",
    scatter_reduction: bool = True,
) -> dict:
    """Write `program` to `path` as ONNX and return facts for the report (sizes, ops, dims, seconds).

    `moe_lowering`: how `sparsec::moe` nodes lower (see `sparsec.exporters.lowering.onnx_moe`): `standard` (plain ONNX,
    any runtime) or `contrib` (ONNX Runtime's `com.microsoft::MoE`, standard ops where it cannot express the FFN).
    `scatter_reduction=False` lowers `standard` without `ScatterND(reduction="add")`, which TensorRT's parser lacks.

    Example:
        >>> export_onnx(program, "out/model.onnx")["dynamic_dims"]
        {'s43': 'batch', 's53': 'seq'}
    """
    import torch

    path = Path(path)
    complex_nodes = [n.name for n in program.graph.nodes
                     if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dtype.is_complex]
    if complex_nodes:
        raise SparsecError(
            f"the program computes complex values ({', '.join(complex_nodes[:5])}{', ...' if len(complex_nodes) > 5 else ''}), "
            "which ONNX cannot express; run the `real_rotary` pass first (recipe: `- real_rotary: {}`)"
        )
    if external_data == "auto":
        external_data = program.parameter_bytes() > EXTERNAL_DATA_THRESHOLD
    start = time.perf_counter()
    lowered = program.without_runtime_asserts()
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
                output_names=program.output_names,
                opset_version=opset,
                dynamo=True,
                custom_translation_table={torch.ops.sparsec.moe.default: moe_translation(moe_lowering, scatter_reduction)},
                verbose=False,
            )
    except Exception as exc:
        raise SparsecError(
            f"ONNX export failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:500]}. "
            "A rewrite may have introduced an op without an ONNX translation; see the traceback above."
        ) from exc
    finally:
        registration_log.setLevel(level)
    onnx_program.save(str(path), external_data=bool(external_data))
    model = onnx.load(str(path), load_external_data=False)
    renames = _name_dynamic_dims(model, program)
    onnx.save(model, str(path))
    data_file = path.with_name(path.name + ".data")
    ops: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        ops[key] = ops.get(key, 0) + 1
    return {
        "path": path.name,
        "opset": opset,
        "external_data": data_file.name if data_file.exists() else None,
        "bytes": path.stat().st_size + (data_file.stat().st_size if data_file.exists() else 0),
        "dynamic_dims": renames,
        "inputs": [i.name for i in model.graph.input],
        "outputs": [o.name for o in model.graph.output],
        "op_counts": dict(sorted(ops.items())),
        "seconds": round(time.perf_counter() - start, 3),
    }
