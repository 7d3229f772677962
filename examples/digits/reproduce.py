"""Reproduce issue 8's claims on the trained digits MoT: which component compresses, and whether a MoE recovers.

Two parts, both scored on the held-out split with the testbed's own metrics (understanding accuracy; the
judge's accuracy on generated digits and their Frechet distance, sampled with every seed in `--seeds`):

1. **Sweep** (`sparsec analyze`'s probe, `sparsec.probe.Probe`): compress the understanding or the generation
   component of the shipped model (`weights/mot`) in depth (skip its most redundant layers, for its own
   tokens) or in width (zero its FFNs' least important neurons) by each ratio, and score both tasks. The probe's
   own figure, top-1 agreement with the dense model at the scored positions, is reported beside them.
2. **Variants**: the generation FFNs (`model.layers.*.mlp_moe_gen`) at half active width, made by real passes
   on a fresh capture: `slice_neurons` (static; also fine-tuned afterwards as long as the MoE adapts, the
   fair comparison), `ffn_to_moe` with 16 experts, 8 active (learned router; then router adaptation; then full
   adaptation); for contrast the understanding FFNs (`model.layers.*.mlp`) sliced to half width; then the
   same comparison at a quarter of the width active (slice 0.25 fine-tuned vs 16 experts, 4 active, adapted).

Statistics, router fits and adaptation use a calibration set drawn from the *train* split (both tasks).

    python examples/digits/reproduce.py                 # full run, writes examples/digits/results/
    python examples/digits/reproduce.py --quick --out /tmp/digits-quick

Outputs (staged in a temporary directory, then moved into `--out`): `results.json` (every number, per seed, the
pass records' stats, timings), `results.md` (the tables), `sweep.png` (quality vs compression per component)
and `variants.png` (the variants' accuracies and Frechet distances).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsec.analysis.regions import region_index

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import testbed as tb  # noqa: E402

import sparsec  # noqa: E402
from sparsec.data.calibration import CalibrationSet  # noqa: E402
from sparsec.data.distill import TrainingSettings, train_end_to_end  # noqa: E402
from sparsec.models import load_model  # noqa: E402
from sparsec.probe import COMPONENTS, DEFAULT_KINDS, Probe, Task  # noqa: E402
from sparsec.testing import apply_pass  # noqa: E402

GEN_FFNS = "model.layers.*.mlp_moe_gen"
UND_FFNS = "model.layers.*.mlp"
OUTPUT_FILES = ("results.json", "results.md", "sweep.png", "variants.png")
FINETUNE_LR = 1e-4  # the MoE's full adaptation rate: the sliced model is fine-tuned like it


@dataclass(frozen=True)
class Variant:
    """One compressed model: a pass name and its options (None: the dense program).

    `adapted`: takes `adapt_steps` from the command line; `finetune`: after the pass, the generation FFNs'
    weights are distilled to the dense model for `adapt_steps` steps (what `adapt: full` does for the MoE).
    """

    name: str
    description: str
    pass_name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    adapted: bool = False
    finetune: bool = False


def variants(adapt_steps: int) -> list[Variant]:
    """The variants of issue 8, in table order."""
    moe = {"where": GEN_FFNS, "experts": 16, "top_k": 8, "shared": 0, "partition": "balanced", "router": "learned"}
    gen_slice = {"where": GEN_FFNS, "keep_ratio": 0.5, "importance": "activation"}
    return [
        Variant("dense", "no pass"),
        Variant(
            "gen slice 0.5", "generation FFNs: slice_neurons keep_ratio 0.5 (activation)", "slice_neurons", gen_slice
        ),
        Variant(
            "gen slice 0.5 + fine-tune",
            f"as above, then the sliced FFNs distilled to the dense model "
            f"({adapt_steps} steps, lr {FINETUNE_LR:g}, as adapt full)",
            "slice_neurons",
            gen_slice,
            finetune=True,
        ),
        Variant(
            "gen MoE 8/16",
            "generation FFNs: ffn_to_moe 16 experts, top 8, learned router, adapt none",
            "ffn_to_moe",
            {**moe, "adapt": "none"},
        ),
        Variant(
            "gen MoE 8/16 + router adapt",
            f"as above, adapt router ({adapt_steps} steps, lr 1e-3)",
            "ffn_to_moe",
            {**moe, "adapt": "router", "lr": 1e-3},
            adapted=True,
        ),
        Variant(
            "gen MoE 8/16 + full adapt",
            f"as above, adapt full ({adapt_steps} steps, lr {FINETUNE_LR:g})",
            "ffn_to_moe",
            {**moe, "adapt": "full", "lr": FINETUNE_LR},
            adapted=True,
        ),
        Variant(
            "gen MoE shared + 4/12 + full adapt",
            "as above, with a shared expert: the 25% most important "
            f"neurons always on, the rest as 12 experts, top 4 (still 128 active); adapt full ({adapt_steps} "
            f"steps, lr {FINETUNE_LR:g})",
            "ffn_to_moe",
            {**moe, "experts": 12, "top_k": 4, "shared": 0.25, "adapt": "full", "lr": FINETUNE_LR},
            adapted=True,
        ),
        Variant(
            "und slice 0.5",
            "understanding FFNs: slice_neurons keep_ratio 0.5 (activation)",
            "slice_neurons",
            {"where": UND_FFNS, "keep_ratio": 0.5, "importance": "activation"},
        ),
        # a quarter of the generation FFN active per token: where static slicing starts to cost
        Variant(
            "gen slice 0.25 + fine-tune",
            f"generation FFNs: slice_neurons keep_ratio 0.25, then fine-tuned "
            f"({adapt_steps} steps, lr {FINETUNE_LR:g})",
            "slice_neurons",
            {**gen_slice, "keep_ratio": 0.25},
            finetune=True,
        ),
        Variant(
            "gen MoE 4/16 + full adapt",
            f"generation FFNs: ffn_to_moe 16 experts, top 4, learned router, adapt "
            f"full ({adapt_steps} steps, lr {FINETUNE_LR:g})",
            "ffn_to_moe",
            {**moe, "top_k": 4, "adapt": "full", "lr": FINETUNE_LR},
            adapted=True,
        ),
    ]


def calibration_set(samples_per_task: int) -> CalibrationSet:
    """`samples_per_task` train sequences of each task as one set, interleaved (und, gen, und, gen, ...) so that
    every calibration batch holds both tasks (adaptation steps then always see generation tokens)."""
    parts = [tb.task_inputs(task, split="train", n=samples_per_task) for task in tb.TASKS]
    inputs = {key: torch.stack([p[key] for p in parts], dim=1).flatten(0, 1) for key in parts[0]}
    return CalibrationSet(inputs, source=f"digits train split, {samples_per_task} per task ({', '.join(tb.TASKS)})")


def capture(loaded) -> sparsec.Program:
    return sparsec.capture(loaded.model, loaded.family.example_inputs(loaded.model, 2, 16))


def score(logits: tb.Logits, judge: tb.Judge, seeds: Sequence[int], per_label: int) -> dict[str, Any]:
    """Understanding accuracy and, per seed and on their mean, the generation metrics of one model."""
    per_seed = [
        {"seed": seed, **tb.generation_quality(logits, judge, per_label=per_label, seed=seed)} for seed in seeds
    ]
    return {
        "understanding_accuracy": tb.understanding_accuracy(logits),
        "judge_accuracy": statistics.fmean(s["judge_accuracy"] for s in per_seed),
        "frechet_distance": statistics.fmean(s["frechet_distance"] for s in per_seed),
        "per_seed": per_seed,
    }


def retained(result: dict[str, Any], dense: dict[str, Any]) -> dict[str, float]:
    """Quality as a fraction of the dense model's, per task."""
    return {
        "retained_understanding": result["understanding_accuracy"] / dense["understanding_accuracy"],
        "retained_generation": result["judge_accuracy"] / dense["judge_accuracy"],
    }


# ----- part 1: the sweep -------------------------------------------------------------------------------------
def sweep(
    loaded,
    judge,
    samples_per_task: int,
    ratios: Sequence[float],
    seeds: Sequence[int],
    per_label: int,
    dense: dict[str, Any],
    log: Callable[[str], None],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every (component, kind, ratio) of the probe, scored on both tasks with the testbed's metrics; and the
    probe's dynamic-sparsity overlap per FFN (how much the top neurons of one sample agree with another's)."""
    program = capture(loaded)
    tasks = [
        Task(
            name,
            program,
            CalibrationSet(tb.task_inputs(name, "train", samples_per_task), source=f"train {name}"),
            scored=tb.score_mask(name, samples_per_task),
        )
        for name in tb.TASKS
    ]
    probe = Probe(tasks)
    analysis = probe.run(ratios, units=False)  # the sweep only: each variant is scored by sampling below
    agreement = {(r["component"], r["kind"], r["ratio"], r["task"]): r for r in analysis["sweep"]}
    rows = []
    points = [(c, k, r) for c in COMPONENTS for k in DEFAULT_KINDS for r in ratios]
    for i, (component, kind, ratio) in enumerate(points, 1):
        start = time.perf_counter()
        step = probe.compressed(tasks[0], component, kind, ratio)
        result = score(lambda batch, step=step: step(batch)["logits"], judge, seeds, per_label)
        probe_row = agreement[(component, kind, ratio, tb.TASKS[0])]
        removed = (
            {"skipped_blocks": probe_row["skipped_blocks"]}
            if kind == "depth"
            else {"kept_width": probe_row["kept_width"]}
        )
        rows.append(
            {
                "component": component,
                "kind": kind,
                "ratio": ratio,
                "actual_ratio": probe_row["actual_ratio"],
                **removed,
                **result,
                **retained(result, dense),
                "token_agreement": {t: agreement[(component, kind, ratio, t)]["value"] for t in tb.TASKS},
                "seconds": time.perf_counter() - start,
            }
        )
        log(
            f"  [{i}/{len(points)}] compress {component} {kind} {ratio:g}: understanding "
            f"{result['understanding_accuracy']:.3f}, judge {result['judge_accuracy']:.3f}, "
            f"Frechet {result['frechet_distance']:.1f}"
        )
    return rows, analysis["sparsity"]


# ----- part 2: the variants ----------------------------------------------------------------------------------
def ffn_widths(record, variant: Variant, dense_width: int) -> tuple[int, int]:
    """(active generation-FFN width per token, understanding-FFN width) after the variant's pass."""
    gen, und = dense_width, dense_width
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


