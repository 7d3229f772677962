"""The compile's memory plan: its peak estimated from the checkpoint's headers before the model loads, whether the
weights are read lazily, and the refusal of a compile that cannot fit (`sparsec.resources` holds the policy and the
arithmetic; this module supplies what only the compiler knows: the target's ONNX precision, the parity mode)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsec import resources
from sparsec.analysis.regions import block_boundaries
from sparsec.compiler.checks import model_config, text_config
from sparsec.data import parity, reference
from sparsec.data.calibration import held_out_samples
from sparsec.errors import SparsecError
from sparsec.exporters.targets import get_target
from sparsec.models import BUILTIN_PREFIX
from sparsec.recipe import Recipe
from sparsec.resources import DTYPE_BYTES, GiB, MemoryEstimate, check_fits, checkpoint_facts, estimate_compile


@dataclass(frozen=True)
class MemoryPlan:
    """How the compile holds its weights.

    Attributes:
        lazy: the weights are read from the checkpoint files as they are needed (`load_model(weights="lazy")`).
        runs_model: the model runs (calibration, gates); False only for a weight-only lazy dry run.
    """

    lazy: bool
    runs_model: bool


def plan_memory(
    model: str | Path,
    recipe: Recipe,
    *,
    dtype: str,
    device: torch.device,
    target: str | None,
    lazy: bool | None,
    dry_run: bool,
    say: Callable[[str], None],
) -> MemoryPlan:
    """Estimate a checkpoint directory's compile (printed), decide lazy reading where `lazy` is None
    (`resources.reads_lazily`), and refuse what cannot fit (`check_fits`) or cannot be read lazily when `lazy` insists.
    `target`: the target whose parity session the compile will hold (None: no ONNX parity in this compile)."""
    blocker = lazy_blocker(recipe, device)
    builtin = str(model).startswith(BUILTIN_PREFIX)
    if lazy and (blocker or builtin):
        raise SparsecError(
            f"cannot read the weights of {model} lazily: " + (blocker or "a built-in model has no checkpoint files")
        )
    estimate = memory_estimate(Path(model), recipe, dtype, target) if not builtin and Path(model).is_dir() else None
    if estimate is not None:
        if lazy is None:
            lazy = blocker is None and resources.reads_lazily(estimate)
        shown = estimate.lazy() if lazy else estimate
        say(
            f"[sparsec] {shown.describe()}"
            + (
                f" with weights read lazily, until the transformed program is read to be written (weights in"
                f" memory: {estimate.total / GiB:.1f} GiB)"
                if lazy
                else ""
            )
            + f"; {resources.describe_available()} available"
        )
        check_fits(shown, f"compiling {model}", could_read_lazily=not lazy and not blocker)
    lazy = bool(lazy)
    return MemoryPlan(lazy=lazy, runs_model=not lazy or runs_model(recipe, dry_run))


def lazy_blocker(recipe: Recipe, device: torch.device) -> str | None:
    """Why this compile needs the weights in memory (None: it can read them lazily; see `compile_model`)."""
    if recipe.entry_points:
        return "the recipe compiles several entry points, which share weights"
    if device.type != "cpu":
        return f"lazily read weights are read onto the CPU, and --device is {device}"
    return None


def runs_model(recipe: Recipe, dry_run: bool) -> bool:
    """Whether a lazily read compile runs the model: always but for a weight-only dry run (no pass decides from
    calibration data, no `quality:` gates of the recipe's own; the default gates are then reported unchecked)."""
    return (
        not dry_run
        or any(p.needs_calibration() for p in recipe.passes)
        or bool(recipe.quality.gates and not recipe.quality.is_default)
    )


def memory_estimate(directory: Path, recipe: Recipe, dtype: str, target: str | None) -> MemoryEstimate | None:
    """The compile's `MemoryEstimate` from the checkpoint headers and config.json (None when they say too little)."""
    elements, by_dtype = checkpoint_facts(directory)
    if not elements:
        return None
    config = model_config(directory)
    text = text_config(config)
    load_bytes = DTYPE_BYTES[dtype] if dtype != "auto" else max(1, round(sum(by_dtype.values()) / elements))
    session = 0
    if target is not None:
        file_bytes = elements * _onnx_bytes_per_element(recipe, target)
        session = _parity_session_bytes(file_bytes, recipe, int(text.get("num_hidden_layers") or 1))
    cal = recipe.calibration
    width = int(text.get("vocab_size") or config.get("vocab_size") or 0)
    held_out = held_out_samples(cal.samples, cal.holdout)
    hidden = int(text.get("hidden_size") or 0)
    gated_tokens = (held_out or cal.samples) * cal.seq_len  # no split: gated on every sample
    whole = _holds_whole_logits(config)
    # references hold the hidden states logits are projected from, or whole logits where something follows the head
    reference_token_bytes = (width if whole else hidden) * 4
    kept = gated_tokens * reference_token_bytes
    parity_samples = min(recipe.export.parity.samples, cal.samples)
    parity_reference = parity_samples * cal.seq_len * reference_token_bytes
    # the backend's outputs of one run (`backend_parity`'s pieces), held twice: its buffer and the returned array
    sample_bytes = cal.seq_len * width * 4
    backend_outputs = 2 * sample_bytes * min(parity_samples, max(1, parity.BACKEND_RUN_BYTES // max(sample_bytes, 1)))
    return estimate_compile(
        elements,
        load_bytes,
        parity_session=session,
        kept_outputs=(kept if kept <= reference.KEEP_BYTES else 0)
        + (parity_reference + backend_outputs if target else 0),
        batch_tokens=min(cal.batch_size, cal.samples) * cal.seq_len,
        sequential_tokens=(cal.samples - held_out) * cal.seq_len,
        output_width=width,
        output_copies=_output_copies(recipe, whole=whole),
        hidden=hidden,
        layers=int(text.get("num_hidden_layers") or 0),
        sequential=cal.sequential,
    )


# Models whose logits are more than a plain projection, so the checks compare them whole (`find_logits_head`)
WHOLE_LOGITS_CONFIG_KEYS = ("final_logit_softcapping", "logit_scale")  # soft-capped, scaled
WHOLE_LOGITS_MODEL_TYPES = ("chameleon",)  # image-token logits masked


def _holds_whole_logits(config: dict) -> bool:
    """Whether the checks and training hold this model's logits whole: something follows its projection
    (soft-capping, a logit scale, masked image tokens), so `find_logits_head` will not find a plain one."""
    text = text_config(config)
    return (
        any(text.get(key) for key in WHOLE_LOGITS_CONFIG_KEYS) or config.get("model_type") in WHOLE_LOGITS_MODEL_TYPES
    )


def _output_copies(recipe: Recipe, *, whole: bool) -> int:
    """How many times one calibration batch's widest output (a language model's logits) is held at once. Logits
    held whole: 8 times where a pass trains through them against the dense program (`needs_reference`: teacher,
    student, their log-softmaxes and gradients), else 5 for the checks. Otherwise they are projected from hidden
    states a few rows at a time, by the checks and by training alike (`sparsec.data.projected_kl`): one transient
    copy. (The parity check's backend outputs are counted apart, with the kept outputs.)"""
    if whole:
        return 8 if any(p.needs_reference() for p in recipe.passes) else 5
    return 1


def check_materialized_fits(program, recipe: Recipe, target: str) -> None:
    """Before a lazily read program's weights are read into memory for writing: `SparsecError` (exit 2, nothing
    written) when they and the parity session cannot fit in the memory available now."""
    weights = program.parameter_bytes()
    session = 0
    if recipe.export.onnx and get_target(target).builds_from_onnx:
        file_bytes = program.num_parameters() * _onnx_bytes_per_element(recipe, target)
        session = _parity_session_bytes(file_bytes, recipe, max(len(block_boundaries(program)), 1))
    check_fits(MemoryEstimate(weights, 0, session), "writing the transformed program")


def _onnx_bytes_per_element(recipe: Recipe, target: str) -> int:
    """Bytes per weight in the ONNX file the target lowers to: 4 for FP32, else 2."""
    return 4 if get_target(target).lowering(recipe).precision == "fp32" else 2


def _parity_session_bytes(file_bytes: int, recipe: Recipe, layers: int) -> int:
    """The parity session's bytes for an ONNX file of `file_bytes`: the whole model's, or one block's where parity
    will run block by block (`parity_mode_for`, as the ONNX Runtime target decides)."""
    from sparsec.exporters.targets.onnxruntime import SESSION_BYTES_PER_FILE_BYTE, parity_mode_for

    mode = parity_mode_for(file_bytes, recipe.export.parity.mode, resources.available_memory())
    return int(SESSION_BYTES_PER_FILE_BYTE * (file_bytes if mode == "whole" else file_bytes // max(layers, 1)))
