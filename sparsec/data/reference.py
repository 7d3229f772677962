"""Reference outputs: what a program computed on a calibration set before it was changed, batch by batch.

Quality checks compare a transformed program with the program as it was, batch by batch (`compare_outputs`).
Kept whole, those outputs cost samples x sequence x vocabulary floats (128 x 128 tokens of a 262,144-token
vocabulary: 17 GB), so `ReferenceOutputs` keeps them only while they are small (`KEEP_BYTES`) and otherwise
recomputes each batch from the unchanged program when a check reads it: memory then holds one batch's outputs
whatever the number of samples and the vocabulary, and the values are the same bit for bit (the same program on the
same batches), at the price of one more forward pass per check. A language model's logits that are a plain
projection (`sparsec.data.logits.logits_run`) are held as their hidden states and projected when read:
vocabulary-wide logits then cost little to keep.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx import Node

from sparsec.data.calibration import CalibrationSet
from sparsec.data.logits import logits_run

KEEP_BYTES = 256 * 2**20  # reference outputs up to this size are kept; larger ones are recomputed per batch


class ReferenceOutputs:
    """The outputs of `program` as it is now on every batch of `calibration`, in batch order, each time it is
    iterated; passes may change `program` afterwards.

    Kept (computed once, now, from `program` itself) when all batches' outputs take at most `keep_bytes` (default
    `KEEP_BYTES`; their size is `output_bytes`, in `bytes`); otherwise recomputed on every iteration, one batch at a
    time, from a `Program.frozen_copy()` made now (it shares the weights, and reads those passes replace back from
    the checkpoint when it has one). `kept` says which. Logits that are a plain projection come as
    `ProjectedLogits` with the projection as it is now.
    """

    def __init__(
        self, program, calibration: CalibrationSet, *, keep_bytes: int | None = None, progress: bool = False
    ) -> None:
        self.calibration = calibration
        run_as = logits_run(program)
        self.bytes = output_bytes(program, calibration, run_as.outputs_from)
        self.kept = self.bytes is not None and self.bytes <= (KEEP_BYTES if keep_bytes is None else keep_bytes)
        self._logits = run_as.logits
        if self.kept:
            self._program, self._outputs_from = None, None
            self._outputs = list(self._run(program, run_as.outputs_from, progress))
        else:
            self._program, self._outputs = program.frozen_copy(), None
            nodes = {n.name: n for n in self._program.graph.nodes}  # the copy's, by the names they share
            self._outputs_from = {nodes[k.name]: nodes[v.name] for k, v in (run_as.outputs_from or {}).items()}

    def _run(self, program, outputs_from, progress: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        runs = self.calibration.run(program, progress=progress, desc="reference outputs", outputs_from=outputs_from)
        for _, outputs in runs:
            yield outputs
            del outputs  # not held while the next batch is computed

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        outputs = self._outputs if self._outputs is not None else self._run(self._program, self._outputs_from)
        for batch in outputs:
            yield self._logits(batch)


def output_bytes(program, calibration: CalibrationSet, outputs_from: Mapping[Node, Node] | None = None) -> int | None:
    """The bytes of `program`'s user outputs over every batch of `calibration` (with `outputs_from`, of the nodes
    returned in their place): a full batch's, from the captured output shapes with each symbolic dimension read
    off the batch input that has it, times the number of batches (an upper bound when the last batch is short).
    None when a dimension cannot be resolved that way (an output whose size depends on values, not shapes)."""
    outputs_from = outputs_from or {}
    signature = program.exported.graph_signature
    placeholders = {n.name: n for n in program.graph.find_nodes(op="placeholder")}
    user_inputs = [s.arg.name for s in signature.input_specs if s.kind == InputKind.USER_INPUT]
    batch = next(calibration.batches())
    sizes: dict[str, int] = {}
    for name, placeholder in zip(program.input_names, user_inputs):
        value = placeholders[placeholder].meta.get("val")
        tensor = batch.get(name)
        if isinstance(value, torch.Tensor) and tensor is not None and value.dim() == tensor.dim():
            for dim, size in zip(value.shape, tensor.shape):
                if not isinstance(dim, int):
                    sizes.setdefault(str(dim), int(size))
    (output,) = program.graph.find_nodes(op="output")
    total = 0
    for node, spec in zip(output.args[0], signature.output_specs):
        if spec.kind != OutputKind.USER_OUTPUT or not hasattr(node, "meta"):
            continue
        node = outputs_from.get(node, node)
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        dims = [dim if isinstance(dim, int) else sizes.get(str(dim)) for dim in value.shape]
        if any(d is None for d in dims):
            return None
        total += math.prod(dims) * value.element_size()
    return total * calibration.num_batches
