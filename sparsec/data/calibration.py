"""Calibration data and activation statistics.

Calibration inputs come from (in this order of preference):

- a `.safetensors` or `.npz` file of model inputs by name, e.g. `input_ids` [N, S] and `attention_mask`;
- a `.txt` (one sample per line) or `.jsonl` (`{"text": ...}` per line) file, tokenized with the tokenizer
  in the model directory (text-only models);
- otherwise a synthetic set of random inputs, announced as such: fine for checking that rewrites are
  exact, meaningless for choosing what to prune.

Statistics are collected at graph nodes by running the program once over the set (`StatisticsCache`):
passes ask for all the nodes they need in one call, and results are cached until the graph changes.
Only valid tokens (where `attention_mask` is 1) count.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.fx import Node
from tqdm.auto import tqdm

from sparsec.errors import CalibrationError


@dataclass
class CalibrationSet:
    """Model inputs for calibration, `inputs[name]` of shape [N, ...], served in batches.

    Example::

        calib = CalibrationSet({"input_ids": ids, "attention_mask": mask}, source="my.safetensors")
        for batch in calib.batches(): ...
    """

    inputs: dict[str, torch.Tensor]
    source: str
    batch_size: int = 8
    synthetic: bool = False

    def __post_init__(self) -> None:
        sizes = {k: int(v.shape[0]) for k, v in self.inputs.items()}
        if not sizes:
            raise CalibrationError("calibration set has no inputs")
        if len(set(sizes.values())) != 1:
            raise CalibrationError(f"calibration inputs disagree on the number of samples: {sizes}")
        if next(iter(sizes.values())) == 0:
            raise CalibrationError(f"calibration set {self.source} has zero samples")
        if self.batch_size < 1:
            raise CalibrationError(f"calibration batch_size must be >= 1, got {self.batch_size}")

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self), self.batch_size):
            yield {k: v[start : start + self.batch_size] for k, v in self.inputs.items()}

    def head(self, samples: int) -> "CalibrationSet":
        """The first `samples` samples, same source and batch size (what backend parity runs)."""
        return CalibrationSet({k: v[:samples] for k, v in self.inputs.items()}, self.source,
                              batch_size=self.batch_size, synthetic=self.synthetic)

    @property
    def num_batches(self) -> int:
        return -(-len(self) // self.batch_size)

    @staticmethod
    def valid_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """[B, S] bool mask of real tokens (from `attention_mask`), or None when every position counts."""
        mask = batch.get("attention_mask")
        return mask.bool() if mask is not None else None

    def num_tokens(self) -> int:
        mask = self.inputs.get("attention_mask")
        if mask is not None:
            return int(mask.bool().sum())
        ids = self.inputs.get("input_ids")
        return int(ids.numel()) if ids is not None else len(self)

    def describe(self) -> dict:
        return {
            "source": self.source,
            "synthetic": self.synthetic,
            "samples": len(self),
            "tokens": self.num_tokens(),
            "shapes": {k: list(v.shape) for k, v in self.inputs.items()},
            "batch_size": self.batch_size,
        }

    @torch.no_grad()
    def reference_outputs(self, program, progress: bool = False) -> list[dict[str, torch.Tensor]]:
        """The program's outputs on every batch (the reference later quality checks compare against)."""
        return [program.run(b) for b in tqdm(self.batches(), total=self.num_batches, desc="reference outputs",
                                              disable=not progress, leave=False)]


def _read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    with np.load(path, allow_pickle=False) as data:
        return {k: torch.from_numpy(data[k]) for k in data.files}


def _read_texts(path: Path) -> list[str]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    texts = []
    for i, line in enumerate(lines, 1):
        try:
            texts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CalibrationError(f"{path}:{i}: expected a JSON object with a 'text' field") from exc
    return texts