def finetune(program: sparsec.Program, calib: CalibrationSet, teacher: sparsec.Program, steps: int) -> dict[str, float]:
    """Distill the generation FFNs' weights of `program` to `teacher` (the dense program), like adapt full."""
    trainable = [
        program.state_name(linear.args[1])
        for ffn in region_index(program).ffns(GEN_FFNS)
        for linear in ffn.linears.values()
    ]
    settings = TrainingSettings(steps=steps, lr=FINETUNE_LR, schedule="constant")
    report = train_end_to_end(program, teacher, trainable, calib, settings, description="fine-tune")
    return dataclasses.asdict(report)


def evaluate_variant(
    loaded, judge, calib: CalibrationSet, variant: Variant, adapt_steps: int, per_label: int, seeds: Sequence[int]
) -> dict[str, Any]:
    """Capture afresh, apply the variant's pass (and fine-tuning), score; the dense row is scored in `main`."""
    start = time.perf_counter()
    program = capture(loaded)
    teacher = program.frozen_copy() if variant.finetune else None
    options = dict(variant.options)
    if variant.adapted:
        options["adapt_steps"] = adapt_steps
    record = apply_pass(program, variant.pass_name, calibration=calib, **options)
    fine_tuning = finetune(program, calib, teacher, adapt_steps) if variant.finetune else None
    compile_seconds = time.perf_counter() - start

    result = score(lambda batch: program.run(batch)["logits"], judge, seeds, per_label)
    gen_width, und_width = ffn_widths(record, variant, loaded.model.config.intermediate_size)
    out = {
        "name": variant.name,
        "description": variant.description,
        "pass": variant.pass_name,
        "options": options,
        "gen_ffn_active_width": gen_width,
        "und_ffn_width": und_width,
        **result,
        "compile_seconds": compile_seconds,
        "seconds": time.perf_counter() - start,
        "stats": record.stats,
    }
    adaptation = record.decisions.get("adapt")
    if adaptation:
        out["adaptation"] = {k: v for k, v in adaptation.items() if not isinstance(v, list)}
    routers = [d["router"] for d in record.decisions["ffns"] if "router" in d]
    if routers:
        out["routers"] = routers
    if fine_tuning is not None:
        out["adaptation"] = fine_tuning
    return out


