"""ONNX lowerings of `torch.ops.sparsec.moe`, used as custom translations by `torch.onnx.export`.

Both implement the routing of `sparsec.ops.moe` (softmax over experts, top-k, gating unit|softmax|renormalized;
`standard` also the paper's raw-logit gating `one_plus_logit`):

- `contrib`: ONNX Runtime's `com.microsoft::MoE` (CPU kernel since 1.23; the CUDA kernel honours the SwiGLU
  attributes from 1.28, before that it hard-codes GPT-OSS's). Checked facts about the CPU kernel (1.32): weights
  in the `nn.Linear` layout [E, out, in] (ours); router input = logits, softmax over all experts, top-k,
  `normalize_routing_weights` renormalizes; a gated FFN only as `activation_type="swiglu"` with
  `swiglu_fusion=1` (gate and up rows interleaved, alpha 1, beta 0, no clamp: SiLU(gate) * up); `gelu` is the
  tanh approximation; fc3 is not implemented on CPU. Unit gating is expressed by handing the kernel masked
  logits (0 for the k chosen experts, -1e9 elsewhere: weight 1/k each) and scaling the output by k.
  FFNs the kernel cannot express (erf GELU, GeGLU) fall back to `standard`. Gating `one_plus_logit` it cannot
  express at all (its weights come from a softmax; `1 + logit` may be negative or exceed 1): `export_onnx`
  refuses `contrib` for it (`CONTRIB_GATINGS`) and names `standard` instead.
- `standard`: plain ONNX (TopK, Equal, NonZero, Gather, Gemm, ScatterND with reduction add), still sparse:
  per expert, gather the tokens routed to it, run its FFN on them, scatter-add the weighted result. For
  runtimes without the contrib op. With `scatter_reduction=False` (what `--target tensorrt` exports) each
  expert's result is scattered into zeros (`ScatterND` without reduction: an expert's tokens are distinct) and
  added, and `NonZero` reads a float mask: TensorRT's ONNX parser documents `ScatterND` with `reduction` none
  only and `NonZero` on FP32/FP16 (onnx-tensorrt docs/operators.md, TensorRT 10.15).

Top-k ties: ONNX TopK keeps the lower index, ONNX Runtime's MoE the higher, torch.topk is unspecified; only
exactly tied router logits can route differently.
"""

from __future__ import annotations

import math
from typing import Literal

import onnx
import onnxscript
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

MoeLowering = Literal["contrib", "standard"]

MICROSOFT = Opset("com.microsoft", 1)


def _contrib_moe_schema() -> onnx.defs.OpSchema:
    """The subset of ORT's MoE schema we emit (ONNX itself has no schema for contrib ops)."""
    P = onnx.defs.OpSchema.FormalParameter
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    inputs = [
        P("input", "T"),
        P("router_probs", "T"),
        P("fc1_experts_weights", "T"),
        P("fc1_experts_bias", "T", param_option=optional),
        P("fc2_experts_weights", "T"),
    ]
    A = onnx.defs.OpSchema.Attribute
    kinds = onnx.defs.OpSchema.AttrType
    attributes = [
        A("k", kinds.INT, ""),
        A("activation_type", kinds.STRING, ""),
        A("normalize_routing_weights", kinds.INT, ""),
        A("swiglu_fusion", kinds.INT, ""),
        A("activation_alpha", kinds.FLOAT, ""),
        A("activation_beta", kinds.FLOAT, ""),
    ]
    return onnx.defs.OpSchema(
        "MoE",
        "com.microsoft",
        1,
        inputs=inputs,
        outputs=[P("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")],
        attributes=attributes,
    )


CONTRIB_MOE = Op(MICROSOFT, "MoE", _contrib_moe_schema())
CONTRIB_GATINGS = ("unit", "softmax", "renormalized")  # one_plus_logit: softmax weights cannot express 1 + logit
CONTRIB_ACTIVATIONS = {"silu": "silu", "relu": "relu", "gelu_tanh": "gelu"}  # plain FFNs; gated: silu only
MASKED_LOGIT = -1e9


def contrib_supports(activation: str, gated: bool, same_width: bool) -> bool:
    """Whether ORT's CPU MoE kernel computes this FFN exactly (its output must be as wide as its input)."""
    return same_width and (activation == "silu" if gated else activation in CONTRIB_ACTIVATIONS)


def _static_dim(value, axis: int) -> int:
    dim = value.shape[axis] if value.shape is not None else None
    if not isinstance(dim, int):
        raise ValueError(f"the MoE lowering needs static weight shapes; {value.name} has {value.shape}")
    return dim


def _rows(x):
    """[..., H] -> [T, H]."""
    return op.Reshape(x, op.Concat(op.Constant(value_ints=[-1]), op.Shape(x, start=-1), axis=0))


def _router_logits(x2, router_weight, router_bias):
    logits = op.MatMul(x2, op.Transpose(router_weight, perm=[1, 0]))
    return logits if router_bias is None else op.Add(logits, router_bias)


