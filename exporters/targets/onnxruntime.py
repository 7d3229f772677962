"""ONNX Runtime: run an exported model and check it against the PyTorch program (backend parity).

Two targets (`OnnxRuntime`): `onnxruntime` (CPUExecutionProvider, the default) and `onnxruntime-cuda`
(CUDAExecutionProvider only, from onnxruntime-gpu, the `gpu` extra; `require_onnxruntime` fails fast where a target
cannot run). Both run the same ONNX file, the contrib `com.microsoft::MoE` lowering included (ONNX Runtime has CPU
and CUDA kernels for it), and build nothing beyond it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from sparsec.data import parity
from sparsec.data.calibration import CalibrationSet
from sparsec.data.parity import ParityOptions, Precision
from sparsec.errors import SparsecError
from sparsec.exporters.targets import register_target
from sparsec.exporters.targets.base import Runner, Target
from sparsec.ir.program import Program

if TYPE_CHECKING:
    import onnx


CUDA = "CUDAExecutionProvider"
# Builds of ONNX Runtime on PyPI: each ships the same `onnxruntime` module, so exactly one may be installed.
BUILDS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn")
INSTALL = {"onnxruntime": 'pip install -e ".[cpu]"', "onnxruntime-cuda": 'pip install -e ".[gpu]"'}


def installed_builds(site: str | Path | None = None) -> list[str]:
    """The ONNX Runtime builds (`BUILDS`) installed in `site`, by default the directory the `onnxruntime` module
    loads from (a build elsewhere on the path, e.g. outside a virtualenv, is shadowed, not overwritten).

    Example:
        >>> installed_builds()
        ['onnxruntime']
    """
    if site is None:
        spec = importlib.util.find_spec("onnxruntime")
        if spec is None or not spec.submodule_search_locations:
            return []
        site = Path(next(iter(spec.submodule_search_locations))).parent
    names = {dist.metadata["Name"].lower().replace("_", "-") for dist in importlib.metadata.distributions(path=[str(site)])}
    return [name for name in BUILDS if name in names]


def require_onnxruntime(target: str = "onnxruntime") -> None:
    """Raise `SparsecError` unless `target` (`onnxruntime` or `onnxruntime-cuda`) can run here: an ONNX Runtime build
    installed and importable; for `onnxruntime-cuda` exactly one build (onnxruntime-gpu) and a session that actually
    gets the CUDA provider (a device and the CUDA libraries). Cheap (a one-node session at most); called before capture.

    Two builds overwrite each other's files in the one `onnxruntime` module: which one loads depends on the install
    order, and uninstalling either breaks the other. Any build runs the CPU target.

    Example:
        >>> require_onnxruntime("onnxruntime-cuda")
        SparsecError: --target onnxruntime-cuda needs ONNX Runtime's CUDAExecutionProvider, and onnxruntime 1.32.0 ...
    """
    builds = installed_builds()
    if not builds:
        raise SparsecError(f"--target {target} runs ONNX Runtime, which is not installed here: {INSTALL[target]}")
    keep = "onnxruntime-gpu>=1.28" if target == "onnxruntime-cuda" else "onnxruntime>=1.23"
    reinstall = f"keep one build: pip uninstall -y {' '.join(builds)} && pip install '{keep}'"
    try:
        import onnxruntime as ort

        ort.InferenceSession  # noqa: B018  (missing from a module half removed by uninstalling another build)
    except (ImportError, AttributeError) as exc:
        raise SparsecError(f"the `onnxruntime` module ({' + '.join(builds)}) does not import ({exc}); {reinstall}") from exc
    if target != "onnxruntime-cuda":
        return
    if len(builds) > 1:
        raise SparsecError(f"--target onnxruntime-cuda: {' and '.join(builds)} are both installed; they ship the same "
                           f"`onnxruntime` module (the one loading here, {ort.__version__}, offers "
                           f"{ort.get_available_providers()}); {reinstall}")
    available = ort.get_available_providers()
    if CUDA not in available:
        raise SparsecError(f"--target onnxruntime-cuda needs ONNX Runtime's {CUDA}, and {builds[0]} {ort.__version__} "
                           f"here offers only {available}; replace it with onnxruntime-gpu on a machine with an NVIDIA "
                           f"GPU, CUDA and cuDNN: pip uninstall -y {builds[0]} && {INSTALL[target]}")
    try:
        got = ort.InferenceSession(cuda_probe_model().SerializeToString(), providers=[CUDA]).get_providers()
    except Exception as exc:  # onnxruntime raises when the CUDA libraries or the device are missing
        got, why = [], f": {str(exc).strip().splitlines()[0]}"
    else:
        why = "; ONNX Runtime's log above names what it could not load"
    if CUDA not in got:
        raise SparsecError(f"--target onnxruntime-cuda: onnxruntime-gpu {ort.__version__} is installed but no CUDA device "
                           f"is usable (a session with {CUDA} got {got}{why}); check nvidia-smi and the CUDA/cuDNN "
                           "versions onnxruntime-gpu needs")


def cuda_probe_model() -> onnx.ModelProto:
    """A one-node model that every onnxruntime sparsec supports loads: IR 8, opset 17 (the onnx package's defaults
    run ahead of onnxruntime: onnx 1.23 writes IR 14, which onnxruntime-gpu 1.31 refuses)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "cuda_probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


