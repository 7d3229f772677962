"""Tensors stored in safetensors files, read one at a time when a program needs them.

A `Program` captured from a model whose parameters were never allocated (`sparsec.models.load_model(...,
weights="lazy")`) holds each weight as a `StoredTensor`: where it lies (file and key) and what the program sees
(shape, dtype). `read()` reads that one tensor from the file into memory of its own (`pread`, no mapping of the
file that would keep it resident; never unpickling anything), converted to the program's dtype; nothing is cached, so a pass that scores weights by magnitude holds one FFN's tensors at a
time.

A checkpoint may store one program tensor as several (the paper's MoE checkpoints store each expert's weights on
their own, where `sparsec::moe` takes them stacked): such a `StoredTensor` names its `parts`, read and stacked. One
computed from stored tensors in any files by a function of them (transformers' conversion of legacy checkpoints,
`sparsec.conversion`: per-expert tensors fused into one) is a `ConvertedTensor`.
"""

from __future__ import annotations

from collections.abc import Callable
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
        return self._checked(tensor, self.file)

    def _checked(self, tensor: torch.Tensor, where: Path) -> torch.Tensor:
        """`tensor` in `dtype`, after checking it has `shape` (`SparsecError` naming `where` otherwise)."""
        if tuple(tensor.shape) != self.shape:
            raise SparsecError(
                f"{where}: {self.key!r} has shape {tuple(tensor.shape)}, the program expects "
                f"{self.shape}; the checkpoint changed since the program was captured: capture it again"
            )
        return tensor.to(self.dtype)


@dataclass(frozen=True)
class ConvertedTensor(StoredTensor):
    """A tensor computed from the stored tensors `sources` ((file, key) pairs, in any files) by `convert`, which takes
    them read in that order, each in `dtype`, and returns the tensor (of `shape`). `file` and `key` name the first
    source and the result (in messages, and as the identity of a tensor read once): two `ConvertedTensor`s of one
    checkpoint never share a `key`. Reading holds the sources, the conversion's steps and the result at once (a few
    times the weight's size, briefly)."""

    sources: tuple[tuple[Path, str], ...] = ()
    convert: Callable[[list[torch.Tensor]], torch.Tensor] | None = None

    def read(self) -> torch.Tensor:
        """The tensor, freshly computed from its sources (CPU, `dtype`); `SparsecError` when a source no longer reads,
        the conversion fails on them or the result no longer has `shape`."""
        from safetensors import safe_open

        tensors: dict[tuple[Path, str], torch.Tensor] = {}
        try:
            for file in dict.fromkeys(file for file, _ in self.sources):
                with safe_open(str(file), framework="pt", backend="pread") as f:
                    for key in (k for p, k in self.sources if p == file):
                        tensors[(file, key)] = f.get_tensor(key).to(self.dtype)
        except Exception as exc:
            raise SparsecError(
                f"cannot read the tensors of {self.key!r} from {self.file.parent} ({exc}); the checkpoint changed or "
                "is corrupt since the program was captured: capture it again"
            ) from exc
        try:
            tensor = self.convert([tensors.pop(source) for source in self.sources])
        except Exception as exc:
            raise SparsecError(
                f"cannot compute {self.key!r} from its tensors in {self.file.parent} ({exc}); the checkpoint changed "
                "since the program was captured: capture it again"
            ) from exc
        return self._checked(tensor, self.file.parent)
