"""`next_token_loss` against a hand computation with left padding and a chunked vocabulary."""

import math

import torch

from sparsec.data import language_model
from sparsec.data.language_model import NextTokenLoss, next_token_loss


def test_next_token_loss_matches_hand_computation_with_left_padding(monkeypatch):
    monkeypatch.setattr(language_model, "_CHUNK_TOKENS", 3)  # several chunks
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    expected, count = 0.0, 0
    for b in range(2):
        for t in range(4):
            if mask[b, t] and mask[b, t + 1]:
                expected -= float(torch.log_softmax(logits[b, t].double(), -1)[ids[b, t + 1]])
                count += 1
    got = next_token_loss(logits, ids, mask)
    assert got.tokens == count == 6
    assert math.isclose(got.nll, expected, rel_tol=1e-6)
    assert math.isclose(got.perplexity, math.exp(expected / count), rel_tol=1e-6)


def test_losses_add_over_batches():
    torch.manual_seed(1)
    logits, ids = torch.randn(4, 6, 7), torch.randint(0, 7, (4, 6))
    whole = next_token_loss(logits, ids)
    parts = next_token_loss(logits[:1], ids[:1]) + next_token_loss(logits[1:], ids[1:])
    assert parts.tokens == whole.tokens == 20
    assert math.isclose(parts.nll, whole.nll, rel_tol=1e-6)
    assert math.isnan(NextTokenLoss().perplexity)
