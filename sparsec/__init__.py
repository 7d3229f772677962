"""sparsec: capture a transformer as one FX graph, rewrite it with checked passes, lower it to ONNX / TensorRT."""

__version__ = "0.1.0"

import os

import torch

from sparsec.capture import capture
from sparsec.errors import (
    CalibrationError,
    CaptureError,
    PassError,
    QualityError,
    RecipeError,
    SparsecError,
    VerificationError,
)
from sparsec.ir.program import Program
from sparsec.ir.tags import Tagger, TagRule
from sparsec.ops import moe as _moe  # noqa: F401  (registers torch.ops.sparsec.moe: programs holding it load and run)


def load_program(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """`torch.export.load(path)` for a `program.pt2` holding sparsec's operators (`torch.ops.sparsec.moe`, written
    by `ffn_to_moe`): importing sparsec registers them, without which torch cannot resolve them ("We failed to
    resolve torch.ops.sparsec.moe.default"). A program without them loads with torch alone.

    Returns the plain `ExportedProgram`, to run as torch.export's own (`.module()(**inputs)["logits"]`); for sparsec's
    IR (metadata, tags, further passes) use `Program.load`.

    Example::

        exported = sparsec.load_program("out/program.pt2")
        exported.module()(input_ids=ids, attention_mask=mask)["logits"]
    """
    return torch.export.load(path)


__all__ = [
    "load_program",
    "capture",
    "Program",
    "TagRule",
    "Tagger",
    "SparsecError",
    "CaptureError",
    "RecipeError",
    "PassError",
    "VerificationError",
    "CalibrationError",
    "QualityError",
]
