"""Backend parity: a lowered model (ONNX Runtime session, TensorRT engine) against the PyTorch program.

The last check of lowering. A backend runs the same calibration batches as the program; `check_parity`
compares the outputs over valid tokens (`quality.compare_outputs` with the error distribution: cosine, rel L2,
max / mean / percentile absolute and relative errors, top-1 agreement and KL for logits) and checks each
output against its tolerances. A failure raises `QualityError` naming every output, metric, value and bound,
and the compile writes nothing.

Tolerances are `sparsec.data.quality.Bounds`, the type the recipe's `quality:` gates use too: a bound on one metric, named by the metric, a lower bound for the agreements (`cosine`,
`top1`), an upper bound for every error (`rel_l2`, `max_abs`, `p99_abs`, `p99_rel`, `kl`, ...). The defaults
depend on the precision the backend computes in (`DEFAULT_TOLERANCES`), scale-free so that they hold for any
model:

| precision | cosine (at least) | rel_l2 (at most) | top1 (logits, at least) |
|---|---|---|---|
| fp32 | 0.9999 | 1e-3 | 0.99 |
| fp16 | 0.999 | 1e-2 | 0.95 |
| bf16 | 0.99 | 5e-2 | 0.90 |

Why these: FP32 backends differ from PyTorch only in summation order and fused kernels (measured rel L2
~3e-7 on the tiny Qwen2), so 1e-3 leaves room for deep models and still catches a wrong op. FP16 rounds each
op to 2^-11 ~ 4.9e-4 relative; the tiny Qwen2 converted with the norms, softmax and router in FP32 gave
rel L2 5.3e-4 and top-1 1.0, real models with 30+ layers accumulate more, hence 1e-2 (20x that unit
roundoff). BF16 keeps 8 mantissa bits, 2^-8 ~ 3.9e-3 (8x coarser than FP16): measured rel L2 6.6e-3 on the
same model, bound 5e-2. Top-1 flips where the two best logits are within the error: 1% of tokens at FP32
(ties), 5% / 10% at FP16 / BF16. Absolute and percentile bounds depend on the output's scale, so they have
no default: set them per output in the recipe.

Recipe (`export.parity`):

```yaml
export:
  precision: fp16
  parity:
    samples: 8                      # calibration samples run through both
    percentiles: [50, 90, 99]       # reported as p50_abs ... p99_rel
    tolerances:                     # output name or glob -> bounds over the precision's defaults
      "*": {cosine: 0.9995}
      logits: {p99_abs: 0.05, top1: null}    # null drops a default bound
```

Entries apply in order, later ones override earlier ones for the outputs they match.

Example:
    >>> pairs = [(program.run(batch), engine_outputs(batch), CalibrationSet.valid_mask(batch)) for batch in batches]
    >>> report = check_parity(pairs, backend="onnxruntime CPUExecutionProvider", precision="fp16",
    ...                       options=ParityOptions())
    >>> report["metrics"]["logits"]["p99_abs"], report["tolerances"]["logits"]
    (0.0021, {'cosine': 0.999, 'rel_l2': 0.01, 'top1': 0.95})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from sparsec.data.calibration import CalibrationSet
from sparsec.data.quality import Bounds, bound_failures, compare_outputs, percentile_key
from sparsec.errors import QualityError, SparsecError

Precision = Literal["fp32", "fp16", "bf16"]

DEFAULT_TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"cosine": 0.9999, "rel_l2": 1e-3, "top1": 0.99},
    "fp16": {"cosine": 0.999, "rel_l2": 1e-2, "top1": 0.95},
    "bf16": {"cosine": 0.99, "rel_l2": 5e-2, "top1": 0.90},
}
BASE_METRICS = ("cosine", "rel_l2", "max_abs", "mean_abs", "max_rel", "mean_rel", "top1", "kl")


@dataclass
class ParityOptions:
    """`export.parity`: how many calibration samples, which percentiles, tolerances per output (module doc)."""

    samples: int = 8
    percentiles: list[float] = field(default_factory=lambda: [50.0, 90.0, 99.0])
    tolerances: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples: must be >= 1, got {self.samples}")
        bad = [q for q in self.percentiles if not 0 <= q <= 100]
        if bad:
            raise ValueError(f"percentiles: each must be in [0, 100], got {bad}")
        Bounds(self.tolerances, self.metric_names(), label="tolerances")  # its ValueErrors name the key

    def metric_names(self) -> list[str]:
        """Every metric a bound may name, the percentile ones included."""
        return [*BASE_METRICS, *(percentile_key(q, k) for k in ("abs", "rel") for q in self.percentiles)]

    def bounds(self) -> Bounds:
        """The tolerances as `Bounds` (over the precision's defaults, see `resolve_tolerances`)."""
        return Bounds(self.tolerances, self.metric_names(), label="export.parity.tolerances")


def resolve_tolerances(precision: Precision, bounds: Bounds, outputs: Sequence[str]) -> dict[str, dict[str, float]]:
    """The bounds per output: the precision's defaults, then `bounds`' entries in order (None drops a bound).

    Raises `SparsecError` for an unknown precision or an entry that matches no output.

    Example:
        >>> resolve_tolerances("fp32", Bounds({"logits": {"max_abs": 1e-4, "top1": None}}), ["logits"])
        {'logits': {'cosine': 0.9999, 'rel_l2': 0.001, 'max_abs': 0.0001}}
    """
    if precision not in DEFAULT_TOLERANCES:
        raise SparsecError(f"precision {precision!r}: choose one of {list(DEFAULT_TOLERANCES)}")
    return bounds.resolve(outputs, DEFAULT_TOLERANCES[precision])


def check_parity(
    pairs: Sequence[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], torch.Tensor | None]],
    *,
    backend: str,
    precision: Precision,
    options: ParityOptions,
) -> dict:
    """Compare a backend's outputs with the program's over `(program, backend, valid_mask)` batches.

    Returns the report section: backend, precision, tolerances and metrics per output. Raises `QualityError`
    listing every broken bound (NaN breaks every bound).
    """
    metrics = compare_outputs(pairs, percentiles=options.percentiles)
    if not metrics:
        raise SparsecError("parity: the program has no floating-point outputs to compare")
    tolerances = resolve_tolerances(precision, options.bounds(), list(metrics))
    failures = bound_failures(metrics, tolerances, "parity")
    if failures:
        raise QualityError(f"{backend} ({precision}) differs from the PyTorch program beyond the parity tolerances: "
                           + "; ".join(failures))
    return {"backend": backend, "precision": precision, "tolerances": tolerances, "metrics": metrics}


def backend_parity(
    program,
    run: Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]],
    calibration: CalibrationSet,
    *,
    backend: str,
    precision: Precision,
    options: ParityOptions,
) -> dict:
    """`check_parity` of a backend's `run` (named inputs -> outputs) against `program` on the first
    `options.samples` calibration samples; the report also holds the input shapes used.

    Example:
        >>> backend_parity(program, lambda b: ort_backend.run(sess, b), calib, backend="ONNX Runtime",
        ...                precision="fp32", options=ParityOptions())["input_shapes"]
        {'input_ids': [8, 24], 'attention_mask': [8, 24]}
    """
    subset = calibration.head(options.samples)
    pairs = [(ref, run(b), CalibrationSet.valid_mask(b)) for b, ref in subset.run(program, desc="parity reference")]
    report = check_parity(pairs, backend=backend, precision=precision, options=options)
    return {"input_shapes": {k: list(v.shape) for k, v in subset.inputs.items()}, **report}
