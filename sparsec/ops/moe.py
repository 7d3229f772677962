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

Gating "one_plus_logit" is the paper's MoE ("Understanding and Harnessing Sparsity in Unified Multimodal
Models", its repository's `Qwen2MoeSparseMoeBlock`): no softmax, the k largest raw logits pick the experts and
each chosen expert is weighted `1 + logit`, so a zero router (the paper's initialisation) gives exactly the sum
of k experts and training moves the weights away from 1. Ties (every logit of a zero router ties) pick the
lowest expert indices (a stable sort), which is what ONNX TopK does, so a zero router routes tokens to experts
0..k-1 in PyTorch, in the decomposition and in ONNX alike; the paper's code uses `torch.topk`, whose choice among
ties is unspecified (on the CPU it picks high indices), which only matters before the router is trained. The
paper computes the logits and `1 + logit` in the model's dtype (bfloat16); here they are float32 like every
gating. Its gated shared expert, `shared(x) * (1 + gate_shared(x))`, lies outside this op (`ffn_to_moe`).

Under "unit" gating the router still gets a gradient when one is asked for (straight-through: the forward
weight is exactly 1, the backward sees d weight / d p = 1), so routers can be tuned end to end.

The kernel is sparse: token-expert pairs are grouped by expert and each expert runs its matmuls over its own
tokens only (`torch._grouped_mm` on CUDA for bfloat16, a loop of matmuls elsewhere). The op has a fake
implementation (export, shape propagation), an autograd formula (recomputation through the differentiable
kernel), a FLOP formula (`FlopCounterMode` counts what the op really computes: k experts per token) and a
decomposition into ATen ops (`DECOMPOSITIONS`) for compilers that run no Python, such as AOTInductor.

Example::
    y = torch.ops.sparsec.moe(x, router_w, None, fc1, None, fc3, None, fc2, 2, "silu", "unit")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

# The elementwise activations an expert may apply, by name (transformers' `ACT2FN` names where it has one:
# `relu2` is squared ReLU, `quick_gelu` x * sigmoid(1.702 x)); each has an ONNX lowering (`onnx_moe.ACTIVATIONS`).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: torch.square(F.relu(x)),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "mish": F.mish,
    "hardswish": F.hardswish,
}
GATINGS = ("unit", "softmax", "renormalized", "one_plus_logit")
Gating = Literal["unit", "softmax", "renormalized", "one_plus_logit"]


def router_logits(x: Tensor, router_weight: Tensor, router_bias: Tensor | None = None) -> Tensor:
    """[..., H] -> [..., E] router logits, computed in float32."""
    return F.linear(x.float(), router_weight.float(), None if router_bias is None else router_bias.float())


def route(logits: Tensor, top_k: int, gating: Gating = "unit") -> tuple[Tensor, Tensor]:
    """(weights [T, k] float32, experts [T, k] int64) for router logits [T, E]; see the module docstring."""
    if gating not in GATINGS:
        raise ValueError(f"gating must be one of {GATINGS}, got {gating!r}")
    if gating == "one_plus_logit":
        top, experts = logits.float().sort(dim=-1, descending=True, stable=True)
        return 1.0 + top[..., :top_k], experts[..., :top_k]
    probs = torch.softmax(logits.float(), dim=-1)
    top_p, experts = probs.topk(top_k, dim=-1)
    if gating == "softmax":
        return top_p, experts
    if gating == "renormalized":
        return top_p / top_p.sum(-1, keepdim=True), experts
    if torch.is_grad_enabled() and top_p.requires_grad:
        return 1.0 + (top_p - top_p.detach()), experts  # straight-through: forward exactly 1
    return torch.ones_like(top_p), experts


def _pad_last(t: Tensor, multiple: int) -> Tensor:
    """`t` with its last dim zero-padded to a multiple of `multiple`."""
    extra = -t.shape[-1] % multiple
    return F.pad(t, (0, extra)) if extra else t


