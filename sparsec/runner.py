"""Load a compiled artifact and run or time it: what `sparsec run` and `sparsec bench` do.

An artifact is a `sparsec compile` output directory, loaded by its target (`sparsec.exporters.targets`):
`model.onnx` (ONNX Runtime, CPU or CUDA), `model.engine` (TensorRT) or `model.aoti.pt2` (AOTInductor). Inputs come from
a calibration file (as for compile) or are synthesized from the artifact's input types (`artifact_inputs`: the
ONNX file's inputs, or those an AOTInductor package records), with the dynamic dims given by name (`--dims
batch=1,seq=128`): integer inputs named `*mask*` are ones, other integer inputs (token ids) uniform in [0, n)
where n is the first dim of the embedding table the graph gathers them from (else 2), floats standard normal,
bools true.

`interleaved_timing` times several artifacts on the same inputs in one run (`sparsec bench --baseline`): their
calls alternate, so machine noise (another job, clock changes) falls on each alike, and `ideal_speedup` says what
their compile reports promise.

Example::
    runner = load_artifact("out/demo", target="onnxruntime")
    inputs = synthetic_inputs(artifact_inputs("out/demo"), {"batch": 1, "seq": 128})
    timing(runner, inputs, warmup=3, runs=20)["p50_ms"]
    # 1.9
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from sparsec.errors import SparsecError
from sparsec.exporters.targets import InputSpec, Runner, get_target


def load_artifact(directory: str | Path, target: str = "onnxruntime") -> Runner:
    """A function running the artifact in `directory` on named torch inputs, outputs by name (`Target.load` of the
    registered target `target`).

    Raises `SparsecError` when the target is not registered, the directory lacks the target's file or the target
    cannot run here.
    """
    return get_target(target).load(Path(directory))


def artifact_inputs(directory: str | Path, target: str = "onnxruntime") -> list[InputSpec]:
    """The inputs the artifact in `directory` takes (`Target.input_specs` of the registered target `target`)."""
    return get_target(target).input_specs(Path(directory))


def artifact_report(directory: str | Path) -> dict | None:
    """The compile report of the program in `directory`: `directory/report.json`, or for an entry point's directory
    (`OUT/NAME`) its section of `OUT/report.json` with the report's `model` and `target` added; None without a
    report."""
    directory = Path(directory)
    for path, section in ((directory / "report.json", None), (directory.parent / "report.json", directory.name)):
        if path.is_file():
            report = json.loads(path.read_text())
            if section is None:
                return report
            if section in report.get("entry_points", {}):
                return {
                    "model": report.get("model", {}),
                    "target": report.get("target"),
                    **report["entry_points"][section],
                }
    return None


def ideal_speedup(artifact: str | Path, baseline: str | Path) -> tuple[float | None, str]:
    """What the compile reports promise for `artifact` against `baseline`: the baseline's parameter count over the
    artifact's (`parameters.after` in each report.json), and what it is, or None and why not.

    A parameter ratio is the ideal for depth and width pruning (FLOPs fall with the weights they multiply); an
    `ffn_to_moe` program keeps its parameters and computes less per token, so there it understates the ideal.
    """
    counts = []
    for directory in (artifact, baseline):
        report = artifact_report(directory)
        if report is None or "parameters" not in report:
            return None, f"{directory} has no report.json with parameter counts (a sparsec compile output)"
        counts.append(report["parameters"]["after"])
    return counts[1] / counts[0], "parameter ratio, baseline / artifact (report.json parameters.after)"


def synthetic_inputs(specs: Sequence[InputSpec], dims: Mapping[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for every input of `specs` (`artifact_inputs`), dynamic dims sized by name from `dims` (module
    docstring).

    Raises `SparsecError` naming a dynamic dim `dims` does not size.
    """
    generator = torch.Generator().manual_seed(seed)
    inputs = {}
    for spec in specs:
        shape = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                shape.append(dim)
            elif dim in dims:
                shape.append(int(dims[dim]))
            else:
                raise SparsecError(
                    f"input {spec.name!r} axis {axis} is dynamic ({dim or 'unnamed'}); give its "
                    f"size with --dims {dim or 'NAME'}=N (sized here: {dict(dims)})"
                )
        if spec.dtype == torch.bool:
            inputs[spec.name] = torch.ones(shape, dtype=torch.bool)
        elif not spec.dtype.is_floating_point:
            if "mask" in spec.name:
                tensor = torch.ones(shape, dtype=torch.int64)
            else:
                tensor = torch.randint(0, spec.high or 2, shape, generator=generator)
            inputs[spec.name] = tensor.to(spec.dtype)
        else:
            inputs[spec.name] = torch.randn(shape, generator=generator).to(spec.dtype)
    return inputs


DEFAULT_DIMS = {"batch": 1, "seq": 128}
"""Sizes of the dynamic dims of synthetic inputs that `--dims` does not give (`sparsec run` / `bench`)."""


def parse_dims(text: str) -> dict[str, int]:
    """`batch=1,seq=128` -> {'batch': 1, 'seq': 128}."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, size = item.partition("=")
        if not name or not size.isdigit():
            raise SparsecError(f"--dims {text!r}: expected NAME=N[,NAME=N...], e.g. batch=1,seq=128")
        out[name] = int(size)
    return out


def timing(runner: Runner, inputs: Mapping[str, torch.Tensor], *, warmup: int, runs: int) -> dict:
    """Run `warmup` untimed then `runs` timed calls; wall-clock per call (inputs in, outputs back on the host).

    Returns milliseconds: `mean_ms`, `min_ms`, `p50_ms`, `p90_ms`, `p99_ms`, `max_ms` and every run in `runs_ms`.
    """
    return interleaved_timing([runner], inputs, warmup=warmup, runs=runs)[0]


def interleaved_timing(
    runners: Sequence[Runner], inputs: Mapping[str, torch.Tensor], *, warmup: int, runs: int
) -> list[dict]:
    """`timing` of several runners on the same inputs, side by side: each round calls every runner once, in turn,
    the order reversed every other round (A B, B A, ...), so neither always runs first or on the other's heels.
    Returns one `timing` result per runner, in order."""
    if warmup < 0 or runs < 1:
        raise SparsecError(f"--warmup must be >= 0 and --runs >= 1, got {warmup} and {runs}")
    for _ in range(warmup):
        for runner in runners:
            runner(inputs)
    times: list[list[float]] = [[] for _ in runners]
    for round_ in range(runs):
        order = range(len(runners)) if round_ % 2 == 0 else reversed(range(len(runners)))
        for i in order:
            start = time.perf_counter()
            runners[i](inputs)
            times[i].append((time.perf_counter() - start) * 1e3)
    return [{"warmup": warmup, "runs": runs, **latency_summary(t)} for t in times]


def latency_summary(times_ms: Sequence[float]) -> dict:
    """`mean_ms`, `min_ms`, `p50_ms`, `p90_ms`, `p99_ms`, `max_ms` of call times in milliseconds, and every one in
    `runs_ms`.

    Example:
        >>> latency_summary([2.0, 1.0, 3.0])["p50_ms"]
        2.0
    """
    values = np.asarray(times_ms, dtype=float)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "mean_ms": float(values.mean()),
        "min_ms": float(values.min()),
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "max_ms": float(values.max()),
        "runs_ms": [float(t) for t in values],
    }
