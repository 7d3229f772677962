"""ONNX precision conversion (sparsec.exporters.lowering.precision) on real sparsec exports: the tiny Qwen2 and its
ffn_to_moe version (standard and contrib lowerings). Structure (which ops compute in which type, read from
the converted file with strict ONNX type inference) and numerics against the FP32 PyTorch program at a shape
other than the capture shape: ONNX Runtime CPU for FP16, onnx's reference evaluator for BF16 (ONNX Runtime's
CPU provider has no BF16 MatMul)."""

import numpy as np
import onnx
import pytest
import torch
from conftest import MoeOpModule, make_inputs, make_model, random_moe_weights
from onnx.reference import ReferenceEvaluator

import sparsec
from sparsec import testing
from sparsec.data.calibration import CalibrationSet
from sparsec.data.parity import ParityOptions, check_parity
from sparsec.errors import SparsecError
from sparsec.exporters.lowering.onnx import export_onnx
from sparsec.exporters.lowering.precision import convert_precision
from sparsec.exporters.targets import onnxruntime as ort_backend

pytestmark = pytest.mark.slow

FLOAT, FLOAT16, BFLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(program, model, {name: fp32 onnx path}) for the dense tiny Qwen2 and its MoE (4 experts, 2 active)."""
    root = tmp_path_factory.mktemp("precision")
    model = make_model("tiny-qwen2")
    dense = sparsec.capture(model, make_inputs(model, 2, 16))
    export_onnx(dense, root / "dense.onnx")
    moe = sparsec.capture(model, make_inputs(model, 2, 16))
    calib = CalibrationSet(make_inputs(model, 16, 16, seed=3), source="test")
    testing.apply_pass(moe, "ffn_to_moe", experts=4, top_k=2, fit_steps=20, calibration=calib)  # a fitted router, fast
    export_onnx(moe, root / "moe.onnx")
    export_onnx(moe, root / "moe_contrib.onnx", moe_lowering="contrib")
    return (
        {"dense": dense, "moe": moe, "moe_contrib": moe},
        model,
        {n: root / f"{n}.onnx" for n in ("dense", "moe", "moe_contrib")},
    )


def _types(path) -> dict[str, int]:
    """Element type of every value, from strict type inference on the file."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
    types = {
        v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)
    }
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def _nodes(path, op_type):
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == op_type]


