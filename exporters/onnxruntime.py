"""ONNX Runtime: run an exported model and check it against the PyTorch program (backend parity).

Two targets: `onnxruntime` (CPUExecutionProvider, the default) and `onnxruntime-cuda` (CUDAExecutionProvider
from onnxruntime-gpu, the `gpu` extra; `require_cuda_provider` fails fast where it cannot run). Both run the
same ONNX file, the contrib `com.microsoft::MoE` lowering included (ONNX Runtime has CPU and CUDA kernels for it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from sparsec import parity
from sparsec.calibration import CalibrationSet
from sparsec.errors import SparsecError
from sparsec.parity import ParityOptions, Precision
from sparsec.program import Program


CUDA = "CUDAExecutionProvider"
GPU_INSTALL = ('install onnxruntime-gpu in place of onnxruntime on a machine with an NVIDIA GPU, CUDA and cuDNN: '
               'pip uninstall -y onnxruntime && pip install -e ".[gpu]"')


def providers_for(target: str) -> tuple[str, ...]:
    """The execution providers of a target: `onnxruntime` -> CPU, `onnxruntime-cuda` -> CUDA only (no CPU fallback,
    so parity measures the CUDA kernels)."""
    return (CUDA,) if target == "onnxruntime-cuda" else ("CPUExecutionProvider",)


def require_cuda_provider() -> None:
    """Raise `SparsecError` unless ONNX Runtime can run on a CUDA device here: the provider must be compiled in
    (onnxruntime-gpu) and a one-node session must actually get it (a device and CUDA libraries present)."""
    import onnx
    import onnxruntime as ort

    available = ort.get_available_providers()
    if CUDA not in available:
        raise SparsecError(f"--target onnxruntime-cuda needs ONNX Runtime's {CUDA}, and onnxruntime {ort.__version__} "
                           f"here offers only {available}; {GPU_INSTALL}")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    probe = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe", [x],
                                                          [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    try:
        got = ort.InferenceSession(probe.SerializeToString(), providers=[CUDA]).get_providers()
    except Exception as exc:  # onnxruntime raises when the CUDA libraries or the device are missing
        got, why = [], f": {str(exc).splitlines()[0][:300]}"
    else:
        why = ""
    if CUDA not in got:
        raise SparsecError(f"--target onnxruntime-cuda: onnxruntime-gpu {ort.__version__} is installed but no CUDA device "
                           f"is usable (a session with {CUDA} got {got}{why}); check nvidia-smi and the CUDA/cuDNN "
                           "versions onnxruntime-gpu needs")


def session(path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",),
            config: Mapping[str, str] | None = None):
    """An `onnxruntime.InferenceSession` for `path`; `config`: session config entries
    (e.g. `{"session.intra_op.allow_spinning": "0"}`)."""
    import onnxruntime as ort

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
    """Backend parity (`sparsec.parity`) of ONNX Runtime against the program on the first `options.samples`
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
