"""A trained unified testbed: a small BAGEL-style MoT that both classifies and draws scikit-learn's 8x8 digits.

Random weights prove rewrites exact but say nothing about quality. This module holds everything needed to
measure the quality of a (compressed) Mixture-of-Transformers on two real tasks:

- data: `sklearn.datasets.load_digits` (1,797 images, 8x8, gray levels 0..16, shipped with scikit-learn),
  split 80/20 stratified with a fixed seed into `train` and `heldout`;
- a token vocabulary shared by both tasks (`PAD` .. `DRAW`, 10 label tokens, `LEVELS` pixel tokens);
- understanding: `bos, image_start, 64 pixels, image_end, classify` (68 tokens, all understanding tokens,
  `gen_mask` 0) -> the label token predicted at the last position;
- generation: `bos, draw, label, image_start, 64 pixels` (68 tokens, `gen_mask` 1 on the 64 pixel tokens)
  -> the pixels, autoregressively;
- metrics: understanding accuracy on the held-out split, and generation quality scored by a small CNN
  judge trained only on the train split (its accuracy on generated digits for the requested labels, and a
  Frechet distance between its penultimate features of generated and of real held-out digits).

Every metric takes a model or any callable `inputs -> logits`, so a sparsec `Program` scores the same way:

    >>> from sparsec.models import load_model
    >>> loaded = load_model(WEIGHTS / "mot"); model = loaded.model
    >>> understanding_accuracy(model)                                   # held-out split
    >>> program = sparsec.capture(model, loaded.family.example_inputs(model, 2, 16))
    >>> understanding_accuracy(lambda b: program.run(b)["logits"])
    >>> generation_quality(model, load_judge(), per_label=20, seed=0)   # {'judge_accuracy': ..., ...}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = Path(__file__).resolve().parent / "weights"

# vocabulary: special tokens, then the 10 label tokens, then the pixel tokens (gray level quantised to LEVELS)
PAD, BOS, IMAGE_START, IMAGE_END, CLASSIFY, DRAW = range(6)
NUM_LABELS = 10
LABEL0 = 6
LEVELS = 8
PIXEL0 = LABEL0 + NUM_LABELS
VOCAB_SIZE = PIXEL0 + LEVELS
PIXELS = 64
SEQ_LEN = PIXELS + 4  # both tasks: 4 non-pixel tokens + 64 pixel tokens
PROMPT_LEN = 4  # generation prompt: bos, draw, label, image_start
MAX_GRAY = 16  # load_digits' gray levels are 0..16

Logits = Callable[[dict[str, torch.Tensor]], torch.Tensor]
TASKS = ("understanding", "generation")


@dataclass(frozen=True)
class Split:
    """Images as gray levels 0..16 ([N, 64] float) and their labels ([N] long)."""

    images: torch.Tensor
    labels: torch.Tensor


@cache
def _splits(seed: int = 0) -> dict[str, Split]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_x, held_x, train_y, held_y = train_test_split(
        digits.data, digits.target, test_size=0.2, stratify=digits.target, random_state=seed
    )
    return {
        "train": Split(torch.tensor(train_x, dtype=torch.float32), torch.tensor(train_y, dtype=torch.long)),
        "heldout": Split(torch.tensor(held_x, dtype=torch.float32), torch.tensor(held_y, dtype=torch.long)),
    }


def load_split(split: str) -> Split:
    """The deterministic 80/20 stratified split of load_digits: `train` (1,437 images) or `heldout` (360)."""
    splits = _splits()
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(splits)}")
    return splits[split]


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Gray levels 0..16 -> pixel levels 0..LEVELS-1 (long)."""
    return torch.round(images * (LEVELS - 1) / MAX_GRAY).long().clamp(0, LEVELS - 1)


def dequantize(levels: torch.Tensor) -> torch.Tensor:
    """Pixel levels 0..LEVELS-1 -> gray levels in 0..16 (float): what the judge looks at."""
    return levels.float() * MAX_GRAY / (LEVELS - 1)


def understanding_inputs(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """[N, 64] gray levels -> `bos, image_start, pixels, image_end, classify` ([N, 68]), all understanding tokens."""
    n = images.shape[0]
    ids = torch.cat(
        [
            torch.tensor([BOS, IMAGE_START]).expand(n, 2),
            PIXEL0 + quantize(images),
            torch.tensor([IMAGE_END, CLASSIFY]).expand(n, 2),
        ],
        dim=1,
    )
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "gen_mask": torch.zeros_like(ids)}


