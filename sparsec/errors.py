"""Exceptions sparsec raises for problems a user can fix.

Every error names what is wrong and what to do. The CLI maps them to exit codes: `SparsecError` (bad input:
model, recipe, options) exits 2; `QualityError` (a quality gate or backend parity check failed) exits 1;
`VerificationError` (a pass broke the program: a bug in that pass, not in the input) exits 3, as any other
internal error does.
"""

from __future__ import annotations

import signal


class SparsecError(Exception):
    """Base class: a problem with the user's input, reported before or instead of doing work."""

    exit_code = 2


class CaptureError(SparsecError):
    """The model could not be captured with torch.export.

    Attributes:
        partial_graph: the FX graph torch.export had built when it failed (text), if it offered one.
    """

    partial_graph: str | None = None


class FamilyError(SparsecError):
    """A model family cannot be registered (not a `Family`; its name, a model_type or a built-in taken), or a
    named family or built-in model does not exist."""


class RecipeError(SparsecError):
    """A recipe (or a pass's options) is malformed: unknown key, wrong type, value out of range."""


class PassError(SparsecError):
    """A pass's precondition (`requires`) or postcondition (`ensures`) does not hold."""


class VerificationError(SparsecError):
    """The program is inconsistent after a pass (lint, shapes, parameter bookkeeping): a bug in that pass (its
    author's to fix: sparsec's for a built-in pass), not in the user's input."""

    exit_code = 3


class CalibrationError(SparsecError):
    """Calibration data cannot be read or does not fit the model's inputs."""


class QualityError(SparsecError):
    """A quality gate or the backend parity check failed; no artifact is written."""

    exit_code = 1


class Terminated(BaseException):
    """The process got SIGTERM or SIGHUP (`timeout`, a CI cancel, a closed terminal) while sparsec held signals
    as exceptions (`sparsec.staging.signals_as_exceptions`): raised where the program was, so every `finally`
    removes what it staged. A `BaseException`, like `KeyboardInterrupt`, so no `except Exception` swallows it.

    Attributes:
        signum: the signal's number; the CLI exits with 128 + it, as a shell reports a process the signal ended.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum
