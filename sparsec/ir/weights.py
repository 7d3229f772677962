"""The weight store: a program's state tensors (parameters, buffers, constants), where each lives, and snapshots of them.

The tensors themselves sit in the `ExportedProgram`'s `state_dict` and `constants`, as torch.export expects; the
store is the one place that puts them there and knows what else backs them:

- Lazily backed weights. A program captured without its weights in memory (`sparsec.models.load_model(...,
  weights="lazy")`) is backed by the checkpoint's files (`attach`): the exported program holds meta tensors (shapes
  and dtypes), `tensor` reads a weight from its file on each call (not cached), `replace` stores the new (small)
  tensor, `drop` forgets it, and `held` / shapes never read. `materialize` reads them all into memory.
- Spilling. With `spill_to(directory)`, the tensors `replace` puts in place of lazily backed ones (a sliced FFN: half
  the weights of a 14B model) are written there and read back lazily too, so memory stays at one tensor.
- Stored copies. A tensor held in memory whose exact copy lies in a file (`note_stored_copies`) is referred to by
  that file in snapshots (`StoredCopy`), so a snapshot does not keep a weight a pass replaces alive.
- Snapshots. Passes never change a state tensor in place, they `replace` it: a snapshot shares the tensors (cheap),
  `restore` puts them back exactly, and `changed_in_place` finds the tensors a pass did edit in place.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from sparsec.errors import SparsecError
from sparsec.ir.stored import StoredTensor


@dataclass(frozen=True)
class StoredCopy:
    """A state tensor held in memory whose exact copy lies in a file (`WeightStore.note_stored_copies`): a snapshot
    keeps this, not the tensor, so a weight a pass replaces is freed at once and `restore` reads it back if needed.

    `tensor` is a weak reference; the copy stands for the program's tensor while that is the same object at the
    same in-place version (`holds`)."""

    stored: StoredTensor
    tensor: weakref.ref
    version: int
    device: torch.device
    requires_grad: bool | None  # None: not a Parameter

    def holds(self, tensor: Any) -> bool:
        return self.tensor() is tensor and tensor._version == self.version

    def resolve(self, cache: dict[tuple[Path, str], torch.Tensor]) -> torch.Tensor:
        """The tensor if it still lives, else a fresh read (once per stored key: tied weights stay tied)."""
        alive = self.tensor()
        if alive is not None and alive._version == self.version:
            return alive
        key = (self.stored.file, self.stored.key)
        if key not in cache:
            tensor = self.stored.read().to(self.device)
            if self.requires_grad is not None:
                tensor = torch.nn.Parameter(tensor, requires_grad=self.requires_grad)
            cache[key] = tensor
        return cache[key]


@dataclass(frozen=True)
class WeightSnapshot:
    """The state tensors at `WeightStore.snapshot()`, shared, not copied (a tensor with a stored copy as its
    `StoredCopy`); `tensor_versions` holds each tensor's in-place version counter (`WeightStore.changed_in_place`)."""

    state_dict: dict[str, torch.Tensor | StoredCopy]
    constants: dict[str, Any]
    tensor_versions: dict[str, int]
    stored: dict[str, StoredTensor | None]


def _tensor_versions(ep: ExportedProgram) -> dict[str, int]:
    """In-place version counter of every state tensor (bumped by each in-place op on it)."""
    tensors = {**ep.state_dict, **ep.constants}
    return {name: t._version for name, t in tensors.items() if isinstance(t, torch.Tensor)}


