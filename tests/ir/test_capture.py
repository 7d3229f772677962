"""Capture: one graph, exact to eager at shapes other than the capture shape; clear errors when it fails."""

import pytest
import torch
from conftest import MODELS, make_inputs, make_model

import sparsec
import sparsec.testing
from sparsec.errors import CaptureError


@pytest.mark.parametrize("name", MODELS)
def test_capture_is_exact_at_other_shapes(captured, name):
    model, program = captured(name)
    assert program.dynamic_dims["input_ids"] == {0: "batch", 1: "seq"}
    for batch, seq in [(3, 9), (1, 23)]:
        inputs = make_inputs(model, batch, seq, seed=batch, pad_left=2)
        sparsec.testing.assert_equivalent(program, model, inputs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_one_graph_no_python_fallbacks(captured, name):
    _, program = captured(name)
    targets = {n.op for n in program.graph.nodes}
    assert targets <= {"placeholder", "call_function", "output"}
    assert program.num_parameters() > 0 and program.output_names[0] == "logits"


def test_static_capture_has_no_dynamic_dims():
    model = make_model("tiny-qwen2")
    program = sparsec.capture(model, make_inputs(model, 2, 8), dynamic=False)
    assert program.dynamic_dims == {}
    assert all(isinstance(d, int) for d in program.graph.find_nodes(op="placeholder")[-1].meta["val"].shape)


def test_capture_restores_model_state():
    model = make_model("tiny-qwen2").train()
    sparsec.capture(model, make_inputs(model, 2, 8))
    assert model.training and model.config.use_cache is True


class _Inner(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent branch: not capturable with dynamic values
            return x * 2
        return x


class _Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 4), _Inner())

    def forward(self, x):
        return self.body(x.nonzero().float().sum() + x)


def test_uncapturable_model_names_module_op_and_hint():
    with pytest.raises(CaptureError) as info:
        sparsec.capture(_Outer(), {"x": torch.randn(2, 3, 4)})
    message = str(info.value)
    assert "failing module: body.1" in message
    assert "if x.sum() > 0" in message
    assert "hint:" in message and "data" in message
    assert len(message.splitlines()) <= 6


def test_bad_example_inputs_are_rejected_before_export():
    model = make_model("tiny-qwen2")
    with pytest.raises(CaptureError, match="needs an example size >= 2"):
        sparsec.capture(model, make_inputs(model, 1, 8))
    with pytest.raises(CaptureError, match="not tensors"):
        sparsec.capture(model, {**make_inputs(model, 2, 8), "use_cache": False})
    with pytest.raises(CaptureError, match="not an example input"):
        sparsec.capture(model, make_inputs(model, 2, 8), dynamic={"pixel_values": {0: "batch"}})


def test_a_model_that_branches_at_its_own_length_limit_is_captured_below_it():
    """MPT builds its ALiBi table at `max_seq_len` (its config's name for the longest sequence) and slices it only
    below that length: torch.export refuses `seq` unbounded and also at `max_seq_len` itself. The program takes every
    length up to one below the limit, and equals the Hugging Face model with left padding at another shape."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MptConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, expansion_ratio=2
    )
    model = transformers.MptForCausalLM(config).eval()
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    assert program.dim_bounds == {"seq": 63}
    for batch, seq in [(3, 11), (1, 63)]:
        inputs = make_inputs(model, batch, seq, seed=3, pad_left=2)
        sparsec.testing.assert_equivalent(program, model, inputs, output="logits", rtol=1e-4, atol=1e-5)


class _FixedLength(torch.nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], 4, 4, -1).sum(2)  # seq 16 split into 4 x 4: the length is fixed


def test_a_dim_the_code_fixes_is_refused_naming_the_guard_and_the_recipe_option():
    with pytest.raises(CaptureError) as info:
        sparsec.capture(_FixedLength(), {"x": torch.randn(2, 16, 3)}, dynamic={"x": {0: "batch", 1: "seq"}})
    message = str(info.value)
    assert "Constraints violated (seq)" in message and "- Not all values of seq" in message
    assert "`capture: {dynamic: false}`" in message
    static = sparsec.capture(_FixedLength(), {"x": torch.randn(2, 16, 3)}, dynamic={"x": {0: "batch"}})
    assert static.dynamic_dims == {"x": {0: "batch"}}
