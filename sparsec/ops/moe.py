"""The sparsec mixture-of-experts operator, `torch.ops.sparsec.moe`: one definition of routing and a sparse kernel.

An MoE FFN made from a dense FFN holds E experts, each the sub-FFN of a set of the dense FFN's neurons,
stacked in the layout of `nn.Linear` weights (so expert e is exactly `down[:, n_e] act(gate[n_e] x) * up[n_e] x`
for its neurons n_e):

    fc1_weight [E, I_e, H]  (+ fc1_bias [E, I_e])   gate rows (gated FFN) or fc1 rows (plain FFN): activated
    fc3_weight [E, I_e, H]  (+ fc3_bias [E, I_e])   up rows (gated FFN only): multiplies the activation
    fc2_weight [E, O, I_e]                          down columns (O: output width, usually H); the dense
                                                    down bias stays outside the op

Routing, the one definition used by the PyTorch op, both ONNX lowerings and router training (`route`):

    logits = x @ router_weight.T (+ router_bias);  p = softmax(logits) over the E experts (in float32)
    experts = top_k(p)  (the k largest; ties are broken by torch.topk and may differ between runtimes)
    weight  = 1                      gating "unit" (default: with top_k == E the MoE equals the dense FFN)
            | p[experts]             gating "softmax"
            | p[experts] / sum(...)  gating "renormalized"
    y = sum over the chosen experts of weight * expert(x)

Under "unit" gating the router still gets a gradient when one is asked for (straight-through: the forward
weight is exactly 1, the backward sees d weight / d p = 1), so routers can be tuned end to end.

The kernel is sparse: token-expert pairs are grouped by expert and each expert runs its matmuls over its own
tokens only (`torch._grouped_mm` on CUDA for bfloat16, a loop of matmuls elsewhere). The op has a fake
implementation (export, shape propagation), an autograd formula (recomputation through the differentiable
kernel) and a FLOP formula (`FlopCounterMode` counts what the op really computes: k experts per token).

Example::
    y = torch.ops.sparsec.moe(x, router_w, None, fc1, None, fc3, None, fc2, 2, "silu", "unit")
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
GATINGS = ("unit", "softmax", "renormalized")
Gating = Literal["unit", "softmax", "renormalized"]


def router_logits(x: Tensor, router_weight: Tensor, router_bias: Tensor | None = None) -> Tensor:
    """[..., H] -> [..., E] router logits, computed in float32."""
    return F.linear(x.float(), router_weight.float(), None if router_bias is None else router_bias.float())


def route(logits: Tensor, top_k: int, gating: Gating = "unit") -> tuple[Tensor, Tensor]:
    """(weights [T, k] float32, experts [T, k] int64) for router logits [T, E]; see the module docstring."""
    if gating not in GATINGS:
        raise ValueError(f"gating must be one of {GATINGS}, got {gating!r}")
    probs = torch.softmax(logits.float(), dim=-1)
    top_p, experts = probs.topk(top_k, dim=-1)
    if gating == "softmax":
        return top_p, experts
    if gating == "renormalized":
        return top_p / top_p.sum(-1, keepdim=True), experts
    if torch.is_grad_enabled() and top_p.requires_grad:
        return 1.0 + (top_p - top_p.detach()), experts  # straight-through: forward exactly 1
    return torch.ones_like(top_p), experts


def _linear_grouped(xs: Tensor, weight: Tensor, bias: Tensor | None, offsets: Tensor, counts: list[int]) -> Tensor:
    """Rows of `xs` grouped by expert (`counts` each) times each expert's [out, in] `weight` (+ bias)."""
    out = torch._grouped_mm(xs, weight.transpose(1, 2), offs=offsets)
    if bias is not None:
        out = out + torch.repeat_interleave(bias, torch.tensor(counts, device=xs.device), dim=0)
    return out