def _experts_grouped(
    xs: Tensor,
    sorted_experts: Tensor,
    num_experts: int,
    fc1: tuple[Tensor, Tensor | None],
    fc3: tuple[Tensor | None, Tensor | None],
    fc2_weight: Tensor,
    act: Callable[[Tensor], Tensor],
) -> Tensor:
    """The experts on rows `xs` sorted by expert (`sorted_experts`, ascending) with `torch._grouped_mm`: three grouped
    GEMMs whose shapes depend only on the number of rows, so the computation traces (export, Inductor) and each
    expert multiplies its own rows only.

    `_grouped_mm` needs 16-byte aligned strides: an unaligned hidden, expert or output width is zero-padded (exact:
    zero weights add nothing, and act(0) * 0 = 0 for every supported activation).
    """
    multiple = max(1, 16 // xs.element_size())
    counts = torch.zeros(num_experts, dtype=torch.int64, device=xs.device)
    offsets = counts.scatter_add(0, sorted_experts, torch.ones_like(sorted_experts)).cumsum(0).to(torch.int32)

    def linear(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        width = weight.shape[1]
        weight = _pad_last(weight, multiple)
        if weight.shape[1] % multiple:
            weight = F.pad(weight, (0, 0, 0, -weight.shape[1] % multiple))
        out = torch._grouped_mm(_pad_last(rows, multiple), weight.transpose(1, 2), offs=offsets)[:, :width]
        return out if bias is None else out + bias.index_select(0, sorted_experts)

    h = act(linear(xs, *fc1))
    if fc3[0] is not None:
        h = h * linear(xs, *fc3)
    return linear(h, fc2_weight, None)


def _experts_loop(
    xs: Tensor,
    sorted_experts: Tensor,
    num_experts: int,
    fc1: tuple[Tensor, Tensor | None],
    fc3: tuple[Tensor | None, Tensor | None],
    fc2_weight: Tensor,
    act: Callable[[Tensor], Tensor],
) -> Tensor:
    """The experts on rows `xs` sorted by expert, one matmul chain per expert on its own rows. Traceable: the row
    counts become unbacked sizes (`torch._check` states what they add up to), which Inductor compiles."""
    counts = torch.zeros(num_experts, dtype=torch.int64, device=xs.device)
    sizes = counts.scatter_add(0, sorted_experts, torch.ones_like(sorted_experts)).tolist()
    for n in sizes:
        torch._check(n >= 0)
    torch._check(sum(sizes) == xs.shape[0])
    outs = []
    for e, chunk in enumerate(xs.split(sizes)):
        h = act(F.linear(chunk, fc1[0][e], None if fc1[1] is None else fc1[1][e]))
        if fc3[0] is not None:
            h = h * F.linear(chunk, fc3[0][e], None if fc3[1] is None else fc3[1][e])
        outs.append(F.linear(h, fc2_weight[e]))
    return torch.cat(outs)


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

    `grouped`: run the experts as grouped GEMMs (`torch._grouped_mm`, which traces in bfloat16 only; on the CPU its
    AOTInductor call fails) or one matmul chain per expert. None: grouped on CUDA for bfloat16 inputs. Both forms
    trace (`DECOMPOSITIONS`).
    """
    num_experts = fc1_weight.shape[0]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    weights, experts = route(router_logits(x2, router_weight, router_bias), top_k, gating)
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    token_of = order // top_k
    if grouped is None:
        grouped = x.is_cuda and x.dtype == torch.bfloat16
    run_experts = _experts_grouped if grouped else _experts_loop
    ys = run_experts(
        x2.index_select(0, token_of),
        flat.index_select(0, order),
        num_experts,
        (fc1_weight, fc1_bias),
        (fc3_weight, fc3_bias),
        fc2_weight,
        ACTIVATIONS[activation],
    )
    # under unit gating the forward weights are exactly 1: skip the multiply unless a gradient needs it
    ys = ys.float()
    if not (gating == "unit" and not weights.requires_grad):
        ys = ys * weights.reshape(-1).index_select(0, order).unsqueeze(-1)
    # the k experts of a token are summed in float32 (AOTInductor's CPU index_add has no bfloat16 kernel either)
    out = torch.zeros(x2.shape[0], fc2_weight.shape[1], device=x.device).index_add(0, token_of, ys)
    return out.to(x.dtype).reshape(*shape[:-1], fc2_weight.shape[1])


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


DECOMPOSITIONS = {torch.ops.sparsec.moe.default: moe_forward}
"""`sparsec::moe` in ATen ops only (routing, sort by expert, the experts' matmuls, `index_add`): what a compiler that
cannot call back into Python (AOTInductor) compiles in the op's place, `exported.run_decompositions(DECOMPOSITIONS)`.
`moe_forward` traces: on CUDA in bfloat16 the experts are grouped GEMMs, elsewhere one matmul chain per expert over
its rows, with the row counts as unbacked sizes."""
