"""Quality: how far a transformed program's outputs are from the reference, and the gates on that.

Metrics per output, over valid tokens only (attention_mask == 1), each a vector along the last dim:
- `cosine`: mean per-token cosine similarity;
- `rel_l2`: ||cand - ref|| / ||ref|| over the whole output;
- `max_abs`, `mean_abs`: absolute error;
- for logits (outputs named `*logits*`): `top1` agreement of the argmax and `kl`, the mean
  KL(softmax(ref) || softmax(cand)) per token;
- for a causal language model's `logits` (`compare_programs`, `is_causal_lm`): `perplexity`, `dense_perplexity`
  (the reference's) and `ppl_ratio`, from the next-token loss over valid tokens
  (`sparsec.data.language_model.next_token_loss`);
- with `percentiles` (backend parity, `sparsec.data.parity`): the error distribution over valid entries,
  `p{q}_abs` of |cand - ref| and `max_rel`, `mean_rel`, `p{q}_rel` of the relative error
  |cand - ref| / max(|ref|, 1e-3 * rms(ref_token)) (the floor, relative to each token's RMS, keeps entries
  where the reference crosses zero finite). Percentiles are exact up to `PERCENTILE_SAMPLES` entries per
  output, beyond that computed on a seeded uniform sample of that many (`percentile_entries` says how many).

Entries the reference holds at its dtype's lowest value and the candidate at that value too, or at or below
float16's lowest (-65504: where an FP16 backend clamps the same mask), are masked by the model (Chameleon bans
image tokens from its text logits with `finfo.min`): they count as equal and leave `cosine`, `rel_l2` and the
absolute errors, which they would otherwise swamp (rel_l2 ~1e-46 whatever the rest does); `top1` and `kl` keep
them. Token vectors equal on both sides (all zeros, e.g. a padding embedding's logits) have cosine 1.

`Bounds` (output glob -> metric bounds) is the one way to bound these metrics: the recipe's `quality:` gates
(`QualityGates.bounds()`) and the backend parity tolerances (`sparsec.data.parity`) are both `Bounds`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from sparsec.data.calibration import CalibrationSet
from sparsec.data.language_model import NextTokenLoss, next_token_loss
from sparsec.data.logits import Logits, ProjectedLogits, logit_rows, logits_run
from sparsec.errors import RecipeError, SparsecError
from sparsec.ir.paths import glob_match

PERCENTILE_SAMPLES = 1 << 22
REL_FLOOR = 1e-3
CHUNK_ENTRIES = 1 << 20  # entries per metric chunk: 8 MiB per float64 temporary


def _token_chunks(ref: Logits, cand: Logits, mask: torch.Tensor | None):
    """(ref, cand) token vectors [T, C] over valid tokens, a few at a time (`CHUNK_ENTRIES` entries at most,
    one token at least), without copying the whole batch first; `ProjectedLogits` are projected
    `ProjectedLogits.chunk_rows` tokens at a time."""
    if mask is not None and ref.dim() >= 3 and tuple(ref.shape[:2]) == tuple(mask.shape):
        mask = mask.bool()
        rows = (
            (ref[b][mask[b]].reshape(-1, ref.shape[-1]), cand[b][mask[b]].reshape(-1, ref.shape[-1]))
            for b in range(ref.shape[0])
        )
    elif ref.dim():
        rows = [(ref.reshape(-1, ref.shape[-1]), cand.reshape(-1, cand.shape[-1]))]
    else:
        rows = [(ref.reshape(1, 1), cand.reshape(1, 1))]
    for r, c in rows:
        projected = [x.chunk_rows() for x in (r, c) if isinstance(x, ProjectedLogits)]
        outer = min(projected, default=max(1, r.shape[0]))
        for first in range(0, r.shape[0], outer):
            r_rows, c_rows = logit_rows(r[first : first + outer]), logit_rows(c[first : first + outer])
            step = max(1, CHUNK_ENTRIES // max(1, r_rows.shape[-1]))
            for start in range(0, r_rows.shape[0], step):
                yield r_rows[start : start + step], c_rows[start : start + step]


def percentile_key(q: float, kind: str) -> str:
    """The metric name of percentile `q` of the `abs` or `rel` error: `p99_abs`, `p99.9_rel`."""
    return f"p{q:g}_{kind}"


class OutputComparison:
    """Accumulates the metrics of one output over batches (with `percentiles`, the error distribution too)."""

    def __init__(self, logits: bool, percentiles: Sequence[float] = ()) -> None:
        self.logits = logits
        self.percentiles = tuple(percentiles)
        self.tokens = 0
        self.cos_sum = self.err_sq = self.ref_sq = self.abs_sum = self.max_abs = 0.0
        self.rel_sum = self.max_rel = 0.0
        self.elements = 0
        self.top1 = self.kl_sum = 0.0
        self.entries = 0
        self._errors = torch.empty(0, 2)  # kept (abs, rel) pairs for the percentiles
        self._keys = torch.empty(0)
        self._generator = torch.Generator().manual_seed(0x5A3C)  # sampling keys, independent of data seeds

    def add(self, ref: Logits, cand: Logits, mask: torch.Tensor | None) -> None:
        """Accumulate one batch. Works through it in chunks of about `CHUNK_ENTRIES` entries (a few rows of
        logits), so memory stays bounded by the chunk, never by the batch: [8, 64, 151936] logits would need
        ~10 GiB of float64 temporaries at once. Each chunk is computed in float64 and the sums accumulate in
        Python floats, so the metrics do not depend on the chunking."""
        if ref.shape != cand.shape:
            raise ValueError(f"output shapes differ: reference {tuple(ref.shape)}, candidate {tuple(cand.shape)}")
        for r, c in _token_chunks(ref.detach(), cand.detach(), mask):
            self._add_tokens(r, c)

    def _add_tokens(self, ref: torch.Tensor, cand: torch.Tensor) -> None:
        """One chunk of token vectors [T, C] in the outputs' own dtype."""
        lowest = torch.finfo(ref.dtype).min
        banned = (ref == lowest) & ((cand == lowest) | (cand <= torch.finfo(torch.float16).min))
        r, c = ref.double(), cand.double()
        r_kept, c_kept = r.masked_fill(banned, 0.0), c.masked_fill(banned, 0.0)
        diff = c_kept - r_kept
        self.tokens += r.shape[0]
        self.elements += r.numel()
        cosine = F.cosine_similarity(r_kept, c_kept, dim=-1, eps=1e-12)
        self.cos_sum += float(torch.where((r_kept == c_kept).all(-1), 1.0, cosine).sum())
        self.err_sq += float((diff * diff).sum())
        self.ref_sq += float((r_kept * r_kept).sum())
        self.abs_sum += float(diff.abs().sum())
        self.max_abs = max(self.max_abs, float(diff.abs().max())) if diff.numel() else self.max_abs
        if self.logits:
            self.top1 += float((r.argmax(-1) == c.argmax(-1)).sum())
            log_p, log_q = F.log_softmax(r, -1), F.log_softmax(c, -1)
            self.kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
        if self.percentiles:
            self._add_distribution(r_kept, diff, ~banned)

    def _add_distribution(self, ref: torch.Tensor, diff: torch.Tensor, counted: torch.Tensor) -> None:
        floor = REL_FLOOR * ref.pow(2).mean(-1, keepdim=True).sqrt()
        rel = diff.abs() / torch.maximum(ref.abs(), floor).clamp_min(torch.finfo(torch.float64).tiny)
        errors = torch.stack([diff.abs()[counted], rel[counted]], -1).float()
        if not errors.numel():
            return
        self.entries += errors.shape[0]
        self.rel_sum += float(errors[:, 1].double().sum())
        self.max_rel = max(self.max_rel, float(errors[:, 1].max()))
        keys = torch.rand(errors.shape[0], generator=self._generator)
        self._errors, self._keys = torch.cat([self._errors, errors]), torch.cat([self._keys, keys])
        if self._keys.numel() > PERCENTILE_SAMPLES:  # the entries with the smallest keys: a uniform sample
            kept = self._keys.topk(PERCENTILE_SAMPLES, largest=False).indices
            self._errors, self._keys = self._errors[kept], self._keys[kept]

    def result(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        out = {
            "cosine": self.cos_sum / n,
            "rel_l2": (self.err_sq**0.5) / max(self.ref_sq**0.5, 1e-30),
            "max_abs": self.max_abs,
            "mean_abs": self.abs_sum / max(self.elements, 1),
            "tokens": self.tokens,
        }
        if self.logits:
            out["top1"] = self.top1 / n
            out["kl"] = self.kl_sum / n
        if self.percentiles:
            out["max_rel"] = self.max_rel
            out["mean_rel"] = self.rel_sum / max(self.entries, 1)
            errors = self._errors.double().numpy() if self._errors.numel() else np.zeros((1, 2))
            for kind, column in (("abs", 0), ("rel", 1)):
                for q, value in zip(self.percentiles, np.percentile(errors[:, column], self.percentiles)):
                    out[percentile_key(q, kind)] = float(value)
            out["percentile_entries"] = int(self._errors.shape[0])
        return out


def compare_outputs(
    pairs: Iterable[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], torch.Tensor | None]],
    percentiles: Sequence[float] = (),
) -> dict[str, dict[str, float]]:
    """Metrics per output name over `(reference, candidate, valid_mask)` batches.

    `percentiles` (in [0, 100]) adds the error distribution: `p{q}_abs`, `max_rel`, `mean_rel`, `p{q}_rel`.

    Example:
        >>> ref, cand = {"y": torch.tensor([[1.0, 2.0]])}, {"y": torch.tensor([[1.0, 2.5]])}
        >>> compare_outputs([(ref, cand, None)], percentiles=[50])["y"]["p50_abs"]
        0.25
    """
    comps: dict[str, OutputComparison] = {}
    for ref, cand, mask in pairs:
        _add_batch(comps, ref, cand, mask, percentiles)
        del ref, cand, mask  # not held while the next batch is computed
    return {name: c.result() for name, c in comps.items()}


