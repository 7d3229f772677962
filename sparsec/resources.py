"""Memory: what a compile will need, what the machine has, and a clear refusal before the OOM killer steps in.

`estimate_compile` adds up, from the checkpoint's size on disk, the dtype it is loaded in and the recipe's
calibration shape, the memory a `sparsec compile` holds at its peak:

- the program's weights (loaded once; the captured program shares them with the model);
- the reference outputs the quality gates compare against (every calibration batch's outputs) and one batch's
  forward activations;
- the ONNX Runtime session of the parity check (the ONNX file's weights, FP32 unless the recipe says otherwise),
  which is open while the program is still in memory.

It is an estimate (allocator slack, fragmentation and library code come on top), printed before heavy work. A
compile is refused only when its weights and the parity session alone cannot fit in the memory available now
(`MemAvailable`, or the cgroup's limit if lower): that one cannot succeed, and saying so costs seconds instead of
a kill minutes later.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
from dataclasses import dataclass
from pathlib import Path

from sparsec.errors import SparsecError

DTYPE_BYTES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F64": 8,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
GiB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes each part of a compile holds at its peak (see the module docstring)."""

    weights: int
    calibration: int
    parity_session: int

    @property
    def total(self) -> int:
        return self.weights + self.calibration + self.parity_session

    @property
    def required(self) -> int:
        """What must fit for the compile to succeed at all: weights and the parity session."""
        return self.weights + self.parity_session

    def describe(self) -> str:
        return (
            f"estimated peak {self.total / GiB:.1f} GiB (weights {self.weights / GiB:.1f}, calibration "
            f"{self.calibration / GiB:.1f}, ONNX Runtime session {self.parity_session / GiB:.1f})"
        )


def checkpoint_facts(directory: str | Path) -> tuple[int, dict[str, int]]:
    """Tensor elements of a safetensors checkpoint and its bytes per dtype, read from the file headers only."""
    elements, by_dtype = 0, {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 100 * 2**20:
                raise SparsecError(
                    f"{path} is not a safetensors file (header size {size}); re-save the model "
                    "with save_pretrained(dir, safe_serialization=True)"
                )
            try:
                header = json.loads(f.read(size))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise SparsecError(f"{path}: its safetensors header is corrupt ({exc}); re-save the model") from exc
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            elements += count
            by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + count * DTYPE_BYTES.get(info["dtype"], 4)
    return elements, by_dtype


def estimate_compile(
    parameters: int,
    load_bytes_per_element: int,
    *,
    onnx_bytes_per_element: int | None,
    calibration_tokens: int,
    batch_tokens: int,
    output_width: int,
    hidden: int,
    layers: int,
) -> MemoryEstimate:
    """The peak of a compile of a model with `parameters` weights (see the module docstring).

    `onnx_bytes_per_element`: None when no parity session runs in this process. `output_width`: the last dim of
    the largest output (the vocabulary for logits); `hidden`, `layers`: for the activations of one batch.
    """
    reference = calibration_tokens * output_width * 4
    activations = batch_tokens * (4 * output_width + 4 * hidden * (layers + 8)) * 4
    session = parameters * onnx_bytes_per_element if onnx_bytes_per_element else 0
    return MemoryEstimate(parameters * load_bytes_per_element, reference + activations, session)


def available_memory() -> int | None:
    """Bytes this process can still allocate: `MemAvailable`, or the cgroup's remaining limit if lower."""
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            current = int(Path("/sys/fs/cgroup/memory.current").read_text())
            candidates.append(int(limit) - current)
    except (OSError, ValueError):
        pass
    return min(candidates) if candidates else None


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc's `malloc_trim`; a no-op elsewhere).

    Weights of a few MB sit on the malloc heap, whose free pages glibc keeps: after a pass drops or slices hundreds
    of them, the process would otherwise go on holding their memory, and the next phase's peak would stack on it.
    """
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


def check_fits(estimate: MemoryEstimate, what: str) -> None:
    """Raise `SparsecError` (exit 2) when `estimate.required` exceeds the memory available now."""
    available = available_memory()
    if available is not None and estimate.required > available:
        raise SparsecError(
            f"{what} needs at least {estimate.required / GiB:.1f} GiB (weights {estimate.weights / GiB:.1f} GiB and "
            f"the ONNX Runtime session of the parity check {estimate.parity_session / GiB:.1f} GiB) and "
            f"{available / GiB:.1f} GiB are available: load in bfloat16 (--dtype bfloat16), export in a half "
            "precision (export.precision: fp16), or compile on a machine with more memory"
        )
