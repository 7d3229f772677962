"""The `Target` protocol: what a deployment backend provides to `sparsec compile`, `run` and `bench`.

A target checks, before any work, that it can run here and fits the recipe (`check`), says how the ONNX file is
lowered for it (`lowering`), builds its artifact from the lowered ONNX (`build`: a TensorRT engine; nothing for
ONNX Runtime), loads an artifact directory into a callable (`load`) and runs backend parity against the program
(`parity`). Its recipe options, if any, are a dataclass parsed from `export.<section>` (TensorRT: `tensorrt:`).

The recipe is passed as a `sparsec.recipe.Recipe` but not typed as one: the recipe sits above this layer and
imports it (to find the option sections), not the other way round.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparsec.data.calibration import CalibrationSet
from sparsec.data.parity import ParityOptions, Precision, ProgramReference
from sparsec.ir.program import Program

Runner = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]
"""A loaded artifact: named torch inputs in, named torch outputs (on the host) back."""

MOE_LOWERINGS = ("standard", "contrib")


@dataclass(frozen=True)
class Lowering:
    """How the compiler lowers the program to ONNX for a target.

    `precision`: the compute type of the ONNX file (`sparsec.exporters.lowering.precision`; "fp32" leaves the
    export as it is). `scatter_reduction`: whether the `standard` MoE lowering may use `ScatterND(reduction="add")`
    (TensorRT's parser lacks it).
    """

    precision: Precision
    scatter_reduction: bool = True


class Target(abc.ABC):
    """A deployment backend. Subclass it, set the class attributes, implement `load` and `parity`, and register an
    instance with `sparsec.exporters.targets.register_target` (or the `sparsec.targets` entry-point group).

    Class attributes:
        name: the `--target` value.
        description: one line for `--help`: what runs the artifact and what the target needs installed.
        section: its options' key under the recipe's `export:` (e.g. "tensorrt"), or None.
        options: the dataclass parsed from that section (fields with `metadata={"path": True}` are resolved
            relative to the recipe file); None when `section` is.
        needs_onnx: True when the target cannot do without the ONNX file (`export.onnx: false` is then an error);
            False when a recipe without ONNX still compiles for it (the artifact is `program.pt2` alone).
        artifacts: the files `build` writes into the output directory besides `model.onnx`.
        moe_lowerings: the `export.moe_lowering` values whose ONNX the target runs.

    Example::

        class OnnxFile(Target):
            name = "onnx-file"
            description = "the ONNX file alone, run by ONNX Runtime on CPU"

            def load(self, directory):
                sess = onnxruntime.session(directory / "model.onnx")
                return lambda inputs: onnxruntime.run(sess, inputs)

            def parity(self, reference, directory, options, precision):
                return onnxruntime.check_parity(reference, directory / "model.onnx", options=options,
                                                precision=precision)

        register_target(OnnxFile())
    """

    name: str = ""
    description: str = ""
    section: str | None = None
    options: type | None = None
    needs_onnx: bool = True
    artifacts: tuple[str, ...] = ()
    moe_lowerings: tuple[str, ...] = MOE_LOWERINGS

    def check(self, recipe: Any) -> None:
        """Raise `SparsecError` naming what is missing here (module, device) or what in `recipe` the target cannot
        run, and the fix. Cheap: called before the model is loaded. The compiler has already checked `needs_onnx`."""
        return None

    def recipe_options(self, recipe: Any) -> Any:
        """This target's parsed `export.<section>` options in `recipe` (its defaults where the recipe has none)."""
        if self.section is None:
            raise TypeError(f"target {self.name!r} has no recipe options section")
        return getattr(recipe.export, self.section)

    def lowering(self, recipe: Any) -> Lowering:
        """How to lower the program to ONNX for this target; by default in `export.precision`."""
        return Lowering(precision=recipe.export.precision)

    def build(
        self,
        program: Program,
        onnx_path: Path,
        directory: Path,
        recipe: Any,
        calibration: CalibrationSet,
        log: Callable[[str], None],
    ) -> dict[str, Any]:
        """Build the artifact in `directory` from the lowered `onnx_path` (or the program); return the report sections
        it adds (TensorRT: `{"engine": {...}}`). `log` takes progress lines. By default nothing is built."""
        return {}

    @abc.abstractmethod
    def load(self, directory: Path) -> Runner:
        """The artifact in `directory` (a compile output) as a `Runner`. Raises `SparsecError` when the directory
        lacks the target's file or the target cannot run here."""

    @abc.abstractmethod
    def parity(
        self, reference: ProgramReference, directory: Path, options: ParityOptions, precision: Precision
    ) -> dict[str, Any]:
        """Backend parity (`sparsec.data.parity`) of the artifact in `directory` against the program of `reference`
        on its calibration samples. Call `reference.compute()` (the program's outputs, then the program is released)
        before opening the backend's session, so the two never hold memory together. Raises `QualityError` naming
        each output and metric outside its tolerance; returns the parity report."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
