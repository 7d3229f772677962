"""Depth-pruning speed: ONNX Runtime CPU latency with 25% and 50% of the blocks dropped, against dense.

Builds a Qwen2-style model of realistic proportions with random weights (speed does not depend on them),
compiles the dense model and the dropped variants with sparsec (capture -> drop_layers -> ONNX), times all
of them in one run, interleaved, and compares the measured speedup with the FLOP-ideal one (FLOPs counted
by torch's FlopCounterMode on each compiled program at the benchmark shape).

    python bench/drop_layers.py                    # hidden 1024, 16 layers, seq 512
    python bench/drop_layers.py --layers 4 --hidden 256 --seq 128 --reps 3   # quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, median, time_interleaved  # noqa: E402

import sparsec  # noqa: E402
from sparsec.exporters import onnxruntime as ort_backend  # noqa: E402
from sparsec.exporters.onnx import export_onnx  # noqa: E402
from sparsec.inspection import flops_by_path  # noqa: E402
from sparsec.models import build_model  # noqa: E402
from sparsec.pass_manager import PassManager, get_pass  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import transformers

    config = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
        max_position_embeddings=max(4096, args.seq), tie_word_embeddings=False,
    )
    model = build_model(config)
    ids = torch.randint(0, args.vocab, (1, args.seq))
    bench_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    capture_inputs = {"input_ids": ids[:, :16].repeat(2, 1), "attention_mask": torch.ones(2, 16, dtype=torch.long)}

    variants = {"dense": None, "drop 25%": args.layers // 4, "drop 50%": args.layers // 2}
    rows, runs, facts = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, n_drop in variants.items():
            program = sparsec.capture(model, capture_inputs)
            if n_drop:
                layers = list(range(1, args.layers, 2))[:n_drop]  # every other block, spread over the stack
                PassManager([get_pass("drop_layers")(layers=layers)]).run(program)
            flops = sum(flops_by_path(program, bench_inputs).values())
            path = Path(tmp) / f"{name.replace(' ', '_').replace('%', '')}.onnx"
            export_onnx(program, path)
            sess = ort_backend.session(path)
            runs[name] = (lambda s=sess: ort_backend.run(s, bench_inputs))
            facts[name] = {"blocks": args.layers - (n_drop or 0), "parameters": program.num_parameters(), "flops": flops}
            print(f"compiled {name}: {facts[name]}", file=sys.stderr)
        times = time_interleaved(runs, reps=args.reps)

    dense = facts["dense"]
    dense_latency = median(times["dense"])
    results = {}
    for name in variants:
        latency = median(times[name])
        ideal = dense["flops"] / facts[name]["flops"]
        measured = dense_latency / latency
        results[name] = {**facts[name], "median_s": latency, "ideal_speedup": ideal, "measured_speedup": measured,
                         "fraction_of_ideal": measured / ideal, "times_s": times[name]}
        rows.append([name, facts[name]["blocks"], f"{facts[name]['parameters'] / 1e6:.1f}M",
                     f"{facts[name]['flops'] / 1e9:.1f}", f"{latency * 1e3:.0f}", f"{ideal:.3f}x", f"{measured:.3f}x",
                     f"{measured / ideal:.2f}"])
    print(f"ONNX Runtime {__import__('onnxruntime').__version__} CPU, {torch.get_num_threads()} threads, batch 1 x seq {args.seq}, "
          f"hidden {args.hidden}, {args.layers} layers, median of {args.reps} interleaved runs")
    print(markdown_table(["variant", "blocks", "params", "GFLOPs", "median ms", "ideal speedup", "measured speedup",
                          "measured / ideal"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
