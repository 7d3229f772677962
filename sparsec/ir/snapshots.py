"""Snapshots: a program as it was, to put back when a pass fails (what the `PassManager` takes before every pass).

Contract: taking one is cheap, the graph is copied (nodes and their metadata dicts) and the tensors are shared
(`WeightStore.snapshot`); `restore` makes the program what it was, exactly, and leaves the snapshot valid to
restore again. That holds because passes replace state tensors (`Program.replace_state`) and signature entries,
never edit them in place; `Program.changed_in_place` finds the tensors a pass did edit in place.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch.export.graph_signature import ExportGraphSignature
from torch.fx import Graph

from sparsec.ir.editing import set_signature
from sparsec.ir.tags import Tagger
from sparsec.ir.weights import WeightSnapshot

if TYPE_CHECKING:
    from sparsec.ir.program import Program


@dataclass(frozen=True)
class ProgramSnapshot:
    """A program as it was at `Program.snapshot()`, for `Program.restore`.

    The graph is a copy; signature entries and tensors (`weights`) are shared with the program.
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


def take(program: Program) -> ProgramSnapshot:
    """`Program.snapshot`."""
    signature = program.exported.graph_signature
    return ProgramSnapshot(
        graph=copy.deepcopy(program.graph),
        signature=ExportGraphSignature(list(signature.input_specs), list(signature.output_specs)),
        family=program.family,
        tagger=copy.deepcopy(program.tagger),
        dynamic_dims=copy.deepcopy(program.dynamic_dims),
        weights=program.weights.snapshot(),
    )


def restore(program: Program, snapshot: ProgramSnapshot) -> None:
    """`Program.restore`: graph, signature, state and metadata as at `snapshot`; recompiles (the nodes are new)."""
    program.graph_module.graph = copy.deepcopy(snapshot.graph)
    set_signature(program.exported, inputs=snapshot.signature.input_specs, outputs=snapshot.signature.output_specs)
    program.weights.restore(snapshot.weights)
    program.family = snapshot.family
    program.tagger = copy.deepcopy(snapshot.tagger)
    program.dynamic_dims = copy.deepcopy(snapshot.dynamic_dims)
    program.recompile()