def load_calibration(
    path: str | Path | None,
    *,
    input_names: Sequence[str],
    synthetic: Mapping[str, torch.Tensor] | None = None,
    tokenizer_dir: str | Path | None = None,
    samples: int = 16,
    seq_len: int = 32,
    batch_size: int = 8,
) -> CalibrationSet:
    """Read calibration inputs for a program with inputs `input_names`.

    Args:
        path: a .safetensors/.npz tensor file, a .txt/.jsonl text file, or None for the synthetic set.
        input_names: the program's inputs; a file must provide them (`attention_mask` defaults to ones).
        synthetic: the inputs to use when `path` is None (made by the caller from the model family).
        tokenizer_dir: model directory holding a tokenizer, for text files.
        samples, seq_len: how many text samples to use and the length they are padded/truncated to.
    """
    if path is None:
        if synthetic is None:
            raise CalibrationError("no calibration file given and no synthetic inputs available")
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in synthetic.items())
        return CalibrationSet(dict(synthetic), source=f"synthetic random inputs ({shapes})", batch_size=batch_size, synthetic=True)
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist")
    if path.suffix in (".safetensors", ".npz"):
        try:
            inputs = _read_tensor_file(path)
        except Exception as exc:
            raise CalibrationError(f"cannot read calibration file {path}: {exc}") from exc
    elif path.suffix in (".txt", ".jsonl"):
        inputs = _tokenize(_read_texts(path)[:samples], tokenizer_dir, seq_len, path)
    else:
        raise CalibrationError(f"calibration file {path}: unsupported type {path.suffix!r}; use .safetensors, .npz, .txt or .jsonl")
    if "attention_mask" in input_names and "attention_mask" not in inputs and "input_ids" in inputs:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    missing = [n for n in input_names if n not in inputs]
    if missing:
        raise CalibrationError(f"calibration file {path} lacks model input(s) {missing}; it has {sorted(inputs)}")
    inputs = {n: inputs[n] for n in input_names}
    for name in ("input_ids", "attention_mask"):
        if name in inputs and inputs[name].dtype != torch.long:
            inputs[name] = inputs[name].long()
    return CalibrationSet(inputs, source=str(path), batch_size=batch_size)


def _tokenize(texts: list[str], tokenizer_dir, seq_len: int, path: Path) -> dict[str, torch.Tensor]:
    if not texts:
        raise CalibrationError(f"calibration file {path} has no text")
    if tokenizer_dir is None or not any(Path(tokenizer_dir).glob("tokenizer*")):
        raise CalibrationError(
            f"text calibration file {path} needs the model's tokenizer, and the model directory has none; "
            "save the tokenizer there (tokenizer.save_pretrained) or pass tokenized inputs as .safetensors"
        )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# ----- statistics ---------------------------------------------------------------------------------------
@dataclass
class ChannelStats:
    """Per-channel (last dimension) statistics of one node's values over valid calibration tokens.

    Attributes:
        tokens: how many vectors were seen.
        mean_abs: E[|x_c|] per channel c (the activation importance of neuron c).
        mean_sq: E[x_c^2] per channel.
        max_abs: max |x_c| per channel.
    """

    tokens: int
    mean_abs: torch.Tensor
    mean_sq: torch.Tensor
    max_abs: torch.Tensor


class ChannelAccumulator:
    """Sums behind `ChannelStats`, fed token vectors [T, C] batch by batch (`StatisticsCache`, the probe)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.sum_abs = self.sum_sq = self.max_abs = None

    def add(self, vectors: torch.Tensor) -> None:
        v = vectors.detach().float()
        abs_v = v.abs()
        if self.sum_abs is None:
            self.sum_abs = abs_v.sum(0)
            self.sum_sq = (v * v).sum(0)
            self.max_abs = abs_v.amax(0) if len(v) else torch.zeros(v.shape[1:])
        else:
            self.sum_abs += abs_v.sum(0)
            self.sum_sq += (v * v).sum(0)
            if len(v):
                self.max_abs = torch.maximum(self.max_abs, abs_v.amax(0))
        self.tokens += int(v.shape[0])

    def result(self) -> ChannelStats:
        n = max(self.tokens, 1)
        return ChannelStats(self.tokens, self.sum_abs / n, self.sum_sq / n, self.max_abs)


def cosine_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sum over tokens of cos(a_t, b_t) for token vectors [T, C]: divided by T, the block redundancy score of
    `drop_layers` (`StatisticsCache.cosine`) and the probe (`sparsec analyze`)."""
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).sum())


