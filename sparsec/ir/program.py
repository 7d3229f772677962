"""The IR: a captured model as one `torch.export` program, plus what passes need to rewrite it safely.

A `Program` owns one `ExportedProgram` (ATen-level FX graph with lifted parameters). Passes edit
`program.graph` in place; the `PassManager` then calls `program.recompile()` and `program.verify()`.
Parameters are graph inputs here, so "a weight is gone" has a precise meaning: no placeholder, no
signature entry, no tensor in the state dict. `prune()` establishes that after a rewrite.

State (parameters, buffers, constants) changes only through `add_state` / `add_parameter`, `replace_state`
and `remove_state`, which keep placeholders, signature and tensors in step. Passes never change a state tensor
in place: they put a new tensor in its place with `replace_state`. That is what makes `snapshot()` cheap (it
shares the tensors) and `restore()` exact; the `PassManager` checks it after every pass (`changed_in_place`).

`Program` is a facade over modules of `sparsec.ir` with one idea each: `weights` (state tensors, lazily backed and
spilled weights), `editing`, `execution`, `snapshots`, `verification`, `copies` and `serialization`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx import Graph, GraphModule, Node

from sparsec.ir import copies, editing, execution, serialization, snapshots, verification
from sparsec.ir.editing import RUNTIME_ASSERTS, STATE_KINDS, StateKind
from sparsec.ir.execution import ValueRewrite
from sparsec.ir.snapshots import ProgramSnapshot
from sparsec.ir.stored import StoredTensor
from sparsec.ir.tags import Tagger
from sparsec.ir.verification import same_meta
from sparsec.ir.weights import WeightStore

__all__ = ["RUNTIME_ASSERTS", "Program", "ProgramSnapshot", "ValueRewrite", "same_meta"]

T = TypeVar("T")


class Program:
    """A whole model as one FX graph that passes rewrite in place.

    Attributes:
        exported: the underlying `torch.export.ExportedProgram`.
        family: the model family the tag defaults came from (`qwen2`, `janus`, ... or `unknown`).
        tagger: component tag rules (understanding / generation / shared) for module paths.
        dynamic_dims: for each input, `{axis: name}` of its dynamic dimensions (e.g. `{0: "batch", 1: "seq"}`).
        dim_bounds: `{dim name: largest size}` of the dynamic dims the model bounds (BERT's `seq` at
            `max_position_embeddings`); the others are unbounded.
        weights: the `WeightStore` of its state tensors (lazily backed, spilled, stored copies).
        source_config: the configuration of the model it was captured from, as a plain dict (a Hugging Face
            model's `config.to_dict()`), or None; it describes the model before any pass (a target writing a
            checkpoint rewrites it from the program). Not saved in `.pt2` files.

    The program's outputs are plain containers, made so when the `Program` is made: a model returning a
    `ModelOutput` returns a dict of the same names (`logits`), as the `.pt2` file `save` writes does.

    Example::

        program = sparsec.capture(model, {"input_ids": ids, "attention_mask": mask})
        region_index(program).region("model.layers.0").parameters[:2]
        # ['model.layers.0.self_attn.q_proj.weight', 'model.layers.0.self_attn.q_proj.bias']
        program.run({"input_ids": ids, "attention_mask": mask})["logits"].shape
        # torch.Size([2, 16, 128])
    """

    def __init__(
        self,
        exported: ExportedProgram,
        *,
        family: str = "unknown",
        tagger: Tagger | None = None,
        dynamic_dims: Mapping[str, Mapping[int, str]] | None = None,
        dim_bounds: Mapping[str, int] | None = None,
        source_config: Mapping[str, Any] | None = None,
    ) -> None:
        serialization.with_plain_outputs(exported)
        self.exported = exported
        self.family = family
        self.source_config = dict(source_config) if source_config is not None else None
        self.tagger = tagger or Tagger()
        self.dynamic_dims = {k: dict(v) for k, v in (dynamic_dims or {}).items()}
        self.dim_bounds = dict(dim_bounds or {})
        self.weights = WeightStore(exported)
        self._version = 0
        self._analyses: dict[Callable, Any] = {}
        self._analyses_version = 0
        verification.mark_inferred(self.graph)

    # ----- views -----------------------------------------------------------------------------------
    @property
    def graph_module(self) -> GraphModule:
        return self.exported.graph_module

    @property
    def graph(self) -> Graph:
        return self.exported.graph_module.graph

    @property
    def input_names(self) -> list[str]:
        """The user inputs, in call order (all captured as keyword arguments)."""
        return execution.input_names(self.exported)

    @property
    def output_names(self) -> list[str]:
        return execution.output_names(self.exported)

    @property
    def device(self) -> torch.device:
        """Where the program's weights are (`WeightStore.device`)."""
        return self.weights.device

    @property
    def version(self) -> int:
        """Incremented by every `recompile()`: analyses and statistics computed at an older version are stale."""
        return self._version

    def analysis(self, compute: Callable[[Program], T]) -> T:
        """`compute(self)`, cached until the next `recompile()` (`compute` is the key: pass the same function).

        Example::

            program.analysis(RegionIndex) is program.analysis(RegionIndex)
            # True
        """
        if self._analyses_version != self._version:
            self._analyses, self._analyses_version = {}, self._version
        if compute not in self._analyses:
            self._analyses[compute] = compute(self)
        return self._analyses[compute]

    def state_placeholders(self) -> dict[str, Node]:
        """Fully qualified state name (parameter, buffer, constant) -> its placeholder node."""
        return editing.state_placeholders(self.exported)

    def state_name(self, node: Node) -> str | None:
        """The parameter/buffer name a placeholder node stands for, or None for user inputs and other nodes."""
        if node.op != "placeholder":
            return None
        specs = self.exported.graph_signature.input_specs
        return next((s.target for s in specs if s.kind in STATE_KINDS and s.arg.name == node.name), None)

    def parameter_names(self) -> list[str]:
        return [s.target for s in self.exported.graph_signature.input_specs if s.kind == InputKind.PARAMETER]

    def num_parameters(self) -> int:
        """Number of parameter elements (buffers and constants excluded), as `sum(p.numel())` on the module."""
        return sum(self.exported.state_dict[n].numel() for n in self.parameter_names())

    def parameter_bytes(self) -> int:
        return sum(self.exported.state_dict[n].nbytes for n in self.parameter_names())

    # ----- weights (`WeightStore`) -------------------------------------------------------------------
    def state_tensor(self, name: str) -> torch.Tensor:
        """The state tensor `name`; a lazily backed one is read from its file now, on each call (not cached)."""
        return self.weights.tensor(name)

    def state_shape(self, name: str) -> torch.Size:
        """The shape of state tensor `name`, never read from a file (parameter counts of lazily backed programs)."""
        return self.weights.held(name).shape

    def attach_weights(self, sources: Mapping[str, StoredTensor | None]) -> None:
        """Back state tensors by tensors stored on disk, read when needed (`WeightStore.attach`)."""
        self.weights.attach(sources)

    def spill_to(self, directory: str | os.PathLike | None) -> None:
        """Spill what `replace_state` puts in place of lazily backed tensors to `directory` (`WeightStore.spill_to`)."""
        self.weights.spill_to(directory)

    def note_stored_copies(self, sources: Mapping[str, StoredTensor]) -> None:
        """Record in-memory state tensors as exact copies of stored ones (`WeightStore.note_stored_copies`)."""
        self.weights.note_stored_copies(sources)

    def lazy_state(self) -> list[str]:
        """Names of the state tensors not in memory (read from their files when asked for)."""
        return self.weights.lazy_names()

    def materialize(self) -> None:
        """Read every lazily backed state tensor into memory, one at a time (`WeightStore.materialize`)."""
        self.weights.materialize()

    def replace_state(self, name: str, value: torch.Tensor) -> None:
        """Put `value` in place of the state tensor `name` (e.g. a sliced copy); a parameter stays a parameter.

        The program keeps its own copy of a new parameter. A changed shape or dtype is re-inferred by `verify()`.
        """
        old = self.weights.held(name)
        self.weights.replace(name, value)
        if not same_meta(old, value):
            self.state_placeholders()[name].meta.pop("val", None)

    # ----- editing (`editing`) -------------------------------------------------------------------------
    def add_state(
        self, name: str, value: torch.Tensor, kind: StateKind = "parameter", *, persistent: bool = True
    ) -> Node:
        """Add a parameter, buffer or constant tensor (a copy of `value`) with its placeholder node, which it returns,
        and signature entry (`sparsec.ir.editing.add_state`)."""
        return editing.add_state(self.exported, self.weights, name, value, kind, persistent)

    def add_parameter(self, name: str, value: torch.Tensor) -> Node:
        """`add_state(name, value, "parameter")`: a new weight (frozen; `distill` can train it)."""
        return self.add_state(name, value, "parameter")

    def remove_state(self, name: str) -> None:
        """Remove a state tensor nobody reads (placeholder, signature entry, tensor); one still read is refused."""
        editing.remove_state(self.exported, self.weights, name)

    def replace_uses(self, node: Node, replacement: Node, *, except_in: Node | None = None) -> None:
        """Make every user of `node` (but `except_in`) read `replacement`, program outputs included."""
        editing.replace_uses(self.exported, node, replacement, except_in)

    def prune(self) -> list[str]:
        """Dead-code-eliminate and drop state nobody uses; returns the removed state names. Recompiles."""
        removed = editing.prune(self.exported, self.weights)
        self.recompile()
        return removed

    def recompile(self) -> None:
        """Regenerate the graph module's code after in-place graph edits and invalidate cached views."""
        self.graph_module.recompile()
        self._version += 1

    # ----- execution (`execution`) -----------------------------------------------------------------------
    def flat_args(
        self, inputs: Mapping[str, torch.Tensor], state: Callable[[str], torch.Tensor] | None = None
    ) -> list[Any]:
        """The graph module's positional arguments for `inputs` by name (moved to `device`) and the state tensors
        (`state(name)`, default `state_tensor`): `named_outputs(program.graph_module(*program.flat_args(inputs)))`
        is `run(inputs)` with grad (training through the graph, `sparsec.data.distill`)."""
        return execution.flat_args(self.exported, self.weights, inputs, state or self.state_tensor)

    def named_outputs(self, flat: Any) -> dict[str, torch.Tensor]:
        """The user outputs by name from the graph module's flat result (see `flat_args`)."""
        return execution.named_outputs(self.exported, flat)

    def run(
        self,
        inputs: Mapping[str, torch.Tensor],
        observe: Callable[[Node, Any], None] | None = None,
        nodes: set[Node] | None = None,
        rewrite: Mapping[Node, ValueRewrite] | None = None,
        shapes_only: bool = False,
        outputs_from: Mapping[Node, Node] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the graph on `inputs` by name and return the outputs by name; `observe` reports node values as they
        are computed, `rewrite` replaces them, `shapes_only` runs on fake tensors, `outputs_from` returns another
        node's value in place of an output's and skips what only that output needed (`sparsec.ir.execution.run`)."""
        return execution.run(
            self.exported, self.weights, self.state_tensor, inputs, observe, nodes, rewrite, shapes_only, outputs_from
        )

    def run_segmented(
        self,
        batches: Sequence[Mapping[str, torch.Tensor]],
        cuts: Iterable[Node],
        observe: Callable[[int, Node, Any], None] | None = None,
        nodes: set[Node] | None = None,
        rewrite: Mapping[Node, ValueRewrite] | None = None,
        on_segment: Callable[[int, int], None] | None = None,
        outputs_from: Mapping[Node, Node] | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Run the graph over all `batches` segment by segment, split after each node of `cuts`, and yield each
        batch's outputs by name, equal to `run`'s (`sparsec.ir.execution.run_segmented`).

        Example::

            blocks = [block.outputs()[-1] for block in region_index(program).blocks()]
            outputs = list(program.run_segmented(list(calibration.batches()), blocks))
        """
        return execution.run_segmented(
            self.exported,
            self.weights,
            self.state_tensor,
            batches,
            cuts,
            observe,
            nodes,
            rewrite,
            on_segment,
            outputs_from,
        )

    # ----- snapshots, verification, copies, persistence ------------------------------------------------
    def snapshot(self) -> ProgramSnapshot:
        """The program as it is now, for `restore`: cheap, the tensors are shared (`sparsec.ir.snapshots`)."""
        return snapshots.take(self.exported, self.weights, self.family, self.tagger, self.dynamic_dims)

    def restore(self, snapshot: ProgramSnapshot) -> None:
        """Make the program what it was at `snapshot` (which stays valid). Bumps `version`: the nodes are new."""
        snapshots.restore(self.exported, self.weights, snapshot)
        self.family = snapshot.family
        self.tagger = copy.deepcopy(snapshot.tagger)
        self.dynamic_dims = copy.deepcopy(snapshot.dynamic_dims)
        self.recompile()

    def changed_in_place(self, snapshot: ProgramSnapshot) -> list[str]:
        """State tensors still shared with `snapshot` and modified in place since (`WeightStore.changed_in_place`):
        such a change survives `restore`; a pass must `replace_state` instead."""
        return self.weights.changed_in_place(snapshot.weights)

    def verify(self) -> None:
        """Check the invariants every pass must keep (`sparsec.ir.verification`); raise `VerificationError`
        naming the broken one."""
        verification.verify(self.exported, self.weights)

    def without_runtime_asserts(self, extra_outputs: Sequence[str] = ()) -> Program:
        """A copy without runtime-assert nodes (ONNX has no meaning for them), sharing the weight tensors, whose
        graph also returns the nodes named in `extra_outputs` after the user outputs; `output_names` stay these."""
        program = self._with(copies.without_runtime_asserts(self.exported, extra_outputs))
        program.weights = self.weights.shared_with(program.exported)
        return program

    def frozen_copy(self) -> Program:
        """A copy of the program as it is now, which later rewrites of this one leave alone, holding the same
        tensors; one with an exact copy on disk, or read lazily, the copy reads from its file when it runs
        (`WeightStore.frozen_onto`: the dense reference a recovery pass trains against keeps no dropped weight)."""
        program = self._with(copies.detached(self.exported))
        program.weights = self.weights.frozen_onto(program.exported)
        return program

    def shares_state(self, other: Program, name: str) -> bool:
        """Whether state tensor `name` is the same in this program and `other` (a `frozen_copy` of one of them);
        False when either lacks it. Passes replace what they change, so a tensor shared is a tensor unchanged."""
        return self.weights.shares(other.weights, name)

    def _with(self, exported: ExportedProgram) -> Program:
        """A program of `exported` with this one's metadata."""
        return Program(
            exported,
            family=self.family,
            tagger=self.tagger,
            dynamic_dims=self.dynamic_dims,
            dim_bounds=self.dim_bounds,
            source_config=self.source_config,
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write a `.pt2` file loadable with plain `torch.export.load` (`sparsec.ir.serialization`); a lazily
        backed program is materialised first. Needs `import sparsec` to load only if the graph holds sparsec's own
        operators (`sparsec.load_program` does that)."""
        self.materialize()
        metadata = serialization.ProgramMetadata(self.family, self.tagger, self.dynamic_dims, self.dim_bounds)
        return serialization.save(self.exported, metadata, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Program:
        exported, meta = serialization.load(path)
        return cls(
            exported, family=meta.family, tagger=meta.tagger, dynamic_dims=meta.dynamic_dims, dim_bounds=meta.dim_bounds
        )

    def __repr__(self) -> str:
        n_ops = sum(1 for n in self.graph.nodes if n.op == "call_function")
        return f"Program(family={self.family!r}, ops={n_ops}, parameters={self.num_parameters():,})"
