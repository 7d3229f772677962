"""FFN-to-MoE speed: one FFN layer (PyTorch, AOTInductor, ONNX Runtime, transformers' Mixtral block) and a model.

Layer: a gated SiLU FFN (hidden 1024, intermediate 4096, 512 tokens by default) against the sparsec MoE made from it
by `ffn_to_moe` (16 experts of 256 neurons, top-8 and top-4), timed side by side in one process with runs
interleaved, on `--device` in `--dtype`, by each of `--engines`: `torch` (the dense FFN and the `sparsec::moe` op,
both the captured program's module; on CUDA in bfloat16 the op runs grouped GEMMs), `transformers`
(`MixtralSparseMoeBlock` at the same shapes, experts implementations `--hf-experts`), `aotinductor` (each program
compiled as `--target aotinductor` does: the MoE decomposed to ATen) and `ort` (ONNX Runtime on the CPU: dense,
the contrib `com.microsoft::MoE` lowering and the standard-ONNX lowering). ONNX Runtime is timed in its own
interleaved group (its thread pool and torch's disturb each other), with intra-op spinning off (see
bench/common.py: spinning sessions slow each other down); on CUDA every call is synchronized. Ideal = E/k (the FFN
work falls by that factor; the router adds 2*T*H*E FLOPs, under 0.4% here); TFLOP/s is each variant's own FLOPs
per second.

Model: a 16-layer Qwen2-style model (bench/common.py) with every FFN turned into 16 experts, 8 active, in ONNX
Runtime (`--lowering`, default standard), against the dense model; ideal = the FLOP ratio of the two programs.

Random weights and a random router (speed does not depend on them; a random router spreads tokens evenly).

    python bench/ffn_to_moe.py                       # both parts (--reps: layer part, --model-reps: model part)
    python bench/ffn_to_moe.py --skip-model          # the layer part only (about a minute)
    python bench/ffn_to_moe.py --skip-model --device cuda --dtype bfloat16 --hidden 3584 --ffn-intermediate 18944 \
        --tokens 4096 --top-k 8 --engines torch,transformers,aotinductor --hf-experts grouped_mm   # BAGEL's FFN
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    NO_SPIN,
    compare_variants,
    markdown_table,
    parser,
    qwen2_model,
    synchronized,
    time_interleaved,
)

import sparsec  # noqa: E402
from sparsec.analysis.inspection import flops_by_path  # noqa: E402
from sparsec.exporters.lowering.onnx import export_onnx  # noqa: E402
from sparsec.exporters.targets import onnxruntime as ort_backend  # noqa: E402
from sparsec.ops.moe import DECOMPOSITIONS  # noqa: E402
from sparsec.transform.pass_manager import PassManager, get_pass  # noqa: E402

ENGINES = ("torch", "transformers", "ort", "aotinductor")
# E experts, k active, no shared expert, no data needed: the layout whose ideal speedup is E/k
PLAIN_MOE = {"shared": 0, "partition": "balanced", "router": "random", "importance": "magnitude"}


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


def aotinductor_package(program: sparsec.Program, directory: Path):
    """The program compiled by AOTInductor the way `--target aotinductor` does (MoE decomposed to ATen), loaded."""
    exported = program.exported.run_decompositions(DECOMPOSITIONS)
    path = torch._inductor.aoti_compile_and_package(exported, package_path=str(directory / "ffn.pt2"))
    return torch._inductor.aoti_load_package(path)


def layer_benchmark(args) -> dict:
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    engines = set(args.engines.split(","))
    unknown = engines - set(ENGINES)
    if unknown:
        sys.exit(f"--engines: {sorted(unknown)} are not of {list(ENGINES)}")
    x = torch.randn(1, args.tokens, args.hidden, device=device, dtype=dtype)
    dense = GatedFfn(args.hidden, args.ffn_intermediate).eval()
    for p in dense.parameters():
        torch.nn.init.normal_(p, 0, 0.02)
    dense = dense.to(device, dtype)
    example = {"x": torch.randn(2, 16, args.hidden, device=device, dtype=dtype)}
    dims = {"x": {0: "batch", 1: "seq"}}
    moe = get_pass("ffn_to_moe")
    programs = {"dense": sparsec.capture(dense, example, dynamic=dims)}
    for k in args.top_k:
        program = sparsec.capture(dense, example, dynamic=dims)
        PassManager([moe(**PLAIN_MOE, experts=args.experts, top_k=k)]).run(program)
        programs[f"MoE {args.experts}/{k}"] = program
    inputs = {"x": x}
    flops = {name: sum(flops_by_path(p, inputs).values()) for name, p in programs.items()}
    timed = synchronized if device.type == "cuda" else (lambda fn: fn)

    runs, ort_runs, rows_meta = {}, {}, {}
    for name, program in programs.items():
        if "torch" in engines:
            module = program.exported.module()
            runs[f"PyTorch {name}"] = timed(lambda m=module: m(**inputs))
            rows_meta[f"PyTorch {name}"] = (name, "PyTorch dense")
    width = args.ffn_intermediate // args.experts
    for k in args.top_k if "transformers" in engines else ():
        for implementation in args.hf_experts:
            block = mixtral_block(args.hidden, width, args.experts, k, implementation).to(device, dtype)
            name = f"transformers Mixtral {implementation} {args.experts}/{k}"
            try:
                with torch.no_grad():
                    block(x)
            except Exception as exc:  # an implementation this torch build/device lacks
                print(f"skipping {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            runs[name] = timed(lambda b=block: b(x))
            rows_meta[name] = (f"MoE {args.experts}/{k}", "PyTorch dense")
    tmp = tempfile.TemporaryDirectory()
    for i, (name, program) in enumerate(programs.items()):
        if "aotinductor" in engines:
            (Path(tmp.name) / str(i)).mkdir()
            package = aotinductor_package(program, Path(tmp.name) / str(i))
            runs[f"AOTInductor {name}"] = timed(lambda pk=package: pk(**inputs))
            rows_meta[f"AOTInductor {name}"] = (name, "AOTInductor dense")
            print(f"compiled {name} with AOTInductor", file=sys.stderr, flush=True)
        if "ort" in engines:
            for lowering in ["contrib", "standard"] if name != "dense" else ["contrib"]:
                path = Path(tmp.name) / f"{name.replace(' ', '_').replace('/', '_')}_{lowering}.onnx"
                export_onnx(program, path, moe_lowering=lowering)
                label = f"ORT {name}" + (f" ({lowering})" if name != "dense" else "")
                sess = ort_backend.session(path, config=NO_SPIN)
                ort_feed = {k: v.cpu() for k, v in inputs.items()}
                ort_runs[label] = lambda s=sess, f=ort_feed: ort_backend.run(s, f)
                rows_meta[label] = (name, "ORT dense")
            print(f"exported {name}", file=sys.stderr, flush=True)

    with torch.no_grad():  # two groups: ONNX Runtime's and torch's thread pools would slow each other down
        times = {
            **time_interleaved(runs, reps=args.reps, warmup=args.warmup),
            **time_interleaved(ort_runs, reps=args.reps, warmup=args.warmup),
        }
    tmp.cleanup()
    medians = {name: statistics.median(t) for name, t in times.items()}
    rows, results = [], {}
    for name, (variant, dense_name) in sorted(rows_meta.items(), key=lambda item: item[1][1]):  # by engine
        speedup = medians[dense_name] / medians[name] if dense_name in medians else float("nan")
        ideal = 1.0 if variant == "dense" else args.experts / int(variant.split("/")[1])
        results[name] = {
            "median_s": medians[name],
            "tflops": flops[variant] / medians[name] / 1e12,
            "speedup": speedup,
            "ideal": ideal,
            "fraction_of_ideal": speedup / ideal,
            "flop_ratio": flops["dense"] / flops[variant],
            "times_s": times[name],
        }
        rows.append(
            [
                name,
                f"{medians[name] * 1e3:.3f}",
                f"{results[name]['tflops']:.2f}",
                f"{speedup:.2f}x",
                f"{ideal:.0f}x",
                f"{speedup / ideal:.2f}",
            ]
        )
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    title = (
        f"FFN layer: hidden {args.hidden}, intermediate {args.ffn_intermediate}, {args.tokens} tokens, "
        f"{args.experts} experts of {width}, {args.dtype} on {where}; torch {torch.__version__}"
        + (f", ONNX Runtime {__import__('onnxruntime').__version__} CPU" if ort_runs else "")
        + f"; median of {args.reps} interleaved runs; speedup vs the dense FFN on the same engine (transformers vs "
        "PyTorch dense); TFLOP/s: the variant's own FLOPs per second"
    )
    table = markdown_table(["variant", "median ms", "TFLOP/s", "speedup", "ideal (E/k)", "speedup / ideal"], rows)
    print("\n" + title)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(f"{title}\n\n{table}\n")
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=512, help="tokens of the layer benchmark")
    p.add_argument("--device", default="cpu", help="where the layer benchmark runs (cpu, cuda[:N])")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--engines",
        default="torch,transformers,ort",
        help=f"comma-separated engines of the layer benchmark, of {', '.join(ENGINES)} (ort: ONNX Runtime on the CPU)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first")
    p.add_argument("--markdown", help="also write the layer table here")
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
                moe(**PLAIN_MOE, experts=args.experts, top_k=args.experts // 2)
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