def _router_matmuls(path) -> list[str]:
    """MatMuls whose output reaches a TopK (standard lowering) or the contrib MoE's router input, by names."""
    graph = onnx.load(str(path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    found = []
    for node in graph.node:
        if node.op_type == "TopK" or (node.domain == "com.microsoft" and node.op_type == "MoE"):
            value = node.input[0 if node.op_type == "TopK" else 1]
            while value in producer and producer[value].op_type != "MatMul":
                value = producer[value].input[0]
            if value in producer:
                found.append(producer[value].name)
    return sorted(set(found))


def _other_shape_inputs(model):
    return make_inputs(model, 3, 21, seed=7, pad_left=4)  # capture was 2 x 16


@pytest.mark.parametrize("name", ["dense", "moe", "moe_contrib"])
def test_fp16_keeps_sensitive_ops_fp32_and_matches_pytorch_in_onnx_runtime(tmp_path, exported, name):
    programs, model, paths = exported
    out = tmp_path / "fp16.onnx"
    report = convert_precision(paths[name], out, "fp16")  # runs onnx.checker (full_check) itself
    onnx.checker.check_model(str(out), full_check=True)
    types = _types(out)
    graph = onnx.load(str(out)).graph

    assert [(i.name, i.type.tensor_type.elem_type) for i in graph.input] == [
        ("input_ids", onnx.TensorProto.INT64),
        ("attention_mask", onnx.TensorProto.INT64),
    ]
    assert [(o.name, o.type.tensor_type.elem_type) for o in graph.output] == [("logits", FLOAT)]
    for op in ("Softmax", "Pow", "ReduceMean", "Sqrt", "Reciprocal", "Cos", "Sin", "TopK"):
        for node in _nodes(out, op):
            assert types[node.input[0]] == FLOAT and types[node.output[0]] == FLOAT, (op, node.name)
    assert len(_nodes(out, "Softmax")) >= 4 and len(_nodes(out, "ReduceMean")) == 9  # 4 attention, 9 RMSNorms
    # every RMSNorm's output (x * rsqrt(...) * weight) is FP32, its weight initializer too
    for reciprocal in _nodes(out, "Reciprocal"):
        scale = next(n for n in graph.node if reciprocal.output[0] in n.input)
        affine = next(n for n in graph.node if scale.output[0] in n.input)
        assert scale.op_type == "Mul" and affine.op_type == "Mul" and types[affine.output[0]] == FLOAT
        assert any(types[i] == FLOAT and i in {t.name for t in graph.initializer} for i in affine.input)
    routers = _router_matmuls(out)
    assert len(routers) == (0 if name == "dense" else 4)
    matmuls = _nodes(out, "MatMul")
    for node in matmuls:
        expected = FLOAT if node.name in routers else FLOAT16
        assert types[node.output[0]] == expected, node.name
    if name == "moe":
        for node in _nodes(out, "Gemm"):  # the experts' FFNs
            assert types[node.output[0]] == FLOAT16
        assert all(types[n.output[0]] == FLOAT for n in _nodes(out, "ScatterND"))  # accumulation of experts
    if name == "moe_contrib":
        moes = [n for n in graph.node if n.op_type == "MoE"]
        assert len(moes) == 4  # one T for x and router logits: the FP32 router's logits are cast down to it
        assert all(types[n.input[0]] == FLOAT16 and types[n.input[1]] == FLOAT16 for n in moes)
    assert report["kept_fp32"]["Softmax"] == len(_nodes(out, "Softmax"))
    assert report["converted_nodes"] > 100 and report["casts_inserted"] > 0

    inputs = _other_shape_inputs(model)
    program = programs[name]
    got = ort_backend.run(ort_backend.session(out), inputs)
    parity = check_parity(
        [(program.run(inputs), got, CalibrationSet.valid_mask(inputs))],
        backend="ORT fp16",
        precision="fp16",
        options=ParityOptions(percentiles=[99]),
    )
    metrics = parity["metrics"]["logits"]
    assert metrics["rel_l2"] > 1e-5  # it does compute in FP16 (an FP32 run is ~3e-7)
    assert got["logits"].dtype == torch.float32


def test_bf16_matches_pytorch_in_the_reference_evaluator(tmp_path, exported):
    programs, model, paths = exported
    out = tmp_path / "bf16.onnx"
    convert_precision(paths["dense"], out, "bf16")
    types = _types(out)
    assert all(types[n.output[0]] == BFLOAT16 for n in _nodes(out, "MatMul"))
    assert all(types[n.input[0]] == FLOAT for n in _nodes(out, "Softmax"))
    inputs = _other_shape_inputs(model)
    feed = {k: v.numpy() for k, v in inputs.items()}
    (logits,) = ReferenceEvaluator(str(out)).run(None, feed)
    assert logits.dtype == np.float32
    mask = CalibrationSet.valid_mask(inputs)
    ref = programs["dense"].run(inputs)
    parity = check_parity(
        [(ref, {"logits": torch.from_numpy(logits)}, mask)],
        backend="reference bf16",
        precision="bf16",
        options=ParityOptions(),
    )
    fp16 = tmp_path / "fp16.onnx"
    convert_precision(paths["dense"], fp16, "fp16")
    (logits16,) = ReferenceEvaluator(str(fp16)).run(None, feed)
    fp16_metrics = check_parity(
        [(ref, {"logits": torch.from_numpy(logits16)}, mask)],
        backend="reference fp16",
        precision="fp16",
        options=ParityOptions(),
    )["metrics"]["logits"]
    assert parity["metrics"]["logits"]["rel_l2"] > 3 * fp16_metrics["rel_l2"]  # 8 mantissa bits against 11


def test_external_data_and_fp32_copy(tmp_path, exported):
    programs, model, paths = exported
    out = tmp_path / "ext.onnx"
    convert_precision(paths["dense"], out, "fp16", external_data=True)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 100_000
    inputs = _other_shape_inputs(model)
    external = ort_backend.run(ort_backend.session(out), inputs)["logits"]
    inline = tmp_path / "inline.onnx"
    convert_precision(paths["dense"], inline, "fp16")
    assert torch.equal(external, ort_backend.run(ort_backend.session(inline), inputs)["logits"])
    # and a model with external data converts (tensors read lazily from the source's data file)
    again = tmp_path / "again.onnx"
    convert_precision(out, again, "fp16")
    assert (tmp_path / "again.onnx.data").exists()
    torch.testing.assert_close(
        ort_backend.run(ort_backend.session(again), inputs)["logits"], external, rtol=0, atol=2e-3
    )
    copy = tmp_path / "copy.onnx"
    assert convert_precision(paths["dense"], copy, "fp32")["converted_nodes"] == 0
    testing.assert_onnx_equivalent(copy, programs["dense"], inputs, output="logits")


def test_keep_ops_stay_fp32(tmp_path, exported):
    _, _, paths = exported
    report = convert_precision(paths["dense"], tmp_path / "k.onnx", "fp16", keep_ops=["Sigmoid"])
    types = _types(tmp_path / "k.onnx")
    sigmoids = _nodes(tmp_path / "k.onnx", "Sigmoid")
    assert report["kept_fp32"]["Sigmoid"] == len(sigmoids) == 4
    assert all(types[n.input[0]] == FLOAT and types[n.output[0]] == FLOAT for n in sigmoids)


def test_refuses_what_it_cannot_convert(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("y", FLOAT, [2])
    branch = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "b", [], [y])
    cond = onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)], "g", [cond, x], [y]
    )
    onnx.save(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), str(tmp_path / "if.onnx")
    )
    with pytest.raises(SparsecError, match=r"does not handle subgraphs .*\['If'\]"):
        convert_precision(tmp_path / "if.onnx", tmp_path / "out.onnx", "fp16")
    with pytest.raises(SparsecError, match="precision 'int8': choose fp32, fp16 or bf16"):
        convert_precision(tmp_path / "if.onnx", tmp_path / "out.onnx", "int8")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("lowering", ["contrib", "standard", "standard_for_tensorrt"])