def _add_batch(
    comps: dict[str, OutputComparison],
    ref: Mapping[str, torch.Tensor],
    cand: Mapping[str, torch.Tensor],
    mask: torch.Tensor | None,
    percentiles: Sequence[float],
) -> None:
    """One batch of `compare_outputs`: each floating-point output into its `OutputComparison`."""
    for name, r in ref.items():
        if not isinstance(r, ProjectedLogits) and (not torch.is_tensor(r) or not r.is_floating_point()):
            continue
        if name not in cand:
            raise ValueError(f"candidate lacks output {name!r}")
        c = cand[name] if isinstance(cand[name], ProjectedLogits) else torch.as_tensor(cand[name])
        if r.shape != c.shape:
            raise SparsecError(
                f"output {name!r} changed shape from {tuple(r.shape)} to {tuple(c.shape)}, so its quality cannot "
                "be compared with the original model's (slice_hidden narrows an encoder's hidden-state output); "
                "compare a downstream output instead, or compress something that keeps the model's outputs"
            )
        comps.setdefault(name, OutputComparison("logits" in name, percentiles)).add(r, c, mask)


PERPLEXITY_OUTPUT = "logits"  # the output whose metrics hold `perplexity`, `dense_perplexity` and `ppl_ratio`


def is_causal_lm(program) -> bool:
    """Whether a program's perplexity is measured (`compare_programs`) and `max_ppl_ratio` may gate it: it takes
    `input_ids` [batch, seq] and returns `logits` [batch, seq, vocab] over the same batch and sequence (a causal
    language model's next-token logits; not, e.g., Janus' image-token logits for a generation step)."""
    if "input_ids" not in program.input_names or PERPLEXITY_OUTPUT not in program.output_names:
        return False
    user_outputs = dict(zip(program.output_names, program.exported.graph_signature.user_outputs))
    nodes = {n.name: n for n in program.graph.nodes if n.op in ("placeholder", "call_function")}
    ids, logits = (nodes.get(name) for name in ("input_ids", user_outputs[PERPLEXITY_OUTPUT]))
    if ids is None or logits is None or "val" not in ids.meta or "val" not in logits.meta:
        return False
    ids_shape, logits_shape = ([str(d) for d in n.meta["val"].shape] for n in (ids, logits))
    return len(ids_shape) == 2 and len(logits_shape) == 3 and logits_shape[:2] == ids_shape


