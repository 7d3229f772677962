"""sparsec: capture a transformer as one FX graph, rewrite it with checked passes, lower it to ONNX / TensorRT."""

from .capture import capture
from .errors import (
    CalibrationError,
    CaptureError,
    PassError,
    QualityError,
    RecipeError,
    SparsecError,
    VerificationError,
)
from . import moe as _moe  # noqa: F401  (registers torch.ops.sparsec.moe: programs holding it load and run)
from .program import Program
from .tags import TagRule, Tagger

__version__ = "0.1.0"

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
