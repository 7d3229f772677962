"""The benchmark suite: depth, width, head and MoE speed, and compile time, each side by side in one run.

Runs bench/drop_layers.py (depth), bench/slice_neurons.py (width), bench/slice_hidden.py (hidden: the residual
stream's width), bench/prune_heads.py (heads: KV groups and query heads), bench/ffn_to_moe.py (MoE: one FFN layer
on several engines, and the whole model) and bench/compile_time.py (sparsec's capture + passes + export against a
bare torch.onnx.export) in one process, each printing its own table as it finishes, then one summary table:
every compressed variant's measured speedup against its ideal (FLOP ratio, or E/k for an MoE layer), and
the compile time against the bare export's. `--only quality` runs bench/quality.py (the quality frontier of a real
model: held-out perplexity, task accuracy and latency per recipe, with and without recovery), which needs the real
model and texts bench/real_model.py writes (`--real-model`, `--calib-text`, `--eval-text`). Each benchmark's own
docstring says how it measures.

    python bench/run.py                                  # all five at the benchmark sizes (16 layers, hidden 1024)
    python bench/run.py --only depth,compile --reps 5 --compile-reps 5
    python bench/run.py --quick                          # tiny sizes, 2 reps: checks that the suite runs;
                                                         # its figures say nothing about speed
    python bench/run.py --json bench/results/suite.json  # every raw time too

Speed is compared within a run only (the machine is shared and noisy); quote medians.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import compile_time  # noqa: E402
import drop_layers  # noqa: E402
import ffn_to_moe  # noqa: E402
import prune_heads  # noqa: E402
import quality  # noqa: E402
import slice_hidden  # noqa: E402
import slice_neurons  # noqa: E402
from common import markdown_table, parser  # noqa: E402

BENCHMARKS: dict[str, Callable] = {
    "depth": drop_layers.run,
    "width": slice_neurons.run,
    "hidden": slice_hidden.run,
    "heads": prune_heads.run,
    "moe": ffn_to_moe.run,
    "compile": compile_time.run,
    "quality": quality.run,
}
SPEED = [name for name in BENCHMARKS if name != "quality"]  # the default: quality needs a real model (--real-model)
QUICK = {
    "layers": 4,
    "hidden": 128,
    "intermediate": 256,
    "vocab": 512,
    "seq": 64,
    "reps": 2,
    "model_reps": 2,
    "compile_reps": 1,
    "tokens": 64,
    "ffn_intermediate": 512,
    "experts": 8,
    "top_k": [4],
    "hf_experts": ["eager"],
    "calib_samples": 2,
    "calib_seq": 32,
}


def summary_rows(name: str, result: dict) -> list[list[str]]:
    """[benchmark, variant, measured, ideal, measured / ideal] for every compressed variant of one benchmark."""

    def speedups(label: str, variants: dict, measured: str, ideal: str) -> list[list[str]]:
        return [
            [label, variant, f"{r[measured]:.2f}x", f"{r[ideal]:.2f}x", f"{r['fraction_of_ideal']:.2f}"]
            for variant, r in variants.items()
            if r[ideal] != 1.0
        ]

    if name == "compile":
        ratio = result["ratio_to_bare"]
        return [
            [
                "compile",
                "capture + passes + export, time vs bare torch.onnx.export",
                f"{ratio:.2f}x",
                "1.00x (target <= 1.50x)",
                f"{1 / ratio:.2f}",
            ],
            [
                "compile",
                "capture + export, no passes, time vs bare",
                f"{result['no_passes_ratio_to_bare']:.2f}x",
                "1.00x",
                f"{1 / result['no_passes_ratio_to_bare']:.2f}",
            ],
        ]
    if name == "quality":
        return [
            ["quality", variant, f"ppl {r['ppl_ratio']:.2f}x dense", f"{r['active_parameters'] / 1e6:.1f}M active", ""]
            for variant, r in result.items()
        ]
    if name == "moe":
        rows = speedups("moe layer", result.get("layer", {}), "speedup", "ideal")
        return rows + speedups("moe model", result.get("model", {}), "measured_speedup", "ideal_speedup")
    return speedups(name, result, "measured_speedup", "ideal_speedup")


def main(argv: Sequence[str] | None = None) -> dict:
    p = parser(__doc__.split("\n\n")[0])
    ffn_to_moe.add_arguments(p)
    compile_time.add_arguments(p)
    quality.add_arguments(p)
    p.add_argument(
        "--only",
        default=",".join(SPEED),
        help=f"comma-separated benchmarks to run (default: {','.join(SPEED)}; also: quality)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and 2 reps, to check the suite runs: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
    )
    p.set_defaults(reps=7)
    args = p.parse_args(argv)
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown or not chosen:
        p.error(f"--only: unknown benchmark(s) {unknown or chosen}; choose from {list(BENCHMARKS)}")
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    suite_json, args.json = args.json, None  # the sub-benchmarks write nothing of their own

    results, seconds, rows = {}, {}, []
    for name in chosen:
        print(f"\n## {name}\n", flush=True)
        start = time.perf_counter()
        results[name] = BENCHMARKS[name](args)
        seconds[name] = time.perf_counter() - start
        rows += summary_rows(name, results[name])
    print(f"\n## Summary ({', '.join(f'{n} {s:.0f} s' for n, s in seconds.items())})\n")
    print(markdown_table(["benchmark", "variant", "measured", "ideal", "measured / ideal"], rows))
    if suite_json:
        Path(suite_json).write_text(
            json.dumps(
                {"args": {**vars(args), "json": suite_json}, "seconds": seconds, "results": results},
                indent=2,
                default=str,
            )
        )
    return {"results": results, "seconds": seconds, "summary": rows}


if __name__ == "__main__":
    main()
