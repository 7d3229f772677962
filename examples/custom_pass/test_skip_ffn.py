"""How to verify a graph rewrite in your own unit tests, with `sparsec.testing` (run: `pytest examples/custom_pass`).

The reference is independent of the pass: the same change made by hand on the Hugging Face model (its MLPs
replaced by a module returning zeros), compared at a shape other than the capture shape, with left padding,
in PyTorch and in ONNX Runtime. Structural checks say what the graph holds afterwards.
"""

import pytest
import torch
from skip_ffn import SkipFfn

from sparsec import testing
from sparsec.exporters.lowering.onnx import export_onnx
from sparsec.families import detect_family
from sparsec.models import build_model, builtin_config
from sparsec.transform.pass_manager import PASS_REGISTRY


@pytest.fixture(autouse=True)
def skip_ffn():
    """`skip_ffn` registered for each test (what the installed package's entry point does), and not after it."""
    with PASS_REGISTRY.temporarily(SkipFfn):
        yield


class Zero(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def inputs(model, batch, seq, seed, pad_left=0):
    example = detect_family(model).example_inputs(model, batch, seq, seed=seed)
    example["attention_mask"][0, :pad_left] = 0
    return example


def test_skip_ffn_matches_the_hand_edited_model(tmp_path):
    model = build_model(builtin_config("tiny-qwen2"))
    program = testing.capture(model, inputs(model, 2, 8, seed=0))
    before = testing.parameter_names(program)
    n_before = program.num_parameters()

    record = testing.apply_pass(
        program, "skip_ffn", where="model.layers.[12].mlp", calibration=inputs(model, 4, 12, seed=3)
    )

    # exactly the MLPs' weights went, and the norm that only fed them
    testing.assert_parameters_removed(
        before, program, ["model.layers.[12].mlp.**", "model.layers.[12].post_attention_layernorm.*"]
    )
    assert set(record.removed_state) == before - testing.parameter_names(program)
    removed = sum(p.numel() for i in (1, 2) for p in model.model.layers[i].mlp.parameters())
    removed += sum(model.model.layers[i].post_attention_layernorm.weight.numel() for i in (1, 2))
    assert n_before - program.num_parameters() == removed
    testing.assert_op_count(program, "model.layers.1", "aten.linear.default", 4)  # q, k, v, o: no MLP linears
    testing.assert_op_count(program, "model.layers.0", "aten.linear.default", 7)
    assert record.quality["logits"]["cosine"] < 1.0  # the manager's quality check ran on the calibration data

    for i in (1, 2):
        model.model.layers[i].mlp = Zero()
    other_shape = inputs(model, 3, 11, seed=5, pad_left=3)
    testing.assert_equivalent(program, model, other_shape, rtol=1e-5, atol=1e-5)
    export_onnx(program, tmp_path / "model.onnx")
    testing.assert_onnx_equivalent(tmp_path / "model.onnx", model, other_shape, output="logits")
