"""Memory: what a compile will need, what the machine has, and a clear refusal before the OOM killer steps in.

`estimate_compile` adds up, from the checkpoint's size on disk, the dtype it is loaded in and the recipe's
calibration shape, the memory a `sparsec compile` holds at its peak:

- the program's weights (loaded once; the captured program shares them with the model);
- calibration: one batch's forward activations and outputs (a language model's logits several times over where
  they are compared or trained through whole, else projected a few rows at a time: `sparsec.data.logits`), plus the
  outputs kept whole: the quality gates' reference while it is small (`sparsec.data.reference`; a larger one is
  recomputed batch by batch) and the parity check's reference (`export.parity.samples` samples). None of it grows
  with the number of calibration samples, except what a layer-sequential run keeps between blocks (the hidden
  states of every sample: `calibration.sequential`, or weights read lazily);
- the ONNX Runtime session of the parity check: of the whole model (about twice the ONNX file's bytes) or of its
  largest block (`export.parity.mode`; the compiler decides as the target will).

Weights read lazily (a compile that does not fit otherwise, `sparsec.compiler`) hold one block's weights while
the model runs (`MemoryEstimate.lazy`); the transformed program's weights are checked again after the passes,
before they are read into memory for writing.

It is an estimate (allocator slack, fragmentation and library code come on top), printed before heavy work. A
compile whose estimate exceeds the memory available now (`MemAvailable`, or the cgroup's limit if lower) is refused,
naming what to change: it would not succeed, and saying so costs seconds instead of a kill minutes later.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import json
import math
import os
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


def read_json_object(path: Path, fix: str) -> dict:
    """The JSON object in the file `path` (a checkpoint's config); `SparsecError` naming the file and `fix` (what to
    do) when it cannot be read, is not JSON or holds something else than an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SparsecError(f"{path} is not valid JSON ({exc}); {fix}") from exc
    if not isinstance(data, dict):
        raise SparsecError(f"{path} is not a JSON object; {fix}")
    return data


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes each part of a compile holds at its peak (see the module docstring).

    `between_blocks`: what a layer-sequential run keeps between blocks for every sample, counted when `sequential`
    (the recipe asks for it, or `lazy()`: lazily read weights run block by block).
    """

    weights: int
    calibration: int
    parity_session: int
    block_weights: int = 0
    between_blocks: int = 0
    sequential: bool = False

    def lazy(self) -> MemoryEstimate:
        """The estimate of a compile that reads weights lazily: `block_weights` (one block's) in memory at a time,
        and the model run block by block."""
        return dataclasses.replace(self, weights=self.block_weights, sequential=True)

    @property
    def calibration_held(self) -> int:
        """Calibration's share of the peak: `calibration`, and `between_blocks` when the run is sequential."""
        return self.calibration + (self.between_blocks if self.sequential else 0)

    @property
    def total(self) -> int:
        return self.weights + self.calibration_held + self.parity_session

    def describe(self) -> str:
        return (
            f"estimated peak {self.total / GiB:.1f} GiB (weights {self.weights / GiB:.1f}, calibration "
            f"{self.calibration_held / GiB:.1f}, ONNX Runtime session {self.parity_session / GiB:.1f})"
        )


SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}
INDEX_FILE = "model.safetensors.index.json"
_RESAVE = "copy the checkpoint again or re-save it with save_pretrained(dir, safe_serialization=True)"


