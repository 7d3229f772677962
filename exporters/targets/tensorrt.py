"""TensorRT: build a serialized engine from the compiled ONNX, run it, check it against the PyTorch program.

The `tensorrt` target (`TensorRT`) and its recipe section `export.tensorrt` (`TensorRTOptions`). Two parts, kept
apart:

- CPU-side, importable anywhere and tested in CI: `require_tensorrt` (fails fast, before any work, naming what is
  missing: the `tensorrt` module, a CUDA build of torch to hold the engine's buffers, a CUDA device) and
  `derive_profiles` (the optimization profile's min/opt/max shapes from the ONNX inputs, the recipe's
  `export.tensorrt.profiles` and the shapes parity will feed).
- GPU-side, needing `tensorrt` and a GPU (`build_engine`, `Engine`), imported lazily, tested only by the
  `gpu`-marked tests.

Precision: the ONNX file comes already in the recipe's precision (`sparsec.exporters.lowering.precision`) and is built as a
strongly typed network: TensorRT 11 only has those (its `STRONGLY_TYPED` flag is deprecated and ignored), on
TensorRT 10 the flag is set. `typing="flags"` (TensorRT 10 only) builds the FP32 ONNX weakly typed with
`BuilderFlag.FP16` / `BF16` instead, leaving the choice of layer precision to TensorRT.

Example::
    require_tensorrt()
    profiles = derive_profiles({"input_ids": ["batch", "seq"]}, {"seq": [1, 128, 512]},
                               {"input_ids": [(8, 24)]})
    build_engine("out/model.onnx", "out/model.engine", profiles=profiles, precision="fp16")
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from sparsec.data.calibration import CalibrationSet
from sparsec.data.parity import ParityOptions, Precision, ProgramReference
from sparsec.errors import SparsecError
from sparsec.exporters.targets.base import Lowering, Runner, Target
from sparsec.ir.program import Program

INSTALL = (
    'install the gpu extra on a machine with an NVIDIA GPU: pip install -e ".[gpu]" '
    "(the tensorrt wheels fetch their libraries from NVIDIA's package index)"
)
Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]


@dataclass
class TensorRTOptions:
    """`export.tensorrt` (`--target tensorrt`).

    `profiles`: `{dim name: [min, opt, max]}` for the ONNX's dynamic dims (`batch`, `seq`); dims not named span
    1 .. the calibration shapes parity runs. `workspace_mib`: the builder's workspace pool limit. `timing_cache`:
    a file loaded before and saved after the build (reused across compiles; relative to the recipe file). `typing`:
    `strong` (the ONNX carries the precision; TensorRT 10 and 11) or `flags` (TensorRT 10 only: FP32 ONNX, FP16/BF16
    builder flags).
    """

    profiles: dict[str, list[int]] = field(default_factory=dict)
    workspace_mib: int = 4096
    timing_cache: str | None = field(default=None, metadata={"path": True})
    typing: Literal["strong", "flags"] = "strong"

    def __post_init__(self) -> None:
        if self.workspace_mib < 1:
            raise ValueError(f"workspace_mib: must be >= 1, got {self.workspace_mib}")
        for name, bounds in self.profiles.items():
            if len(bounds) != 3 or not 0 <= bounds[0] <= bounds[1] <= bounds[2]:
                raise ValueError(f"profiles.{name}: expected [min, opt, max] with 0 <= min <= opt <= max, got {bounds}")


def require_tensorrt() -> None:
    """Raise `SparsecError` naming what the `tensorrt` target lacks here (module, CUDA torch, GPU) and how to get it.

    Cheap: checks what is importable and visible, builds nothing. Called before capture.
    """
    missing = []
    if importlib.util.find_spec("tensorrt") is None:
        missing.append("the Python module `tensorrt` is not installed")
    if not torch.cuda.is_available():
        build = (
            "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no device is visible"
        )
        missing.append(
            f"torch {torch.__version__} has no usable CUDA device ({build}); the engine's input and "
            "output buffers are CUDA tensors"
        )
    if missing:
        raise SparsecError("--target tensorrt needs TensorRT and an NVIDIA GPU: " + "; ".join(missing) + f". {INSTALL}")


def tensorrt_major() -> int:
    import tensorrt as trt

    return int(trt.__version__.split(".")[0])


def derive_profiles(
    inputs: Mapping[str, Sequence[int | str | None]],
    ranges: Mapping[str, Sequence[int]] | None,
    observed: Mapping[str, Sequence[Sequence[int]]],
) -> Profile:
    """The optimization profile: per ONNX input its (min, opt, max) shape.

    Args:
        inputs: each ONNX input's dims: an int (static), a name (`batch`, `seq`: dynamic) or None (dynamic, unnamed).
        ranges: the recipe's `export.tensorrt.profiles`, `{dim name: [min, opt, max]}`.
        observed: the shapes each input will be fed (parity's calibration batches); every one must fit.

    A dynamic dim without a range gets min 1 (0 if a fed shape has 0 there), opt and max the largest observed
    value (the engine then serves up to the shapes it was checked at; give ranges for deployment). Unnamed dynamic dims cannot be ranged
    in the recipe and follow that rule per input.

    Raises `SparsecError` for a range naming no dim of the model, a range that is not min <= opt <= max
    (min >= 0), an observed shape outside its range or disagreeing with a static dim, or an input with
    no observed shape.

    Example:
        >>> derive_profiles({"input_ids": ["batch", "seq"]}, {"seq": [1, 64, 256]}, {"input_ids": [(8, 24), (3, 24)]})
        {'input_ids': ((1, 1), (8, 64), (8, 256))}
    """
    ranges = dict(ranges or {})
    names = {d for dims in inputs.values() for d in dims if isinstance(d, str)}
    unknown = sorted(set(ranges) - names)
    if unknown:
        raise SparsecError(
            f"export.tensorrt.profiles: {unknown} name no dynamic dim of the model; its dynamic dims are "
            f"{sorted(names)}"
        )
    for name, bounds in ranges.items():
        if len(bounds) != 3 or not 0 <= bounds[0] <= bounds[1] <= bounds[2]:
            raise SparsecError(
                f"export.tensorrt.profiles.{name}: expected [min, opt, max] with 0 <= min <= opt <= max, "
                f"got {list(bounds)}"
            )
    largest: dict[str, int] = {}
    smallest: dict[str, int] = {}
    for input_name, dims in inputs.items():
        shapes = observed.get(input_name)
        if not shapes:
            raise SparsecError(f"TensorRT profile: no shape observed for input {input_name!r}")
        for shape in shapes:
            if len(shape) != len(dims):
                raise SparsecError(
                    f"TensorRT profile: input {input_name!r} has rank {len(dims)}, fed shape {list(shape)}"
                )
            for axis, (dim, size) in enumerate(zip(dims, shape)):
                if isinstance(dim, int) and dim != size:
                    raise SparsecError(
                        f"TensorRT profile: input {input_name!r} axis {axis} is static {dim}, fed {size}"
                    )
                key = dim if isinstance(dim, str) else f"{input_name}:{axis}"
                largest[key] = max(largest.get(key, 0), int(size))
                smallest[key] = min(smallest.get(key, int(size)), int(size))
    for name, (low, _, high) in ranges.items():
        if name in largest and not low <= smallest[name] <= largest[name] <= high:
            raise SparsecError(
                f"export.tensorrt.profiles.{name}: [{low}, ..., {high}] does not hold the calibration "
                f"shapes parity runs ({smallest[name]} to {largest[name]}); widen it or change the "
                "calibration inputs"
            )
    profile: Profile = {}
    for input_name, dims in inputs.items():
        low, opt, high = [], [], []
        for axis, dim in enumerate(dims):
            if isinstance(dim, int):
                low.append(dim), opt.append(dim), high.append(dim)
                continue
            key = dim if isinstance(dim, str) else f"{input_name}:{axis}"
            bounds = ranges.get(dim) if isinstance(dim, str) else None
            if bounds is None:
                bounds = (min(1, smallest[key]), largest[key], largest[key])
            low.append(int(bounds[0])), opt.append(int(bounds[1])), high.append(int(bounds[2]))
        profile[input_name] = (tuple(low), tuple(opt), tuple(high))
    return profile


def onnx_input_dims(onnx_path: str | Path) -> dict[str, list[int | str | None]]:
    """Each graph input's dims as `derive_profiles` takes them."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    out = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        out[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    return out


def engine_profiles(
    onnx_path: str | Path, ranges: Mapping[str, Sequence[int]] | None, batches: Iterable[Mapping[str, torch.Tensor]]
) -> Profile:
    """`derive_profiles` for the inputs of `onnx_path` fed `batches` (the batches parity will run).

    Example::
        engine_profiles("out/model.onnx", {"seq": [1, 64, 512]}, calibration.head(8).batches())
        # {'input_ids': ((1, 1), (8, 64), (8, 512)), 'attention_mask': ((1, 1), (8, 64), (8, 512))}
    """
    observed: dict[str, list[Shape]] = {}
    for batch in batches:
        for name, value in batch.items():
            observed.setdefault(name, []).append(tuple(value.shape))
    dims = onnx_input_dims(onnx_path)
    return derive_profiles(dims, ranges, {name: observed.get(name, []) for name in dims})


# ----- GPU side: needs tensorrt and a CUDA device ------------------------------------------------------------------
def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    profiles: Profile,
    precision: Precision = "fp32",
    typing: Literal["strong", "flags"] = "strong",
    workspace_mib: int = 4096,
    timing_cache: str | Path | None = None,
) -> dict:
    """Parse `onnx_path` with TensorRT's OnnxParser and write the serialized engine to `engine_path`.

    `typing="strong"` (the ONNX carries the precision) or `"flags"` (TensorRT 10: FP32 ONNX + FP16/BF16 builder
    flags). `timing_cache`: loaded if the file exists, saved after the build. Raises `SparsecError` with every
    parser error (node, op, message) or when the build fails. Returns facts for the report.
    """
    import tensorrt as trt

    major = tensorrt_major()
    if typing == "flags" and major >= 11:
        raise SparsecError(
            f"export.tensorrt.typing: flags needs TensorRT 10 (builder precision flags are gone in "
            f"TensorRT {trt.__version__}, strongly typed only); use typing: strong"
        )
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if typing == "strong" and major == 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    start = time.perf_counter()
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            error = parser.get_error(i)
            name = error.node_name() if hasattr(error, "node_name") else "?"  # node_name/node_operator: TensorRT >= 10
            operator = error.node_operator() if hasattr(error, "node_operator") else "?"
            errors.append(f"node {error.node()} ({name}, {operator}): {error.desc()}")
        raise SparsecError(
            f"TensorRT {trt.__version__} cannot parse {onnx_path}: {len(errors)} error(s): " + "; ".join(errors)
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if typing == "flags" and precision != "fp32":
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profiles.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SparsecError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path} (see its log above)")
    Path(engine_path).write_bytes(memoryview(serialized))
    if cache_path:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return {
        "path": Path(engine_path).name,
        "tensorrt": trt.__version__,
        "typing": typing,
        "precision": precision,
        "profiles": {k: [list(s) for s in v] for k, v in profiles.items()},
        "workspace_mib": workspace_mib,
        "timing_cache": str(cache_path) if cache_path else None,
        "bytes": Path(engine_path).stat().st_size,
        "seconds": round(time.perf_counter() - start, 3),
    }