def compare_programs(
    program, calibration: CalibrationSet, reference: Iterable[Mapping[str, torch.Tensor]], progress: bool = False
) -> dict[str, dict[str, float]]:
    """Run `program` over the calibration set (`CalibrationSet.run`: whole-model or layer-sequential) and compare
    with the reference outputs of each batch, one batch's outputs at a time.

    For a causal language model (`is_causal_lm`) the `logits` metrics also hold `perplexity` (the program's),
    `dense_perplexity` (the reference's) and their ratio `ppl_ratio`, from the next-token loss over valid tokens
    (`sparsec.data.language_model.next_token_loss`) on the same batches. Logits that are a plain projection
    (`find_logits_head`) are never computed whole: the program runs up to their hidden states, and the metrics
    project a few tokens at a time (`sparsec.data.logits`)."""
    lm = is_causal_lm(program)
    losses = [NextTokenLoss(), NextTokenLoss()]  # the reference's, the program's
    run = logits_run(program)

    def pairs():
        references = iter(reference)
        for batch, outputs in calibration.run(
            program, progress=progress, desc="quality check", outputs_from=run.outputs_from
        ):
            outputs = run.logits(outputs)
            ref = next(references)
            mask = CalibrationSet.valid_mask(batch)
            if lm:
                losses[0] += next_token_loss(ref[PERPLEXITY_OUTPUT], batch["input_ids"], mask)
                losses[1] += next_token_loss(outputs[PERPLEXITY_OUTPUT], batch["input_ids"], mask)
            yield ref, outputs, mask
            del ref, outputs  # one batch's outputs at a time: not held while the next batch is computed

    metrics = compare_outputs(pairs())
    if lm:
        dense, compressed = losses
        metrics[PERPLEXITY_OUTPUT].update(
            perplexity=_exp(compressed.mean),
            dense_perplexity=_exp(dense.mean),
            ppl_ratio=_exp(compressed.mean - dense.mean),
        )
    return metrics


