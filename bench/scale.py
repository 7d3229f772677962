"""Real-size models: peak memory and time of `sparsec inspect` and `sparsec compile` against the checkpoint's bytes.

Qwen2-shaped checkpoints with random bf16 weights at the sizes users compile (0.5B, 1.5B, 3B, 7B) are written
once into a cache directory, shard by shard straight from the config (no model is built: memory stays at one
shard), in exactly `save_pretrained`'s layout (config.json, model-0000k-of-0000n.safetensors, the index). Each
command then runs in its own process under `/usr/bin/time -v`; its peak RSS is divided by the checkpoint's bytes
(the ideal a weights-bound tool approaches: 1.0x holds the weights once).

Recipe (issue 16's): drop a quarter of the blocks by index, slice every FFN to half by weight magnitude,
synthetic calibration of 8 samples x 64 tokens.

    python bench/scale.py --sizes 0.5b,1.5b --cache ~/.cache/sparsec-scale --json bench/results/scale.json
    python bench/scale.py --sizes 0.5b --phases inspect            # one command only
    python bench/scale.py --sizes 7b --phases inspect,compile-lazy  # 15 GB; about 30 min on a 2-core machine
    python bench/scale.py --quick                                   # a 10M model: checks that the script runs
    python bench/scale.py --sizes bagel-7b-mot --phases inspect,dry-run --cache /work/scale-cache   # 14B, 28 GB

The calibration axis (`--calibration 64,256,1024`): peak RSS of `compile --dry-run` against the number of
calibration samples (token ids, `--seq-len` tokens each, batches of 8), with a quality gate (`calib-gates`:
statistics, then the pass measured on the held-out fifth against the dense program, every metric) and with
`ffn_to_moe`'s `adapt: router` (`calib-adapt`: the router trained against the dense program). Flat is the target:
no reference output is kept whole once it passes `sparsec.data.reference.KEEP_BYTES`, and logits that are a plain
projection are kept as hidden states (`sparsec.data.logits`) and trained through a few rows at a time
(`sparsec.data.projected_kl`). `calib-gates-whole` and `calib-adapt-whole` are the same with every batch's logits
computed whole, as sparsec did before that projection (the baseline, side by side). `calib-compile` is
`calib-gates` compiled to the end: program.pt2, the ONNX export and ONNX Runtime parity.

    python bench/scale.py --sizes vocab-262k --calibration 64,256,1024 --json calibration.json
    python bench/scale.py --sizes 270m --calibration 128 --phases calib-gates,calib-gates-whole
    python bench/scale.py --sizes vocab-262k --calibration 64,256 --seq-len 512 --phases calib-gates,calib-gates-whole
    python bench/scale.py --sizes vocab-262k --calibration 64,256 --phases calib-adapt,calib-adapt-whole
    python bench/scale.py --sizes 0.5b-262k --calibration 64 --phases calib-compile

Phases: `inspect`, `dry-run` (`compile --dry-run`: the passes' decisions, nothing written), `compile` (program.pt2,
model.onnx, ONNX Runtime parity as `export.parity.mode: auto` decides: block by block above 1 GiB of ONNX),
`compile-whole` (the same with `export: {parity: {mode: whole}}`: the whole model in one session),
`compile-lazy` (`compile --weights lazy`: the checkpoint read block by block while the model runs, the transformed
program read into memory for writing). A phase killed for memory or failing is reported with its exit status and
the last lines it printed; the other phases go on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# Qwen2 / Qwen2.5 base configs (hidden, FFN, layers, heads, KV heads, vocab, tied embeddings).
PRESETS: dict[str, dict] = {
    "quick": dict(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=8192,
        tie_word_embeddings=True,
    ),
    "vocab-262k": dict(  # a 262,144-token vocabulary (Gemma 3's) on a small stack: the logits dominate
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=262144,
        tie_word_embeddings=True,
    ),
    "270m": dict(  # Gemma 3 270M's widths and vocabulary on a Qwen2 stack: 257M parameters, 168M of them the table
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=262144,
        tie_word_embeddings=True,
    ),
    "0.5b-262k": dict(  # Qwen2-0.5B's stack with a 262,144-token vocabulary: 593M parameters, 235M the table
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=262144,
        tie_word_embeddings=True,
    ),
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "3b": dict(
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}
# BAGEL-7B-MoT's language model (`sparsec.families.mot.MOT_PRESETS["bagel-7b"]`, 14B, 28 GB): phases `inspect` and
# `dry-run` on a 24 GiB machine (the weights are read lazily); a full compile holds the transformed program (about
# half of 28 GB with this recipe) while it writes it, and was not run here.
MOT_SIZES = {"bagel-7b-mot": "bagel-7b"}
SHARD_BYTES = 1 << 30
PHASES = ("inspect", "dry-run", "compile", "compile-whole", "compile-lazy")
CALIBRATION_GATES = "passes:\n  - drop_layers: {count: 1}\nquality: {min_cosine: 0.0}\n"  # random weights pass
CALIBRATION_ADAPT = (
    "passes:\n  - ffn_to_moe: {experts: 8, top_k: 2, adapt: router, adapt_steps: 4}\nquality: {gates: off}\n"
)
CALIBRATION_PHASES = {
    "calib-gates": CALIBRATION_GATES,
    "calib-adapt": CALIBRATION_ADAPT,
    "calib-gates-whole": CALIBRATION_GATES,  # every batch's logits computed whole (WHOLE_LOGITS)
    "calib-adapt-whole": CALIBRATION_ADAPT,
    "calib-compile": CALIBRATION_GATES,  # the whole compile: the gates, ONNX export and ONNX Runtime parity
}
# The `-whole` phases: logits computed whole, as before they were projected from hidden states (for comparison)
WHOLE_LOGITS = (
    "import sys; import sparsec.data.logits as l; l.find_logits_head = lambda program, output='logits': None; "
    "from sparsec.cli import main; sys.exit(main(sys.argv[1:]))"
)


def checkpoint_tensors(config) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Name -> (shape, is_norm) of every tensor `save_pretrained` writes for the model of `config`."""
    from sparsec.models import build_model

    with torch.device("meta"):
        model = build_model(config)
    tensors = {name: (tuple(t.shape), "norm" in name) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    return tensors


def model_config(size: str):
    """The transformers config of `size`: a Qwen2 preset, or a `MOT_SIZES` MoT shape."""
    import transformers

    if size in MOT_SIZES:
        from sparsec.families.mot import MOT_PRESETS, MoTConfig

        return MoTConfig(**MOT_PRESETS[MOT_SIZES[size]], torch_dtype="bfloat16", architectures=["MoTForCausalLM"])
    return transformers.Qwen2Config(
        **PRESETS[size], max_position_embeddings=4096, torch_dtype="bfloat16", architectures=["Qwen2ForCausalLM"]
    )


def write_checkpoint(directory: Path, size: str, seed: int = 0) -> Path:
    """A random bf16 Qwen2 checkpoint of preset `size` in `directory` (kept if already complete).

    Weights are N(0, 0.02) (norm weights 1, biases 0.02-scaled too), written shard by shard: peak memory is one
    shard (1 GiB), never the model. Staged and renamed, so an interrupted write leaves no half checkpoint.
    """
    from safetensors.torch import save_file

    if (directory / "config.json").is_file():
        return directory
    config = model_config(size)
    tensors = checkpoint_tensors(config)
    shards: list[list[str]] = [[]]
    size_now = 0
    for name, (shape, _) in tensors.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size_now + nbytes > SHARD_BYTES:
            shards.append([])
            size_now = 0
        shards[-1].append(name)
        size_now += nbytes
    directory.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    try:
        for k, names in enumerate(shards, 1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            shard = {}
            for name in names:
                shape, is_norm = tensors[name]
                if is_norm:
                    shard[name] = torch.ones(shape, dtype=torch.bfloat16)
                else:
                    shard[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
                weight_map[name] = file
                total += shard[name].nbytes
            save_file(shard, str(stage / file), metadata={"format": "pt"})
            print(f"[scale] {size}: wrote {file} ({len(names)} tensors)", flush=True)
            del shard
        config.save_pretrained(stage)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (stage / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        os.replace(stage, directory)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return directory


def checkpoint_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def recipe_text(layers: int, spread: bool = False) -> str:
    """The recipe: the last quarter of the blocks dropped (`spread`: every fourth block, for the MoT, whose
    consecutive blocks drop_layers cannot bypass yet), every FFN sliced to half by magnitude."""
    dropped = list(range(layers - layers // 4, layers))[: layers // 4] or [layers - 1]
    if spread:
        dropped = list(range(3, layers, 4))
    return (
        f"passes:\n  - drop_layers: {{layers: {dropped}}}\n"
        "  - slice_neurons: {keep_ratio: 0.5, importance: magnitude}\n"
        "calibration: {samples: 8, seq_len: 64}\n"
        "quality: {gates: off}\n"  # random weights: the table reports parity, not what pruning costs
    )


def run_measured(command: list[str], log: Path) -> dict:
    """Run `command` under /usr/bin/time -v; its peak RSS, wall time, exit status and last lines."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(["/usr/bin/time", "-v", *command], stdout=out, stderr=subprocess.STDOUT)
    text = log.read_text(errors="replace")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {
        "rc": proc.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_bytes": int(rss.group(1)) * 1024 if rss else None,
        "tail": [line for line in text.splitlines() if line.strip() and not line.startswith("\t")][-4:],
    }


def measure(size: str, cache: Path, phases: list[str], work: Path) -> dict:
    directory = write_checkpoint(cache / (f"mot-{size}-bf16" if size in MOT_SIZES else f"qwen2-{size}-bf16"), size)
    layers = model_config(size).num_hidden_layers
    recipe = work / f"recipe-{size}.yaml"
    recipe.write_text(recipe_text(layers, spread=size in MOT_SIZES))
    whole = work / f"recipe-{size}-whole.yaml"  # parity of the whole model in one ONNX Runtime session
    whole.write_text(recipe.read_text() + "export: {parity: {mode: whole}}\n")
    ckpt = checkpoint_bytes(directory)
    row: dict = {"size": size, "checkpoint_bytes": ckpt, "phases": {}}
    sparsec = [sys.executable, "-m", "sparsec.cli"]
    for phase in phases:
        out = work / f"out-{size}"
        compile_ = [*sparsec, "compile", "--model", str(directory), "--out", str(out), "--recipe"]
        command = {
            "inspect": [*sparsec, "inspect", "--model", str(directory)],
            "dry-run": [*sparsec, "compile", "--model", str(directory), "--recipe", str(recipe), "--dry-run"],
            "compile": [*compile_, str(recipe)],
            "compile-whole": [*compile_, str(whole)],
            "compile-lazy": [*compile_, str(recipe), "--weights", "lazy"],
        }[phase]
        print(f"[scale] {size}: {phase} ...", flush=True)
        result = run_measured(command, work / f"{size}-{phase}.log")
        if result["peak_rss_bytes"]:
            result["peak_over_checkpoint"] = round(result["peak_rss_bytes"] / ckpt, 2)
        report = out / "report.json"
        if phase.startswith("compile") and result["rc"] == 0 and report.is_file():
            data = json.loads(report.read_text())
            result["phase_seconds"] = data.get("seconds")
            result["onnx_bytes"] = data.get("export", {}).get("bytes")
            result["parity_cosine"] = data.get("parity", {}).get("metrics", {}).get("logits", {}).get("cosine")
        shutil.rmtree(out, ignore_errors=True)
        row["phases"][phase] = result
        print(
            f"[scale] {size}: {phase} rc {result['rc']}, {result['seconds']} s, peak "
            f"{(result['peak_rss_bytes'] or 0) / 2**30:.2f} GiB ({result.get('peak_over_checkpoint')}x checkpoint)",
            flush=True,
        )
    return row


def calibration_file(path: Path, samples: int, seq_len: int, vocab: int) -> Path:
    """`samples` rows of random token ids, `seq_len` long; every third row left-padded by 1 to 16."""
    from safetensors.torch import save_file

    ids = torch.randint(0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(samples))
    mask = torch.ones_like(ids)
    for i in range(0, samples, 3):
        mask[i, : 1 + i % 16] = 0
    save_file({"input_ids": ids, "attention_mask": mask}, str(path))
    return path


def measure_calibration(
    size: str, cache: Path, samples: list[int], seq_len: int, phases: list[str], work: Path
) -> list[dict]:
    """Peak RSS of each of `phases` (`CALIBRATION_PHASES`), a dry run (`calib-compile`: a compile to the end), at
    every sample count, one process each."""
    directory = write_checkpoint(cache / f"qwen2-{size}-bf16", size)
    vocab = model_config(size).vocab_size
    calibs = {n: calibration_file(work / f"calib-{n}.safetensors", n, seq_len, vocab) for n in samples}
    rows = []
    for phase in phases:
        for count, calib in calibs.items():
            recipe = work / f"{phase}.yaml"
            calibration = f"calibration: {{samples: {count}, seq_len: {seq_len}, batch_size: 8}}\n"
            recipe.write_text(CALIBRATION_PHASES[phase] + calibration)
            sparsec = ["-c", WHOLE_LOGITS] if phase.endswith("-whole") else ["-m", "sparsec.cli"]
            command = [sys.executable, *sparsec, "compile", "--model", str(directory), "--recipe", str(recipe)]
            command += ["--calib", str(calib), "--dtype", "float32"]
            command += ["--out", str(work / f"out-{count}")] if phase == "calib-compile" else ["--dry-run"]
            print(f"[scale] {size}: {phase} at {count} samples ...", flush=True)
            result = run_measured(command, work / f"{phase}-{count}.log")
            rows.append({"size": size, "phase": phase, "samples": count, "seq_len": seq_len, **result})
            print(
                f"[scale] {phase} {count}: rc {result['rc']}, {result['seconds']} s, "
                f"peak {(result['peak_rss_bytes'] or 0) / 2**30:.2f} GiB",
                flush=True,
            )
    return rows


def calibration_markdown(rows: list[dict]) -> str:
    """Peak RSS per sample count, and over the smallest count's peak of the same phase."""
    first = {}
    lines = [
        "| model | phase | samples x tokens | exit | peak RSS | / fewest samples | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = r["peak_rss_bytes"] or 0
        base = first.setdefault((r["size"], r["phase"], r["seq_len"]), peak)
        lines.append(
            f"| {r['size']} | {r['phase']} | {r['samples']} x {r['seq_len']} | {r['rc']} | {peak / 2**30:.2f} GiB | "
            f"{peak / base:.2f}x | {r['seconds']} |"
        )
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| checkpoint | on disk | phase | exit | peak RSS | peak / disk | seconds | ONNX | parity cosine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for phase, r in row["phases"].items():
            peak = f"{r['peak_rss_bytes'] / 2**30:.2f} GiB" if r["peak_rss_bytes"] else "-"
            onnx = f"{r['onnx_bytes'] / 1e9:.2f} GB" if r.get("onnx_bytes") else "-"
            cos = f"{r['parity_cosine']:.6f}" if r.get("parity_cosine") is not None else "-"
            lines.append(
                f"| {row['size']} bf16 | {row['checkpoint_bytes'] / 1e9:.2f} GB | {phase} | {r['rc']} | {peak} | "
                f"{r.get('peak_over_checkpoint', '-')}x | {r['seconds']} | {onnx} | {cos} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes", default="0.5b,1.5b", help=f"comma-separated, of {[*PRESETS, *MOT_SIZES]} (default: %(default)s)"
    )
    p.add_argument(
        "--phases",
        help=f"comma-separated, of {list(PHASES)} (default: all); with --calibration, of {list(CALIBRATION_PHASES)} "
        "(default: calib-gates,calib-adapt)",
    )
    p.add_argument(
        "--cache",
        default=str(Path.home() / ".cache" / "sparsec-scale"),
        help="where the checkpoints are written once (default: %(default)s)",
    )
    p.add_argument(
        "--calibration",
        help="comma-separated sample counts: run the calibration axis (its phases, chosen by --phases) instead",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=128,
        help="tokens per calibration sample (with --calibration; default: %(default)s)",
    )
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--quick", action="store_true", help="the 10M `quick` size only")
    args = p.parse_args(argv)
    sizes = ["quick"] if args.quick else args.sizes.split(",")
    known = CALIBRATION_PHASES if args.calibration else PHASES
    default = "calib-gates,calib-adapt" if args.calibration else ",".join(PHASES)
    phases = (args.phases or default).split(",")
    bad = [s for s in sizes if s not in PRESETS and s not in MOT_SIZES] + [f for f in phases if f not in known]
    if bad:
        p.error(f"unknown size or phase {bad}; sizes {[*PRESETS, *MOT_SIZES]}, phases {list(known)}")
    with tempfile.TemporaryDirectory(prefix="sparsec-scale-") as work:
        cache = Path(args.cache).expanduser()
        if args.calibration:
            counts = [int(n) for n in args.calibration.split(",")]
            rows = [
                r for size in sizes for r in measure_calibration(size, cache, counts, args.seq_len, phases, Path(work))
            ]
            table = calibration_markdown(rows)
        else:
            rows = [measure(size, cache, phases, Path(work)) for size in sizes]
            table = markdown(rows)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "markdown": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
