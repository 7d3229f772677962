"""The distillation loss on logits that are never held whole: KL(teacher || student) projected a few rows at a time.

Training against a teacher through whole logits holds, for one batch, the student's logits, the teacher's, both
log-softmaxes and the gradient: eight [tokens, vocab] float32 tensors, 8.6 GB for 8 x 128 tokens at a 262,144-token
vocabulary. Where the student's logits are `ProjectedLogits` (`sparsec.data.logits`), `projected_kl` projects
`chunk_rows` tokens at a time and computes the loss and its gradient together: d KL / d logits is
(softmax(student) - softmax(teacher)) / tokens, which needs only that chunk, so the gradient with respect to the
hidden states, the projection's weight and its bias is accumulated chunk by chunk in the forward pass (the way
fused linear cross-entropy kernels do it) and backward only scales it. The loss is `kl_logits`' to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsec.data.logits import Logits, ProjectedLogits, logit_rows


def projected_kl(student: ProjectedLogits, teacher: Logits) -> torch.Tensor:
    """Mean over token rows of KL(softmax(teacher) || softmax(student)) in float32, for token rows [T, vocab]
    (`token_vectors` of a batch's logits); differentiable in the student's hidden states, weight and bias, with
    at most `student.chunk_rows()` rows of logits held at a time."""
    if student.dim() != 2 or tuple(student.shape) != tuple(teacher.shape):
        raise ValueError(f"token rows of equal shape expected, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    inputs = (student.hidden, student.weight, student.bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _ProjectedKL.apply(*inputs, teacher)
    with torch.no_grad():
        return _kl_pass(student, teacher, _Gradients.none()).loss


@dataclass
class _Gradients:
    """The gradient of the mean KL with respect to each input that needs one (None: not wanted)."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    @staticmethod
    def none() -> _Gradients:
        return _Gradients(None, None, None)

    @staticmethod
    def for_inputs(student: ProjectedLogits, wanted: tuple[bool, bool, bool]) -> _Gradients:
        def zeros(tensor: torch.Tensor | None, want: bool, dtype: torch.dtype | None = None):
            return torch.zeros_like(tensor, dtype=dtype) if want and tensor is not None else None

        return _Gradients(
            zeros(student.hidden, wanted[0]),
            zeros(student.weight, wanted[1], torch.float32),
            zeros(student.bias, wanted[2], torch.float32),
        )


@dataclass
class _Pass:
    loss: torch.Tensor
    gradients: _Gradients


def _kl_pass(student: ProjectedLogits, teacher: Logits, gradients: _Gradients) -> _Pass:
    """The mean KL over the rows and, into `gradients`, its gradient: one chunk of rows at a time."""
    tokens = student.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=student.hidden.device)
    step = student.chunk_rows()
    for start in range(0, tokens, step):
        rows = slice(start, min(start + step, tokens))
        hidden = student.hidden[rows]
        log_s = F.linear(hidden, student.weight, student.bias).float().log_softmax(-1)
        log_t = logit_rows(teacher[rows]).float().log_softmax(-1)
        p_t = log_t.exp()
        total += (p_t * (log_t - log_s)).sum().double()
        if gradients.hidden is None and gradients.weight is None and gradients.bias is None:
            continue
        grad = (log_s.exp() - p_t) / tokens  # d mean KL / d student logits
        del log_s, log_t, p_t
        _accumulate(gradients, grad, hidden, student.weight, rows)
    return _Pass((total / max(tokens, 1)).float(), gradients)


def _accumulate(
    gradients: _Gradients, grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, rows: slice
) -> None:
    """Back through `linear(hidden, weight, bias)` for one chunk, as autograd would: the logits' gradient in the
    projection's dtype, matrix products in it, weight and bias gradients summed over chunks in float32."""
    grad = grad.to(weight.dtype)
    if gradients.hidden is not None:
        gradients.hidden[rows] = (grad @ weight).to(gradients.hidden.dtype)
    if gradients.weight is not None:
        gradients.weight += (grad.t() @ hidden.to(weight.dtype)).float()
    if gradients.bias is not None:
        gradients.bias += grad.float().sum(0)


class _ProjectedKL(torch.autograd.Function):
    """`projected_kl` under autograd: the forward pass computes the gradients, backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher):
        student = ProjectedLogits(hidden, weight, bias)
        result = _kl_pass(student, teacher, _Gradients.for_inputs(student, tuple(ctx.needs_input_grad[:3])))
        ctx.gradients = result.gradients
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return result.loss

    @staticmethod
    def backward(ctx, grad_loss):
        g = ctx.gradients
        ctx.gradients = None  # a second backward through the same loss is an error, as after any freed graph
        if g is None:
            raise RuntimeError("projected_kl: backward through the same loss twice")
        scale = grad_loss.float()
        hidden = None if g.hidden is None else g.hidden * scale.to(g.hidden.dtype)
        weight = None if g.weight is None else (g.weight * scale).to(ctx.dtypes[0])
        bias = None if g.bias is None else (g.bias * scale).to(ctx.dtypes[1])
        return hidden, weight, bias, None
