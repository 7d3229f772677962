"""Reference outputs: what a program computed on a calibration set before it was changed, batch by batch.

Quality checks compare a transformed program with the program as it was, batch by batch (`compare_outputs`).
Kept whole, those outputs cost samples x sequence x vocabulary floats (128 x 128 tokens of a 262,144-token
vocabulary: 17 GB), so `ReferenceOutputs` keeps them only while they are small (`KEEP_BYTES`) and otherwise
recomputes each batch from the unchanged program when a check reads it: memory then holds one batch's outputs
whatever the number of samples and the vocabulary, and the values are the same bit for bit (the same program on the
same batches), at the price of one more forward pass per check.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.export.graph_signature import InputKind, OutputKind

from sparsec.data.calibration import CalibrationSet

KEEP_BYTES = 256 * 2**20  # reference outputs up to this size are kept; larger ones are recomputed per batch


class ReferenceOutputs:
    """The outputs of `program` on every batch of `calibration`, in batch order, each time it is iterated.

    `program` must stay as it is while this is used: give a `Program.frozen_copy()` of a program that passes will
    change (it shares the weights, and reads those passes replace back from the checkpoint when it has one). Kept
    (computed once, now) when all batches' outputs take at most `keep_bytes` (default `KEEP_BYTES`; their size is
    `output_bytes`, in `bytes`); otherwise recomputed on every iteration, one batch at a time, and `program` is held
    instead (`kept` says which).
    """

    def __init__(
        self, program, calibration: CalibrationSet, *, keep_bytes: int | None = None, progress: bool = False
    ) -> None:
        self.calibration = calibration
        self.bytes = output_bytes(program, calibration)
        self.kept = self.bytes is not None and self.bytes <= (KEEP_BYTES if keep_bytes is None else keep_bytes)
        self._program = None if self.kept else program
        self._outputs = (
            [outputs for _, outputs in calibration.run(program, progress=progress, desc="reference outputs")]
            if self.kept
            else None
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._outputs is not None:
            yield from self._outputs
            return
        for _, outputs in self.calibration.run(self._program):
            yield outputs
            del outputs  # not held while the next batch is computed


def output_bytes(program, calibration: CalibrationSet) -> int | None:
    """The bytes of `program`'s user outputs over every batch of `calibration`: a full batch's, from the captured
    output shapes with each symbolic dimension read off the batch input that has it, times the number of batches
    (an upper bound when the last batch is short). None when a dimension cannot be resolved that way (an output
    whose size depends on values, not shapes)."""
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
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        dims = [dim if isinstance(dim, int) else sizes.get(str(dim)) for dim in value.shape]
        if any(d is None for d in dims):
            return None
        total += math.prod(dims) * value.element_size()
    return total * calibration.num_batches
