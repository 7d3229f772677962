"""ONNX Runtime: run an exported model and check it against the PyTorch program (backend parity).

Two targets (`OnnxRuntime`): `onnxruntime` (CPUExecutionProvider, the default) and `onnxruntime-cuda`
(CUDAExecutionProvider only, from onnxruntime-gpu, the `gpu` extra; `require_onnxruntime` fails fast where a target
cannot run). Both run the same ONNX file, the contrib `com.microsoft::MoE` lowering included (ONNX Runtime has CPU
and CUDA kernels for it), and build nothing beyond it.

Parity (`check_parity`) computes the program's side first and releases the program, then opens a session: of the
whole model, or, where that would not fit (`parity_mode`; `export.parity.mode`), of one block at a time.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from sparsec import resources
from sparsec.data import parity
from sparsec.data.parity import ParityOptions, Precision, ProgramReference
from sparsec.errors import SparsecError
from sparsec.exporters.lowering.segments import BOUNDARY_PREFIX as BOUNDARY
from sparsec.exporters.targets.base import Runner, Target

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
    names = {
        dist.metadata["Name"].lower().replace("_", "-") for dist in importlib.metadata.distributions(path=[str(site)])
    }
    return [name for name in BUILDS if name in names]


def require_onnxruntime(target: str = "onnxruntime") -> None:
    """Raise `SparsecError` unless `target` (`onnxruntime` or `onnxruntime-cuda`) can run here: an ONNX Runtime build
    installed and importable; for `onnxruntime-cuda` exactly one build (onnxruntime-gpu) and a session that actually
    gets the CUDA provider (a device and the CUDA libraries). Cheap (a one-node session at most); called before capture.

    Two builds overwrite each other's files in the one `onnxruntime` module: which one loads depends on the install
    order, and uninstalling either breaks the other. Any build runs the CPU target.

    Example::
        require_onnxruntime("onnxruntime-cuda")
        # SparsecError: --target onnxruntime-cuda needs ONNX Runtime's CUDAExecutionProvider, and onnxruntime 1.32.0 ...
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
        raise SparsecError(
            f"the `onnxruntime` module ({' + '.join(builds)}) does not import ({exc}); {reinstall}"
        ) from exc
    if target != "onnxruntime-cuda":
        return
    if len(builds) > 1:
        raise SparsecError(
            f"--target onnxruntime-cuda: {' and '.join(builds)} are both installed; they ship the same "
            f"`onnxruntime` module (the one loading here, {ort.__version__}, offers "
            f"{ort.get_available_providers()}); {reinstall}"
        )
    available = ort.get_available_providers()
    if CUDA not in available:
        raise SparsecError(
            f"--target onnxruntime-cuda needs ONNX Runtime's {CUDA}, and {builds[0]} {ort.__version__} "
            f"here offers only {available}; replace it with onnxruntime-gpu on a machine with an NVIDIA "
            f"GPU, CUDA and cuDNN: pip uninstall -y {builds[0]} && {INSTALL[target]}"
        )
    try:
        got = ort.InferenceSession(cuda_probe_model().SerializeToString(), providers=[CUDA]).get_providers()
    except Exception as exc:  # onnxruntime raises when the CUDA libraries or the device are missing
        got, why = [], f": {str(exc).strip().splitlines()[0]}"
    else:
        why = "; ONNX Runtime's log above names what it could not load"
    if CUDA not in got:
        raise SparsecError(
            f"--target onnxruntime-cuda: onnxruntime-gpu {ort.__version__} is installed but no CUDA device "
            f"is usable (a session with {CUDA} got {got}{why}); check nvidia-smi and the CUDA/cuDNN "
            "versions onnxruntime-gpu needs"
        )


def cuda_probe_model() -> onnx.ModelProto:
    """A one-node model that every onnxruntime sparsec supports loads: IR 8, opset 17 (the onnx package's defaults
    run ahead of onnxruntime: onnx 1.23 writes IR 14, which onnxruntime-gpu 1.31 refuses)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "cuda_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


def session(
    path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",), config: Mapping[str, str] | None = None
):
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


SESSION_BYTES_PER_FILE_BYTE = 2.0
"""ONNX Runtime's CPU session holds the initializers and, for MatMul, prepacked copies of their weights: about twice
the ONNX file's bytes at its peak (the estimate `parity_mode` judges a whole-model session by)."""