class Engine:
    """A deserialized engine run on CUDA torch tensors: `Engine(path).run({"input_ids": ...})` -> outputs by name.

    Example::
        Engine("out/model.engine").run({"input_ids": ids, "attention_mask": mask})["logits"].shape
        # torch.Size([8, 24, 256])
    """

    def __init__(self, path: str | Path) -> None:
        import tensorrt as trt

        self._trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise SparsecError(f"TensorRT cannot deserialize {path} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def _torch_dtype(self, name: str) -> torch.dtype:
        trt = self._trt
        return {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.bfloat16: torch.bfloat16,
            trt.int64: torch.int64,
            trt.int32: torch.int32,
            trt.bool: torch.bool,
        }[self.engine.get_tensor_dtype(name)]

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        stream = torch.cuda.current_stream()
        keep = {}
        for name in self.inputs:
            tensor = inputs[name].to("cuda", self._torch_dtype(name)).contiguous()
            keep[name] = tensor
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise SparsecError("TensorRT execution failed (see its log above)")
        stream.synchronize()
        return {k: v.cpu() for k, v in outputs.items()}


def check_parity(
    reference: ProgramReference, engine_path: str | Path, *, options: ParityOptions, precision: Precision = "fp32"
) -> dict:
    """Backend parity (`sparsec.data.parity`) of the engine against the program of `reference` (computed, and the
    program released, before the engine loads); raises `QualityError` naming each failing output and metric. The
    engine runs whole (`export.parity.mode` does not apply)."""
    import tensorrt as trt

    from sparsec.data import parity

    program_side = reference.compute()
    report = parity.backend_parity(
        program_side,
        Engine(engine_path).run,
        backend=f"TensorRT {trt.__version__}",
        precision=precision,
        options=options,
    )
    return {"runtime": f"tensorrt {trt.__version__}", "device": torch.cuda.get_device_name(), **report}


class TensorRT(Target):
    """`model.engine` built from the lowered ONNX (standard MoE lowering without scatter reductions; FP32 ONNX with
    builder flags under `typing: flags`, else in `export.precision`) and run on CUDA tensors."""

    name = "tensorrt"
    description = 'a TensorRT engine, also writes model.engine (the gpu extra: pip install -e ".[gpu]", an NVIDIA GPU)'
    section = "tensorrt"
    options = TensorRTOptions
    artifacts = ("model.engine",)
    moe_lowerings = ("standard",)

    def check(self, recipe: Any) -> None:
        if recipe.export.moe_lowering not in self.moe_lowerings:
            raise SparsecError(
                "export.moe_lowering: contrib emits ONNX Runtime's com.microsoft::MoE, which TensorRT "
                "does not parse; use moe_lowering: standard with --target tensorrt"
            )
        require_tensorrt()
        if self.recipe_options(recipe).typing == "flags" and tensorrt_major() >= 11:
            raise SparsecError(
                "export.tensorrt.typing: flags needs TensorRT 10 (TensorRT 11 builds strongly typed "
                "networks only); use typing: strong, the precision then comes from export.precision"
            )

    def lowering(self, recipe: Any) -> Lowering:
        flags = self.recipe_options(recipe).typing == "flags"
        return Lowering(precision="fp32" if flags else recipe.export.precision, scatter_reduction=False)

    def build(
        self,
        program: Program,
        onnx_path: Path,
        directory: Path,
        recipe: Any,
        calibration: CalibrationSet,
        log: Callable[[str], None],
    ) -> dict[str, Any]:
        options, export = self.recipe_options(recipe), recipe.export
        profiles = engine_profiles(onnx_path, options.profiles, calibration.head(export.parity.samples).batches())
        log("building the TensorRT engine")
        return {
            "engine": build_engine(
                onnx_path,
                directory / "model.engine",
                profiles=profiles,
                precision=export.precision,
                typing=options.typing,
                workspace_mib=options.workspace_mib,
                timing_cache=options.timing_cache,
            )
        }

    def load(self, directory: Path) -> Runner:
        require_tensorrt()
        path = Path(directory) / "model.engine"
        if not path.is_file():
            raise SparsecError(f"{directory} has no model.engine; compile with --target tensorrt")
        return Engine(path).run

    def parity(
        self, reference: ProgramReference, directory: Path, options: ParityOptions, precision: Precision
    ) -> dict[str, Any]:
        return check_parity(reference, Path(directory) / "model.engine", options=options, precision=precision)


TARGETS = (TensorRT(),)  # registered by name in sparsec.exporters.targets
