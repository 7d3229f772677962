"""A program in the checkpoint's dtype (bf16) lowered to an FP32 ONNX model, the weights converted as written."""

import onnx
import pytest
import torch
from conftest import make_inputs, make_model

import sparsec
from sparsec.exporters.lowering.onnx import export_onnx
from sparsec.exporters.targets import onnxruntime as ort_backend


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_bf16_program_exports_as_the_fp32_model_of_its_rounded_weights(tmp_path, name):
    """Upcasting computes the bf16 program's function in FP32: exactly the FP32 model whose weights are the
    bf16-rounded ones (an independent reference), at another shape than the capture one, left padded."""
    model = make_model(name).to(torch.bfloat16)
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    facts = export_onnx(program, tmp_path / "model.onnx", upcast=True, external_data=True)
    assert facts["upcast_from"] == "bf16"
    onnx_model = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert all(i.data_type != onnx.TensorProto.BFLOAT16 for i in onnx_model.graph.initializer)
    assert onnx_model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT

    reference = make_model(name).to(torch.bfloat16).float()  # the same weights, rounded to bf16, in FP32
    inputs = make_inputs(model, 3, 9, seed=5, pad_left=3)
    session = ort_backend.session(tmp_path / "model.onnx", ["CPUExecutionProvider"])
    got = ort_backend.run(session, inputs)["logits"]
    with torch.no_grad():
        want = reference(**inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-4, atol=1e-4)


def test_fp32_program_is_not_upcast(tmp_path):
    model = make_model("tiny-qwen2")
    program = sparsec.capture(model, make_inputs(model, 2, 8))
    facts = export_onnx(program, tmp_path / "model.onnx", upcast=True)
    assert "upcast_from" not in facts