def _exp(x: float) -> float:
    """e**x, inf past float range (a broken program's loss), NaN for NaN (nothing predicted: NaN fails every gate)."""
    return math.exp(x) if x < 709.0 else x if x != x else math.inf


def describe_quality(metrics: Mapping[str, Mapping[str, float]] | None) -> str:
    """One pass's quality in a line: its agreement (`describe_agreement`), then its perplexity where it has one
    (`describe_perplexity`); empty when the pass changed nothing (no check ran).

    Example:
        >>> describe_quality({"logits": {"cosine": 0.99, "top1": 0.9, "perplexity": 31.0, "dense_perplexity": 30.0,
        ...                              "ppl_ratio": 1.0333}})
        'logits cos 0.9900 top1 0.900; ppl 31 (dense 30, x1.033)'
    """
    return "; ".join(part for part in (describe_agreement(metrics), describe_perplexity(metrics)) if part)


def describe_agreement(metrics: Mapping[str, Mapping[str, float]] | None) -> str:
    """`logits cos 0.9912 top1 0.934` per output."""
    return "; ".join(
        f"{o} cos {m['cosine']:.4f}" + (f" top1 {m['top1']:.3f}" if "top1" in m else "")
        for o, m in (metrics or {}).items()
    )


def describe_perplexity(metrics: Mapping[str, Mapping[str, float]] | None) -> str:
    """`ppl 31 (dense 30, x1.033)`: the program's perplexity, the dense program's and their ratio (`compare_programs`);
    empty for a program that has none."""
    m = (metrics or {}).get(PERPLEXITY_OUTPUT, {})
    if "ppl_ratio" not in m:
        return ""
    return f"ppl {m['perplexity']:.4g} (dense {m['dense_perplexity']:.4g}, x{m['ppl_ratio']:.3f})"


