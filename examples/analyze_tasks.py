"""Write the task files of the README's `sparsec analyze` example, `und.safetensors` and `gen.safetensors`:

    python examples/analyze_tasks.py --out tasks
    sparsec analyze --model builtin:tiny-mot --task understanding=tasks/und.safetensors \\
                    --task generation=tasks/gen.safetensors --ratios 0.25,0.5 --out out/probe

A task file holds the inputs of the program serving the task, by name, [N, S] each (tiny-mot: `input_ids`,
`attention_mask`, `gen_mask`), and optionally `score_mask` [N, S], the positions where the task is judged. Here the
inputs are the family's random token ids (`sparsec.probe.synthetic_task_inputs`: understanding samples without
generation tokens, generation samples a prompt followed by generation tokens), and the generation file scores the
positions that predict a generation token. The layout is the point: for your model, write your tokenized
understanding prompts and generation sequences the same way; random ids say nothing about what it tolerates.
"""

import argparse
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from sparsec.families import entry_points
from sparsec.models import load_model
from sparsec.probe import synthetic_task_inputs, task_entry

FILES = {"understanding": "und.safetensors", "generation": "gen.safetensors"}


def task_tensors(model: torch.nn.Module, task: str, samples: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """The inputs of the entry point serving `task`, plus `score_mask` where a modality mask marks generation."""
    entries = dict(entry_points(model))
    entry = entries[task_entry(entries, task, None)]
    tensors = synthetic_task_inputs(entry, task, samples, seq, seed)
    mask = entry.family.modality_mask
    if task == "generation" and mask in tensors:
        score = torch.zeros_like(tensors[mask], dtype=torch.bool)
        score[:, :-1] = tensors[mask][:, 1:].bool()  # position t predicts token t + 1
        tensors["score_mask"] = score
    return {name: t.contiguous() for name, t in tensors.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tasks", help="directory for und.safetensors, gen.safetensors")
    parser.add_argument("--model", default="builtin:tiny-mot", help="the model whose inputs to write")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args()
    model = load_model(args.model).model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed, (task, name) in enumerate(FILES.items(), start=1):
        fd, staged = tempfile.mkstemp(prefix=f".{name}.", dir=out)  # written whole, then moved in
        os.close(fd)
        try:
            save_file(task_tensors(model, task, args.samples, args.seq, seed), staged)
            os.replace(staged, out / name)
        finally:
            Path(staged).unlink(missing_ok=True)
        print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
