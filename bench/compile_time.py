"""Compile time: sparsec's capture + passes + ONNX export against a bare `torch.onnx.export` of the same model.

The model is the benchmarks' 16-layer Qwen2-style model (bench/common.py; random weights). Side by side in one
process, runs interleaved, median of `--compile-reps`:

- **bare**: what a user does without sparsec: `torch.onnx.export(model, (input_ids, attention_mask),
  dynamo=True)` with the same dynamic batch and sequence dims and opset, saved to a file.
- **sparsec, no passes**: `sparsec.capture` -> `export_onnx` of the same, unchanged model: the cost of going
  through sparsec's program (torch.export, then torch.onnx.export of the program, dims renamed).
- **sparsec**: `sparsec.capture` (torch.export, dynamic dims) -> `PassManager` (`sparsec.pipeline.run_passes`) with two passes that need no
  calibration data (`drop_layers` of a quarter of the blocks, named; `slice_neurons` to half width by weight
  magnitude), each followed by the manager's recompile, dead-code and weight pruning and full verification ->
  `export_onnx` (torch.onnx.export of the program, dims renamed, saved). Ideal: the bare export's time.
  Both run once, untimed, on a two-layer model first (first-call costs: imports, op registries).

Calibration forward passes are reported separately: the same passes choosing by calibration data
(`drop_layers` by block cosine, `slice_neurons` by activation importance, the quality check after each pass)
on `--calib-samples` sequences, as the pass time with calibration minus the pass time without.

    python bench/compile_time.py                 # 16 layers, hidden 1024: several minutes
    python bench/compile_time.py --layers 4 --hidden 256 --intermediate 704 --vocab 1000 --compile-reps 2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, parser, qwen2_model  # noqa: E402

import sparsec  # noqa: E402
from sparsec.data.calibration import CalibrationSet  # noqa: E402
from sparsec.exporters.lowering.onnx import export_onnx  # noqa: E402
from sparsec.pipeline import run_passes  # noqa: E402
from sparsec.transform.pass_manager import get_pass  # noqa: E402

OPSET = 18


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile-reps", type=int, default=3, help="repetitions of each pipeline (default %(default)s)")
    p.add_argument(
        "--calib-samples",
        type=int,
        default=8,
        help="calibration sequences for the separate "
        "calibration measurement (default %(default)s, of --calib-seq tokens)",
    )
    p.add_argument("--calib-seq", type=int, default=128, help="tokens per calibration sequence (default %(default)s)")


def _inputs(args: argparse.Namespace, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, args.vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _model(args: argparse.Namespace) -> torch.nn.Module:
    model = qwen2_model(args).eval()
    model.config.use_cache = False  # what sparsec.capture does during capture; the bare export gets the same graph
    return model


def bare_export(model: torch.nn.Module, inputs: dict[str, torch.Tensor], path: Path) -> dict[str, float]:
    """`inputs` are passed positionally in forward's order (input_ids, attention_mask): torch.onnx.export does
    not take dynamic shapes for keyword-only inputs."""
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            model,
            tuple(inputs.values()),
            dynamo=True,
            opset_version=OPSET,
            input_names=list(inputs),
            verbose=False,
            dynamic_shapes=tuple({0: batch, 1: seq} for _ in inputs),
        )
    onnx_program.save(str(path))
    return {"total": time.perf_counter() - start}


def pipeline_passes(args: argparse.Namespace, calibrated: bool) -> list:
    """Drop a quarter of the blocks and halve every FFN: by name and weight magnitude, or by calibration data."""
    drop, slice_ = get_pass("drop_layers"), get_pass("slice_neurons")
    count = max(1, args.layers // 4)
    if calibrated:
        return [drop(count=count), slice_(keep_ratio=0.5, importance="activation", round_to=64)]
    return [
        drop(layers=list(range(1, args.layers, 2))[:count]),
        slice_(keep_ratio=0.5, importance="magnitude", round_to=64),
    ]


def sparsec_compile(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    path: Path,
    args: argparse.Namespace,
    calibration: CalibrationSet | None = None,
    passes: bool = True,
) -> dict[str, float]:
    """Seconds per phase of capture -> passes -> export. `calibration` given: the passes choose by data and
    nothing is exported (only their time counts); `passes` False: capture and export only."""
    times = {}
    start = time.perf_counter()
    program = sparsec.capture(model, inputs)
    times["capture"] = time.perf_counter() - start
    t = time.perf_counter()
    if passes:
        run_passes(program, pipeline_passes(args, calibrated=calibration is not None), calibration, progress=False)
    times["passes"] = time.perf_counter() - t
    if calibration is None:
        t = time.perf_counter()
        export_onnx(program, path, opset=OPSET, external_data=False)
        times["export"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - start
    return times


def run(args: argparse.Namespace) -> dict:
    """Time both pipelines interleaved; print and return medians and the ratio to the bare export."""
    model = _model(args)
    inputs = _inputs(args, 2, 16)
    calibration = CalibrationSet(_inputs(args, args.calib_samples, args.calib_seq, seed=1), source="random tokens")
    runs = {"bare": [], "sparsec, no passes": [], "sparsec": [], "sparsec (calibrated passes)": []}
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # torchvision notes
    with tempfile.TemporaryDirectory() as tmp:
        warm = argparse.Namespace(**{**vars(args), "layers": 2, "hidden": 64, "intermediate": 128, "vocab": 128})
        tiny = _model(warm)
        bare_export(tiny, _inputs(warm, 2, 16), Path(tmp) / "warm.onnx")  # first-call costs (imports, op registries)
        sparsec_compile(tiny, _inputs(warm, 2, 16), Path(tmp) / "warm.onnx", warm)  # off the clock for both
        for rep in range(args.compile_reps):
            runs["bare"].append(bare_export(model, inputs, Path(tmp) / "bare.onnx"))
            runs["sparsec, no passes"].append(
                sparsec_compile(model, inputs, Path(tmp) / "plain.onnx", args, passes=False)
            )
            runs["sparsec"].append(sparsec_compile(model, inputs, Path(tmp) / "sparsec.onnx", args))
            runs["sparsec (calibrated passes)"].append(
                sparsec_compile(model, inputs, Path(tmp) / "x.onnx", args, calibration)
            )
            print(
                f"rep {rep + 1}/{args.compile_reps}: "
                + ", ".join(f"{name} {r[-1]['total']:.1f} s" for name, r in runs.items()),
                file=sys.stderr,
                flush=True,
            )

    def median(name: str, phase: str) -> float:
        return statistics.median(r[phase] for r in runs[name])

    bare = median("bare", "total")
    phases = ("capture", "passes", "export", "total")
    plain = {phase: median("sparsec, no passes", phase) for phase in phases}
    ours = {phase: median("sparsec", phase) for phase in phases}
    calibrated_passes = median("sparsec (calibrated passes)", "passes")
    calibration_seconds = calibrated_passes - ours["passes"]
    results = {
        "bare_export_s": bare,
        "sparsec_no_passes_s": plain,
        "no_passes_ratio_to_bare": plain["total"] / bare,
        "sparsec_s": ours,
        "ratio_to_bare": ours["total"] / bare,
        "target_ratio": 1.5,
        "calibrated_passes_s": calibrated_passes,
        "calibration_forward_s": calibration_seconds,
        "calibration_tokens": calibration.num_tokens(),
        "runs": runs,
    }
    print(
        f"Compile time, {args.layers} layers, hidden {args.hidden}, FFN {args.intermediate}, vocab {args.vocab}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.compile_reps} interleaved runs"
    )
    print(
        markdown_table(
            ["pipeline", "capture s", "passes s", "export s", "total s", "vs bare export"],
            [
                ["bare torch.onnx.export", "", "", "", f"{bare:.1f}", "1.00x"],
                [
                    "sparsec capture + export (no passes)",
                    f"{plain['capture']:.1f}",
                    "",
                    f"{plain['export']:.1f}",
                    f"{plain['total']:.1f}",
                    f"{plain['total'] / bare:.2f}x",
                ],
                [
                    "sparsec capture + passes + export",
                    f"{ours['capture']:.1f}",
                    f"{ours['passes']:.1f}",
                    f"{ours['export']:.1f}",
                    f"{ours['total']:.1f}",
                    f"{ours['total'] / bare:.2f}x (target <= 1.5x)",
                ],
            ],
        )
    )
    print(
        f"Calibration forward passes (reported separately): the same passes choosing by data on "
        f"{calibration.num_tokens()} tokens took {calibrated_passes:.1f} s instead of {ours['passes']:.1f} s "
        f"(+{calibration_seconds:.1f} s)."
    )
    return results


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args()
    results = run(args)
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
