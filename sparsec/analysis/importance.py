"""Neuron and head importance: how much each FFN neuron or attention head contributes, the score width, head and
MoE rewrites select by.

- `activation` (needs calibration): score_j = E[|h_j|] * ||W_down[:, j]||_2, with h the input of W_down,
  averaged over valid calibration tokens (activation magnitude times the weight it feeds);
- `magnitude` (no data): ||W_down[:, j]||_2 * ||W_up[j, :]||_2 (* ||W_gate[j, :]||_2 if gated);
- `random`: a seeded baseline.

A query head's activation importance is the norm of what it writes through the attention's output projection,
||W_o[:, cols_h] a_h(t)||_2 over valid tokens t (`head_contribution_sums`; a_h: its columns of the projection's
input), shared by `prune_heads` and the probe's head sweep.

Example::
    scores = neuron_importance(program, region_index(program).ffns(), "activation", ctx.statistics)
    scores[0].shape   # one score per neuron of the first FFN
    # torch.Size([128])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from sparsec.analysis.dependency import linear_weight
from sparsec.analysis.ffn import Ffn
from sparsec.analysis.heads import Attention

Importance = Literal["activation", "magnitude", "random"]
IMPORTANCES = ("activation", "magnitude", "random")


def neuron_importance(
    program, ffns: Sequence[Ffn], kind: Importance, statistics=None, seed: int = 0
) -> list[torch.Tensor]:
    """One float score per neuron for each FFN in `ffns` (`statistics`: a `StatisticsCache`, for `activation`)."""
    if kind == "activation":
        if statistics is None:
            raise ValueError("activation importance needs calibration statistics")
        stats = statistics.get([f.down.args[0] for f in ffns])
        return [stats[f.down.args[0].name].mean_abs * linear_weight(program, f.down).float().norm(dim=0) for f in ffns]
    if kind == "magnitude":
        scores = []
        for f in ffns:
            up = linear_weight(program, f.up).float().norm(dim=1)
            score = linear_weight(program, f.down).float().norm(dim=0) * up.narrow(0, *f.row_blocks("up"))
            if f.gate is not None:
                score = score * linear_weight(program, f.gate).float().norm(dim=1)
            elif f.gate_half is not None:
                score = score * up.narrow(0, *f.row_blocks("gate"))
            scores.append(score)
        return scores
    if kind == "random":
        gen = torch.Generator().manual_seed(seed)
        return [torch.rand(f.intermediate_size, generator=gen) for f in ffns]
    raise ValueError(f"importance must be one of {IMPORTANCES}, got {kind!r}")


def output_weight(program, attention: Attention) -> torch.Tensor:
    """The attention's output projection weight as [out, in] float32 (a Conv1D weight stored [in, out] transposed)."""
    weight = program.state_tensor(attention.output_weight.name).float()
    return weight if attention.output_weight.dim == 1 else weight.t()


def head_contribution_sums(attention: Attention, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per query head h, the sum over the rows of `x` ([T, in]: the output projection's input at valid tokens) of
    ||W_o[:, cols_h] x[:, cols_h]||_2, float64 [num_heads]; `weight`: `output_weight`. Divide by T for the mean."""
    x = x.float()
    sums = torch.zeros(attention.num_heads, dtype=torch.float64)
    for h in range(attention.num_heads):
        columns = attention.output_columns(h)
        sums[h] = (x[:, columns] @ weight[:, columns].t()).norm(dim=-1).double().sum()
    return sums
