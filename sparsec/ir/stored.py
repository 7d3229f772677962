"""Tensors stored in safetensors files, read one at a time when a program needs them.

A `Program` captured from a model whose parameters were never allocated (`sparsec.models.load_model(...,
weights="lazy")`) holds each weight as a `StoredTensor`: where it lies (file and key) and what the program sees
(shape, dtype). `read()` reads that one tensor from the file into memory of its own (`pread`, no mapping of the
file that would keep it resident; never unpickling anything), converted to the program's dtype; nothing is cached, so a pass that scores weights by magnitude holds one FFN's tensors at a
time.

A checkpoint may store one program tensor as several (the paper's MoE checkpoints store each expert's weights on
their own, where `sparsec::moe` takes them stacked): such a `StoredTensor` names its `parts`, read and stacked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sparsec.errors import SparsecError


@dataclass(frozen=True)
class StoredTensor:
    """Tensor `key` of the safetensors file `file`, read as `dtype` with `shape` (the program's view of it).

    With `parts`, the tensor is those tensors of `file` stacked along a new first dimension, in order, and `key`
    only names the stack (in messages, and as the identity of a tensor read once).
    """

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: tuple[str, ...] = ()

    def read(self) -> torch.Tensor:
        """The tensor, freshly read from the file (CPU, `dtype`); `SparsecError` when the file no longer matches."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.file), framework="pt", backend="pread") as f:
                if self.parts:
                    tensor = torch.stack([f.get_tensor(part).to(self.dtype) for part in self.parts])
                else:
                    tensor = f.get_tensor(self.key)
        except Exception as exc:
            raise SparsecError(
                f"cannot read {self.key!r} from {self.file} ({exc}); the checkpoint changed or is "
                "corrupt since the program was captured: capture it again"
            ) from exc
        if tuple(tensor.shape) != self.shape:
            raise SparsecError(
                f"{self.file}: {self.key!r} has shape {tuple(tensor.shape)}, the program expects "
                f"{self.shape}; the checkpoint changed since the program was captured: capture it again"
            )
        return tensor.to(self.dtype)
