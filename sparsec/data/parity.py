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
    mode: auto                      # whole | blocks | auto (blocks above 1 GiB of ONNX or where one session would not fit)
    percentiles: [50, 90, 99]       # reported as p50_abs ... p99_rel
    tolerances:                     # output name or glob -> bounds over the precision's defaults
      "*": {cosine: 0.9995}
      logits: {p99_abs: 0.05, top1: null}    # null drops a default bound
```

Entries apply in order, later ones override earlier ones for the outputs they match.

The program side is computed first (`ProgramReference.compute`: outputs on the host), then the program is let go
and only then does a backend open its session (`backend_parity`), so the two never share memory. The backend runs
on pieces of the batches whose outputs take at most `BACKEND_RUN_BYTES` (a few samples of a large vocabulary's
logits), so its outputs are never held for a whole batch. Where the whole backend model would not fit, a target
checks block by block instead (`check_block_parity`; ONNX Runtime's `export.parity.mode`).

Example::

    pairs = [(program.run(batch), engine_outputs(batch), CalibrationSet.valid_mask(batch)) for batch in batches]
    report = check_parity(pairs, backend="onnxruntime CPUExecutionProvider", precision="fp16",
                          options=ParityOptions())
    report["metrics"]["logits"]["p99_abs"], report["tolerances"]["logits"]
    # (0.0021, {'cosine': 0.999, 'rel_l2': 0.01, 'top1': 0.95})
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from sparsec.data.calibration import CalibrationSet
from sparsec.data.logits import Logits, logits_run
from sparsec.data.quality import Bounds, bound_failures, compare_outputs, percentile_key
from sparsec.errors import QualityError, SparsecError

Precision = Literal["fp32", "fp16", "bf16"]

DEFAULT_TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"cosine": 0.9999, "rel_l2": 1e-3, "top1": 0.99},
    "fp16": {"cosine": 0.999, "rel_l2": 1e-2, "top1": 0.95},
    "bf16": {"cosine": 0.99, "rel_l2": 5e-2, "top1": 0.90},
}
BACKEND_RUN_BYTES = 256 * 2**20  # a backend's outputs of one run at most (`backend_parity` splits batches)
BASE_METRICS = ("cosine", "rel_l2", "max_abs", "mean_abs", "max_rel", "mean_rel", "top1", "kl")


@dataclass
class ParityOptions:
    """`export.parity`: how many calibration samples, which percentiles, tolerances per output (module doc), and
    `mode`: `whole` (the whole model in one backend session), `blocks` (block by block, for a model whose session
    would not fit; targets that cannot split a model run it whole) or `auto` (the target decides from the model's
    size and the memory available)."""

    samples: int = 8
    percentiles: list[float] = field(default_factory=lambda: [50.0, 90.0, 99.0])
    tolerances: dict[str, dict[str, float | None]] = field(default_factory=dict)
    mode: Literal["auto", "whole", "blocks"] = "auto"

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
    pairs: Iterable[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], torch.Tensor | None]],
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
        raise QualityError(
            f"{backend} ({precision}) differs from the PyTorch program beyond the parity tolerances: "
            + "; ".join(failures)
        )
    return {"backend": backend, "precision": precision, "tolerances": tolerances, "metrics": metrics}


@dataclass
class ParityReference:
    """The program's side of a parity check, on the host: per batch, its inputs, its outputs (a language model's
    logits as `ProjectedLogits` where they are a plain projection: hidden states and the projection, a few hundred
    times smaller), the valid-token mask and the intermediate values asked for (`values`, by FX node name).
    Everything the backend is compared with, so the program itself can be let go before the backend's session
    opens."""

    inputs: list[dict[str, torch.Tensor]]
    outputs: list[dict[str, Logits]]
    masks: list[torch.Tensor | None]
    values: list[dict[str, torch.Tensor]]
    input_shapes: dict[str, list[int]]


class ProgramReference:
    """The program a backend is checked against, handed to `Target.parity`: `compute` runs it once on the first
    `samples` calibration samples and then lets it go (`release`), so no backend session ever shares memory with it.

    A target reads `program` (the graph, e.g. to find block boundaries) before `compute`; afterwards it is None.
    `release`: called after `compute` to free the program's weights (the compiler drops its own reference there).
    """

    def __init__(
        self, program, calibration: CalibrationSet, samples: int, release: Callable[[], None] | None = None
    ) -> None:
        self.program = program
        self.calibration = calibration.head(samples)
        self._release = release

    def compute(self, values: Sequence[str] = ()) -> ParityReference:
        """The program's outputs (and the values of the FX nodes named in `values`) on every batch, moved to the
        host in their dtype; then the program is released. Raises `SparsecError` for a name the graph lacks."""
        if self.program is None:
            raise SparsecError("ProgramReference.compute: already computed (the program was released)")
        nodes = {n.name: n for n in self.program.graph.nodes}
        missing = [v for v in values if v not in nodes]
        if missing:
            raise SparsecError(f"parity: the program has no values named {missing[:5]}")
        wanted = {nodes[v] for v in values}
        observed: list[dict[str, torch.Tensor]] = [{} for _ in range(self.calibration.num_batches)]

        def observe(index: int, node, value) -> None:
            observed[index][node.name] = (
                value.detach().cpu() if isinstance(value, torch.Tensor) else torch.tensor(value)
            )

        inputs, outputs, masks = [], [], []
        run_as = logits_run(self.program, observed=wanted, device="cpu")  # logits kept as hidden states
        for batch, result in self.calibration.run(
            self.program,
            observe=observe if wanted else None,
            nodes=wanted,
            desc="parity reference",
            outputs_from=run_as.outputs_from,
        ):
            inputs.append({k: v.cpu() for k, v in batch.items()})
            outputs.append(run_as.logits({k: v.detach().cpu() for k, v in result.items()}))
            masks.append(CalibrationSet.valid_mask(batch))
        shapes = {k: list(v.shape) for k, v in self.calibration.inputs.items()}
        self.program = None
        if self._release is not None:
            self._release()
        return ParityReference(inputs, outputs, masks, observed, shapes)


def backend_parity(
    reference: ParityReference,
    run: Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]],
    *,
    backend: str,
    precision: Precision,
    options: ParityOptions,
) -> dict:
    """`check_parity` of a backend's `run` (named inputs -> outputs) against the program's `reference`
    (`ProgramReference.compute`); the report also holds the parity mode (`whole`) and the input shapes used.

    Example::

        reference = ProgramReference(program, calib, samples=8).compute()
        backend_parity(reference, lambda b: ort_backend.run(sess, b), backend="ONNX Runtime", precision="fp32",
                       options=ParityOptions())["input_shapes"]
        # {'input_ids': [8, 24], 'attention_mask': [8, 24]}
    """
    batches = zip(reference.inputs, reference.outputs, reference.masks)
    pieces = (piece for batch in batches for piece in backend_pieces(*batch))
    pairs = ((ref, run(inputs), mask) for inputs, ref, mask in pieces)  # one piece of backend outputs at a time
    report = check_parity(pairs, backend=backend, precision=precision, options=options)
    return {"mode": "whole", "input_shapes": reference.input_shapes, **report}


def backend_pieces(
    inputs: dict[str, torch.Tensor], outputs: dict[str, Logits], mask: torch.Tensor | None
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Logits], torch.Tensor | None]]:
    """A batch split along the samples so that the backend's outputs of each piece take at most `BACKEND_RUN_BYTES`
    in float32 (one sample at least): a backend returns a language model's logits whole, 134 MB a sample at 128
    tokens of a 262,144-token vocabulary, and holds them twice (its own buffer and the returned array). Inputs
    without the batch's samples as their first dimension (a broadcast table) go to every piece whole."""
    samples = mask.shape[0] if mask is not None else next(iter(inputs.values())).shape[0]
    rows = max(1, BACKEND_RUN_BYTES // max(sample_output_bytes(outputs), 1))
    if rows >= samples:
        yield inputs, outputs, mask
        return
    for start in range(0, samples, rows):
        part = slice(start, start + rows)
        yield (
            {k: v[part] if v.dim() and v.shape[0] == samples else v for k, v in inputs.items()},
            {k: v[part] for k, v in outputs.items()},
            None if mask is None else mask[part],
        )


def sample_output_bytes(outputs: Mapping[str, Any]) -> int:
    """The float32 bytes of one sample's outputs (every output's size past the batch dimension)."""
    return sum(math.prod(v.shape[1:]) * 4 for v in outputs.values() if hasattr(v, "shape") and len(v.shape) > 0)


def check_block_parity(
    blocks: Mapping[str, Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]],
    head: Iterable[tuple[Mapping[str, Any], Mapping[str, torch.Tensor], torch.Tensor | None]],
    *,
    backend: str,
    precision: Precision,
    options: ParityOptions,
    input_shapes: Mapping[str, list[int]],
) -> dict:
    """Parity checked block by block: `blocks` maps each block (by module path, in order) to its
    `(program output, backend output, valid mask)` per batch, the backend having run the block on the program's own
    boundary activations; `head` yields the model outputs of the last segment (consumed once, after the blocks:
    the backend may compute them as they are read), compared as in `check_parity`.

    A block is judged by the precision's default tolerances (`DEFAULT_TOLERANCES`, less `top1`, which is for logits);
    the head by `options.tolerances` too. Raises `QualityError` naming every block and output outside its bounds;
    returns the report: `mode: blocks`, the per-block metrics and tolerances, and the head's as in whole mode.
    """
    block_bounds = (
        {k: v for k, v in DEFAULT_TOLERANCES[precision].items() if k != "top1"}
        if precision in DEFAULT_TOLERANCES
        else {}
    )
    metrics: dict[str, dict[str, float]] = {}
    failures: list[str] = []
    for name, pairs in blocks.items():
        found = compare_outputs(
            [({name: ref}, {name: got}, mask) for ref, got, mask in pairs], percentiles=options.percentiles
        )
        metrics[name] = found[name]
        failures += bound_failures({name: found[name]}, {name: block_bounds}, "parity")
    try:
        head_report = check_parity(head, backend=backend, precision=precision, options=options)
    except QualityError as exc:
        failures.append(f"head: {exc}")
        head_report = None
    if failures:
        raise QualityError(
            f"{backend} ({precision}) differs from the PyTorch program beyond the parity tolerances, "
            "checked block by block: " + "; ".join(failures)
        )
    return {
        "mode": "blocks",
        "input_shapes": dict(input_shapes),
        **head_report,
        "blocks": {"tolerances": block_bounds, "metrics": metrics},
    }