def onnx_bytes(onnx_path: str | Path) -> int:
    """Bytes of an ONNX file and its external data file."""
    path = Path(onnx_path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


WHOLE_SESSION_MAX_FILE_BYTES = 2**30
"""The largest ONNX file (with its external data) whose parity `auto` checks in one whole-model session."""


def parity_mode_for(file_bytes: int, mode: str, available: int | None) -> str:
    """`whole` or `blocks` for an ONNX file of `file_bytes`: `mode` unless `auto`.

    `auto` runs the whole model in one session up to `WHOLE_SESSION_MAX_FILE_BYTES` (1 GiB) of ONNX, when that
    session (`SESSION_BYTES_PER_FILE_BYTE` x the file) fits in `available` bytes: the file is then checked end to end
    as it will be deployed, at a cost small next to the compile. Above, it checks block by block (every segment of
    the file, stem, blocks and head, each against the program on the same boundary values): a whole-model session
    would hold about twice the file, and the FP32 file of a bf16 model is already twice its weights, so the compile's
    peak would be that session's (1.78x a 1.5B bf16 checkpoint's bytes against 1.28x block by block, README
    "Real-size models")."""
    if mode != "auto":
        return mode
    needed = file_bytes * SESSION_BYTES_PER_FILE_BYTE
    fits = available is None or needed <= available
    return "whole" if file_bytes <= WHOLE_SESSION_MAX_FILE_BYTES and fits else "blocks"


def parity_mode(onnx_path: str | Path, options: ParityOptions) -> str:
    """`parity_mode_for` the file at `onnx_path` and the memory available now."""
    return parity_mode_for(onnx_bytes(onnx_path), options.mode, resources.available_memory())


def check_parity(
    reference: ProgramReference,
    onnx_path: str | Path,
    *,
    options: ParityOptions,
    precision: Precision = "fp32",
    providers: Sequence[str] = ("CPUExecutionProvider",),
    open_session=None,
) -> dict:
    """Backend parity (`sparsec.data.parity`) of ONNX Runtime against the program of `reference` on its calibration
    samples: the program's side is computed (and the program released) before any session opens. The whole model
    in one session, or block by block (`parity_mode`, `check_block_parity`) where it would not fit.

    Raises `QualityError` naming every output (and block) and metric outside its tolerance. Returns the parity
    report (mode, metrics and tolerances per output, per block in blocks mode) with the runtime, provider and input
    shapes used. `open_session(path)`: how sessions are opened (by default `session(path, providers)`).

    Example::

        check_parity(ProgramReference(program, calib, 8), "out/model.onnx", options=ParityOptions(),
                     precision="fp16")["metrics"]["logits"]["p99_abs"]
        # 0.0012
    """
    open_session = open_session or (lambda path: session(path, providers))
    runtime = "onnxruntime " + __import__("onnxruntime").__version__
    if parity_mode(onnx_path, options) == "whole":
        program_side = reference.compute()
        sess = open_session(onnx_path)
        provider = sess.get_providers()[0]
        report = parity.backend_parity(
            program_side,
            lambda batch: run(sess, batch),
            backend=f"ONNX Runtime ({provider})",
            precision=precision,
            options=options,
        )
        return {"runtime": runtime, "provider": provider, **report}
    return _block_parity(reference, Path(onnx_path), options, precision, open_session, runtime)


def _block_parity(
    reference: ProgramReference,
    onnx_path: Path,
    options: ParityOptions,
    precision: Precision,
    open_session,
    runtime: str,
) -> dict:
    """Each segment's ONNX subgraph (`sparsec.exporters.lowering.segments`) in its own session, one at a time, fed
    with the program's boundary values; written next to the ONNX file (its external data resolves) and removed."""
    import onnx

    from sparsec.exporters.lowering.segments import (
        HEAD,
        boundary_name,
        onnx_dtype_to_torch,
        read_segments,
        segment_model,
    )

    model = onnx.load(str(onnx_path), load_external_data=False)
    segments = read_segments(model)
    boundaries = {o.removeprefix(BOUNDARY): o for n in model.graph.node for o in n.output if o.startswith(BOUNDARY)}
    program_side = reference.compute(values=list(boundaries))
    stops = set(boundaries.values())
    blocks, provider = {}, ""

    def opened(index: int, outputs: list[str]):
        """The segment's subgraph in a session, its feeds and their dtypes."""
        sub, feeds = segment_model(model, outputs, stops)
        path = onnx_path.with_name(f".parity-segment-{index}.onnx")
        try:
            onnx.save(sub, str(path))
            sess = open_session(path)
        finally:
            path.unlink(missing_ok=True)
        kinds = {i.name: onnx_dtype_to_torch(i.type.tensor_type.elem_type) for i in sub.graph.input}
        return sess, feeds, kinds

    def feed_of(batch, values, feeds, kinds):
        return {
            name: (batch[name] if name in batch else values[name.removeprefix(BOUNDARY)]).to(kinds[name])
            for name in feeds
        }

    sides = list(zip(program_side.inputs, program_side.values, program_side.outputs, program_side.masks))
    head_index = next(i for i, s in enumerate(segments) if s.name == HEAD)
    for index, segment in enumerate(segments):
        if index == head_index:
            continue
        outputs = [boundary_name(o) for o in segment.outputs]
        sess, feeds, kinds = opened(index, outputs)
        provider = sess.get_providers()[0]
        for batch, values, _, mask in sides:
            got = run(sess, feed_of(batch, values, feeds, kinds))
            for name, onnx_name in zip(segment.outputs, outputs):
                key = segment.name if len(segment.outputs) == 1 else f"{segment.name}:{name}"
                blocks.setdefault(key, []).append((values[name], got[onnx_name], mask))
        del sess
    # the head last, its outputs (a language model's logits) compared piece by piece as they come, never all held
    sess, feeds, kinds = opened(head_index, list(segments[head_index].outputs))
    provider = provider or sess.get_providers()[0]
    head = (
        (outs, run(sess, feed), mask)
        for batch, values, outputs, batch_mask in sides
        for feed, outs, mask in parity.backend_pieces(feed_of(batch, values, feeds, kinds), outputs, batch_mask)
    )
    report = parity.check_block_parity(
        blocks,
        head,
        backend=f"ONNX Runtime ({provider})",
        precision=precision,
        options=options,
        input_shapes=program_side.input_shapes,
    )
    return {"runtime": runtime, "provider": provider, **report}


class OnnxRuntime(Target):
    """The two ONNX Runtime targets: `model.onnx` run by a session on one execution provider (no silent fallback,
    so parity measures that provider's kernels). `cuda=False`: `onnxruntime`, the CPU provider, which has no BF16
    MatMul and still compiles a recipe without ONNX (`export.onnx: false`: `program.pt2` alone); `cuda=True`:
    `onnxruntime-cuda`, the CUDA provider of onnxruntime-gpu."""

    def __init__(self, *, cuda: bool) -> None:
        self.cuda = cuda
        self.name = "onnxruntime-cuda" if cuda else "onnxruntime"
        self.description = (
            f"ONNX Runtime's {CUDA} (onnxruntime-gpu, the gpu extra, and an NVIDIA GPU)"
            if cuda
            else 'ONNX Runtime on CPU (default; the cpu extra: pip install -e ".[cpu]")'
        )
        self.providers = (CUDA,) if cuda else ("CPUExecutionProvider",)
        self.needs_onnx = cuda

    def check(self, recipe) -> None:
        export = recipe.export
        if not export.onnx:
            return
        if export.precision == "bf16" and not self.cuda:
            raise SparsecError(
                "export.precision: bf16 does not run on ONNX Runtime's CPU provider (no BF16 MatMul "
                "kernel); use fp16, or --target tensorrt / onnxruntime-cuda"
            )
        require_onnxruntime(self.name)

    def load(self, directory: Path) -> Runner:
        path = Path(directory) / "model.onnx"
        if not path.is_file():
            raise SparsecError(f"{directory} has no model.onnx (a `sparsec compile --out` directory holds one)")
        require_onnxruntime(self.name)
        sess = session(path, self.providers)
        return lambda inputs: run(sess, inputs)

    def parity(
        self, reference: ProgramReference, directory: Path, options: ParityOptions, precision: Precision
    ) -> dict:
        return check_parity(
            reference,
            Path(directory) / "model.onnx",
            options=options,
            precision=precision,
            providers=self.providers,
            open_session=self.open_session,
        )

    def open_session(self, path: Path):
        """The session parity runs `path` in (one execution provider, no fallback)."""
        return session(path, self.providers)


TARGETS = (OnnxRuntime(cuda=False), OnnxRuntime(cuda=True))  # registered by name in sparsec.exporters.targets