def moe_forward(
    x: Tensor,
    router_weight: Tensor,
    router_bias: Tensor | None,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc3_weight: Tensor | None,
    fc3_bias: Tensor | None,
    fc2_weight: Tensor,
    top_k: int,
    activation: str,
    gating: Gating = "unit",
    grouped: bool | None = None,
) -> Tensor:
    """The MoE FFN on `x` [..., H] -> [..., O] (differentiable; the op below runs it without autograd).

    `grouped`: use `torch._grouped_mm` (None: on CUDA for bfloat16 inputs only).
    """
    num_experts = fc1_weight.shape[0]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    act = ACTIVATIONS[activation]
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    weights, experts = route(router_logits(x2, router_weight, router_bias), top_k, gating)
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    token_of = order // top_k
    counts_t = torch.bincount(flat, minlength=num_experts)
    counts = counts_t.tolist()
    xs = x2.index_select(0, token_of)
    if grouped is None:
        grouped = x.is_cuda and x.dtype == torch.bfloat16
    # under unit gating the forward weights are exactly 1: skip the multiply unless a gradient needs it
    scale = None if gating == "unit" and not weights.requires_grad else weights.reshape(-1).index_select(0, order)
    out = x2.new_zeros(x2.shape[0], fc2_weight.shape[1])
    if grouped:
        offsets = counts_t.cumsum(0).to(torch.int32)
        h = act(_linear_grouped(xs, fc1_weight, fc1_bias, offsets, counts))
        if fc3_weight is not None:
            h = h * _linear_grouped(xs, fc3_weight, fc3_bias, offsets, counts)
        ys = _linear_grouped(h, fc2_weight, None, offsets, counts)
        out.index_add_(0, token_of, ys if scale is None else ys * scale.to(ys.dtype).unsqueeze(-1))
        return out.reshape(*shape[:-1], fc2_weight.shape[1])
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        chunk = xs[start : start + n]
        h = act(F.linear(chunk, fc1_weight[e], None if fc1_bias is None else fc1_bias[e]))
        if fc3_weight is not None:
            h = h * F.linear(chunk, fc3_weight[e], None if fc3_bias is None else fc3_bias[e])
        y = F.linear(h, fc2_weight[e])
        if scale is not None:
            y = y * scale[start : start + n].to(y.dtype).unsqueeze(-1)
        out.index_add_(0, token_of[start : start + n], y)
        start += n
    return out.reshape(*shape[:-1], fc2_weight.shape[1])


@torch.library.custom_op("sparsec::moe", mutates_args=())
def moe(
    x: Tensor,
    router_weight: Tensor,
    router_bias: Tensor | None,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc3_weight: Tensor | None,
    fc3_bias: Tensor | None,
    fc2_weight: Tensor,
    top_k: int,
    activation: str,
    gating: str,
) -> Tensor:
    """Mixture-of-experts FFN; see the module docstring for layouts and routing."""
    with torch.no_grad():
        return moe_forward(
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


@moe.register_fake
def _moe_fake(
    x, router_weight, router_bias, fc1_weight, fc1_bias, fc3_weight, fc3_bias, fc2_weight, top_k, activation, gating
):
    torch._check(router_weight.shape[0] == fc1_weight.shape[0], lambda: "router and experts disagree on E")
    torch._check(fc1_weight.shape[2] == x.shape[-1], lambda: "fc1_weight must be [E, I_e, H]")
    return x.new_empty(*x.shape[:-1], fc2_weight.shape[1])


_TENSOR_ARGS = 8  # x, router_weight, router_bias, fc1_weight, fc1_bias, fc3_weight, fc3_bias, fc2_weight


def _setup_context(ctx, inputs, output) -> None:
    tensors = inputs[:_TENSOR_ARGS]
    ctx.present = [t is not None for t in tensors]
    ctx.save_for_backward(*[t for t in tensors if t is not None])
    ctx.attrs = inputs[_TENSOR_ARGS:]


def _backward(ctx, grad: Tensor):
    saved = iter(ctx.saved_tensors)
    tensors = [next(saved) if present else None for present in ctx.present]
    leaves = [
        None if t is None else t.detach().requires_grad_(need)
        for t, need in zip(tensors, ctx.needs_input_grad[:_TENSOR_ARGS])
    ]
    wanted = [t for t, need in zip(leaves, ctx.needs_input_grad) if t is not None and need]
    with torch.enable_grad():
        out = moe_forward(*leaves, *ctx.attrs)
        # no token reached an expert (e.g. a batch without generation tokens in a MoT): no gradient flows
        found = iter(
            torch.autograd.grad(out, wanted, grad, allow_unused=True) if out.requires_grad else [None] * len(wanted)
        )
    grads = [next(found) if t is not None and need else None for t, need in zip(leaves, ctx.needs_input_grad)]
    return (*grads, None, None, None)


moe.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.sparsec.moe)
def _moe_flops(x_shape, router_shape, _rb, fc1_shape, _b1, fc3_shape, _b3, fc2_shape, top_k, *args, **kwargs) -> int:
    tokens = 1
    for d in x_shape[:-1]:
        tokens *= d
    num_experts, width, hidden = fc1_shape
    matrices = 3 if fc3_shape is not None else 2
    return 2 * tokens * hidden * num_experts + 2 * tokens * top_k * matrices * width * hidden


def moe_dense_reference(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc3_weight: Tensor | None,
    fc3_bias: Tensor | None,
    fc2_weight: Tensor,
    activation: str,
    hidden: bool = False,
) -> Tensor:
    """Every expert on every token: outputs [..., E, O] (or the activations [..., E, I_e] with `hidden`).

    An all-experts computation for fitting routers and for tests, not for serving.
    """
    h = ACTIVATIONS[activation](torch.einsum("...h,eih->...ei", x, fc1_weight) + (0 if fc1_bias is None else fc1_bias))
    if fc3_weight is not None:
        h = h * (torch.einsum("...h,eih->...ei", x, fc3_weight) + (0 if fc3_bias is None else fc3_bias))
    return h if hidden else torch.einsum("...ei,ehi->...eh", h, fc2_weight)