@pytest.mark.parametrize(
    "activation,gated,gating",
    [
        ("silu", True, "unit"),
        ("silu", True, "softmax"),
        ("relu", False, "renormalized"),
        ("gelu_tanh", False, "unit"),
        ("gelu", False, "softmax"),
        ("silu", True, "one_plus_logit"),
    ],
)
def test_fp16_moe_lowerings_with_biases_match_the_op(tmp_path, lowering, activation, gated, gating):
    if lowering == "contrib" and gating == "one_plus_logit":
        pytest.skip(
            "contrib refuses one_plus_logit (tests/passes/test_ffn_to_moe.py::test_onnx_lowerings_match_the_op)"
        )
    torch.manual_seed(0)
    module = MoeOpModule(random_moe_weights(experts=6, gated=gated), 2, activation, gating)
    program = sparsec.capture(module, {"x": torch.randn(2, 8, 16)}, dynamic={"x": {0: "batch", 1: "seq"}})
    for_tensorrt = lowering == "standard_for_tensorrt"
    export_onnx(
        program,
        tmp_path / "moe.onnx",
        moe_lowering="standard" if for_tensorrt else lowering,
        scatter_reduction=not for_tensorrt,
    )
    convert_precision(tmp_path / "moe.onnx", tmp_path / "moe16.onnx", "fp16")
    assert _router_matmuls(tmp_path / "moe16.onnx") and all(
        _types(tmp_path / "moe16.onnx")[n.output[0]] == FLOAT for n in _nodes(tmp_path / "moe16.onnx", "TopK")
    )
    x = {"x": torch.randn(3, 5, 16)}
    got = ort_backend.run(ort_backend.session(tmp_path / "moe16.onnx"), x)
    report = check_parity([(program.run(x), got, None)], backend="ORT", precision="fp16", options=ParityOptions())
    assert next(iter(report["metrics"].values()))["rel_l2"] > 1e-5