def session(path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",),
            config: Mapping[str, str] | None = None):
    """An `onnxruntime.InferenceSession` for `path`; `config`: session config entries
    (e.g. `{"session.intra_op.allow_spinning": "0"}`)."""
    try:
        import onnxruntime as ort
    except ImportError:
        require_onnxruntime()  # raises, naming the extra to install
        raise

    options = ort.SessionOptions()
    options.log_severity_level = 3
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))


def run(sess, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run a session on named torch inputs (inputs the graph dropped are ignored); outputs by name."""
    wanted = {i.name for i in sess.get_inputs()}
    feed = {k: v.detach().cpu().numpy() for k, v in inputs.items() if k in wanted}
    names = [o.name for o in sess.get_outputs()]
    return {n: torch.from_numpy(np.asarray(v)) for n, v in zip(names, sess.run(names, feed))}


def check_parity(
    program: Program,
    onnx_path: str | Path,
    calibration: CalibrationSet,
    *,
    options: ParityOptions,
    precision: Precision = "fp32",
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> dict:
    """Backend parity (`sparsec.data.parity`) of ONNX Runtime against the program on the first `options.samples`
    calibration samples.

    Raises `QualityError` naming every output and metric outside its tolerance. Returns the parity report
    (metrics and tolerances per output) with the runtime, provider and input shapes used.

    Example:
        >>> check_parity(program, "out/model.onnx", calib, options=ParityOptions(), precision="fp16")["metrics"]["logits"]["p99_abs"]
        0.0012
    """
    sess = session(onnx_path, providers)
    provider = sess.get_providers()[0]
    report = parity.backend_parity(program, lambda batch: run(sess, batch), calibration,
                                   backend=f"ONNX Runtime ({provider})", precision=precision, options=options)
    return {"runtime": "onnxruntime " + __import__("onnxruntime").__version__, "provider": provider, **report}


class OnnxRuntime(Target):
    """The two ONNX Runtime targets: `model.onnx` run by a session on one execution provider (no silent fallback,
    so parity measures that provider's kernels). `cuda=False`: `onnxruntime`, the CPU provider, which has no BF16
    MatMul and still compiles a recipe without ONNX (`export.onnx: false`: `program.pt2` alone); `cuda=True`:
    `onnxruntime-cuda`, the CUDA provider of onnxruntime-gpu."""

    def __init__(self, *, cuda: bool) -> None:
        self.cuda = cuda
        self.name = "onnxruntime-cuda" if cuda else "onnxruntime"
        self.description = (f"ONNX Runtime's {CUDA} (onnxruntime-gpu, the gpu extra, and an NVIDIA GPU)" if cuda else
                            'ONNX Runtime on CPU (default; the cpu extra: pip install -e ".[cpu]")')
        self.providers = (CUDA,) if cuda else ("CPUExecutionProvider",)
        self.needs_onnx = cuda

    def check(self, recipe) -> None:
        export = recipe.export
        if not export.onnx:
            return
        if export.precision == "bf16" and not self.cuda:
            raise SparsecError("export.precision: bf16 does not run on ONNX Runtime's CPU provider (no BF16 MatMul "
                               "kernel); use fp16, or --target tensorrt / onnxruntime-cuda")
        require_onnxruntime(self.name)

    def load(self, directory: Path) -> Runner:
        path = Path(directory) / "model.onnx"
        if not path.is_file():
            raise SparsecError(f"{directory} has no model.onnx (a `sparsec compile --out` directory holds one)")
        require_onnxruntime(self.name)
        sess = session(path, self.providers)
        return lambda inputs: run(sess, inputs)

    def parity(self, program: Program, directory: Path, calibration: CalibrationSet, options: ParityOptions,
               precision: Precision) -> dict:
        return check_parity(program, Path(directory) / "model.onnx", calibration, options=options, precision=precision,
                            providers=self.providers)


register_target(OnnxRuntime(cuda=False))
register_target(OnnxRuntime(cuda=True))
