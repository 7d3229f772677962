"""ONNX Runtime: run an exported model and check it against the PyTorch program (backend parity)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from sparsec.calibration import CalibrationSet
from sparsec.errors import QualityError
from sparsec.program import Program
from sparsec.quality import compare_outputs


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
    samples: int,
    min_cosine: float,
    max_rel_l2: float,
) -> dict:
    """Compare ONNX Runtime with the PyTorch program on the first `samples` calibration samples.

    Raises `QualityError` if any output's cosine or relative L2 error is outside the tolerances.
    Returns the metrics per output and the input shapes used.
    """
    sess = session(onnx_path)
    subset = CalibrationSet({k: v[:samples] for k, v in calibration.inputs.items()}, calibration.source,
                            batch_size=calibration.batch_size)
    pairs = [(program.run(b), run(sess, b), CalibrationSet.valid_mask(b)) for b in subset.batches()]
    metrics = compare_outputs(pairs)
    failures = [
        f"{name}: cosine {m['cosine']:.6f} (min {min_cosine}), rel_l2 {m['rel_l2']:.3g} (max {max_rel_l2})"
        for name, m in metrics.items()
        if m["cosine"] < min_cosine or m["rel_l2"] > max_rel_l2
    ]
    if failures:
        raise QualityError("ONNX Runtime output differs from the PyTorch program: " + "; ".join(failures))
    return {
        "runtime": "onnxruntime " + __import__("onnxruntime").__version__,
        "provider": sess.get_providers()[0],
        "input_shapes": {k: list(v.shape) for k, v in subset.inputs.items()},
        "metrics": metrics,
    }
