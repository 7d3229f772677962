"""AOTInductor: the transformed program compiled ahead of time by PyTorch's Inductor into one package, `model.aoti.pt2`.

`--target aotinductor` builds from the program itself, not from ONNX (`Target.builds_from_onnx` is False: no
`model.onnx` is written). The program, in the dtype it was loaded in (`--dtype`), is compiled for the device it
runs on (`--device cpu|cuda[:N]`) with its dynamic dims kept (`batch`, `seq`): C++ (and on CUDA, Triton kernels)
in a `.pt2` package that runs without the Python program, from Python (`torch._inductor.aoti_load_package`, what
`load` does) or from C++ (`torch::inductor::AOTIModelPackageLoader`). `sparsec::moe` nodes are decomposed into
ATen ops first (`sparsec.ops.moe.DECOMPOSITIONS`: grouped GEMMs on CUDA in bfloat16, a matmul chain per expert
elsewhere), so the package holds no Python op; any other op Inductor could only run through Python is refused,
named.

Two `.pt2` files, two loaders: `model.aoti.pt2` is this compiled package (`torch._inductor.aoti_load_package`,
what `sparsec run` uses); `program.pt2` beside it, written for every target, is the transformed program as
torch.export saves it (`torch.export.load` / `sparsec.load_program`; `--target pytorch`). Neither loader reads the
other's file, hence the names.

The package records what `sparsec run` / `bench` need (`aot_inductor.metadata`): the inputs (names, dtypes, dims
by name, token-id bounds) and the output names.

Precision: the package computes in the program's dtype; `export.precision` is the ONNX file's option and must be
left at fp32 (load the model in bfloat16 with `--dtype bfloat16` for a bfloat16 package). Parity uses the
tolerances of the program's precision.

Example::

    sparsec compile --model DIR --recipe recipe.yaml --target aotinductor --device cuda --dtype bfloat16 --out out/
    sparsec bench --artifact out/ --target aotinductor --dims batch=1,seq=2048
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from sparsec.data.calibration import CalibrationSet
from sparsec.data.parity import ParityOptions, Precision, ProgramReference
from sparsec.errors import SparsecError
from sparsec.exporters.targets.base import InputSpec, Runner, Target, program_input_specs, runner_parity
from sparsec.ir.program import Program
from sparsec.ops.moe import DECOMPOSITIONS

PACKAGE = "model.aoti.pt2"
INPUTS_KEY = "sparsec.inputs"
OUTPUTS_KEY = "sparsec.outputs"
CUDA_GRAPHS_KEY = "sparsec.cuda_graphs"
RUNS_PYTHON_FREE = ("aten", "prims")  # op namespaces an AOTInductor package runs without Python
TORCH_INTERNAL_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
"""The FutureWarning torch's own `run_decompositions` / AOTInductor raise while copying the program's pytree specs
(torch 2.13): nothing a user can act on, so `build` keeps it off their terminal."""


@dataclass
class AOTInductorOptions:
    """`export.aotinductor` (`--target aotinductor`).

    `max_autotune`: Inductor's max-autotune: GEMM and Triton kernel configurations are benchmarked while compiling
    (a slower compile, faster kernels; mostly on CUDA). `cuda_graphs`: `load` replays each input shape's call as a
    CUDA graph, captured on its first call (CUDA only; the package then runs single-threaded, which capture
    needs; a program that reads values on the host, such as the MoE's per-expert loop outside bfloat16, cannot be
    captured). `inductor_configs`: further `torch._inductor.config` settings by their dotted names, passed to
    `aoti_compile_and_package` and checked against the installed torch.
    """

    max_autotune: bool = False
    cuda_graphs: bool = False
    inductor_configs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import torch._inductor.config as inductor_config

        known = inductor_config.get_config_copy()
        unknown = sorted(k for k in self.inductor_configs if k not in known)
        if unknown:
            raise ValueError(
                f"inductor_configs: {unknown} are not torch._inductor.config settings in {torch.__version__}"
            )
        reserved = sorted(k for k in self.inductor_configs if k in ("max_autotune", "aot_inductor.metadata"))
        if reserved:
            raise ValueError(
                f"inductor_configs: {reserved} are set by sparsec (max_autotune: use the option of that name)"
            )


class AOTInductor(Target):
    """The `aotinductor` target (module docstring)."""

    name = "aotinductor"
    description = "an AOTInductor package (model.aoti.pt2) for --device cpu or cuda, run by torch (C++ compiler needed)"
    section = "aotinductor"
    options = AOTInductorOptions
    needs_onnx = False
    builds_from_onnx = False
    artifacts = (PACKAGE,)

    def check(self, recipe: Any) -> None:
        if recipe.export.precision != "fp32":
            raise SparsecError(
                f"export.precision: {recipe.export.precision} converts the ONNX file; --target aotinductor compiles "
                "the program in its own dtype: leave export.precision at fp32 and load the model in the dtype "
                "wanted (--dtype bfloat16 / model.dtype)"
            )
        device = torch.device(recipe.model.device)
        if self.recipe_options(recipe).cuda_graphs and device.type != "cuda":
            raise SparsecError(f"export.aotinductor.cuda_graphs needs --device cuda (the model runs on {device})")
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            compiler = get_cpp_compiler()
        except Exception as exc:  # Inductor raises when no compiler is configured or found
            raise SparsecError(f"--target aotinductor needs a C++ compiler (g++ or clang++): {exc}") from exc
        if shutil.which(compiler) is None:
            raise SparsecError(
                f"--target aotinductor compiles C++ with {compiler}, which is not on PATH; install g++ (e.g. "
                "apt install g++) or set CXX"
            )
        if device.type == "cuda" and not _has_triton():
            raise SparsecError("--target aotinductor on --device cuda generates Triton kernels: pip install triton")

    def build(
        self,
        program: Program,
        onnx_path: Path | None,
        directory: Path,
        recipe: Any,
        calibration: CalibrationSet,
        log,
    ) -> dict[str, Any]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=TORCH_INTERNAL_WARNING, category=FutureWarning)
            return self._build(program, directory, recipe, log)

    def _build(self, program: Program, directory: Path, recipe: Any, log) -> dict[str, Any]:
        options = self.recipe_options(recipe)
        program.materialize()
        moe_nodes = sum(1 for n in program.graph.nodes if n.target in DECOMPOSITIONS)
        exported = program.exported.run_decompositions(DECOMPOSITIONS)
        _check_python_free(exported)
        metadata = {
            INPUTS_KEY: json.dumps([_spec_json(s) for s in program_input_specs(program)]),
            OUTPUTS_KEY: json.dumps(program.output_names),
            CUDA_GRAPHS_KEY: str(int(options.cuda_graphs)),
        }
        configs = {**options.inductor_configs, "max_autotune": options.max_autotune, "aot_inductor.metadata": metadata}
        device = program.device
        log(
            f"compiling with AOTInductor for {device}"
            + (f" ({moe_nodes} MoE node(s) decomposed to ATen)" if moe_nodes else "")
            + (", max-autotune" if options.max_autotune else "")
        )
        start = time.perf_counter()
        path = directory / PACKAGE
        torch._inductor.aoti_compile_and_package(exported, package_path=str(path), inductor_configs=configs)
        return {
            "aotinductor": {
                "package": PACKAGE,
                "bytes": path.stat().st_size,
                "device": str(device),
                "dtype": str(next(iter(exported.state_dict.values()), torch.empty(0)).dtype).removeprefix("torch."),
                "torch": torch.__version__,
                "compile_seconds": round(time.perf_counter() - start, 2),
                "max_autotune": options.max_autotune,
                "cuda_graphs": options.cuda_graphs,
                "inductor_configs": options.inductor_configs,
                "moe_decomposed": moe_nodes,
            }
        }

    def load(self, directory: Path) -> Runner:
        call, device = load_package(directory)

        def run(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            outputs = call({n: v.to(device) for n, v in inputs.items()})
            return {n: v.cpu() for n, v in outputs.items()}

        return run

    def input_specs(self, directory: Path) -> list[InputSpec]:
        return _specs_from(_package_metadata(Path(directory) / PACKAGE), Path(directory))

    def parity(
        self, reference: ProgramReference, directory: Path, options: ParityOptions, precision: Precision
    ) -> dict[str, Any]:
        return runner_parity(self, reference, directory, options, precision, backend="AOTInductor")


def load_package(
    directory: str | Path,
) -> tuple[Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]], torch.device]:
    """(call, device) for the package in `directory`: `call` takes the named inputs on `device` (the one the package
    was compiled for) and returns the named outputs there, with no host copies (what a device benchmark times;
    `AOTInductor.load` adds the copies). Raises `SparsecError` when an input is missing or the package does not load."""
    directory = Path(directory)
    package, metadata = _load_package(directory)
    names = [spec.name for spec in _specs_from(metadata, directory)]
    outputs = json.loads(metadata[OUTPUTS_KEY])
    device = torch.device("cuda" if metadata.get("AOTI_DEVICE_KEY") == "cuda" else "cpu")
    run = _CudaGraphs(package) if metadata.get(CUDA_GRAPHS_KEY) == "1" else (lambda feed: package(**feed))

    def call(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in inputs]
        if missing:
            raise SparsecError(f"the package takes inputs {names}; missing {missing}")
        with torch.no_grad():
            result = run({n: inputs[n] for n in names})
        return dict(zip(outputs, pytree.tree_leaves(result)))

    return call, device


def _spec_json(spec: InputSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "dtype": str(spec.dtype).removeprefix("torch."),
        "shape": list(spec.shape),
        "high": spec.high,
    }


def _specs_from(metadata: Mapping[str, str], directory: Path) -> list[InputSpec]:
    if INPUTS_KEY not in metadata:
        raise SparsecError(f"{directory / PACKAGE} was not written by sparsec (its metadata has no {INPUTS_KEY})")
    return [
        InputSpec(s["name"], getattr(torch, s["dtype"]), tuple(s["shape"]), s["high"])
        for s in json.loads(metadata[INPUTS_KEY])
    ]


def _check_python_free(exported: torch.export.ExportedProgram) -> None:
    """Refuse ops a package could only run by calling back into Python (custom ops without a C++ kernel)."""
    foreign = sorted(
        {
            str(n.target)
            for n in exported.graph.nodes
            if n.op == "call_function"
            and isinstance(n.target, torch._ops.OpOverload)
            and n.target.namespace not in RUNS_PYTHON_FREE
        }
    )
    if foreign:
        raise SparsecError(
            f"--target aotinductor: the program holds {foreign}, which AOTInductor cannot run without Python "
            "(no decomposition into ATen ops is registered); use --target onnxruntime, or remove the pass that "
            "introduced them"
        )


def _package_metadata(path: Path) -> dict[str, str]:
    """The `aot_inductor.metadata` of the package at `path`, read from its archive (the compiled model, which holds
    the weights, is not loaded)."""
    if not path.is_file():
        raise SparsecError(f"{path.parent} has no {PACKAGE} (a `sparsec compile --target aotinductor` output)")
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("wrapper_metadata.json"))
            return json.loads(archive.read(name))
    except (zipfile.BadZipFile, StopIteration, json.JSONDecodeError) as exc:
        raise SparsecError(f"{path} is not an AOTInductor package ({type(exc).__name__}: {exc})") from exc


def _load_package(directory: Path):
    """(the loaded package, its metadata); single-threaded when it replays CUDA graphs (capture needs it)."""
    path = directory / PACKAGE
    metadata = _package_metadata(path)
    try:
        package = torch._inductor.aoti_load_package(str(path), run_single_threaded=metadata.get(CUDA_GRAPHS_KEY) == "1")
    except Exception as exc:  # the loader raises RuntimeError with the C++ reason (wrong device, torch version)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SparsecError(
            f"{path} does not load here ({reason}); a package runs on the device it was compiled for (a cuda "
            f"package needs a CUDA device) with the torch version that compiled it (here {torch.__version__})"
        ) from exc
    return package, metadata


class _CudaGraphs:
    """Each input signature's call captured once as a CUDA graph (after a warm-up on a side stream), then replayed
    with the inputs copied into its static buffers; outputs are cloned out of the graph's buffers."""

    def __init__(self, package) -> None:
        self.package = package
        self.graphs: dict[tuple, tuple[Any, dict[str, torch.Tensor], Any]] = {}

    def __call__(self, feed: Mapping[str, torch.Tensor]):
        key = tuple((n, tuple(v.shape), v.dtype) for n, v in feed.items())
        if key not in self.graphs:
            static = {n: v.clone() for n, v in feed.items()}
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.package(**static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.package(**static)
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        for n, v in feed.items():
            static[n].copy_(v)
        graph.replay()
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


TARGETS = (AOTInductor(),)  # registered by name in sparsec.exporters.targets
