"""Train the digits testbed: a small BAGEL-style MoT on both tasks jointly, and the judge that scores its drawings.

    python examples/digits/train.py            # writes examples/digits/weights/{mot/, judge.safetensors, judge.json}

Deterministic (fixed seeds, deterministic algorithms); a few minutes on 2 CPU cores. See README.md here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import testbed as tb  # noqa: E402

from sparsec.families.mot import MoTConfig, MoTForCausalLM  # noqa: E402

MOT_SHAPE = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def joint_loss(
    model: MoTForCausalLM, und: dict[str, torch.Tensor], und_labels: torch.Tensor, gen: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over a mixed batch; (understanding loss, generation loss).

    Understanding: cross-entropy of the label token at the last position (the classify token), the only
    trained position. Generation: next-token cross-entropy of the 64 pixel tokens, predicted from the
    image_start token and the pixels before each.
    """
    n_und = und["input_ids"].shape[0]
    batch = {k: torch.cat([und[k], gen[k]]) for k in und}
    logits = model(**batch).logits
    und_loss = F.cross_entropy(logits[:n_und, -1], tb.LABEL0 + und_labels)
    gen_logits = logits[n_und:, tb.PROMPT_LEN - 1 : -1]
    gen_loss = F.cross_entropy(
        gen_logits.reshape(-1, gen_logits.shape[-1]), gen["input_ids"][:, tb.PROMPT_LEN :].reshape(-1)
    )
    return und_loss, gen_loss


def train_mot(steps: int, batch_size: int, lr: float, seed: int, log_every: int = 100) -> MoTForCausalLM:
    """AdamW with warm-up and cosine decay; each step half understanding, half generation sequences."""
    torch.manual_seed(seed)
    model = MoTForCausalLM(MoTConfig(vocab_size=tb.VOCAB_SIZE, **MOT_SHAPE)).train()
    data = tb.load_split("train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    order = torch.Generator().manual_seed(seed)
    half = batch_size // 2
    start, und_avg, gen_avg = time.time(), 0.0, 0.0
    for step in range(1, steps + 1):
        pick = torch.randint(0, len(data.labels), (batch_size,), generator=order)
        und_pick, gen_pick = pick[:half], pick[half:]
        und_loss, gen_loss = joint_loss(
            model,
            tb.understanding_inputs(data.images[und_pick]),
            data.labels[und_pick],
            tb.generation_inputs(data.labels[gen_pick], data.images[gen_pick]),
        )
        optimizer.zero_grad()
        (und_loss + gen_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        und_avg, gen_avg = und_avg + und_loss.item(), gen_avg + gen_loss.item()
        if step % log_every == 0 or step == steps:
            count = log_every if step % log_every == 0 else step % log_every
            model.eval()
            accuracy = tb.understanding_accuracy(model)
            model.train()
            print(
                f"step {step:5d}/{steps}  und loss {und_avg / count:.3f}  gen loss {gen_avg / count:.3f}  "
                f"held-out acc {accuracy:.3f}  {time.time() - start:.0f} s",
                flush=True,
            )
            und_avg, gen_avg = 0.0, 0.0
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=tb.WEIGHTS, help="output directory (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--per-label", type=int, default=20, help="generated digits per label for the metrics")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    began = time.time()

    judge = tb.train_judge(seed=args.seed)
    print(f"judge trained in {time.time() - began:.0f} s", flush=True)
    model = train_mot(args.steps, args.batch_size, args.lr, args.seed)
    trained = time.time() - began
    print(f"trained in {trained:.0f} s", flush=True)

    metrics = tb.evaluate(model, judge, per_label=args.per_label, seed=args.seed)
    metrics["train_seconds"] = round(trained, 1)
    print(json.dumps(metrics, indent=2))

    model.save_pretrained(args.out / "mot", safe_serialization=True)
    tb.save_judge(judge, args.out)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