# ----- report ------------------------------------------------------------------------------------------------
def _seeds_cell(result: dict[str, Any]) -> str:
    return " ; ".join(f"{s['judge_accuracy']:.3f} / {s['frechet_distance']:.1f}" for s in result["per_seed"])


def sweep_table(rows: list[dict[str, Any]], dense: dict[str, Any]) -> str:
    lines = [
        "| compress | kind | ratio (actual) | understanding acc | retained % | judge acc | retained % "
        "| Frechet distance | top-1 agreement und / gen | per seed: judge / Frechet |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| - | - | 0 | {dense['understanding_accuracy']:.3f} | 100.0 | {dense['judge_accuracy']:.3f} | 100.0 | "
        f"{dense['frechet_distance']:.1f} | 1.000 / 1.000 | {_seeds_cell(dense)} |",
    ]
    for r in rows:
        agree = r["token_agreement"]
        lines.append(
            f"| {r['component']} | {r['kind']} | {r['ratio']:g} ({r['actual_ratio']:.3g}) | "
            f"{r['understanding_accuracy']:.3f} | {100 * r['retained_understanding']:.1f} | "
            f"{r['judge_accuracy']:.3f} | {100 * r['retained_generation']:.1f} | {r['frechet_distance']:.1f} | "
            f"{agree['understanding']:.3f} / {agree['generation']:.3f} | {_seeds_cell(r)} |"
        )
    return "\n".join(lines) + "\n"


def sparsity_table(entries: list[dict[str, Any]]) -> str:
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [
        "| FFN | component | within understanding samples | within generation samples | across the tasks |",
        "|---|---|---|---|---|",
    ]
    for e in entries:
        across = next(iter(e["across"].values()), None)
        lines.append(
            f"| {e['ffn']} | {e['component']} | {cell(e['within'].get('understanding'))} | "
            f"{cell(e['within'].get('generation'))} | {cell(across)} |"
        )
    return "\n".join(lines) + "\n"


