"""Snapshots: a program as it was, to put back when a pass fails (what the `PassManager` takes before every pass).

Contract: taking one is cheap, the graph is copied (nodes and their metadata dicts) and the tensors are shared
(`WeightStore.snapshot`); `restore` makes the graph, signature and tensors what they were, exactly, and leaves the
snapshot valid to restore again. That holds because passes replace state tensors (`Program.replace_state`) and
signature entries, never edit them in place; `Program.changed_in_place` finds the tensors a pass did edit in place.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature
from torch.fx import Graph

from sparsec.ir.editing import set_signature
from sparsec.ir.tags import Tagger
from sparsec.ir.weights import WeightSnapshot, WeightStore


@dataclass(frozen=True)
class ProgramSnapshot:
    """A program as it was at `Program.snapshot()`, for `Program.restore`.

    The graph is a copy; signature entries and tensors (`weights`) are shared with the program. `family`, `tagger`
    and `dynamic_dims` are the program's attributes then.
    """

    graph: Graph
    signature: ExportGraphSignature
    family: str
    tagger: Tagger
    dynamic_dims: dict[str, dict[int, str]]
    weights: WeightSnapshot

    @property
    def state_dict(self) -> dict[str, Any]:
        """The state dict as the snapshot holds it (a tensor with an exact copy on disk as its `StoredCopy`)."""
        return self.weights.state_dict


def take(
    exported: ExportedProgram,
    weights: WeightStore,
    family: str,
    tagger: Tagger,
    dynamic_dims: dict[str, dict[int, str]],
) -> ProgramSnapshot:
    """A snapshot of `exported`, its `weights` and the program's attributes (copied)."""
    signature = exported.graph_signature
    return ProgramSnapshot(
        graph=copy.deepcopy(exported.graph_module.graph),
        signature=ExportGraphSignature(list(signature.input_specs), list(signature.output_specs)),
        family=family,
        tagger=copy.deepcopy(tagger),
        dynamic_dims=copy.deepcopy(dynamic_dims),
        weights=weights.snapshot(),
    )


def restore(exported: ExportedProgram, weights: WeightStore, snapshot: ProgramSnapshot) -> None:
    """Graph, signature and tensors as at `snapshot`; the caller restores its attributes and recompiles."""
    exported.graph_module.graph = copy.deepcopy(snapshot.graph)
    set_signature(exported, inputs=snapshot.signature.input_specs, outputs=snapshot.signature.output_specs)
    weights.restore(snapshot.weights)