AGREEMENTS = ("cosine", "top1")  # bounded from below; every other metric is an error, bounded from above
LOGITS_ONLY = ("top1", "kl")
GATE_METRICS = ("cosine", "rel_l2", "max_abs", "mean_abs", "top1", "kl")  # what `compare_outputs` always reports


@dataclass(frozen=True)
class Bounds:
    """Bounds on quality metrics per output, the one type behind the recipe's `quality:` gates and
    `export.parity.tolerances`.

    `entries`: `{output name or glob (sparsec.ir.paths): {metric: limit or None}}`, applied in order over the
    defaults, later entries overriding earlier ones for the outputs they match; None drops a bound. A bound is
    a lower one for the agreements (`cosine`, `top1`), an upper one for every error (`rel_l2`, `kl`, `max_abs`,
    `p99_rel`, ...). `metrics`: the metric names a bound may name; `label`: the recipe key, for messages.

    Example:
        >>> bounds = Bounds({"*": {"cosine": 0.99}, "logits": {"top1": 0.9}})
        >>> bounds.failures({"logits": {"cosine": 0.95, "top1": 0.97}, "hidden": {"cosine": 0.999}})
        ['logits: cosine 0.95 < 0.99']
    """

    entries: Mapping[str, Mapping[str, float | None]] = field(default_factory=dict)
    metrics: Sequence[str] = GATE_METRICS
    label: str = "bounds"

    def __post_init__(self) -> None:
        for pattern, bounds in self.entries.items():
            for metric, limit in bounds.items():
                if metric not in self.metrics:
                    raise ValueError(
                        f"{self.label}.{pattern}.{metric}: unknown metric; bounds name one of {list(self.metrics)}"
                    )
                if limit is not None and limit < 0 and metric != "cosine":
                    raise ValueError(f"{self.label}.{pattern}.{metric}: must be >= 0, got {limit}")

    def resolve(
        self, outputs: Sequence[str], defaults: Mapping[str, float] | None = None
    ) -> dict[str, dict[str, float]]:
        """The bounds of each output: `defaults`, then the entries in order. `SparsecError` for an entry that
        matches none of `outputs` (when there are any).

        Example:
            >>> Bounds({"logits": {"max_abs": 1e-4, "top1": None}}).resolve(["logits"], {"cosine": 0.9999, "top1": 0.99})
            {'logits': {'cosine': 0.9999, 'max_abs': 0.0001}}
        """
        resolved = {name: dict(defaults or {}) for name in outputs}
        for pattern, bounds in self.entries.items():
            matched = [name for name in outputs if glob_match(name, pattern)]
            if not matched and outputs:
                raise SparsecError(f"{self.label}.{pattern}: matches no output of the program {list(outputs)}")
            for name in matched:
                for metric, limit in bounds.items():
                    if limit is None:
                        resolved[name].pop(metric, None)
                    else:
                        resolved[name][metric] = limit
        return resolved

    def failures(
        self, metrics: Mapping[str, Mapping[str, float]], defaults: Mapping[str, float] | None = None
    ) -> list[str]:
        """`output: metric value < / > bound` for every bound (resolved over the outputs of `metrics`) broken."""
        return bound_failures(metrics, self.resolve(list(metrics), defaults), self.label)


