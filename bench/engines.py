"""Deployed artifacts, dense vs compressed, per compile target and shape: backend parity and latency side by side.

Saves a Qwen2-style model of realistic proportions (random weights: speed does not depend on them) as a
`save_pretrained` directory and compiles it the way `sparsec compile` does (`compile_model`) for every target and
variant: `dense`; `drop-50`, every other block dropped; `slice-50`, FFN neurons sliced to half; `moe-8top2` and
`moe-16top8`, every FFN as E experts of its own neurons with k active (similarity router: nothing trained; the
standard MoE lowering for TensorRT, the contrib MoE op for ONNX Runtime, ATen decomposition for AOTInductor).
The model is loaded in `--dtype` on `--device`; ONNX targets convert to `--precision`, AOTInductor compiles the
program in its own dtype. Every artifact is then timed at each `--shapes` BxS (batch x tokens), runs interleaved
across artifacts (noise hits them alike), warm-up first. AOTInductor packages are timed on their device with the
inputs already there (`load_package`, synchronized per call); the other targets through `sparsec.runner`, as
`sparsec bench` does (host inputs and outputs). The table gives each artifact's backend parity against its
PyTorch program (the compile's own check on the calibration inputs: cosine, rel L2, top-1), p50 / p90 latency,
and its speedup over the same target's dense artifact beside the FLOP-ideal one (dense FLOPs / variant FLOPs,
counted on the compiled program at that shape).

    python bench/engines.py --targets aotinductor --device cuda --dtype bfloat16 --shapes 1x2048,8x512
    python bench/engines.py --targets tensorrt,onnxruntime-cuda --precision fp16 --json bench/results/engines.json
    python bench/engines.py --targets onnxruntime,aotinductor --quick   # the CPU: checks the script

Each target is checked before any work (`check_target`): without a GPU stack the GPU targets stop at once,
naming what is missing. A compile or load that fails (e.g. parity outside tolerance) is reported in its row; the
others go on. `--markdown PATH` also writes the table.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, parser, qwen2_model, synchronized, time_interleaved  # noqa: E402

from sparsec.analysis.inspection import flops_by_path  # noqa: E402
from sparsec.compiler import check_target, compile_model  # noqa: E402
from sparsec.errors import SparsecError  # noqa: E402
from sparsec.exporters.targets import available_targets, get_target  # noqa: E402
from sparsec.exporters.targets.aotinductor import load_package  # noqa: E402
from sparsec.ir.program import Program  # noqa: E402
from sparsec.recipe import Recipe  # noqa: E402
from sparsec.runner import latency_summary, load_artifact  # noqa: E402

VARIANTS = ("dense", "drop-50", "slice-50", "moe-8top2", "moe-16top8")
QUICK = {"layers": 2, "hidden": 128, "intermediate": 256, "vocab": 512, "shapes": "1x64,2x32", "reps": 4, "warmup": 1}


def variant_passes(name: str, layers: int) -> list[dict]:
    """The recipe `passes` of a variant."""
    return {
        "dense": [],
        "drop-50": [{"drop_layers": {"layers": list(range(1, layers, 2))}}],
        "slice-50": [{"slice_neurons": {"keep_ratio": 0.5}}],
        "moe-8top2": [
            {"ffn_to_moe": {"experts": 8, "top_k": 2, "shared": 0, "partition": "balanced", "router": "similarity"}}
        ],
        "moe-16top8": [
            {"ffn_to_moe": {"experts": 16, "top_k": 8, "shared": 0, "partition": "balanced", "router": "similarity"}}
        ],
    }[name]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """`1x2048,8x512` -> [(1, 2048), (8, 512)]."""
    try:
        shapes = [tuple(int(n) for n in part.strip().split("x")) for part in text.split(",") if part.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise SparsecError(f"--shapes {text!r}: expected BATCHxSEQ[,BATCHxSEQ...], e.g. 1x2048,8x512")
    return shapes


def variant_recipe(name: str, args, target: str) -> Recipe:
    """Random weights: no quality gate (the table reports backend parity, which is gated per precision)."""
    builds_from_onnx = get_target(target).builds_from_onnx
    longest = max(s for _, s in parse_shapes(args.shapes))
    return Recipe.from_dict(
        {
            "model": {"dtype": args.dtype, "device": args.device},
            "passes": variant_passes(name, args.layers),
            "calibration": {"samples": 8, "seq_len": 32, "batch_size": 4},
            "quality": {"gates": False},
            "export": {
                "precision": args.precision if builds_from_onnx else "fp32",
                "onnx": builds_from_onnx,
                "moe_lowering": "contrib" if "contrib" in get_target(target).moe_lowerings else "standard",
                "tensorrt": {"profiles": {"batch": [1, 1, 8], "seq": [1, min(longest, 512), longest]}},
            },
        }
    )


def device_call(directory: Path, target: str):
    """(what one timed call runs, the device its inputs go to)."""
    if target != "aotinductor":
        return load_artifact(directory, target), torch.device("cpu")
    call, device = load_package(directory)
    return (synchronized(call) if device.type == "cuda" else call), device


def run(args) -> dict:
    """Compile, check and time every (target, variant, shape); print one table; return the results."""
    if args.quick:
        vars(args).update(QUICK)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else list(VARIANTS)
    shapes = parse_shapes(args.shapes)
    args.seq = max(seq for _, seq in shapes)  # the model's positions cover the longest
    for name in variants:
        if name not in VARIANTS:
            raise SparsecError(f"--variants: {name!r} is not one of {list(VARIANTS)}")
    for target in targets:  # before any work: a target that cannot run here stops the benchmark
        check_target(target, variant_recipe(variants[0], args, target))
    feeds = {}
    for batch, seq in shapes:
        ids = torch.randint(0, args.vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
        feeds[f"{batch}x{seq}"] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    results: dict[str, dict[str, dict]] = {t: {} for t in targets}
    calls = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        qwen2_model(args, args.heads, args.kv_heads).to(getattr(torch, args.dtype)).save_pretrained(model_dir)
        for target in targets:
            for name in variants:
                out = Path(tmp) / target / name
                start = time.perf_counter()
                try:  # one failing cell (parity, a backend error) is reported in its row; the others go on
                    report = compile_model(
                        model_dir, variant_recipe(name, args, target), out, progress=False, target=target
                    )
                    call, device = device_call(out, target)
                except Exception as exc:  # noqa: BLE001
                    results[target][name] = {"error": f"{type(exc).__name__}: {exc}"}
                    print(f"{target} / {name}: failed: {results[target][name]['error']}", file=sys.stderr, flush=True)
                    continue
                program = Program.load(out / "program.pt2")
                logits = report["parity"]["metrics"]["logits"]
                results[target][name] = {
                    "parameters": report["parameters"]["after"],
                    "compile_s": round(time.perf_counter() - start, 1),
                    "parity": {k: logits[k] for k in ("cosine", "rel_l2", "max_abs", "top1") if k in logits},
                    "runtime": report["parity"].get("runtime"),
                    "shapes": {},
                }
                for shape, feed in feeds.items():
                    at_program = {k: v.to(program.device) for k, v in feed.items()}
                    results[target][name]["shapes"][shape] = {"flops": sum(flops_by_path(program, at_program).values())}
                    on_device = {k: v.to(device) for k, v in feed.items()}
                    calls[(target, name, shape)] = lambda c=call, f=on_device: c(f)
                del program
                print(
                    f"{target} / {name}: compiled in {results[target][name]['compile_s']} s, parity "
                    f"{results[target][name]['parity']}",
                    file=sys.stderr,
                    flush=True,
                )
        seconds = time_interleaved(calls, reps=args.reps, warmup=args.warmup)
    rows = []
    for target in targets:
        for shape in feeds:
            dense = results[target].get("dense", {}).get("shapes", {}).get(shape, {})
            for name in variants:
                result = results[target][name]
                if "error" in result:
                    rows.append([target, shape, name, "failed: " + result["error"][:160], "", "", "", "", ""])
                    continue
                cell = result["shapes"][shape]
                cell.update(latency_summary([t * 1e3 for t in seconds[(target, name, shape)]]))
                cell["calls"] = len(seconds[(target, name, shape)])
                speed = ["", "", ""]
                if "p50_ms" in dense:
                    cell["ideal_speedup"] = dense["flops"] / cell["flops"]
                    cell["measured_speedup"] = dense["p50_ms"] / cell["p50_ms"]
                    cell["fraction_of_ideal"] = cell["measured_speedup"] / cell["ideal_speedup"]
                    speed = [f"{cell['ideal_speedup']:.2f}x", f"{cell['measured_speedup']:.2f}x"]
                    speed.append(f"{cell['fraction_of_ideal']:.2f}")
                parity = result["parity"]
                rows.append(
                    [
                        target,
                        shape,
                        name,
                        f"{result['parameters'] / 1e6:.1f}M",
                        f"{parity['cosine']:.6f} / {parity['rel_l2']:.1e} / {parity.get('top1', float('nan')):.3f}",
                        f"{cell['p50_ms']:.3f} / {cell['p90_ms']:.3f}",
                        *speed,
                    ]
                )
    device_name = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "CPU"
    title = (
        f"{args.dtype} weights on {args.device} ({device_name}), ONNX precision {args.precision}; "
        f"hidden {args.hidden}, FFN {args.intermediate}, {args.layers} layers, heads {args.heads or args.hidden // 64} / KV "
        f"{args.kv_heads or max(1, args.hidden // 256)}, vocab {args.vocab}; p50 of {args.reps} interleaved calls "
        f"per artifact and shape after {args.warmup} warm-up; torch {torch.__version__}"
    )
    table = markdown_table(
        [
            "target",
            "BxS",
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
    print(title)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(f"{title}\n\n{table}\n")
    return results


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(layers=8, reps=50)
    cuda = torch.cuda.is_available()
    p.add_argument("--targets", default="aotinductor", help=f"comma-separated, of {list(available_targets())}")
    p.add_argument("--variants", help=f"comma-separated, of {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--shapes", default="1x512", help="comma-separated BATCHxSEQ to time, e.g. 1x2048,8x512")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per artifact and shape first (default 3)")
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="where the model runs (default: cuda if any)")
    p.add_argument(
        "--dtype",
        default="bfloat16" if cuda else "float32",
        choices=["float32", "bfloat16", "float16"],
        help="the model's weights (default: bfloat16 on CUDA, else float32)",
    )
    p.add_argument(
        "--precision",
        default="fp16" if cuda else "fp32",
        choices=["fp32", "fp16", "bf16"],
        help="ONNX targets' export.precision (AOTInductor compiles in --dtype)",
    )
    p.add_argument("--heads", type=int, help="query heads (default hidden / 64)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (default hidden / 256)")
    p.add_argument("--markdown", help="also write the table here")
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks that the benchmark runs, says nothing of speed"
    )
    try:
        run(p.parse_args())
    except SparsecError as exc:
        sys.exit(f"bench/engines.py: {exc}")


if __name__ == "__main__":
    main()
