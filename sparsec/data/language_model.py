"""Next-token loss of a causal language model's logits: the one definition behind perplexity in sparsec.

Position t predicts token t + 1. A prediction counts when both positions are valid (`attention_mask` 1 at t and
at t + 1), so with left or right padding only real text is scored; the first token of each sequence is never
predicted. Sums are accumulated in float64 and returned with their token count, so that batches, windows and
processes combine exactly (`NextTokenLoss.__add__`) and perplexity is `exp(nll / tokens)` over all of them.

Example::

    total = NextTokenLoss()
    for batch in batches:
        total += next_token_loss(model(**batch).logits, batch["input_ids"], batch.get("attention_mask"))
    total.perplexity
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsec.data.logits import Logits, ProjectedLogits, logit_rows

# Tokens scored per log-softmax: the float32 copy of a chunk's logits stays small at large vocabularies.
_CHUNK_TOKENS = 1024


@dataclass(frozen=True)
class NextTokenLoss:
    """A sum of negative log-likelihoods (nats) over `tokens` predicted tokens."""

    nll: float = 0.0
    tokens: int = 0

    def __add__(self, other: NextTokenLoss) -> NextTokenLoss:
        return NextTokenLoss(self.nll + other.nll, self.tokens + other.tokens)

    @property
    def mean(self) -> float:
        """Mean loss per predicted token (nats); NaN when nothing was predicted."""
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean) if self.tokens else math.nan


def next_token_loss(
    logits: Logits, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> NextTokenLoss:
    """The summed next-token loss of `logits` [batch, seq, vocab] (or `ProjectedLogits`) on `input_ids`
    [batch, seq] over valid pairs."""
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
    predicted = logits[:, :-1].reshape(-1, logits.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    if attention_mask is not None:
        valid = (attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()).reshape(-1)
        predicted, targets = predicted[valid], targets[valid]
    step = predicted.chunk_rows() if isinstance(predicted, ProjectedLogits) else _CHUNK_TOKENS
    nll = 0.0
    for start in range(0, targets.numel(), step):
        chunk = logit_rows(predicted[start : start + step]).float()
        nll += float(torch.nn.functional.cross_entropy(chunk, targets[start : start + step], reduction="sum").double())
    return NextTokenLoss(nll, int(targets.numel()))