def bound_failures(
    metrics: Mapping[str, Mapping[str, float]], bounds: Mapping[str, Mapping[str, float]], label: str = "bounds"
) -> list[str]:
    """`output: metric value < / > bound` for every resolved bound a metric breaks; NaN breaks every bound,
    and top1/kl bounds skip outputs that are not logits.

    Example:
        >>> bound_failures({"logits": {"cosine": 0.99, "rel_l2": 0.02}}, {"logits": {"cosine": 0.999, "rel_l2": 0.01}})
        ['logits: cosine 0.99 < 0.999', 'logits: rel_l2 0.02 > 0.01']
    """
    failures = []
    for name, limits in bounds.items():
        values = metrics[name]
        for metric, limit in limits.items():
            if metric not in values:
                if metric in LOGITS_ONLY:
                    continue
                raise SparsecError(f"{label} bound on {name!r}: the output has no metric {metric!r}")
            value, lower = values[metric], metric in AGREEMENTS
            if value != value or (lower and value < limit) or (not lower and value > limit):
                failures.append(f"{name}: {metric} {value:.6g} {'<' if lower else '>'} {limit:g}")
    return failures


DEFAULT_GATES = {"min_cosine": 0.99, "min_top1": 0.9}
"""The gates of a recipe without a `quality:` section (`QualityGates.default()`): every output's mean token cosine
to the uncompressed program >= 0.99 (the former default recipe's gate; below it the logits of a trained LLM
visibly drift, e.g. the cosine 0.725 / top-1 0.09 of an over-pruned model) and, on logits, top-1 agreement >= 0.9
(nine in ten tokens keep their greedy choice). They stop a compile that broke the model; what a task tolerates is
the recipe's to say."""


