"""Reproduce issue 8's claim on the trained digits MoT: static compression vs MoE conversion of the generation FFNs.

For each variant of the shipped testbed model (`weights/mot`), capture a fresh program, apply one pass with a
calibration set drawn from the *train* split (both tasks), then score the program on the held-out split:
generation quality (judge accuracy, Frechet distance; seeded sampling) and understanding accuracy.

Variants: dense; the generation FFNs (`model.layers.*.mlp_moe_gen`) sliced statically to half width;
converted to 16 experts with 8 active (learned router, then router adaptation, then full adaptation); and,
for contrast, the understanding FFNs (`model.layers.*.mlp`) sliced to half width.

    python examples/digits/reproduce.py                 # full run, writes examples/digits/results/
    python examples/digits/reproduce.py --quick --out /tmp/digits-quick

Outputs (staged in a temporary directory, then moved into `--out`): `results.json` (every number, the pass
records' stats, timings), `results.md` (the table) and `results.png` (a bar plot).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import testbed as tb  # noqa: E402

import sparsec  # noqa: E402
from sparsec.calibration import CalibrationSet  # noqa: E402
from sparsec.models import load_model  # noqa: E402
from sparsec.testing import apply_pass  # noqa: E402

GEN_FFNS = "model.layers.*.mlp_moe_gen"
UND_FFNS = "model.layers.*.mlp"
OUTPUT_FILES = ("results.json", "results.md", "results.png")


@dataclass(frozen=True)
class Variant:
    """One compressed model: a pass name and its options (None: the dense program)."""

    name: str
    description: str
    pass_name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    adapted: bool = False  # takes `adapt_steps` from the command line


def variants(adapt_steps: int) -> list[Variant]:
    """The variants of issue 8, in table order."""
    moe = {"where": GEN_FFNS, "experts": 16, "top_k": 8, "router": "learned"}
    return [
        Variant("dense", "no pass"),
        Variant("gen slice 0.5", "generation FFNs: slice_neurons keep_ratio 0.5 (activation)", "slice_neurons",
                {"where": GEN_FFNS, "keep_ratio": 0.5, "importance": "activation"}),
        Variant("gen MoE 8/16", "generation FFNs: ffn_to_moe 16 experts, top 8, learned router, adapt none",
                "ffn_to_moe", {**moe, "adapt": "none"}),
        Variant("gen MoE 8/16 + router adapt", f"as above, adapt router ({adapt_steps} steps, lr 1e-3)",
                "ffn_to_moe", {**moe, "adapt": "router", "adapt_steps": adapt_steps, "lr": 1e-3}, adapted=True),
        Variant("gen MoE 8/16 + full adapt", f"as above, adapt full ({adapt_steps} steps, lr 1e-4)",
                "ffn_to_moe", {**moe, "adapt": "full", "adapt_steps": adapt_steps, "lr": 1e-4}, adapted=True),
        Variant("und slice 0.5", "understanding FFNs: slice_neurons keep_ratio 0.5 (activation)", "slice_neurons",
                {"where": UND_FFNS, "keep_ratio": 0.5, "importance": "activation"}),
    ]


def calibration_set(samples_per_task: int) -> CalibrationSet:
    """`samples_per_task` train sequences of each task as one set, interleaved (und, gen, und, gen, ...) so that
    every calibration batch holds both tasks (adaptation steps then always see generation tokens)."""
    parts = [tb.task_inputs(task, split="train", n=samples_per_task) for task in tb.TASKS]
    inputs = {key: torch.stack([p[key] for p in parts], dim=1).flatten(0, 1) for key in parts[0]}
    return CalibrationSet(inputs, source=f"digits train split, {samples_per_task} per task ({', '.join(tb.TASKS)})")


def ffn_widths(record, variant: Variant, dense_width: int) -> tuple[int, int]:
    """(active generation-FFN width per token, understanding-FFN width) after the variant's pass."""
    gen, und = dense_width, dense_width
    if record is None:
        return gen, und
    ffns = record.decisions["ffns"]
    if variant.pass_name == "slice_neurons":
        width = max(d["width_after"] for d in ffns)
        if variant.options["where"] == GEN_FFNS:
            gen = width
        else:
            und = width
    elif variant.pass_name == "ffn_to_moe":
        gen = max(d["active_neurons_per_token"] for d in ffns)
    return gen, und


