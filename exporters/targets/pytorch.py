"""The PyTorch program itself: `program.pt2`, the transformed program `sparsec compile` writes beside every target's
artifact, run by torch in Python (`sparsec.ir.program.Program.load`, sparsec's operators registered).

It is the reference every other target is checked against, so running it answers "is a difference the backend's or
the program's?" (`sparsec eval --target pytorch`, `sparsec run --target pytorch`). As a compile target it builds
nothing beyond `program.pt2` (`export.pt2` must stay on) and parity checks that the saved file, loaded back, computes
what the program in memory did.

Example::

    sparsec compile --model DIR --recipe recipe.yaml --out out/      # writes program.pt2 for any target
    sparsec eval --artifact out/ --target pytorch --text held_out.txt
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sparsec.data.parity import ParityOptions, Precision, ProgramReference
from sparsec.errors import SparsecError
from sparsec.exporters.targets.base import InputSpec, Runner, Target, program_input_specs, runner_parity
from sparsec.ir.program import Program

PROGRAM = "program.pt2"


def _program(directory: Path) -> Program:
    path = Path(directory) / PROGRAM
    if not path.is_file():
        raise SparsecError(
            f"{directory} has no {PROGRAM} (a `sparsec compile --out` directory holds one unless the recipe set "
            "export.pt2: false)"
        )
    return Program.load(path)


class PyTorchProgram(Target):
    """The `pytorch` target (module docstring)."""

    name = "pytorch"
    description = "the transformed program itself (program.pt2), run by torch in Python: the reference, no backend"
    needs_onnx = False
    builds_from_onnx = False

    def check(self, recipe: Any) -> None:
        if not recipe.export.pt2:
            raise SparsecError("--target pytorch runs program.pt2: leave export.pt2 on (it is off in the recipe)")

    def load(self, directory: Path) -> Runner:
        program = _program(directory)
        device = program.device

        def run(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                outputs = program.run({n: v.to(device) for n, v in inputs.items()})
            return {n: v.cpu() if torch.is_tensor(v) else v for n, v in outputs.items()}

        return run

    def input_specs(self, directory: Path) -> list[InputSpec]:
        return program_input_specs(_program(directory))

    def parity(
        self, reference: ProgramReference, directory: Path, options: ParityOptions, precision: Precision
    ) -> dict[str, Any]:
        return runner_parity(self, reference, directory, options, precision, backend="program.pt2")


TARGETS = (PyTorchProgram(),)  # registered by name in sparsec.exporters.targets
