"""ONNX precision conversion: an FP32 model into FP16 or BF16, numerically sensitive ops kept in FP32.

TensorRT 11 builds strongly typed networks only: FP16/BF16 must be in the ONNX file. `convert_precision`
rewrites an FP32 model (written by `sparsec.exporters.lowering.onnx.export_onnx`) on onnx-ir:

- **Kept in FP32** (with their inputs cast up and their outputs cast down at the boundary):
  - `Softmax`, `LogSoftmax`, `TopK`, `Exp` and the fused norms (`LayerNormalization`,
    `SimplifiedLayerNormalization`, `RMSNormalization`, `GroupNormalization`, `InstanceNormalization`,
    `BatchNormalization`);
  - decomposed norms as torch exports them: from a `ReduceMean` of the input (or of its square, `Pow(x, 2)` /
    `Mul(x, x)`, or of the centred `Sub(x, mean)`), the chain `Add(eps)` / `Sqrt` / `Reciprocal` / `Div` up to
    the `Mul` / `Div` that normalises the input, then the affine `Mul` / `Add` by constants (RMSNorm, LayerNorm);
  - the MoE router: every `TopK`'s input back to the logits' `MatMul` / `Gemm` (through `Softmax`, `Cast`,
    `Add` bias), and the `MatMul` producing ONNX Runtime's contrib `MoE` router input (the contrib op takes x and
    router logits in one type, so those logits are cast down to it after an FP32 MatMul);
  - scatters that accumulate (`ScatterND` / `ScatterElements` with a reduction: the standard MoE lowering
    sums the experts' outputs with one; ONNX Runtime's CPU kernel has no FP16 `add` reduction either);
  - angles of trigonometric functions: `Cos` / `Sin` and every floating-point node they depend on (rotary
    position times inverse frequency: positions above 2048 are not exact in FP16);
  - any node whose ONNX schema does not admit the target type for its floating inputs (e.g. `Range`), ops
    without a known schema, and the op types passed in `keep_ops`.
- **Graph inputs and outputs keep their dtypes** (FP32 logits out; callers feed the same tensors as before);
  Casts sit right after FP32 inputs and right before FP32 outputs.
- **Constants**: FP32 initializers and `Constant` / `ConstantOfShape` values read by converted nodes are
  converted (clamped to the target's finite range, so an FP32 `finfo.min` attention mask stays finite);
  initializers read by kept nodes stay FP32 (one copy of each kind). `Cast(to=FLOAT)` inside the converted
  region casts to the target instead.
- External data: tensors are read lazily from the source's data file; the result is written with external
  data (`NAME.data`) when the source had it or `external_data=True`.

Graphs with subgraphs (`If`, `Loop`, `Scan`) or local functions are refused (our exports have none).

Example::
    report = convert_precision("out/model.onnx", "out/model.fp16.onnx", "fp16")
    report["kept_fp32"]["Softmax"], report["converted_nodes"] > 0
    # (4, True)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from sparsec.data.parity import Precision
from sparsec.errors import SparsecError

TARGETS = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
TYPE_STRINGS = {ir.DataType.FLOAT16: "tensor(float16)", ir.DataType.BFLOAT16: "tensor(bfloat16)"}
FP32 = ir.DataType.FLOAT

SENSITIVE_OPS = frozenset(
    {
        "Softmax",
        "LogSoftmax",
        "TopK",
        "Exp",
        "LayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "RMSNormalization",
        "GroupNormalization",
        "InstanceNormalization",
        "BatchNormalization",
    }
)
NORM_CHAIN_OPS = frozenset({"Add", "Sqrt", "Reciprocal", "Div", "Cast"})
ROUTER_CHAIN_OPS = frozenset({"Softmax", "Cast", "Add", "Transpose"})
TRIG_OPS = frozenset({"Cos", "Sin"})
SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan"})
# Ops outside ONNX's schema registry whose floating inputs and outputs share one type T.
POLYMORPHIC_CONTRIB_OPS = {("com.microsoft", "MoE"): {ir.DataType.FLOAT16, ir.DataType.BFLOAT16}}


def convert_precision(
    source: str | Path,
    target: str | Path,
    precision: Precision,
    *,
    keep_ops: Iterable[str] = (),
    external_data: bool | None = None,
) -> dict:
    """Write `source` (an FP32 ONNX file) to `target` in `precision`; return what was converted and kept.

    `precision` "fp32" copies the model unchanged. `keep_ops`: further op types to keep in FP32.
    The result passes `onnx.checker.check_model(full_check=True)` (strict type and shape inference), checked
    before returning. Raises `SparsecError` for a model it cannot convert (subgraphs, not FP32).

    Example::
        convert_precision("model.onnx", "model.bf16.onnx", "bf16", keep_ops=["Sigmoid"])["kept_fp32"]
        # {'Add': 9, 'Cast': 1, 'Concat': 1, 'Cos': 1, 'Mul': 19, 'Pow': 9, 'Reciprocal': 9, 'ReduceMean': 9,
         # 'Sigmoid': 4, 'Sin': 1, 'Softmax': 4, 'Sqrt': 9}
    """
    source, target = Path(source), Path(target)
    if precision not in ("fp32", "fp16", "bf16"):
        raise SparsecError(f"precision {precision!r}: choose fp32, fp16 or bf16")
    model = ir.load(source)
    had_external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    external = had_external if external_data is None else external_data
    if precision == "fp32":
        _save(model, target, external)
        return {"precision": "fp32", "converted_nodes": 0, "kept_fp32": {}, "casts_inserted": 0}
    dtype = TARGETS[precision]
    graph = model.graph
    nodes = list(graph)
    subgraphs = sorted({n.op_type for n in nodes if n.op_type in SUBGRAPH_OPS})
    if subgraphs or model.functions:
        raise SparsecError(
            f"{source}: precision conversion does not handle subgraphs or local functions "
            f"(found {subgraphs or 'functions'})"
        )
    if not any(v.dtype == FP32 for n in nodes for v in n.outputs):
        raise SparsecError(f"{source}: no FP32 values to convert")
    opset = model.opset_imports.get("", 18)

    keep = _sensitive_nodes(nodes, set(keep_ops))
    keep |= {n for n in nodes if n not in keep and _touches_float(n) and not _admits(n, dtype, opset)}
    keep |= {n for n in nodes if n.op_type == "Constant" and any(u.node in keep for u in n.outputs[0].uses())}
    converted = [n for n in nodes if n not in keep and _touches_float(n)]
    converted_set = set(converted)
    lowered = {v for n in converted for v in n.outputs if v.dtype == FP32}  # values that become `dtype`

    casts = _Casts(graph, dtype)
    for node in converted:
        _retarget_attributes(node, dtype)
        fixed = _fixed_type_inputs(node, opset)
        for i, value in enumerate(node.inputs):
            if value is not None and value.dtype == FP32 and value not in lowered and i not in fixed:
                node.replace_input_with(i, casts.down(value))
    for node in nodes:
        if node in converted_set:
            continue
        for i, value in enumerate(node.inputs):
            if value in lowered:
                node.replace_input_with(i, casts.up(value))
    for value in lowered:
        value.dtype = dtype
    for i, value in enumerate(list(graph.outputs)):
        if value in lowered:
            graph.outputs[i] = casts.output(value)
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        del graph.initializers[name]
    graph.sort()
    _save(model, target, external)
    onnx.checker.check_model(str(target), full_check=True)
    kept = Counter(n.op_type for n in keep if _touches_float(n))
    return {
        "precision": precision,
        "converted_nodes": len(converted),
        "kept_fp32": dict(sorted(kept.items())),
        "casts_inserted": casts.count,
        "initializers_converted": casts.initializers,
    }


def _touches_float(node: ir.Node) -> bool:
    return any(v is not None and v.dtype == FP32 for v in (*node.inputs, *node.outputs)) or (
        node.op_type == "Cast" and node.attributes.get_int("to") == FP32.value
    )


def _sensitive_nodes(nodes: list[ir.Node], keep_ops: set[str]) -> set[ir.Node]:
    keep = {n for n in nodes if n.op_type in SENSITIVE_OPS or n.op_type in keep_ops or _accumulates(n)}
    for node in nodes:
        if node.op_type == "ReduceMean":
            keep |= _norm_nodes(node)
        elif node.op_type == "TopK":
            keep |= _router_nodes(node.inputs[0])
        elif node.domain == "com.microsoft" and node.op_type == "MoE" and len(node.inputs) > 1:
            keep |= _router_nodes(node.inputs[1])
        elif node.op_type in TRIG_OPS:
            keep |= {node} | _float_ancestors(node)
    return keep


def _accumulates(node: ir.Node) -> bool:
    """A scatter with a reduction (the MoE lowering's ScatterND add of expert outputs)."""
    return (
        node.op_type in ("ScatterND", "ScatterElements") and node.attributes.get_string("reduction", "none") != "none"
    )


def _single_consumer(value: ir.Value) -> ir.Node | None:
    users = {u.node for u in value.uses()}
    return next(iter(users)) if len(users) == 1 else None


def _is_constant(value: ir.Value | None) -> bool:
    return value is not None and (
        value.const_value is not None or (value.producer() is not None and value.producer().op_type == "Constant")
    )


def _norm_nodes(reduce: ir.Node) -> set[ir.Node]:
    """The nodes of a decomposed norm around `reduce` (a ReduceMean), or none if it is not one."""
    stat_input = reduce.inputs[0]
    roots, pre = {stat_input}, set()
    producer = stat_input.producer()
    if producer is not None and producer.op_type in ("Pow", "Mul", "Sub"):
        args = [v for v in producer.inputs if v is not None]
        if producer.op_type == "Pow" or (producer.op_type == "Mul" and args[0] is args[-1]):
            pre.add(producer)
            roots = {args[0]}
            centred = args[0].producer()
            if centred is not None and centred.op_type == "Sub":
                pre.add(centred)
                roots.add(centred.inputs[0])
                mean = centred.inputs[1].producer()
                if mean is not None and mean.op_type == "ReduceMean":
                    pre.add(mean)
    chain, value = [reduce], reduce.outputs[0]
    for _ in range(6):
        user = _single_consumer(value)
        if user is None:
            return set()
        chain.append(user)
        if user.op_type in ("Mul", "Div") and any(
            v in roots or (v.producer() in pre) for v in user.inputs if v is not None
        ):
            break
        if user.op_type not in NORM_CHAIN_OPS:
            return set()
        value = user.outputs[0]
    else:
        return set()
    value = chain[-1].outputs[0]
    while (
        (user := _single_consumer(value)) is not None
        and user.op_type in ("Mul", "Add")
        and any(_is_constant(v) for v in user.inputs)
    ):
        chain.append(user)
        value = user.outputs[0]
    return set(chain) | pre


def _router_nodes(logits: ir.Value) -> set[ir.Node]:
    """From a TopK (or contrib MoE router) input back to the MatMul/Gemm computing the router logits."""
    found, value = set(), logits
    for _ in range(8):
        node = value.producer()
        if node is None:
            return set()
        if node.op_type in ("MatMul", "Gemm"):
            return found | {node}
        if node.op_type not in ROUTER_CHAIN_OPS and node.op_type != "ScatterElements":
            return set()
        found.add(node)
        value = node.inputs[0]
    return set()


def _float_ancestors(node: ir.Node) -> set[ir.Node]:
    out, stack = set(), [v for v in node.inputs if v is not None]
    while stack:
        producer = stack.pop().producer()
        if producer is None or producer in out or not any(v.dtype == FP32 for v in producer.outputs):
            continue
        out.add(producer)
        stack.extend(v for v in producer.inputs if v is not None)
    return out


def _schema(node: ir.Node, opset: int):
    try:
        return onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return None


def _admits(node: ir.Node, dtype: ir.DataType, opset: int) -> bool:
    """Whether the node's schema lets every one of its FP32 inputs and outputs be `dtype`."""
    if node.op_type in ("Cast", "Constant", "ConstantOfShape"):
        return True
    contrib = POLYMORPHIC_CONTRIB_OPS.get((node.domain, node.op_type))
    if contrib is not None:
        return dtype in contrib
    schema = _schema(node, opset)
    if schema is None:
        return False
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    for params, values in ((schema.inputs, node.inputs), (schema.outputs, node.outputs)):
        for i, value in enumerate(values):
            if value is None or value.dtype != FP32 or not params:
                continue
            param = params[min(i, len(params) - 1)]
            if param.type_str in allowed and TYPE_STRINGS[dtype] not in allowed[param.type_str]:
                return False
    return True


def _fixed_type_inputs(node: ir.Node, opset: int) -> set[int]:
    """Inputs whose schema type is a fixed `tensor(float)` (not a type constraint): they stay FP32."""
    schema = _schema(node, opset) if (node.domain, node.op_type) not in POLYMORPHIC_CONTRIB_OPS else None
    if schema is None:
        return set()
    constraints = {c.type_param_str for c in schema.type_constraints}
    params = schema.inputs
    return {
        i for i in range(len(node.inputs)) if params and params[min(i, len(params) - 1)].type_str not in constraints
    }


def _convert_array(array: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    target = dtype.numpy()
    limit = float(np.finfo(np.float16).max) if dtype == ir.DataType.FLOAT16 else 3.3895313892515355e38
    return np.clip(array.astype(np.float32), -limit, limit).astype(target)


def _retarget_attributes(node: ir.Node, dtype: ir.DataType) -> None:
    if node.op_type == "Cast" and node.attributes.get_int("to") == FP32.value:
        node.attributes["to"] = ir.AttrInt64("to", dtype.value)
    elif node.op_type == "Constant":
        attr = node.attributes.get("value")
        if attr is not None and attr.value.dtype == FP32:
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(_convert_array(attr.value.numpy(), dtype)))
        for name in ("value_float", "value_floats"):
            if name in node.attributes:
                array = np.asarray(node.attributes[name].value, dtype=np.float32)
                del node.attributes[name]
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(_convert_array(array, dtype)))
    elif node.op_type == "ConstantOfShape" and node.outputs[0].dtype == FP32:
        attr = node.attributes.get("value")
        array = attr.value.numpy() if attr is not None else np.zeros(1, np.float32)
        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(_convert_array(array, dtype)))


class _Casts:
    """Cast values between FP32 and the target type, one Cast (or converted initializer) per value and direction."""

    def __init__(self, graph: ir.Graph, dtype: ir.DataType) -> None:
        self.graph, self.dtype = graph, dtype
        self.suffix = "fp16" if dtype == ir.DataType.FLOAT16 else "bf16"
        self._taken = (
            {v.name for v in graph.initializers.values()}
            | {v.name for v in graph.inputs}
            | {v.name for n in graph for v in n.outputs}
            | {n.name for n in graph}
        )
        self._down: dict[ir.Value, ir.Value] = {}
        self._up: dict[ir.Value, ir.Value] = {}
        self.count = 0
        self.initializers = 0

    def _name(self, base: str) -> str:
        name, i = base, 1
        while name in self._taken:
            name, i = f"{base}_{i}", i + 1
        self._taken.add(name)
        return name

    def _cast(self, value: ir.Value, to: ir.DataType, name: str) -> ir.Value:
        out = ir.Value(name=self._name(name), type=ir.TensorType(to), shape=value.shape)
        node = ir.Node(
            "", "Cast", [value], {"to": ir.AttrInt64("to", to.value)}, outputs=[out], name=self._name(f"{name}_cast")
        )
        producer = value.producer()
        if producer is None:
            self.graph.insert_before(next(iter(self.graph)), node)
        else:
            self.graph.insert_after(producer, node)
        self.count += 1
        return out

    def down(self, value: ir.Value) -> ir.Value:
        if value not in self._down:
            if value.is_initializer() and value.const_value is not None:
                array = _convert_array(value.const_value.numpy(), self.dtype)
                name = self._name(f"{value.name}_{self.suffix}")
                new = ir.Value(
                    name=name,
                    type=ir.TensorType(self.dtype),
                    shape=value.shape,
                    const_value=ir.tensor(array, name=name),
                )
                self.graph.register_initializer(new)
                self.initializers += 1
                self._down[value] = new
            else:
                self._down[value] = self._cast(value, self.dtype, f"{value.name}_{self.suffix}")
        return self._down[value]

    def up(self, value: ir.Value) -> ir.Value:
        if value not in self._up:
            self._up[value] = self._cast(value, FP32, f"{value.name}_fp32")
        return self._up[value]

    def output(self, value: ir.Value) -> ir.Value:
        """An FP32 graph output named like `value` (which gets a new name), cast from it."""
        name = value.name
        value.name = self._name(f"{name}_{self.suffix}")
        out = self._cast(value, FP32, name)
        out.name = name
        return out


def _save(model: ir.Model, target: Path, external: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    data = target.with_name(target.name + ".data")
    if data.exists():
        data.unlink()
    ir.save(model, target, external_data=data.name if external else None)