def _like(held: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as a Parameter with `held`'s `requires_grad` if `held` is one (a parameter stays a parameter)."""
    if isinstance(held, torch.nn.Parameter):
        return torch.nn.Parameter(tensor, requires_grad=held.requires_grad)
    return tensor


class WeightStore:
    """The state tensors of one `ExportedProgram` (see the module docstring).

    `lazy` maps each lazily backed name to its stored tensor (None: only its shape is known, captured from a config
    without a checkpoint); `copies` maps names held in memory to their `StoredCopy`.
    """

    def __init__(
        self,
        exported: ExportedProgram,
        lazy: Mapping[str, StoredTensor | None] | None = None,
        copies: Mapping[str, StoredCopy] | None = None,
    ) -> None:
        self._exported = exported
        self._lazy: dict[str, StoredTensor | None] = dict(lazy or {})
        self._copies: dict[str, StoredCopy] = dict(copies or {})
        self._spill: Path | None = None

    def held(self, name: str) -> torch.Tensor:
        """The tensor the exported program holds for `name` (a meta tensor for a lazily backed one); never reads."""
        ep = self._exported
        return ep.state_dict[name] if name in ep.state_dict else ep.constants[name]

    def _put(self, name: str, tensor: torch.Tensor) -> None:
        """Hold `tensor` for the existing state name `name`, where the exported program keeps it."""
        ep = self._exported
        (ep.state_dict if name in ep.state_dict else ep.constants)[name] = tensor

    def tensor(self, name: str) -> torch.Tensor:
        """The state tensor `name`; a lazily backed one is read from its file now, on each call."""
        if name in self._lazy:
            stored = self._lazy[name]
            if stored is None:
                raise SparsecError(
                    f"{name} has no weights: the program was captured from a config without a "
                    "checkpoint; a decision that reads weights needs the model's .safetensors files"
                )
            return stored.read()
        return self.held(name)

    def is_lazy(self, name: str) -> bool:
        return name in self._lazy

    def lazy_names(self) -> list[str]:
        """Names of the state tensors not in memory (read from their files when asked for)."""
        return sorted(self._lazy)

    @property
    def device(self) -> torch.device:
        """The first materialised state tensor's device; CPU for none (lazily backed weights are read onto the CPU)."""
        ep = self._exported
        for tensor in [*ep.state_dict.values(), *ep.constants.values()]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                return tensor.device
        return torch.device("cpu")

    def attach(self, sources: Mapping[str, StoredTensor | None]) -> None:
        """Back state tensors by tensors stored on disk, read when needed (None: there is no tensor, only its shape).

        What was held for them (e.g. the never-written parameters of a model built without weights) is dropped for
        a meta tensor of the same shape and dtype. `SparsecError` for an unknown name or a stored tensor of another
        shape or dtype.
        """
        ep = self._exported
        for name, stored in sources.items():
            if name not in ep.state_dict and name not in ep.constants:
                raise SparsecError(f"attach_weights: the program has no state tensor named {name!r}")
            held = self.held(name)
            if stored is not None and (tuple(held.shape) != stored.shape or held.dtype != stored.dtype):
                raise SparsecError(
                    f"{stored.file}: {stored.key!r} is {list(stored.shape)} {stored.dtype}, the program's "
                    f"{name} is {list(held.shape)} {held.dtype}; the checkpoint does not fit the config"
                )
            self._put(name, _like(held, held.detach().to("meta")))
            self._lazy[name] = stored

    def spill_to(self, directory: str | os.PathLike | None) -> None:
        """Write the tensors `replace` puts in place of lazily backed ones into safetensors files in `directory`
        (which the caller owns and removes) and back them lazily, instead of holding them; None stops."""
        self._spill = Path(directory) if directory is not None else None

    def note_stored_copies(self, sources: Mapping[str, StoredTensor]) -> None:
        """Record that the in-memory state tensors named in `sources` are exact copies of those stored tensors (a
        model read from its checkpoint). Snapshots then refer to the file instead of holding the tensor
        (`StoredCopy`); `restore` reads back what was freed. A tensor replaced or changed in place afterwards is no
        longer taken for its copy. `SparsecError` for an unknown name or another shape or dtype."""
        for name, stored in sources.items():
            if name in self._lazy:
                continue  # lazily backed: nothing held
            try:
                held = self.held(name)
            except KeyError:
                raise SparsecError(f"note_stored_copies: the program has no state tensor named {name!r}") from None
            if tuple(held.shape) != stored.shape or held.dtype != stored.dtype:
                raise SparsecError(
                    f"{stored.file}: {stored.key!r} is {list(stored.shape)} {stored.dtype}, the program's "
                    f"{name} is {list(held.shape)} {held.dtype}; it is no copy of it"
                )
            grad = held.requires_grad if isinstance(held, torch.nn.Parameter) else None
            self._copies[name] = StoredCopy(stored, weakref.ref(held), held._version, held.device, grad)

    def materialize(self) -> None:
        """Read every lazily backed state tensor into memory, one at a time; afterwards nothing is lazily backed.

        `SparsecError` (nothing read) when some tensor has no stored weights (captured from a config only).
        """
        missing = [name for name, stored in self._lazy.items() if stored is None]
        if missing:
            raise SparsecError(
                f"{len(missing)} state tensors have no weights ({missing[:3]}...): the program was "
                "captured from a config without a checkpoint and cannot run or be written"
            )
        for name in list(self._lazy):
            self._put(name, _like(self.held(name), self._lazy.pop(name).read()))

    def replace(self, name: str, value: torch.Tensor) -> None:
        """Put `value` in place of the state tensor `name`; a parameter stays a parameter (a copy of `value`).

        In place of a lazily backed tensor while spilling (`spill_to`), `value` is written to a file and backed
        lazily in turn.
        """
        old = self.held(name)
        if self._lazy.pop(name, None) is not None and self._spill is not None:
            from safetensors.torch import save_file

            path = self._spill / f"{name}.{len(os.listdir(self._spill))}.safetensors"  # unique: one more each time
            save_file({name: value.detach().contiguous().cpu()}, str(path))
            self._put(name, _like(old, torch.empty_like(value, device="meta")))
            self._lazy[name] = StoredTensor(path, name, tuple(value.shape), value.dtype)
            return
        if isinstance(old, torch.nn.Parameter):
            value = value.detach().clone()
        self._put(name, _like(old, value))

    def add(self, name: str, tensor: torch.Tensor, *, in_state_dict: bool) -> None:
        """Hold a new state tensor, in the exported program's state dict or (not persistent) its constants."""
        ep = self._exported
        (ep.state_dict if in_state_dict else ep.constants)[name] = tensor

    def drop(self, name: str) -> None:
        """Forget the state tensor `name`: held, lazily backed or noted as stored."""
        self._exported.state_dict.pop(name, None)
        self._exported.constants.pop(name, None)
        self._lazy.pop(name, None)
        self._copies.pop(name, None)

    def snapshot(self) -> WeightSnapshot:
        ep = self._exported
        copies = self._copies
        return WeightSnapshot(
            state_dict={n: copies[n] if n in copies and copies[n].holds(t) else t for n, t in ep.state_dict.items()},
            constants=dict(ep.constants),
            tensor_versions=_tensor_versions(ep),
            stored=dict(self._lazy),
        )

    def restore(self, snapshot: WeightSnapshot) -> None:
        """Hold what `snapshot` held. A tensor it knows by its stored copy is the same object if it still lives,
        else read back. The snapshot stays valid."""
        ep = self._exported
        cache: dict[tuple[Path, str], torch.Tensor] = {}
        ep.state_dict.clear()
        for name, value in snapshot.state_dict.items():
            if isinstance(value, StoredCopy):
                tensor = value.resolve(cache)
                self._copies[name] = dataclasses.replace(value, tensor=weakref.ref(tensor), version=tensor._version)
                value = tensor
            ep.state_dict[name] = value
        ep.constants.clear()
        ep.constants.update(snapshot.constants)
        self._lazy = dict(snapshot.stored)

    def changed_in_place(self, snapshot: WeightSnapshot) -> list[str]:
        """State tensors still shared with `snapshot` that were modified in place since (by their in-place version
        counters; writes through `.data` escape it). One it knows by a stored copy that has been freed since is
        shared with nothing."""
        now = _tensor_versions(self._exported)
        shared = {
            **{n: t.tensor() if isinstance(t, StoredCopy) else t for n, t in snapshot.state_dict.items()},
            **snapshot.constants,
        }
        current = {**self._exported.state_dict, **self._exported.constants}
        return sorted(
            name
            for name, version in snapshot.tensor_versions.items()
            if shared[name] is not None and current.get(name) is shared[name] and now.get(name) != version
        )

    def _identity(self, name: str) -> Any:
        """What stands for tensor `name`: its stored tensor if lazy or held as an exact copy, else the tensor."""
        if name in self._lazy:
            return self._lazy[name]
        ep = self._exported
        held = ep.state_dict.get(name, ep.constants.get(name))
        copy = self._copies.get(name)
        return copy.stored if copy is not None and held is not None and copy.holds(held) else held

    def shares(self, other: WeightStore, name: str) -> bool:
        """Whether tensor `name` is the same in both stores: the same object, or the same stored tensor that both
        read or hold an exact copy of. False when either lacks it."""
        mine, theirs = self._identity(name), other._identity(name)
        if mine is None or theirs is None:
            return False
        return mine is theirs or (isinstance(mine, StoredTensor) and mine == theirs)

    def shared_with(self, exported: ExportedProgram) -> WeightStore:
        """A store for `exported`, which holds this store's tensors: the same lazily backed and stored-copy names."""
        return WeightStore(exported, self._lazy, self._copies)

    def frozen_onto(self, exported: ExportedProgram) -> WeightStore:
        """A store for `exported`, a copy of this program holding the same tensors in dicts of its own, that keeps
        none alive a later `replace` drops here: one held on the CPU with an exact copy on disk is made a meta
        tensor in `exported` and read lazily from its file, like those lazily backed here."""
        on_disk = {
            n: c.stored
            for n, c in self._copies.items()
            if n in exported.state_dict and c.holds(exported.state_dict[n]) and c.device.type == "cpu"
        }  # files are read onto the CPU
        for name in on_disk:
            held = exported.state_dict[name]
            exported.state_dict[name] = _like(held, held.detach().to("meta"))
        return WeightStore(exported, {**self._lazy, **on_disk})