def safetensors_header(path: str | Path) -> dict[str, dict]:
    """The tensor entries (`{key: {dtype, shape, data_offsets}}`, no `__metadata__`) of the safetensors file at
    `path`, checked against the file before any tensor is read.

    Checked as the safetensors library checks them when it loads, so that what it would refuse mid-load (a
    `SafetensorError`, a bug-looking exit 3) is refused here, naming the file: the header size fits the file, the
    header is a JSON object, each entry has a known dtype, a shape of non-negative integers and a byte range of
    exactly the size its dtype and shape need, and the byte ranges tile the data that follows the header, which
    the file holds in full (a truncated file fails here). `SparsecError` otherwise.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            size = int.from_bytes(f.read(8), "little")
            if file_size < 8 or not 0 < size <= min(file_size - 8, 100 * 2**20):
                raise SparsecError(
                    f"{path} is not a safetensors file (header size {size}, file size {file_size} bytes); {_RESAVE}"
                )
            raw = f.read(size)
    except OSError as exc:
        raise SparsecError(f"{path}: cannot read it ({exc.strerror or exc}); check the file's permissions") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SparsecError(f"{path}: its safetensors header is corrupt ({exc}); {_RESAVE}") from exc
    if not isinstance(header, dict):
        raise SparsecError(f"{path}: its safetensors header is corrupt (not a JSON object); {_RESAVE}")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    ranges = []
    for key, info in entries.items():
        ranges.append((*_entry_range(path, key, info), key))
    data_size = file_size - 8 - size
    end = 0
    for begin, stop, key in sorted(ranges):
        if begin != end:
            raise SparsecError(
                f"{path}: tensor {key!r} starts at byte {begin} of the data, where {end} was expected (the header's "
                f"byte ranges overlap or leave gaps): the header is corrupt; {_RESAVE}"
            )
        end = stop
    if end != data_size:
        raise SparsecError(
            f"{path}: the header describes {end} bytes of tensor data and the file holds {data_size}: the file is "
            f"{'truncated' if end > data_size else 'corrupt'}; {_RESAVE}"
        )
    return entries


def _entry_range(path: Path, key: str, info) -> tuple[int, int]:
    """The byte range [begin, end) of one header entry, checked against its dtype and shape."""
    bad = f"{path}: the header entry of tensor {key!r} is corrupt"
    if not isinstance(info, dict):
        raise SparsecError(f"{bad} (not an object); {_RESAVE}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPE_BYTES:
        raise SparsecError(f"{bad} (dtype {dtype!r}; known: {sorted(SAFETENSORS_DTYPE_BYTES)}); {_RESAVE}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise SparsecError(f"{bad} (shape {shape!r}, expected non-negative integers); {_RESAVE}")
    if (
        not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets))
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise SparsecError(f"{bad} (data_offsets {offsets!r}, expected [begin, end]); {_RESAVE}")
    need = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != need:
        raise SparsecError(
            f"{bad}: {dtype} {shape} needs {need} bytes and its data_offsets {offsets} span "
            f"{offsets[1] - offsets[0]}; {_RESAVE}"
        )
    return offsets[0], offsets[1]


def checkpoint_headers(directory: str | Path) -> dict[Path, dict[str, dict]]:
    """Each safetensors file of a checkpoint directory with its checked header (`safetensors_header`), in name order.

    A sharded checkpoint's index (`model.safetensors.index.json`) must be a JSON object whose `weight_map` names
    files that are there; `SparsecError` naming the index and the missing shards otherwise.
    """
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            shards = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as exc:
            raise SparsecError(f"{index}: not a safetensors index ({exc}); {_RESAVE}") from exc
        missing = [s for s in shards if not isinstance(s, str) or not (directory / s).is_file()]
        if missing:
            raise SparsecError(
                f"{index} names shard(s) that are not in {directory}: {missing[:5]}; copy the missing files "
                "(or re-save the model)"
            )
    return {path: safetensors_header(path) for path in sorted(directory.glob("*.safetensors"))}


def checkpoint_facts(directory: str | Path) -> tuple[int, dict[str, int]]:
    """Tensor elements of a safetensors checkpoint and its bytes per dtype, read from the file headers only
    (`checkpoint_headers`: a corrupt or truncated file is a `SparsecError` naming it)."""
    elements, by_dtype = 0, {}
    for header in checkpoint_headers(directory).values():
        for info in header.values():
            count = math.prod(info["shape"])
            elements += count
            by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + count * SAFETENSORS_DTYPE_BYTES[info["dtype"]]
    return elements, by_dtype


def estimate_compile(
    parameters: int,
    load_bytes_per_element: int,
    *,
    parity_session: int,
    kept_outputs: int,
    batch_tokens: int,
    sequential_tokens: int,
    output_width: int,
    hidden: int,
    layers: int,
    output_copies: int = 5,
    sequential: bool = False,
) -> MemoryEstimate:
    """The peak of a compile of a model with `parameters` weights (see the module docstring).

    `parity_session`: the bytes of the parity check's session (0 when none runs in this process). `kept_outputs`:
    the bytes of the reference outputs kept whole (the gates' while small, the parity check's). `batch_tokens`: one
    calibration batch's; `sequential_tokens`: the tokens whose hidden states a layer-sequential run keeps between
    blocks (`sequential`: whether the compile runs that way with its weights in memory). `output_width`: the last
    dim of the largest output (the vocabulary for logits), held `output_copies` times for one batch (more where
    logits are trained through or compared whole, fewer where the checks project them from hidden states); `hidden`,
    `layers`: for the activations of one batch, and one block's share of the weights (`block_weights`).
    """
    activations = batch_tokens * (output_copies * output_width + 4 * hidden * (layers + 8)) * 4
    weights = parameters * load_bytes_per_element
    block = weights // max(layers, 1) + output_width * hidden * load_bytes_per_element  # a block, or the head's table
    between_blocks = sequential_tokens * hidden * 4 * 2
    return MemoryEstimate(
        weights, kept_outputs + activations, parity_session, min(block, weights), between_blocks, sequential
    )


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


LAZY_ABOVE = 0.5
"""A compile that may read weights lazily does when its in-memory estimate exceeds this share of the available
memory (`reads_lazily`): the estimate leaves out allocator slack and transient copies, lazy reading gives the same
results, and on the CPU it costs little time next to the model's runs (README "Real-size models")."""


def reads_lazily(estimate: MemoryEstimate) -> bool:
    """Whether a compile with this in-memory `estimate`, which could read its weights lazily, should (`LAZY_ABOVE`;
    no when the available memory is unknown)."""
    available = available_memory()
    return available is not None and estimate.total > LAZY_ABOVE * available


def describe_available() -> str:
    """The memory available now in GiB, or `unknown`."""
    available = available_memory()
    return f"{available / GiB:.1f} GiB" if available is not None else "unknown"


def check_fits(estimate: MemoryEstimate, what: str, *, could_read_lazily: bool = False) -> None:
    """Raise `SparsecError` (exit 2) when `estimate.total` exceeds the memory available now, naming the options that
    shrink each part; it suggests `--weights lazy` when `could_read_lazily` (the compile loads the weights whole but
    need not)."""
    available = available_memory()
    if available is None or estimate.total <= available:
        return
    lazily = "read the weights lazily (--weights lazy), " if could_read_lazily else ""
    raise SparsecError(
        f"{what} needs about {estimate.total / GiB:.1f} GiB (weights {estimate.weights / GiB:.1f} GiB, calibration "
        f"{estimate.calibration_held / GiB:.1f} GiB, the ONNX Runtime session of the parity check "
        f"{estimate.parity_session / GiB:.1f} GiB) and {available / GiB:.1f} GiB are available: {lazily}load in "
        "bfloat16 (--dtype bfloat16), export in a half precision (export.precision: fp16), use smaller calibration "
        "batches (calibration.batch_size) or fewer parity samples (export.parity.samples)"
        + (", fewer calibration samples (calibration.samples)" if estimate.sequential else "")
        + ", or compile on a machine with more memory"
    )