def generation_inputs(labels: torch.Tensor, images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """`bos, draw, label, image_start` + the images' pixel tokens if given ([N, 4] or [N, 68]).

    `gen_mask` is 1 on the pixel tokens (the image being generated), 0 on the prompt.
    """
    n = labels.shape[0]
    prompt = torch.stack(
        [torch.full((n,), BOS), torch.full((n,), DRAW), LABEL0 + labels.long(), torch.full((n,), IMAGE_START)], dim=1
    )
    pixels = PIXEL0 + quantize(images) if images is not None else prompt[:, :0]
    ids = torch.cat([prompt, pixels], dim=1)
    gen_mask = torch.zeros_like(ids)
    gen_mask[:, PROMPT_LEN:] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "gen_mask": gen_mask}


def task_inputs(task: str, split: str = "heldout", n: int | None = None) -> dict[str, torch.Tensor]:
    """The MoT's inputs for `n` images of `split` (all if None) in the format of `task`: a calibration set.

    Example:
        >>> batch = task_inputs("generation", n=64)   # input_ids, attention_mask, gen_mask: [64, 68]
    """
    data = load_split(split)
    images, labels = data.images[:n], data.labels[:n]
    if task == "understanding":
        return understanding_inputs(images)
    if task == "generation":
        return generation_inputs(labels, images)
    raise ValueError(f"unknown task {task!r}; use one of {TASKS}")


def score_mask(task: str, samples: int) -> torch.Tensor:
    """[samples, SEQ_LEN] bool: the positions whose predictions the task is judged by (understanding: the
    classify position, which predicts the label; generation: the positions predicting the 64 pixels)."""
    mask = torch.zeros(samples, SEQ_LEN, dtype=torch.bool)
    if task == "understanding":
        mask[:, SEQ_LEN - 1] = True
    elif task == "generation":
        mask[:, PROMPT_LEN - 1 : SEQ_LEN - 1] = True
    else:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
    return mask


def save_task_inputs(path: str | Path, task: str, split: str = "heldout", n: int | None = None) -> Path:
    """Write `task_inputs(...)` and its `score_mask` as a .safetensors file, the format of
    `sparsec analyze --task NAME=FILE` (the probe then scores the task only where it is judged)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = {k: v.contiguous() for k, v in task_inputs(task, split, n).items()}
    save_file({**inputs, "score_mask": score_mask(task, len(inputs["input_ids"]))}, str(path))
    return path


def as_logits_fn(model: nn.Module | Logits) -> Logits:
    """A model (its `.logits`) or a callable `inputs -> logits` as a callable, run without gradients."""
    if isinstance(model, nn.Module):
        fn = lambda batch: model(**batch).logits  # noqa: E731
    elif callable(model):
        fn = model
    else:
        raise TypeError(f"expected an nn.Module or a callable inputs -> logits, got {type(model).__name__}")

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            out = fn(batch)
        return out.logits if hasattr(out, "logits") else out

    return run


def _batches(inputs: Mapping[str, torch.Tensor], batch_size: int):
    n = next(iter(inputs.values())).shape[0]
    for start in range(0, n, batch_size):
        yield {k: v[start : start + batch_size] for k, v in inputs.items()}


def predict_labels(model: nn.Module | Logits, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Labels [N] the model reads from [N, 64] images: argmax over the 10 label tokens at the last position."""
    fn = as_logits_fn(model)
    preds = [
        fn(b)[:, -1, LABEL0 : LABEL0 + NUM_LABELS].argmax(-1)
        for b in _batches(understanding_inputs(images), batch_size)
    ]
    return torch.cat(preds)


def understanding_accuracy(model: nn.Module | Logits, split: str = "heldout", batch_size: int = 256) -> float:
    """Fraction of `split`'s digits the model labels correctly."""
    data = load_split(split)
    return (predict_labels(model, data.images, batch_size) == data.labels).float().mean().item()


def generate(model: nn.Module | Logits, labels: torch.Tensor, seed: int = 0, temperature: float = 1.0) -> torch.Tensor:
    """Draw one digit per requested label: [N] labels -> [N, 64] gray levels (dequantised pixel tokens).

    64 autoregressive steps, each a full forward over the prompt and the pixels so far (no KV cache), so a
    captured `Program` runs them unchanged. Sampling is restricted to the pixel tokens. `temperature` 1
    samples the model's distribution (seeded: the same seed gives the same images); 0 is greedy, which
    draws one image per label and so leaves the Frechet distance meaningless.
    """
    fn = as_logits_fn(model)
    generator = torch.Generator().manual_seed(seed)
    inputs = generation_inputs(labels)
    for _ in range(PIXELS):
        logits = fn(inputs)[:, -1, PIXEL0 : PIXEL0 + LEVELS].float()
        if temperature == 0:
            level = logits.argmax(-1, keepdim=True)
        else:
            level = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=generator)
        inputs = {
            "input_ids": torch.cat([inputs["input_ids"], PIXEL0 + level], dim=1),
            "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(level)], dim=1),
            "gen_mask": torch.cat([inputs["gen_mask"], torch.ones_like(level)], dim=1),
        }
    return dequantize(inputs["input_ids"][:, PROMPT_LEN:] - PIXEL0)