def _interleave(a, b):
    """Rows a0, b0, a1, b1, ... along axis 1 of two [E, I, ...] tensors."""
    pair = op.Concat(op.Unsqueeze(a, [2]), op.Unsqueeze(b, [2]), axis=2)
    shape = op.Concat(op.Shape(a, end=1), op.Constant(value_ints=[-1]), op.Shape(a, start=2), axis=0)
    return op.Reshape(pair, shape)


def moe_contrib(
    x,
    router_weight,
    router_bias,
    fc1_weight,
    fc1_bias,
    fc3_weight,
    fc3_bias,
    fc2_weight,
    top_k: int,
    activation: str,
    gating: str,
):
    x2 = _rows(x)
    logits = _router_logits(x2, router_weight, router_bias)
    if gating == "unit":
        _, chosen = op.TopK(logits, op.Constant(value_ints=[top_k]), axis=-1)
        masked = op.Expand(op.CastLike(op.Constant(value_float=MASKED_LOGIT), logits), op.Shape(logits))
        logits = op.ScatterElements(
            masked, chosen, op.Expand(op.CastLike(op.Constant(value_float=0.0), logits), op.Shape(chosen)), axis=1
        )
    attributes = {"k": top_k, "normalize_routing_weights": int(gating == "renormalized")}
    fc1, bias1 = fc1_weight, fc1_bias
    if fc3_weight is not None:
        fc1 = _interleave(fc1_weight, fc3_weight)
        if fc1_bias is not None or fc3_bias is not None:
            zeros = op.Mul(
                op.ReduceSum(fc1_weight, op.Constant(value_ints=[2]), keepdims=0),
                op.CastLike(op.Constant(value_float=0.0), fc1_weight),
            )
            bias1 = _interleave(zeros if fc1_bias is None else fc1_bias, zeros if fc3_bias is None else fc3_bias)
        attributes.update(activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
    else:
        attributes["activation_type"] = CONTRIB_ACTIVATIONS[activation]
    y = CONTRIB_MOE(x2, logits, fc1, bias1, fc2_weight, **attributes)
    if gating == "unit":
        y = op.Mul(y, op.CastLike(op.Constant(value_float=float(top_k)), y))
    return op.Reshape(y, op.Shape(x))


def _constant(value: float, like):
    return op.CastLike(op.Constant(value_float=value), like)


def _gelu(h, tanh: bool):
    if tanh:
        cube = op.Mul(_constant(0.044715, h), op.Mul(h, op.Mul(h, h)))
        inner = op.Tanh(op.Mul(_constant(math.sqrt(2 / math.pi), h), op.Add(h, cube)))
    else:
        inner = op.Erf(op.Mul(h, _constant(1 / math.sqrt(2), h)))
    return op.Mul(op.Mul(_constant(0.5, h), h), op.Add(_constant(1.0, h), inner))


# `sparsec.ops.moe.ACTIVATIONS` in ONNX ops of opset 18 (`tests/passes/test_ffn_to_moe_activations.py` holds each to
# the PyTorch function in ONNX Runtime).
ACTIVATIONS = {
    "silu": lambda h: op.Mul(h, op.Sigmoid(h)),
    "gelu": lambda h: _gelu(h, tanh=False),
    "gelu_tanh": lambda h: _gelu(h, tanh=True),
    "relu": lambda h: op.Relu(h),
    "relu2": lambda h: op.Mul(op.Relu(h), op.Relu(h)),
    "quick_gelu": lambda h: op.Mul(h, op.Sigmoid(op.Mul(_constant(1.702, h), h))),
    "relu6": lambda h: op.Clip(h, _constant(0.0, h), _constant(6.0, h)),
    "leaky_relu": lambda h: op.LeakyRelu(h, alpha=0.01),
    "sigmoid": lambda h: op.Sigmoid(h),
    "tanh": lambda h: op.Tanh(h),
    "mish": lambda h: op.Mul(h, op.Tanh(op.Softplus(h))),
    "hardswish": lambda h: op.HardSwish(h),
}


def _expert_linear(xs, weight, bias, index):
    """xs @ weight[index].T (+ bias[index])."""
    w = op.Gather(weight, index, axis=0)
    if bias is None:
        return op.Gemm(xs, w, transB=1)
    return op.Gemm(xs, w, op.Gather(bias, index, axis=0), transB=1)


def _expert_bias(bias, weight, index):
    """bias[index], or zeros of the expert's width when the projection has none."""
    if bias is not None:
        return op.Gather(bias, index, axis=0)
    return op.ConstantOfShape(op.Constant(value_ints=[_static_dim(weight, 1)]))


def moe_standard(
    x,
    router_weight,
    router_bias,
    fc1_weight,
    fc1_bias,
    fc3_weight,
    fc3_bias,
    fc2_weight,
    top_k: int,
    activation: str,
    gating: str,
):
    return _moe_standard(
        x,
        router_weight,
        router_bias,
        fc1_weight,
        fc1_bias,
        fc3_weight,
        fc3_bias,
        fc2_weight,
        top_k,
        activation,
        gating,
        scatter_reduction=True,
    )


def moe_standard_without_scatter_reduction(
    x,
    router_weight,
    router_bias,
    fc1_weight,
    fc1_bias,
    fc3_weight,
    fc3_bias,
    fc2_weight,
    top_k: int,
    activation: str,
    gating: str,
):
    return _moe_standard(
        x,
        router_weight,
        router_bias,
        fc1_weight,
        fc1_bias,
        fc3_weight,
        fc3_bias,
        fc2_weight,
        top_k,
        activation,
        gating,
        scatter_reduction=False,
    )


def _moe_standard(
    x,
    router_weight,
    router_bias,
    fc1_weight,
    fc1_bias,
    fc3_weight,
    fc3_bias,
    fc2_weight,
    top_k: int,
    activation: str,
    gating: str,
    scatter_reduction: bool,
):
    x2 = _rows(x)
    logits = _router_logits(x2, router_weight, router_bias)
    logits = op.Cast(logits, to=onnxscript.FLOAT.dtype)
    if gating == "one_plus_logit":  # raw logits; TopK keeps the lower index on ties, as `route` does
        top_p, chosen = op.TopK(logits, op.Constant(value_ints=[top_k]), axis=-1)
        top_p = op.Add(top_p, op.Constant(value_float=1.0))
    else:
        top_p, chosen = op.TopK(op.Softmax(logits, axis=-1), op.Constant(value_ints=[top_k]), axis=-1)
    if gating == "renormalized":
        top_p = op.Div(top_p, op.ReduceSum(top_p, op.Constant(value_ints=[1]), keepdims=1))
    zero = op.CastLike(op.Constant(value_float=0.0), x2)
    width = op.Constant(value_ints=[_static_dim(fc2_weight, 1)])
    out = zeros = op.Expand(zero, op.Concat(op.Shape(x2, end=1), width, axis=0))
    for e in range(_static_dim(fc1_weight, 0)):
        index = op.Constant(value_int=e)
        hit = op.Equal(chosen, op.Constant(value_ints=[e]))
        routed = op.Greater(
            op.ReduceSum(op.Cast(hit, to=onnxscript.INT64.dtype), op.Constant(value_ints=[1]), keepdims=0),
            op.Constant(value_int=0),
        )
        if not scatter_reduction:
            routed = op.Cast(routed, to=onnxscript.FLOAT.dtype)
        tokens = op.Reshape(op.NonZero(routed), op.Constant(value_ints=[-1]))
        xs = op.Gather(x2, tokens, axis=0)
        if fc3_weight is None:
            h = ACTIVATIONS[activation](_expert_linear(xs, fc1_weight, fc1_bias, index))
        else:  # gate and up in one GEMM (the weights are constants: the Concat folds away)
            gate_up = op.Concat(op.Gather(fc1_weight, index, axis=0), op.Gather(fc3_weight, index, axis=0), axis=0)
            projected = op.Gemm(xs, gate_up, transB=1)
            if fc1_bias is not None or fc3_bias is not None:
                projected = op.Add(
                    projected,
                    op.Concat(
                        *(_expert_bias(b, w, index) for b, w in ((fc1_bias, fc1_weight), (fc3_bias, fc3_weight))),
                        axis=0,
                    ),
                )
            gate, up = op.Split(projected, num_outputs=2, axis=1)
            h = op.Mul(ACTIVATIONS[activation](gate), up)
        y = op.Gemm(h, op.Gather(fc2_weight, index, axis=0), transB=1)
        if gating != "unit":
            weight = op.ReduceSum(
                op.Where(hit, top_p, op.CastLike(zero, top_p)), op.Constant(value_ints=[1]), keepdims=0
            )
            y = op.Mul(y, op.CastLike(op.Unsqueeze(op.Gather(weight, tokens, axis=0), [1]), y))
        if scatter_reduction:
            out = op.ScatterND(out, op.Unsqueeze(tokens, [1]), y, reduction="add")
        else:
            out = op.Add(out, op.ScatterND(zeros, op.Unsqueeze(tokens, [1]), y))
    return op.Reshape(out, op.Concat(op.Shape(x, end=-1), width, axis=0))


def moe_translation(lowering: MoeLowering, scatter_reduction: bool = True):
    """The translation function for `custom_translation_table[torch.ops.sparsec.moe.default]`.

    `contrib` falls back to `standard` per node for FFNs ORT's kernel cannot express (see `contrib_supports`).
    `scatter_reduction=False`: the standard lowering without `ScatterND(reduction="add")` (for TensorRT).
    """
    if lowering == "standard":
        return moe_standard if scatter_reduction else moe_standard_without_scatter_reduction

    def moe_auto(
        x,
        router_weight,
        router_bias,
        fc1_weight,
        fc1_bias,
        fc3_weight,
        fc3_bias,
        fc2_weight,
        top_k: int,
        activation: str,
        gating: str,
    ):
        same_width = _static_dim(fc2_weight, 1) == _static_dim(fc1_weight, 2)
        lower = moe_contrib if contrib_supports(activation, fc3_weight is not None, same_width) else moe_standard
        return lower(
            x,
            router_weight,
            router_bias,
            fc1_weight,
            fc1_bias,
            fc3_weight,
            fc3_bias,
            fc2_weight,
            top_k,
            activation,
            gating,
        )

    return moe_auto