def token_vectors(value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[..., C] -> [T, C], keeping only valid tokens when the leading dims are [B, S] of the mask."""
    if mask is not None and value.dim() >= 3 and tuple(value.shape[:2]) == tuple(mask.shape):
        return value[mask]
    return value.reshape(-1, value.shape[-1]) if value.dim() else value.reshape(1, 1)


class StatisticsCache:
    """Statistics at graph nodes over a calibration set, computed in one forward pass per request.

    - `get(nodes)`: per-channel `ChannelStats` of each node (e.g. FFN neuron magnitudes);
    - `cosine(pairs)`: mean over valid tokens of cos(a_t, b_t) for node pairs (e.g. a block's input and
      output: how little the block changes the residual stream).

    Results are cached until the program's graph changes; ask for everything you need in one call.

    Example::

        stats = ctx.statistics.get([ffn.down.args[0] for ffn in region_index(program).ffns()])
        sims = ctx.statistics.cosine([(block.input, block.output) for block in blocks])
    """

    def __init__(self, program, calibration: CalibrationSet, progress: bool = False) -> None:
        self.program = program
        self.calibration = calibration
        self.progress = progress
        self._version = -1
        self._stats: dict[str, ChannelStats] = {}
        self._cosines: dict[tuple[str, str], float] = {}
        self.passes_run = 0

    def _refresh(self) -> None:
        if self._version != self.program.version:
            self._stats, self._cosines, self._version = {}, {}, self.program.version

    def get(self, nodes: Sequence[Node]) -> dict[str, ChannelStats]:
        self._refresh()
        wanted = {n for n in nodes if n.name not in self._stats}
        if wanted:
            self._collect(wanted, [])
        return {n.name: self._stats[n.name] for n in nodes if n.name in self._stats}

    def cosine(self, pairs: Sequence[tuple[Node, Node]]) -> dict[tuple[str, str], float]:
        self._refresh()
        wanted = [(a, b) for a, b in pairs if (a.name, b.name) not in self._cosines]
        if wanted:
            self._collect(set(), wanted)
        return {(a.name, b.name): self._cosines[(a.name, b.name)] for a, b in pairs}

    @torch.no_grad()
    def observed(self, nodes: Iterable[Node], desc: str = "calibration statistics"
                 ) -> Iterator[tuple[dict[str, torch.Tensor], dict[Node, torch.Tensor]]]:
        """Each calibration batch with the floating-point values of `nodes` in it, in graph order: the one forward
        loop behind `get`, `cosine` and `samples`, for reductions of one's own (the probe's per-modality block
        cosines and per-sample top neurons). Not cached; one pass in `passes_run`."""
        wanted = set(nodes)
        self.passes_run += 1
        for batch in tqdm(self.calibration.batches(), total=self.calibration.num_batches,
                          desc=desc, disable=not self.progress, leave=False):
            held: dict[Node, torch.Tensor] = {}

            def observe(node: Node, value) -> None:
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    held[node] = value

            self.program.run(batch, observe=observe, nodes=wanted)
            yield batch, held

    def samples(self, nodes: Sequence[Node], max_tokens: int) -> dict[str, torch.Tensor]:
        """The first `max_tokens` valid token vectors [T, C] of each node's value, in calibration order.

        Not cached (they are large): for fitting (an MoE router) and checks that need the values themselves.
        """
        held: dict[str, list[torch.Tensor]] = {n.name: [] for n in nodes}
        count = 0
        for batch, values in self.observed(nodes, "calibration samples"):
            mask = CalibrationSet.valid_mask(batch)
            for node, value in values.items():
                held[node.name].append(token_vectors(value, mask).detach())
            count += int(mask.sum()) if mask is not None else held[nodes[0].name][-1].shape[0]
            if count >= max_tokens:
                break
        return {name: torch.cat(values)[:max_tokens] for name, values in held.items() if values}

    def _collect(self, nodes: set[Node], pairs: list[tuple[Node, Node]]) -> None:
        acc = {n.name: ChannelAccumulator() for n in nodes}
        pair_nodes = {n for pair in pairs for n in pair}
        cos_sum = {(a.name, b.name): 0.0 for a, b in pairs}
        tokens = 0
        for batch, values in self.observed(nodes | pair_nodes):
            mask = CalibrationSet.valid_mask(batch)
            for node, value in values.items():
                if node in nodes:
                    acc[node.name].add(token_vectors(value, mask))
            held = {n: token_vectors(v, mask).float() for n, v in values.items() if n in pair_nodes}
            for a, b in pairs:
                cos_sum[(a.name, b.name)] += cosine_sum(held[a], held[b])
            tokens += next(iter(held.values())).shape[0] if held else 0
        self._stats.update({k: a.result() for k, a in acc.items() if a.sum_abs is not None})
        self._cosines.update({k: v / max(tokens, 1) for k, v in cos_sum.items()})
