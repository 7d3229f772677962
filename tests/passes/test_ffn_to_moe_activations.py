"""ffn_to_moe on FFNs of every elementwise activation the MoE operator knows (`sparsec.ops.moe.ACTIVATIONS`).

The references are transformers' own activation functions (`ACT2FN`, what the models call) and the Hugging Face
models and modules the FFNs come from: with every expert active (unit gating) the MoE is the dense FFN; with 2 of 4
experts active, the ONNX file computes what the PyTorch operator computes, at another shape.
"""

import torch
from conftest import SMALL_DECODER, hf_builder, make_inputs
from transformers.activations import ACT2FN

import sparsec
from sparsec import testing
from sparsec.exporters.lowering.onnx import export_onnx
from sparsec.ops.moe import ACTIVATIONS

# sparsec's name -> transformers' ACT2FN names that compute it (gelu_new / gelu_fast / gelu_accurate spell the tanh
# GELU out as arithmetic, to within 1e-6)
HF_NAMES = {
    "silu": ["silu"],
    "gelu": ["gelu"],
    "gelu_tanh": ["gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_accurate"],
    "relu": ["relu"],
    "relu2": ["relu2"],
    "quick_gelu": ["quick_gelu"],
    "relu6": ["relu6"],
    "leaky_relu": ["leaky_relu"],
    "sigmoid": ["sigmoid"],
    "tanh": ["tanh"],
    "mish": ["mish"],
    "hardswish": ["hardswish"],
}
CASES = [(name, hf) for name, hfs in HF_NAMES.items() for hf in hfs]


def test_every_activation_is_transformers_function_of_that_name():
    assert sorted(HF_NAMES) == sorted(ACTIVATIONS)
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    for name, hf in CASES:
        torch.testing.assert_close(ACTIVATIONS[name](x), ACT2FN[hf](x), rtol=1e-6, atol=1e-6, msg=f"{name} ~ {hf}")


class Ffn(torch.nn.Module):
    """A Hugging Face style FFN calling `ACT2FN[activation]`: `down(act(gate x) * up x)` or `down(act(up x))`."""

    def __init__(self, activation: str, gated: bool, hidden: int = 16, width: int = 32) -> None:
        super().__init__()
        self.act = ACT2FN[activation]
        self.gate = torch.nn.Linear(hidden, width) if gated else None
        self.up, self.down = torch.nn.Linear(hidden, width), torch.nn.Linear(width, hidden)

    def forward(self, x):
        h = self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))
        return self.down(h)


class Ffns(torch.nn.Module):
    """One FFN per (activation, gated) case, each on the input, their outputs by name: one capture for all."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ffns = torch.nn.ModuleDict(
            {f"{hf}_{'gated' if gated else 'plain'}": Ffn(hf, gated) for _, hf in CASES for gated in (False, True)}
        )

    def forward(self, x):
        return {name: ffn(x) for name, ffn in self.ffns.items()}


def _moe(module, top_k, tmp_path=None):
    program = sparsec.capture(module, {"x": torch.randn(2, 8, 16)}, dynamic={"x": {0: "batch", 1: "seq"}})
    record = testing.apply_pass(
        program,
        "ffn_to_moe",
        experts=4,
        top_k=top_k,
        shared=0.0,
        partition="balanced",
        importance="magnitude",
        router="random",
    )
    return program, record.decisions["ffns"]


def test_all_experts_active_equal_the_dense_ffns_and_each_activation_is_named():
    module = Ffns().eval()
    program, decisions = _moe(module, top_k=4)
    found = {d["path"].removeprefix("ffns."): d["activation"] for d in decisions}
    expected = {f"{hf}_{kind}": name for name, hf in CASES for kind in ("plain", "gated")}
    assert found == expected
    testing.assert_equivalent(program, module, {"x": torch.randn(3, 5, 16)}, rtol=1e-5, atol=1e-5)


def test_two_of_four_experts_lower_to_onnx_for_every_activation(tmp_path):
    """The standard lowering (ONNX ops); the contrib one falls back to it for all but the few activations
    `com.microsoft::MoE` has (tests/passes/test_ffn_to_moe.py checks those)."""
    program, _ = _moe(Ffns().eval(), top_k=2)
    export_onnx(program, tmp_path / "moe.onnx", moe_lowering="standard")
    testing.assert_onnx_equivalent(tmp_path / "moe.onnx", program, {"x": torch.randn(3, 5, 16)}, rtol=1e-5, atol=1e-5)


def test_nemotron_squared_relu_ffns_become_moes_equal_to_the_hf_model():
    """Nemotron's MLP is `down(relu(up x) ** 2)` (transformers' `ReLUSquaredActivation`): every layer is converted,
    and with every expert active the program is the Hugging Face model, with left padding at another shape."""
    import transformers

    model = hf_builder(transformers.NemotronForCausalLM, transformers.NemotronConfig, **SMALL_DECODER)()
    program = sparsec.capture(model, make_inputs(model, 2, 12))
    record = testing.apply_pass(
        program, "ffn_to_moe", experts=4, top_k=4, partition="balanced", importance="magnitude", router="random"
    )
    assert [(d["path"], d["kind"], d["activation"]) for d in record.decisions["ffns"]] == [
        (f"model.layers.{i}.mlp", "plain", "relu2") for i in range(2)
    ]
    testing.assert_equivalent(
        program, model, make_inputs(model, 3, 9, seed=3, pad_left=2), output="logits", rtol=1e-4, atol=1e-5
    )
