"""The `Target` protocol: what a deployment backend provides to `sparsec compile`, `run` and `bench`.

A target checks, before any work, that it can run here and fits the recipe (`check`), says how the ONNX file is
lowered for it (`lowering`), builds its artifact from the lowered ONNX or from the program itself (`build`: a
TensorRT engine, an AOTInductor package; nothing for ONNX Runtime), loads an artifact directory into a callable
(`load`), says what inputs that takes (`input_specs`) and runs backend parity against the program (`parity`). Its
recipe options, if any, are a dataclass parsed from `export.<section>` (TensorRT: `tensorrt:`).

The recipe is passed as a `sparsec.recipe.Recipe` but not typed as one: the recipe sits above this layer and
imports it (to find the option sections), not the other way round.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsec.data import parity
from sparsec.data.calibration import CalibrationSet, embedding_sizes
from sparsec.data.parity import ParityOptions, Precision, ProgramReference
from sparsec.errors import SparsecError
from sparsec.ir.program import Program

Runner = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]
"""A loaded artifact: named torch inputs in, named torch outputs (on the host) back."""

MOE_LOWERINGS = ("standard", "contrib")


@dataclass(frozen=True)
class InputSpec:
    """One input of an artifact, enough to synthesize it (`sparsec.runner.synthetic_inputs`) or check a calibration
    file against it: `shape` holds ints and, for dynamic dims, their names (`batch`, `seq`); `high`: for token ids,
    the rows of the embedding table they index (ids lie in [0, high)), else None."""

    name: str
    dtype: torch.dtype
    shape: tuple[int | str, ...]
    high: int | None = None


def onnx_input_specs(onnx_path: Path) -> list[InputSpec]:
    """The graph inputs of an ONNX file (its weights are not read), in order."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    bounds = onnx_embedding_sizes(model)
    specs = []
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        dtype = torch.from_numpy(np.zeros(0, np_dtype)).dtype
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "") for d in dims)
        specs.append(InputSpec(value.name, dtype, shape, bounds.get(value.name)))
    return specs


def program_input_specs(program: Program) -> list[InputSpec]:
    """The program's user inputs as `InputSpec`s: dtypes and sizes from the capture, its dynamic dims by name,
    token-id bounds from the embedding tables the inputs index."""
    placeholders = {n.name: n for n in program.graph.find_nodes(op="placeholder")}
    bounds = embedding_sizes(program)
    specs = []
    for name, node_name in zip(program.input_names, program.exported.graph_signature.user_inputs):
        value = placeholders[node_name].meta["val"]
        dims = program.dynamic_dims.get(name, {})
        shape = tuple(dims[axis] if axis in dims else int(size) for axis, size in enumerate(value.shape))
        specs.append(InputSpec(name, value.dtype, shape, bounds.get(node_name)))
    return specs


def onnx_embedding_sizes(model) -> dict[str, int]:
    """Graph input name -> rows of the initializer (embedding table) a `Gather` indexes with it, for an ONNX
    `ModelProto`: the bound token ids stay below."""
    tables = {i.name: list(i.dims) for i in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    return {
        n.input[1]: int(tables[n.input[0]][0])
        for n in model.graph.node
        if n.op_type == "Gather" and len(n.input) > 1 and n.input[0] in tables and n.input[1] in inputs
    }


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
        builds_from_onnx: True when the artifact is the lowered ONNX file or made from it; False when `build`
            compiles the program itself (AOTInductor): no ONNX file is written for the target, `build` gets
            `onnx_path=None`, and parity always runs.
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
    builds_from_onnx: bool = True
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
        """How to lower the program to ONNX for this target; by default in `export.precision`, and "fp32" for a
        target that builds from the program (`builds_from_onnx` False: no ONNX file, so parity judges at the
        program's own precision)."""
        return Lowering(precision=recipe.export.precision if self.builds_from_onnx else "fp32")

    def build(
        self,
        program: Program,
        onnx_path: Path | None,
        directory: Path,
        recipe: Any,
        calibration: CalibrationSet,
        log: Callable[[str], None],
    ) -> dict[str, Any]:
        """Build the artifact in `directory` from the lowered `onnx_path` (or the program); return the report sections
        it adds (TensorRT: `{"engine": {...}}`). `log` takes progress lines. By default nothing is built."""
        return {}

    def input_specs(self, directory: Path) -> list[InputSpec]:
        """The inputs the artifact in `directory` takes, in order; by default those of its `model.onnx`. Raises
        `SparsecError` when the directory lacks the file they are read from."""
        path = Path(directory) / "model.onnx"
        if not path.is_file():
            raise SparsecError(f"{directory} has no model.onnx (a `sparsec compile --out` directory holds one)")
        return onnx_input_specs(path)

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


def runner_parity(
    target: Target,
    reference: ProgramReference,
    directory: Path,
    options: ParityOptions,
    precision: Precision,
    *,
    backend: str,
) -> dict[str, Any]:
    """`Target.parity` for a target whose artifact runs in this process through `target.load`: the program's
    outputs first (`reference.compute()` releases the program), then the artifact's on the same samples."""
    program_side = reference.compute()
    report = parity.backend_parity(
        program_side, target.load(directory), backend=backend, precision=precision, options=options
    )
    return {"runtime": f"torch {torch.__version__} ({backend})", **report}