def evaluate_variant(loaded, judge, calib: CalibrationSet, variant: Variant, adapt_steps: int, per_label: int,
                     seed: int) -> dict[str, Any]:
    start = time.perf_counter()
    program = sparsec.capture(loaded.model, loaded.family.example_inputs(loaded.model, 2, 16))
    record = None
    if variant.pass_name is not None:
        options = dict(variant.options)
        if variant.adapted:
            options["adapt_steps"] = adapt_steps
        record = apply_pass(program, variant.pass_name, calibration=calib, **options)
    compile_seconds = time.perf_counter() - start

    def logits(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return program.run(batch)["logits"]

    quality = tb.generation_quality(logits, judge, per_label=per_label, seed=seed)
    understanding = tb.understanding_accuracy(logits)
    total_seconds = time.perf_counter() - start
    gen_width, und_width = ffn_widths(record, variant, loaded.model.config.intermediate_size)
    result = {
        "name": variant.name,
        "description": variant.description,
        "pass": variant.pass_name,
        "options": {**variant.options, **({"adapt_steps": adapt_steps} if variant.adapted else {})},
        "gen_ffn_active_width": gen_width,
        "und_ffn_width": und_width,
        "understanding_accuracy": understanding,
        "judge_accuracy": quality["judge_accuracy"],
        "per_label_accuracy": quality["per_label_accuracy"],
        "frechet_distance": quality["frechet_distance"],
        "compile_seconds": compile_seconds,
        "seconds": total_seconds,
    }
    if record is not None:
        result["stats"] = record.stats
        adaptation = record.decisions.get("adapt")
        if adaptation:
            result["adaptation"] = {k: v for k, v in adaptation.items() if not isinstance(v, list)}
        routers = [d["router"] for d in record.decisions["ffns"] if "router" in d]
        if routers:
            result["routers"] = routers
    return result


def markdown_table(results: list[dict[str, Any]], dense_width: int) -> str:
    lines = [
        f"| variant | active gen-FFN width (of {dense_width}) | understanding acc | judge acc | retained % "
        "| Frechet distance | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['name']} | {r['gen_ffn_active_width']} | {r['understanding_accuracy']:.3f} | "
                     f"{r['judge_accuracy']:.3f} | {100 * r['retained_generation']:.1f} | "
                     f"{r['frechet_distance']:.1f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in results]
    x = range(len(results))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.4
    left.bar([i - width / 2 for i in x], [r["judge_accuracy"] for r in results], width, label="generation: judge accuracy")
    left.bar([i + width / 2 for i in x], [r["understanding_accuracy"] for r in results], width,
             label="understanding accuracy")
    left.axhline(0.97 * results[0]["judge_accuracy"], color="gray", linestyle="--", linewidth=1,
                 label="97% of dense judge accuracy")
    left.set_ylim(0, 1.25)
    left.set_xticks(list(x), names, rotation=30, ha="right")
    left.set_title("accuracy (held-out)")
    left.legend(loc="upper center", fontsize=8, ncol=2)
    right.bar(list(x), [r["frechet_distance"] for r in results], color="tab:red")
    right.set_xticks(list(x), names, rotation=30, ha="right")
    right.set_title("Frechet distance of generated digits (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output directory")
    parser.add_argument("--quick", action="store_true",
                        help="small fast run: 5 digits per label, 16 calibration samples per task, 5 adapt steps")
    parser.add_argument("--per-label", type=int, default=None, help="generated digits per label (default 20; quick 5)")
    parser.add_argument("--calib-samples", type=int, default=None, help="train samples per task (default 128; quick 16)")
    parser.add_argument("--adapt-steps", type=int, default=None, help="adaptation steps (default 100; quick 5)")
    parser.add_argument("--seed", type=int, default=0, help="generation sampling seed")
    parser.add_argument("--variants", default=None, help="comma-separated subset of variant names (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see README, shared cores)")
    args = parser.parse_args(argv)
    per_label = args.per_label or (5 if args.quick else 20)
    calib_samples = args.calib_samples or (16 if args.quick else 128)
    adapt_steps = args.adapt_steps or (5 if args.quick else 100)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    chosen = variants(adapt_steps)
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",")]
        unknown = sorted(set(wanted) - {v.name for v in chosen})
        if unknown:
            parser.error(f"unknown variants {unknown}; choose from {[v.name for v in chosen]}")
        chosen = [v for v in chosen if v.name in wanted or v.name == "dense"]  # dense: the reference

    start = time.perf_counter()
    loaded = load_model(tb.WEIGHTS / "mot")
    loaded.model.eval()
    judge = tb.load_judge()
    calib = calibration_set(calib_samples)
    dense_width = loaded.model.config.intermediate_size
    print(f"digits reproduction: {len(chosen)} variants, {per_label} digits per label, seed {args.seed}, "
          f"calibration {len(calib)} train sequences, adapt steps {adapt_steps}", flush=True)

    results = []
    for i, variant in enumerate(chosen, 1):
        print(f"[{i}/{len(chosen)}] {variant.name}: {variant.description} ...", flush=True)
        result = evaluate_variant(loaded, judge, calib, variant, adapt_steps, per_label, args.seed)
        results.append(result)
        print(f"    understanding {result['understanding_accuracy']:.3f}, judge {result['judge_accuracy']:.3f}, "
              f"Frechet {result['frechet_distance']:.1f}, {result['seconds']:.0f} s", flush=True)
    dense_judge = results[0]["judge_accuracy"]
    for r in results:
        r["retained_generation"] = r["judge_accuracy"] / dense_judge if dense_judge > 0 else float("nan")

    summary = {
        "settings": {"per_label": per_label, "seed": args.seed, "calibration_samples_per_task": calib_samples,
                     "adapt_steps": adapt_steps, "quick": args.quick, "threads": args.threads,
                     "generation_ffns": GEN_FFNS, "understanding_ffns": UND_FFNS, "dense_ffn_width": dense_width},
        "reference_frechet_distance": tb.reference_frechet_distance(judge, per_label),
        "variants": results,
        "total_seconds": time.perf_counter() - start,
    }
    table = markdown_table(results, dense_width)
    print(table, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out, prefix=".staging-") as staging:
        staging_dir = Path(staging)
        (staging_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        (staging_dir / "results.md").write_text(
            f"# Digits reproduction ({'quick' if args.quick else 'full'} run)\n\n"
            f"{per_label} generated digits per label (seed {args.seed}), held-out split; calibration "
            f"{calib_samples} train sequences per task; adapt steps {adapt_steps}. Reference Frechet distance "
            f"(real train digits, same count): {summary['reference_frechet_distance']:.1f}. Retained % = judge "
            f"accuracy / dense judge accuracy.\n\n{table}")
        plot(results, staging_dir / "results.png")
        for name in OUTPUT_FILES:
            shutil.move(str(staging_dir / name), str(args.out / name))
    print(f"wrote {', '.join(OUTPUT_FILES)} to {args.out} ({summary['total_seconds']:.0f} s)", flush=True)
    return summary


if __name__ == "__main__":
    main()
