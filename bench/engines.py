"""Deployed artifacts, dense vs compressed, per compile target: backend parity and latency side by side.

Saves a Qwen2-style model of realistic proportions (random weights: speed does not depend on them) as a
`save_pretrained` directory and compiles it the way `sparsec compile` does (`compile_model`) for every target and
variant: `dense`; `drop-50`, every other block dropped; `slice-50`, FFN neurons sliced to half; `moe-8top2`,
every FFN as 8 experts of its own neurons with 2 active (similarity router: nothing trained; the standard MoE
lowering for TensorRT, the contrib MoE op for ONNX Runtime). Then every artifact
is loaded with `sparsec.runner` and timed at batch 1 x `--seq` tokens, runs interleaved across artifacts (noise
hits them alike), warm-up first. The table gives each artifact's backend parity against its PyTorch program
(the compile's own check: cosine, rel L2 and top-1 on the calibration inputs), p50 / p90 latency, and its
speedup over the same target's dense artifact beside the FLOP-ideal one (dense FLOPs / variant FLOPs, counted on
the compiled program at the benchmark shape).

    python bench/engines.py                                  # tensorrt + onnxruntime-cuda, fp16, 8 layers, seq 512
    python bench/engines.py --targets tensorrt --precision bf16 --json bench/results/engines.json
    python bench/engines.py --targets onnxruntime --precision fp32 --quick   # the CPU target: checks the script

Each target is checked before any work (`check_target`): without a GPU stack the GPU targets stop at once,
naming what is missing. A compile or load that fails (e.g. parity outside tolerance) is reported in its row; the others go on.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, parser, qwen2_model, time_interleaved  # noqa: E402

from sparsec.analysis.inspection import flops_by_path  # noqa: E402
from sparsec.compiler import check_target, compile_model  # noqa: E402
from sparsec.errors import SparsecError  # noqa: E402
from sparsec.exporters.targets import available_targets, get_target  # noqa: E402
from sparsec.ir.program import Program  # noqa: E402
from sparsec.recipe import Recipe  # noqa: E402
from sparsec.runner import latency_summary, load_artifact  # noqa: E402

VARIANTS = ("dense", "drop-50", "slice-50", "moe-8top2")
QUICK = {"layers": 2, "hidden": 128, "intermediate": 256, "vocab": 512, "seq": 64, "reps": 4, "warmup": 1}


def variant_passes(name: str, layers: int) -> list[dict]:
    """The recipe `passes` of a variant."""
    return {
        "dense": [],
        "drop-50": [{"drop_layers": {"layers": list(range(1, layers, 2))}}],
        "slice-50": [{"slice_neurons": {"keep_ratio": 0.5}}],
        "moe-8top2": [{"ffn_to_moe": {"experts": 8, "top_k": 2, "router": "similarity"}}],
    }[name]


def variant_recipe(name: str, args, target: str) -> Recipe:
    """Random weights: no quality gate (the table reports backend parity, which is gated per precision)."""
    return Recipe.from_dict(
        {
            "passes": variant_passes(name, args.layers),
            "quality": {"gates": False},
            "export": {
                "precision": args.precision,
                "moe_lowering": "contrib" if "contrib" in get_target(target).moe_lowerings else "standard",
                "tensorrt": {"profiles": {"batch": [1, 1, 8], "seq": [1, args.seq, max(args.seq, 32)]}},
            },
        }
    )


def run(args) -> dict:
    """Compile, check and time every (target, variant); print one table; return the results by target and variant."""
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else list(VARIANTS)
    for name in variants:
        if name not in VARIANTS:
            raise SparsecError(f"--variants: {name!r} is not one of {list(VARIANTS)}")
    for target in targets:  # before any work: a GPU target that cannot run here stops the benchmark
        check_target(target, variant_recipe(variants[0], args, target))
    if args.quick:
        vars(args).update(QUICK)
    ids = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    results: dict[str, dict[str, dict]] = {t: {} for t in targets}
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        qwen2_model(args).save_pretrained(model_dir)
        for target in targets:
            for name in variants:
                out = Path(tmp) / target / name
                start = time.perf_counter()
                try:  # one failing cell (parity, a backend error) is reported in its row; the others go on
                    report = compile_model(
                        model_dir, variant_recipe(name, args, target), out, progress=False, target=target
                    )
                    runners[(target, name)] = load_artifact(out, target)
                except Exception as exc:  # noqa: BLE001
                    results[target][name] = {"error": f"{type(exc).__name__}: {exc}"}
                    print(f"{target} / {name}: failed: {results[target][name]['error']}", file=sys.stderr, flush=True)
                    continue
                logits = report["parity"]["metrics"]["logits"]
                results[target][name] = {
                    "parameters": report["parameters"]["after"],
                    "compile_s": round(time.perf_counter() - start, 1),
                    "flops": sum(flops_by_path(Program.load(out / "program.pt2"), inputs).values()),
                    "parity": {k: logits[k] for k in ("cosine", "rel_l2", "max_abs", "top1") if k in logits},
                    "runtime": report["parity"].get("runtime"),
                    "device": report["parity"].get("device"),
                    "provider": report["parity"].get("provider"),
                }
                print(
                    f"{target} / {name}: compiled in {results[target][name]['compile_s']} s, parity "
                    f"{results[target][name]['parity']}",
                    file=sys.stderr,
                    flush=True,
                )
        calls = time_interleaved(
            {key: lambda r=runner: r(inputs) for key, runner in runners.items()}, reps=args.reps, warmup=args.warmup
        )
        times = {
            key: {**latency_summary([t * 1e3 for t in seconds]), "calls": len(seconds)}
            for key, seconds in calls.items()
        }
    rows = []
    for target in targets:
        dense = results[target].get("dense", {})
        for name in variants:
            result = results[target][name]
            if "error" in result:
                rows.append([target, name, "failed: " + result["error"][:160], "", "", "", "", ""])
                continue
            result.update(times[(target, name)])
            speed = ["", "", ""]
            if "p50_ms" in dense:
                result["ideal_speedup"] = dense["flops"] / result["flops"]
                result["measured_speedup"] = dense["p50_ms"] / result["p50_ms"]
                speed = [
                    f"{result['ideal_speedup']:.2f}x",
                    f"{result['measured_speedup']:.2f}x",
                    f"{result['measured_speedup'] / result['ideal_speedup']:.2f}",
                ]
            parity = result["parity"]
            rows.append(
                [
                    target,
                    name,
                    f"{result['parameters'] / 1e6:.1f}M",
                    f"{parity['cosine']:.6f} / {parity['rel_l2']:.1e} / {parity.get('top1', float('nan')):.3f}",
                    f"{result['p50_ms']:.3f} / {result['p90_ms']:.3f}",
                    *speed,
                ]
            )
    print(
        f"{args.precision}, batch 1 x seq {args.seq}, hidden {args.hidden}, FFN {args.intermediate}, {args.layers} "
        f"layers; p50 of {args.reps} interleaved calls per artifact after {args.warmup} warm-up; "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}"
    )
    print(
        markdown_table(
            [
                "target",
                "variant",
                "params",
                "parity cosine / rel L2 / top-1",
                "p50 / p90 ms",
                "ideal speedup",
                "measured speedup",
                "measured / ideal",
            ],
            rows,
        )
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return results


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(layers=8, reps=50)
    p.add_argument(
        "--targets", default="tensorrt,onnxruntime-cuda", help=f"comma-separated, of {list(available_targets())}"
    )
    p.add_argument("--variants", help=f"comma-separated, of {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per artifact first (default 3)")
    p.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks that the benchmark runs, says nothing of speed"
    )
    try:
        run(p.parse_args())
    except SparsecError as exc:
        sys.exit(f"bench/engines.py: {exc}")


if __name__ == "__main__":
    main()
