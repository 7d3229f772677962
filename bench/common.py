"""Shared benchmark machinery: a realistic-size model, compiled variants, interleaved ONNX Runtime timing.

Every benchmark compiles a dense model and its variants with sparsec (capture -> passes -> ONNX), counts
each compiled program's FLOPs at the benchmark shape (torch's FlopCounterMode), times all variants in one
process with runs interleaved (machine noise hits them alike), and prints measured vs FLOP-ideal speedups.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import sparsec
from sparsec.analysis.inspection import flops_by_path
from sparsec.exporters.lowering.onnx import export_onnx
from sparsec.exporters.targets import onnxruntime as ort_backend
from sparsec.models import build_model
from sparsec.transform.pass_manager import Pass, PassManager


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--json", help="also write the results here")
    return p


def qwen2_model(args: argparse.Namespace, heads: int | None = None, kv_heads: int | None = None) -> torch.nn.Module:
    """The benchmark model: head_dim 64 (`heads` = hidden / 64) in groups of 4 (`kv_heads` = hidden / 256) unless
    given."""
    import transformers

    return build_model(
        transformers.Qwen2Config(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=heads or args.hidden // 64,
            num_key_value_heads=kv_heads or max(1, args.hidden // 256),
            max_position_embeddings=max(4096, args.seq),
            tie_word_embeddings=False,
        )
    )


def time_interleaved(runs: dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each variant; variants alternate within every repetition."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def synchronized(fn: Callable) -> Callable:
    """`fn` followed by a CUDA synchronize: what a device timing measures (kernels are launched asynchronously)."""

    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return call


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# Interleaved sessions in one process: a session's intra-op threads spin after each run and steal the cores
# from the next session's run. One ad-hoc measurement here: a 2-thread session of one FFN, 90 ms alone, took
# 141 ms interleaved with spinning sessions and 90 ms with spinning off.
NO_SPIN = {"session.intra_op.allow_spinning": "0"}


def compare_variants(
    model: torch.nn.Module,
    variants: dict[str, Sequence[Pass]],
    args: argparse.Namespace,
    describe: Callable[[sparsec.Program], str],
    session_config: dict[str, str] | None = None,
    moe_lowering: str = "standard",
) -> dict:
    """Compile each variant (its passes applied to a fresh capture), time them interleaved, print a table."""
    ids = torch.randint(0, args.vocab, (1, args.seq))
    bench_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    capture_inputs = {"input_ids": ids[:, :16].repeat(2, 1), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    runs, facts = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, passes) in enumerate(variants.items()):
            program = sparsec.capture(model, capture_inputs)
            PassManager(passes).run(program)
            path = Path(tmp) / f"variant{i}.onnx"
            export_onnx(program, path, moe_lowering=moe_lowering)
            sess = ort_backend.session(path, config=session_config)
            runs[name] = lambda s=sess: ort_backend.run(s, bench_inputs)
            facts[name] = {
                "shape": describe(program),
                "parameters": program.num_parameters(),
                "flops": sum(flops_by_path(program, bench_inputs).values()),
            }
            print(f"compiled {name}: {facts[name]}", file=sys.stderr, flush=True)
        times = time_interleaved(runs, reps=args.reps)

    dense_name = next(iter(variants))
    dense_latency = statistics.median(times[dense_name])
    rows, results = [], {}
    for name in variants:
        latency = statistics.median(times[name])
        ideal = facts[dense_name]["flops"] / facts[name]["flops"]
        measured = dense_latency / latency
        results[name] = {
            **facts[name],
            "median_s": latency,
            "ideal_speedup": ideal,
            "measured_speedup": measured,
            "fraction_of_ideal": measured / ideal,
            "times_s": times[name],
        }
        rows.append(
            [
                name,
                facts[name]["shape"],
                f"{facts[name]['parameters'] / 1e6:.1f}M",
                f"{facts[name]['flops'] / 1e9:.1f}",
                f"{latency * 1e3:.0f}",
                f"{ideal:.3f}x",
                f"{measured:.3f}x",
                f"{measured / ideal:.2f}",
            ]
        )
    print(
        f"ONNX Runtime {__import__('onnxruntime').__version__} CPU, {torch.get_num_threads()} threads, batch 1 x seq "
        f"{args.seq}, hidden {args.hidden}, FFN {args.intermediate}, {args.layers} layers, median of {args.reps} "
        "interleaved runs"
    )
    print(
        markdown_table(
            [
                "variant",
                "shape",
                "params",
                "GFLOPs",
                "median ms",
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


def compare_at_two_lengths(
    model: torch.nn.Module,
    variants: dict[str, Sequence[Pass]],
    args: argparse.Namespace,
    describe: Callable[[sparsec.Program], str],
) -> dict:
    """`compare_variants` at `args.seq` and at 4x that (512 and 2048 by default), where attention's share of the
    time grows; `model` must hold positions for 4x `args.seq`. Results keyed `"{variant} @ seq {seq}"`, all of them
    written to `args.json` if given."""
    results = {}
    for seq in (args.seq, 4 * args.seq):
        at = argparse.Namespace(**{**vars(args), "seq": seq, "json": None})
        measured = compare_variants(model, variants, at, describe=describe)
        results |= {f"{name} @ seq {seq}": r for name, r in measured.items()}
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return results