class Judge(nn.Module):
    """A small CNN digit classifier on [N, 64] gray levels 0..16; `features` is its penultimate layer."""

    def __init__(self, channels: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.config = {"channels": channels, "hidden": hidden}
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.fc = nn.Linear(2 * channels * 16, hidden)
        self.out = nn.Linear(hidden, NUM_LABELS)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = (images / MAX_GRAY).reshape(-1, 1, 8, 8)
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(images))


def train_judge(seed: int = 0, epochs: int = 30, batch_size: int = 64) -> Judge:
    """Train the judge on the train split only, on quantised images (what generated digits look like)."""
    torch.manual_seed(seed)
    data = load_split("train")
    images = dequantize(quantize(data.images))
    judge = Judge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=3e-3, weight_decay=1e-4)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=order).split(batch_size):
            loss = F.cross_entropy(judge(images[idx]), data.labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return judge.eval()


def save_judge(judge: Judge, directory: str | Path = WEIGHTS) -> Path:
    """Write `judge.safetensors` and `judge.json` (its architecture) to `directory`."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(directory / "judge.safetensors"))
    (directory / "judge.json").write_text(json.dumps(judge.config, indent=2) + "\n")
    return directory / "judge.safetensors"


def load_judge(directory: str | Path = WEIGHTS) -> Judge:
    """The judge saved by `save_judge` (safetensors, no pickle)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    weights, config = directory / "judge.safetensors", directory / "judge.json"
    if not weights.is_file() or not config.is_file():
        raise FileNotFoundError(
            f"no judge in {directory} (judge.safetensors + judge.json); run examples/digits/train.py"
        )
    judge = Judge(**json.loads(config.read_text()))
    judge.load_state_dict(load_file(str(weights)))
    return judge.eval()


def judge_accuracy(judge: Judge, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of [N, 64] images the judge labels as `labels`."""
    with torch.no_grad():
        return (judge(images).argmax(-1) == labels).float().mean().item()


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FID's formula on two feature sets [N, D], [M, D]: |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2)."""
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr((S_a S_b)^1/2) = sum of sqrt(eig(S_a^1/2 S_b S_a^1/2)), a symmetric PSD matrix
    eigval, eigvec = torch.linalg.eigh(cov_a)
    root_a = eigvec @ torch.diag(eigval.clamp(min=0).sqrt()) @ eigvec.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def judge_features(judge: Judge, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return judge.features(images)


def generation_quality(
    model: nn.Module | Logits, judge: Judge, per_label: int = 20, seed: int = 0, temperature: float = 1.0
) -> dict[str, float | list[float]]:
    """Draw `per_label` digits of each label and score them with the judge.

    Returns `judge_accuracy` (fraction judged as the requested label), `per_label_accuracy` (10 values) and
    `frechet_distance` (judge features of the generated digits vs all real held-out digits, quantised).
    """
    labels = torch.arange(NUM_LABELS).repeat_interleave(per_label)
    images = generate(model, labels, seed=seed, temperature=temperature)
    with torch.no_grad():
        correct = judge(images).argmax(-1) == labels
    real = dequantize(quantize(load_split("heldout").images))
    return {
        "judge_accuracy": correct.float().mean().item(),
        "per_label_accuracy": correct.float().view(NUM_LABELS, per_label).mean(1).tolist(),
        "frechet_distance": frechet_distance(judge_features(judge, images), judge_features(judge, real)),
    }


def reference_frechet_distance(judge: Judge, per_label: int = 20) -> float:
    """The Frechet distance of `per_label` real train digits of each label (quantised) to the held-out ones.

    What a perfect generator would score with as many samples: the floor to read `generation_quality`'s
    `frechet_distance` against (the estimate is biased upwards at small sample sizes).
    """
    data = load_split("train")
    pick = torch.cat([torch.nonzero(data.labels == label).squeeze(1)[:per_label] for label in range(NUM_LABELS)])
    real = dequantize(quantize(load_split("heldout").images))
    train = dequantize(quantize(data.images[pick]))
    return frechet_distance(judge_features(judge, train), judge_features(judge, real))


def evaluate(model: nn.Module | Logits, judge: Judge, per_label: int = 20, seed: int = 0) -> dict:
    """All metrics of a model (or `inputs -> logits` callable) on the held-out split."""
    held = load_split("heldout")
    quality = generation_quality(model, judge, per_label=per_label, seed=seed)
    return {
        "understanding_accuracy": understanding_accuracy(model),
        "generation_judge_accuracy": quality["judge_accuracy"],
        "generation_per_label_accuracy": quality["per_label_accuracy"],
        "generation_frechet_distance": quality["frechet_distance"],
        "reference_frechet_distance": reference_frechet_distance(judge, per_label),
        "judge_heldout_accuracy": judge_accuracy(judge, dequantize(quantize(held.images)), held.labels),
    }