@dataclass
class QualityGates:
    """The recipe's `quality:` section: gates checked after every pass, as `Bounds`.

    `min_cosine`, `max_rel_l2`, `min_top1`, `max_kl` bound every output that has the metric (top1 and kl: the
    logits); `outputs` adds bounds per output name or glob in the `Bounds` form, e.g.
    `quality: {min_cosine: 0.98, outputs: {logits: {top1: 0.9, cosine: null}}}`. `max_ppl_ratio` bounds the
    program's perplexity over the dense program's (`ppl_ratio` of `compare_programs`, e.g. 1.10: at most 10%
    higher); only a causal language model has one (`is_causal_lm`), and `check_program` refuses the bound on any
    other program. A section states the gates in full (what it does not bound is not gated); a recipe without one
    gets `QualityGates.default()` (`DEFAULT_GATES`). `gates: false` (`quality: {gates: off}` in YAML) turns gating
    off: metrics are still measured and reported, the compile says that nothing was gated.

    The compile measures the gates on the held-out calibration samples (`CalibrationSet.split`), which no pass sees.

    Example:
        >>> QualityGates(min_cosine=0.99, min_top1=0.9).failures({"logits": {"cosine": 0.95, "top1": 0.97}})
        ['logits: cosine 0.95 < 0.99']
    """

    gates: bool = True
    min_cosine: float | None = None
    max_rel_l2: float | None = None
    min_top1: float | None = None
    max_kl: float | None = None
    max_ppl_ratio: float | None = None
    outputs: dict[str, dict[str, float | None]] = field(default_factory=dict)
    is_default: bool = field(default=False, init=False)  # from DEFAULT_GATES, not the recipe (see `default`)

    @classmethod
    def default(cls) -> QualityGates:
        """The gates of a recipe without a `quality:` section (`DEFAULT_GATES`)."""
        gates = cls(**DEFAULT_GATES)
        gates.is_default = True
        return gates

    def __post_init__(self) -> None:
        for name in ("min_cosine", "min_top1"):
            value = getattr(self, name)
            if value is not None and not -1.0 <= value <= 1.0:
                raise ValueError(f"{name}: must be in [-1, 1], got {value}")
        for name in ("max_rel_l2", "max_kl"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name}: must be >= 0, got {value}")
        if self.max_ppl_ratio is not None and not self.max_ppl_ratio >= 1.0:
            raise ValueError(
                f"max_ppl_ratio: must be >= 1 (the compressed program's perplexity over the dense one's; 1.10 allows "
                f"10% more), got {self.max_ppl_ratio}"
            )
        Bounds(self.outputs, label="outputs")  # its ValueErrors name the key
        if not self.gates and self.bounds_set():
            raise ValueError("gates: off, yet bounds are set; remove them, or remove `gates: off` to gate by them")

    def bounds_set(self) -> bool:
        """Whether any bound is set (with `gates` on, the compile is gated)."""
        return bool(self.outputs) or any(
            v is not None for v in (self.min_cosine, self.max_rel_l2, self.min_top1, self.max_kl, self.max_ppl_ratio)
        )

    def check_program(self, program) -> None:
        """`RecipeError` when `max_ppl_ratio` bounds a program that has no perplexity (not `is_causal_lm`): asked
        before any work, so a recipe cannot gate on a metric its program never reports."""
        if self.gates and self.max_ppl_ratio is not None and not is_causal_lm(program):
            raise RecipeError(
                f"quality.max_ppl_ratio: perplexity needs a causal language model, a program taking `input_ids` "
                f"[batch, seq] and returning `{PERPLEXITY_OUTPUT}` [batch, seq, vocab]; this one takes "
                f"{program.input_names} and returns {program.output_names}. Gate it with min_cosine / max_rel_l2 / "
                "outputs instead"
            )

    def bounds(self) -> Bounds:
        """The gates as `Bounds`: the four global gates for every output (`*`), then `outputs`, then `max_ppl_ratio`
        on `logits` (`ppl_ratio`); none when off."""
        if not self.gates:
            return Bounds({}, label="quality.outputs")
        every = {
            metric: getattr(self, gate)
            for gate, metric in (
                ("min_cosine", "cosine"),
                ("min_top1", "top1"),
                ("max_rel_l2", "rel_l2"),
                ("max_kl", "kl"),
            )
            if getattr(self, gate) is not None
        }
        every.update(self.outputs.get("*", {}))
        entries = {**({"*": every} if every else {}), **{k: v for k, v in self.outputs.items() if k != "*"}}
        if self.max_ppl_ratio is not None:
            entries[PERPLEXITY_OUTPUT] = {**entries.get(PERPLEXITY_OUTPUT, {}), "ppl_ratio": self.max_ppl_ratio}
        return Bounds(entries, (*GATE_METRICS, "ppl_ratio"), label="quality.outputs")

    def describe(self) -> dict:
        """What the report records: `source` (`default`, `recipe` or `off`) and the bounds per output glob
        (`{"*": {"cosine": 0.99, "top1": 0.9}}`; a lower bound for cosine / top1, an upper one otherwise).
        `gated` is False when no bound applies: then nothing stopped a bad compile.

        Example:
            >>> QualityGates.default().describe()
            {'source': 'default', 'gated': True, 'bounds': {'*': {'cosine': 0.99, 'top1': 0.9}}}
        """
        entries = {k: {m: x for m, x in b.items() if x is not None} for k, b in self.bounds().entries.items()}
        entries = {k: b for k, b in entries.items() if b}
        source = "off" if not self.gates else "default" if self.is_default else "recipe"
        return {"source": source, "gated": bool(entries), "bounds": entries}

    def failures(self, metrics: Mapping[str, Mapping[str, float]]) -> list[str]:
        return self.bounds().failures(metrics)
