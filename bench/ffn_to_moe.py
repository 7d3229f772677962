"""FFN-to-MoE speed: one FFN layer (PyTorch and ONNX Runtime, vs transformers' Mixtral MoE block) and a whole model.

Layer: a gated SiLU FFN (hidden 1024, intermediate 4096, 512 tokens) against the sparsec MoE made from it by
`ffn_to_moe` (16 experts of 256 neurons, top-8 and top-4), timed side by side in one process with runs
interleaved: PyTorch (the dense FFN and the `sparsec::moe` op, both through the captured program), transformers'
`MixtralSparseMoeBlock` at the same shapes (experts implementations `eager` and `grouped_mm`), and ONNX Runtime
(dense, the contrib `com.microsoft::MoE` lowering and the standard-ONNX lowering); torch and ONNX Runtime
variants are timed in two separate interleaved groups (their thread pools disturb each other), and ONNX
Runtime sessions run with intra-op spinning off (see bench/common.py: spinning sessions slow each other down). Ideal = E/k (the FFN work
falls by that factor; the router adds 2*T*H*E FLOPs, under 0.4% here).

Model: a 16-layer Qwen2-style model (bench/common.py) with every FFN turned into 16 experts, 8 active, in ONNX
Runtime (`--lowering`, default standard), against the dense model; ideal = the FLOP ratio of the two programs.

Random weights and a random router (speed does not depend on them; a random router spreads tokens evenly).

    python bench/ffn_to_moe.py                       # both parts (--reps: layer part, --model-reps: model part)
    python bench/ffn_to_moe.py --skip-model          # the layer part only (about a minute)
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import NO_SPIN, compare_variants, markdown_table, parser, qwen2_model, time_interleaved  # noqa: E402

import sparsec  # noqa: E402
from sparsec.analysis.inspection import flops_by_path  # noqa: E402
from sparsec.exporters.lowering.onnx import export_onnx  # noqa: E402
from sparsec.exporters.targets import onnxruntime as ort_backend  # noqa: E402
from sparsec.transform.pass_manager import PassManager, get_pass  # noqa: E402


class GatedFfn(torch.nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = torch.nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = torch.nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def mixtral_block(hidden: int, width: int, experts: int, top_k: int, implementation: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=width,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        experts_implementation=implementation,
    )
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    return block


def layer_benchmark(args) -> dict:
    torch.manual_seed(0)
    x = torch.randn(1, args.tokens, args.hidden)
    dense = GatedFfn(args.hidden, args.ffn_intermediate).eval()
    for p in dense.parameters():
        torch.nn.init.normal_(p, 0, 0.02)
    example = {"x": torch.randn(2, 16, args.hidden)}
    dims = {"x": {0: "batch", 1: "seq"}}
    moe = get_pass("ffn_to_moe")
    programs = {"dense": sparsec.capture(dense, example, dynamic=dims)}
    for k in args.top_k:
        program = sparsec.capture(dense, example, dynamic=dims)
        PassManager([moe(experts=args.experts, top_k=k, router="random", importance="magnitude")]).run(program)
        programs[f"MoE {args.experts}/{k}"] = program
    inputs = {"x": x}
    flops = {name: sum(flops_by_path(p, inputs).values()) for name, p in programs.items()}

    runs, ort_runs, rows_meta = {}, {}, {}
    for name, program in programs.items():
        runs[f"PyTorch {name}"] = lambda p=program: p.run(inputs)
        rows_meta[f"PyTorch {name}"] = name
    width = args.ffn_intermediate // args.experts
    for k in args.top_k:
        for implementation in args.hf_experts:
            block = mixtral_block(args.hidden, width, args.experts, k, implementation)
            name = f"transformers Mixtral {implementation} {args.experts}/{k}"
            try:
                with torch.no_grad():
                    block(x)
            except Exception as exc:  # an implementation this torch build/CPU lacks
                print(f"skipping {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            runs[name] = lambda b=block: b(x)
            rows_meta[name] = f"MoE {args.experts}/{k}"
    tmp = tempfile.TemporaryDirectory()
    for name, program in programs.items():
        lowerings = ["contrib", "standard"] if name != "dense" else ["contrib"]
        for lowering in lowerings:
            path = Path(tmp.name) / f"{name.replace(' ', '_').replace('/', '_')}_{lowering}.onnx"
            export_onnx(program, path, moe_lowering=lowering)
            label = f"ORT {name}" + (f" ({lowering})" if name != "dense" else "")
            sess = ort_backend.session(path, config=NO_SPIN)
            ort_runs[label] = lambda s=sess: ort_backend.run(s, inputs)
            rows_meta[label] = name
        print(f"exported {name}", file=sys.stderr, flush=True)

    with torch.no_grad():  # two groups: ONNX Runtime's and torch's thread pools would slow each other down
        times = {**time_interleaved(runs, reps=args.reps), **time_interleaved(ort_runs, reps=args.reps)}
    tmp.cleanup()
    medians = {name: statistics.median(t) for name, t in times.items()}
    rows, results = [], {}
    for name, variant in rows_meta.items():
        engine = name.split(" ")[0]
        dense_name = "PyTorch dense" if engine in ("PyTorch", "transformers") else "ORT dense"
        speedup = medians[dense_name] / medians[name]
        ideal = 1.0 if variant == "dense" else args.experts / int(variant.split("/")[1])
        results[name] = {
            "median_s": medians[name],
            "speedup": speedup,
            "ideal": ideal,
            "fraction_of_ideal": speedup / ideal,
            "flop_ratio": flops["dense"] / flops[variant],
            "times_s": times[name],
        }
        rows.append([name, f"{medians[name] * 1e3:.1f}", f"{speedup:.2f}x", f"{ideal:.0f}x", f"{speedup / ideal:.2f}"])
    print(
        f"\nFFN layer: hidden {args.hidden}, intermediate {args.ffn_intermediate}, {args.tokens} tokens, "
        f"{args.experts} experts of {width}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"ONNX Runtime {__import__('onnxruntime').__version__} CPU; median of {args.reps} interleaved runs; "
        "speedup vs the dense FFN on the same engine (transformers vs PyTorch dense)"
    )
    print(markdown_table(["variant", "median ms", "speedup", "ideal (E/k)", "speedup / ideal"], rows))
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=512, help="tokens of the layer benchmark")
    p.add_argument("--ffn-intermediate", type=int, default=4096, help="FFN width of the layer benchmark")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, nargs="+", default=[8, 4])
    p.add_argument(
        "--hf-experts",
        nargs="*",
        default=["eager", "grouped_mm"],
        help="transformers experts implementations to compare against (batched_mm copies every token's "
        "expert weights: 19 s per call at the default shapes here, so it is not in the default list)",
    )
    p.add_argument("--model-reps", type=int, default=7, help="repetitions of the model part (the layer part: --reps)")
    p.add_argument("--skip-model", action="store_true", help="only the layer benchmark")
    p.add_argument("--skip-layer", action="store_true", help="only the model benchmark")
    p.add_argument(
        "--lowering",
        choices=["standard", "contrib"],
        default="standard",
        help="MoE lowering of the model benchmark (the layer benchmark times both)",
    )


def run(args: argparse.Namespace) -> dict:
    """The layer part and the model part (unless skipped); results of each."""
    results = {} if args.skip_layer else {"layer": layer_benchmark(args)}
    if not args.skip_model:
        moe = get_pass("ffn_to_moe")
        variants = {
            "dense": [],
            f"MoE {args.experts}/{args.experts // 2}": [
                moe(experts=args.experts, top_k=args.experts // 2, router="random", importance="magnitude")
            ],
        }
        model_args = argparse.Namespace(**{**vars(args), "reps": args.model_reps, "json": None})
        results["model"] = compare_variants(
            qwen2_model(model_args),
            variants,
            model_args,
            describe=lambda prog: (
                f"{len(prog.graph.find_nodes(op='call_function', target=torch.ops.sparsec.moe.default))} MoE FFNs"
            ),
            session_config=NO_SPIN,
            moe_lowering=args.lowering,
        )
    return results


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(reps=15)
    args = p.parse_args()
    results = run(args)
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