def variants_table(results: list[dict[str, Any]], dense_width: int) -> str:
    lines = [
        f"| variant | active gen-FFN width (of {dense_width}) | understanding acc | judge acc | retained % "
        "| Frechet distance | per seed: judge / Frechet | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['gen_ffn_active_width']} | {r['understanding_accuracy']:.3f} | "
            f"{r['judge_accuracy']:.3f} | {100 * r['retained_generation']:.1f} | "
            f"{r['frechet_distance']:.1f} | {_seeds_cell(r)} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(rows: list[dict[str, Any]], dense: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    styles = {"understanding": "-", "generation": "--"}
    for ax, kind in zip(axes[:2], DEFAULT_KINDS):
        for component in COMPONENTS:
            group = [r for r in rows if r["kind"] == kind and r["component"] == component]
            if not group:
                continue
            x = [0.0] + [r["actual_ratio"] for r in group]
            for task, key, marker in (
                ("understanding", "retained_understanding", "o"),
                ("generation", "retained_generation", "s"),
            ):
                ax.plot(
                    x,
                    [1.0] + [r[key] for r in group],
                    linestyle=styles[component],
                    marker=marker,
                    label=f"compress {component}, task {task}",
                )
        ax.set_xlabel("layers skipped (fraction)" if kind == "depth" else "FFN neurons removed (fraction)")
        ax.set_ylabel("quality retained (accuracy / dense)")
        ax.set_ylim(0, 1.1)
        ax.set_title(f"{kind} compression")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[2]
    for component in COMPONENTS:
        for kind, marker in zip(DEFAULT_KINDS, ("o", "s")):
            group = [r for r in rows if r["kind"] == kind and r["component"] == component]
            if group:
                ax.plot(
                    [0.0] + [r["actual_ratio"] for r in group],
                    [dense["frechet_distance"]] + [r["frechet_distance"] for r in group],
                    linestyle=styles[component],
                    marker=marker,
                    label=f"compress {component}, {kind}",
                )
    ax.set_yscale("log")
    ax.set_xlabel("fraction removed")
    ax.set_ylabel("Frechet distance (log; lower is better)")
    ax.set_title("generated digits vs real")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_variants(results: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    names = [r["name"] for r in results]
    x = range(len(results))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.4
    left.bar(
        [i - width / 2 for i in x], [r["judge_accuracy"] for r in results], width, label="generation: judge accuracy"
    )
    left.bar(
        [i + width / 2 for i in x],
        [r["understanding_accuracy"] for r in results],
        width,
        label="understanding accuracy",
    )
    left.axhline(
        0.97 * results[0]["judge_accuracy"],
        color="gray",
        linestyle="--",
        linewidth=1,
        label="97% of dense judge accuracy",
    )
    left.set_ylim(0, 1.25)
    left.set_xticks(list(x), names, rotation=30, ha="right")
    left.set_title("accuracy (held-out; judge: mean over seeds)")
    left.legend(loc="upper center", fontsize=8, ncol=2)
    right.bar(list(x), [r["frechet_distance"] for r in results], color="tab:red")
    right.set_xticks(list(x), names, rotation=30, ha="right")
    right.set_title("Frechet distance of generated digits (mean over seeds; lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _number_list(text: str, kind: type) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults are the full run (about 10 minutes on one thread here); "
        "--quick: 5 digits per label, seed 0, ratio 0.5, 16 calibration samples per "
        "task, 5 adapt steps.",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output directory")
    parser.add_argument("--quick", action="store_true", help="small fast run (see below)")
    parser.add_argument("--per-label", type=int, default=None, help="generated digits per label and seed (default 20)")
    parser.add_argument(
        "--seeds",
        type=lambda t: _number_list(t, int),
        default=None,
        help="generation sampling seeds, comma-separated (default 0,1,2)",
    )
    parser.add_argument(
        "--ratios",
        type=lambda t: _number_list(t, float),
        default=None,
        help="sweep: fractions removed, comma-separated (default 0.25,0.5,0.75)",
    )
    parser.add_argument("--calib-samples", type=int, default=None, help="train samples per task (default 128)")
    parser.add_argument("--adapt-steps", type=int, default=None, help="adaptation / fine-tuning steps (default 100)")
    parser.add_argument("--parts", default="sweep,variants", help="which parts to run: sweep, variants or both")
    parser.add_argument("--variants", default=None, help="comma-separated subset of variant names (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see README, shared cores)")
    args = parser.parse_args(argv)
    per_label = args.per_label or (5 if args.quick else 20)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    ratios = args.ratios or ([0.5] if args.quick else [0.25, 0.5, 0.75])
    calib_samples = args.calib_samples or (16 if args.quick else 128)
    adapt_steps = args.adapt_steps or (5 if args.quick else 100)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - {"sweep", "variants"}:
        parser.error(f"--parts: choose sweep, variants or both, got {args.parts!r}")
    if any(not 0 < r < 1 for r in ratios):
        parser.error(f"--ratios must lie in (0, 1) (the fraction removed), got {ratios}")
    chosen = variants(adapt_steps)
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",")]
        unknown = sorted(set(wanted) - {v.name for v in chosen})
        if unknown:
            parser.error(f"unknown variants {unknown}; choose from {[v.name for v in chosen]}")
        chosen = [v for v in chosen if v.name in wanted or v.name == "dense"]  # dense: the reference
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def log(message: str) -> None:
        print(message, flush=True)

    start = time.perf_counter()
    loaded = load_model(tb.WEIGHTS / "mot")
    loaded.model.eval()
    judge = tb.load_judge()
    dense_width = loaded.model.config.intermediate_size
    log(
        f"digits reproduction: parts {parts}, {per_label} digits per label x seeds {seeds}, "
        f"{calib_samples} train sequences per task, adapt steps {adapt_steps}"
    )

    log("[dense] scoring the uncompressed program ...")
    dense_start = time.perf_counter()
    program = capture(loaded)
    dense = score(lambda batch: program.run(batch)["logits"], judge, seeds, per_label)
    dense_seconds = time.perf_counter() - dense_start
    log(
        f"    understanding {dense['understanding_accuracy']:.3f}, judge {dense['judge_accuracy']:.3f}, "
        f"Frechet {dense['frechet_distance']:.1f}"
    )
    summary: dict[str, Any] = {
        "settings": {
            "parts": parts,
            "per_label": per_label,
            "seeds": seeds,
            "ratios": ratios,
            "calibration_samples_per_task": calib_samples,
            "adapt_steps": adapt_steps,
            "quick": args.quick,
            "threads": args.threads,
            "generation_ffns": GEN_FFNS,
            "understanding_ffns": UND_FFNS,
            "dense_ffn_width": dense_width,
        },
        "reference_frechet_distance": tb.reference_frechet_distance(judge, per_label),
        "dense": dense,
    }
    sections = []
    if "sweep" in parts:
        log(f"[sweep] {len(COMPONENTS)} components x {len(DEFAULT_KINDS)} kinds x ratios {ratios} ...")
        summary["sweep"], summary["sparsity"] = sweep(
            loaded, judge, calib_samples, ratios, seeds, per_label, dense, log
        )
        sections.append(
            "## Sweep: one component compressed at a time (the probe's what-if rewrites)\n\n"
            + sweep_table(summary["sweep"], dense)
        )
        sections.append(
            "## Dynamic sparsity: mean Jaccard overlap of two samples' top 10% FFN neurons\n\n"
            + sparsity_table(summary["sparsity"])
        )
    if "variants" in parts:
        calib = calibration_set(calib_samples)
        results = []
        for i, variant in enumerate(chosen, 1):
            log(f"[variant {i}/{len(chosen)}] {variant.name}: {variant.description} ...")
            if variant.pass_name is None:  # scored once above
                result = {
                    "name": variant.name,
                    "description": variant.description,
                    "pass": None,
                    "options": {},
                    "gen_ffn_active_width": dense_width,
                    "und_ffn_width": dense_width,
                    **dense,
                    "seconds": dense_seconds,
                }
            else:
                result = evaluate_variant(loaded, judge, calib, variant, adapt_steps, per_label, seeds)
            result.update(retained(result, dense))
            results.append(result)
            log(
                f"    understanding {result['understanding_accuracy']:.3f}, judge {result['judge_accuracy']:.3f}, "
                f"Frechet {result['frechet_distance']:.1f}, {result['seconds']:.0f} s"
            )
        summary["variants"] = results
        sections.append(
            "## Variants: the generation FFNs at half (and a quarter) active width\n\n"
            + variants_table(results, dense_width)
        )
    summary["total_seconds"] = time.perf_counter() - start
    report = (
        f"# Digits reproduction ({'quick' if args.quick else 'full'} run)\n\n"
        f"Held-out split; {per_label} generated digits per label for each seed in {seeds} (judge accuracy and "
        f"Frechet distance: means over the seeds); calibration {calib_samples} train sequences per task; "
        f"adapt steps {adapt_steps}. Reference Frechet distance (real train digits, same count): "
        f"{summary['reference_frechet_distance']:.1f}. Retained % = accuracy / dense accuracy.\n\n"
        + "\n".join(sections)
    )
    log(report)

    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(dir=args.out, prefix=".staging-") as staging:
        staging_dir = Path(staging)
        (staging_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        (staging_dir / "results.md").write_text(report)
        written += ["results.json", "results.md"]
        if "sweep" in summary:
            plot_sweep(summary["sweep"], dense, staging_dir / "sweep.png")
            written.append("sweep.png")
        if "variants" in summary:
            plot_variants(summary["variants"], staging_dir / "variants.png")
            written.append("variants.png")
        for name in written:
            shutil.move(str(staging_dir / name), str(args.out / name))
    log(f"wrote {', '.join(written)} to {args.out} ({summary['total_seconds']:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
