"""sparsec: capture a transformer as one FX graph, rewrite it with checked passes, lower it to ONNX / TensorRT."""

__version__ = "0.1.0"

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

__all__ = [
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
