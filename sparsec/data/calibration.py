"""Calibration data and activation statistics.

Calibration inputs come from (in this order of preference):

- a `.safetensors` or `.npz` file of model inputs by name, e.g. `input_ids` [N, S] and `attention_mask`;
- a `.txt` (one sample per line) or `.jsonl` (`{"text": ...}` per line) file, tokenized with the tokenizer
  in the model directory (text-only models);
- otherwise a synthetic set of random inputs, announced as such: fine for checking that rewrites are
  exact, meaningless for choosing what to prune.

A compile splits the set by whole samples (`CalibrationSet.split`, the recipe's `calibration.holdout`): the
passes and their statistics get the decision samples, the quality gates measure on the held-out ones, so a
compression is judged on data it was not chosen for.

Statistics are collected at graph nodes by running the program once over the set (`StatisticsCache`):
passes ask for all the nodes they need in one call, and results are cached until the graph changes.
Only valid tokens (where `attention_mask` is 1) count.

Every run of a program over the set (statistics, reference outputs, quality checks, the parity reference) goes
through `CalibrationSet.run`: batch by batch through the whole model, or, when the set has `cuts`,
layer-sequentially (`Program.run_segmented`: each block for all batches before the next). Both give the same
values bit for bit. The data layer does not know what a block is: `cuts` is a function of the program chosen by
the caller (the compiler passes `sparsec.analysis.regions.block_boundaries` for `calibration.sequential`),
called again for every graph version, since a rewrite changes the nodes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.fx import Node

from sparsec.data.logits import unobserved_head
from sparsec.errors import CalibrationError
from sparsec.progress import progress_bar

# What `AutoTokenizer.from_pretrained` reads from a model directory (fast, slow and SentencePiece tokenizers, and
# config.json, whose model_type can decide the tokenizer class). `sparsec compile` copies the tokenizer into
# OUT/tokenizer/ (`TOKENIZER_DIR`; config.json is not copied), so `sparsec run --calib FILE.txt` tokenizes as the
# compile did.
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)


def tokenizer_files(directory: str | Path | None) -> list[str]:
    """The `TOKENIZER_FILES` present in `directory`; empty when it holds no tokenizer (config.json alone is none)."""
    if directory is None:
        return []
    present = [name for name in TOKENIZER_FILES if (Path(directory) / name).is_file()]
    return [] if present in ([], ["config.json"]) else present


@dataclass
class CalibrationSet:
    """Model inputs for calibration, `inputs[name]` of shape [N, ...], served in batches.

    `cuts`: None to run a program over the set batch by batch through the whole model (the fast path), or a
    function giving the nodes to cut the program at for layer-sequential runs (see `run`).

    `static_batch`: the program runs only batches of exactly `batch_size` samples (captured with `capture.dynamic:
    false`), so the set keeps whole batches: the samples past the last whole one are left out (its length says how
    many it kept; `split` and `head` keep whole batches too), and a set smaller than one batch is refused.

    Example::

        calib = CalibrationSet({"input_ids": ids, "attention_mask": mask}, source="my.safetensors")
        for batch in calib.batches(): ...
    """

    inputs: dict[str, torch.Tensor]
    source: str
    batch_size: int = 8
    synthetic: bool = False
    cuts: Callable[[Any], Sequence[Node]] | None = None
    static_batch: bool = False

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
        if self.static_batch:
            kept = len(self) // self.batch_size * self.batch_size
            if not kept:
                raise CalibrationError(
                    f"calibration set {self.source} has {len(self)} sample(s), fewer than one batch of "
                    f"{self.batch_size}, the only batch size of a program captured with `capture: {{dynamic: false}}`: "
                    "use more calibration samples (calibration.samples, or a larger file; the held-out side needs a "
                    "whole batch too, calibration.holdout), or keep the capture dynamic"
                )
            self.inputs = {k: v[:kept] for k, v in self.inputs.items()}

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self), self.batch_size):
            yield {k: v[start : start + self.batch_size] for k, v in self.inputs.items()}

    def head(self, samples: int) -> CalibrationSet:
        """The first `samples` samples, same source and batch size (what backend parity runs)."""
        return self._with_inputs({k: v[:samples] for k, v in self.inputs.items()})

    def _with_inputs(self, inputs: dict[str, torch.Tensor]) -> CalibrationSet:
        """A set of `inputs` (some of this set's samples) with this set's source, batch size and cuts."""
        return CalibrationSet(
            inputs,
            self.source,
            batch_size=self.batch_size,
            synthetic=self.synthetic,
            cuts=self.cuts,
            static_batch=self.static_batch,
        )

    def split(self, holdout: float, seed: int) -> CalibrationSplit:
        """Hold out a fraction of the samples for the quality gates (`CalibrationSplit`); the rest decide.

        By whole samples: `holdout` x samples, rounded to the nearest, at least one, chosen by a permutation seeded
        with `seed` (the same set and seed hold out the same samples), each side kept in the set's order.
        `holdout` 0 holds out nothing. `CalibrationError` naming `calibration.holdout` when a side would be empty
        (a set of one sample, or a fraction that leaves nothing to decide on).

        Example:
            >>> calib = CalibrationSet({"input_ids": torch.arange(10).view(10, 1)}, source="ids")
            >>> split = calib.split(0.2, seed=0)
            >>> len(split.decision), len(split.holdout)
            (8, 2)
        """
        if not 0.0 <= holdout < 1.0:
            raise CalibrationError(f"calibration.holdout: must be in [0, 1), got {holdout}")
        samples = len(self)
        if holdout == 0.0:
            return CalibrationSplit(self, None, 0.0)
        held = held_out_samples(samples, holdout)
        if held >= samples:
            raise CalibrationError(
                f"calibration.holdout: {holdout:g} of {self.source}'s {samples} sample(s) leaves "
                f"{samples - held} for the passes to decide on; the split needs at least one sample on each side: "
                "use more calibration samples (calibration.samples, or a larger file), or `calibration.holdout: 0` "
                "to gate on the samples the passes decide on"
            )
        order = torch.randperm(samples, generator=torch.Generator().manual_seed(seed))
        kept = order[held:].sort().values
        held_out = order[:held].sort().values
        return CalibrationSplit(
            self._with_inputs({k: v[kept] for k, v in self.inputs.items()}),
            self._with_inputs({k: v[held_out] for k, v in self.inputs.items()}),
            holdout,
        )

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
            "sequential": self.cuts is not None,
        }

    @torch.no_grad()
    def run(
        self,
        program,
        observe: Callable[[int, Node, Any], None] | None = None,
        nodes: set[Node] | None = None,
        progress: bool = False,
        desc: str = "calibration run",
        outputs_from: Mapping[Node, Node] | None = None,
    ) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """Run `program` over every batch and yield `(batch, outputs)` in batch order; the one loop behind the
        statistics, reference outputs, quality checks and parity reference.

        Without `cuts`, batch by batch through the whole model (`Program.run`). With `cuts`, layer-sequentially
        (`Program.run_segmented` at `cuts(program)`): memory holds the values live at one cut for all batches
        instead of any batch's values across the whole graph, and the outputs are the same bit for bit.
        `observe(batch_index, node, value)` sees the values of `nodes` (all if None) as they are computed,
        batch by batch in the first case, segment by segment (batches 0..N-1 each) in the second; `progress`
        then counts segments, since every segment runs before the first batch's outputs. `outputs_from` returns
        other nodes' values in place of outputs (`Program.run`).
        """
        batches = list(self.batches())
        if self.cuts is None:
            bar = progress_bar(total=len(batches), desc=desc, enabled=progress)
            try:
                for i, batch in enumerate(batches):
                    report = None if observe is None else (lambda node, value, i=i: observe(i, node, value))
                    outputs = program.run(batch, observe=report, nodes=nodes, outputs_from=outputs_from)
                    yield batch, outputs
                    del outputs  # a batch's outputs are not held while the next one is computed
                    bar.update(1)
            finally:
                bar.close()
            return
        bar = progress_bar(desc=f"{desc}, segments", enabled=progress)  # all segments run before the first output

        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        cuts = self.cuts(program)
        try:
            index = 0
            segments = program.run_segmented(
                batches, cuts, observe, nodes, on_segment=advance, outputs_from=outputs_from
            )
            for outputs in segments:
                yield batches[index], outputs
                del outputs
                index += 1
        finally:
            bar.close()


def held_out_samples(samples: int, holdout: float) -> int:
    """How many of `samples` `CalibrationSet.split` holds out for `holdout`: rounded half up, at least one; none
    for 0."""
    return max(1, int(holdout * samples + 0.5)) if holdout else 0


@dataclass(frozen=True)
class CalibrationSplit:
    """A calibration set split by whole samples (`CalibrationSet.split`).

    `decision`: what the passes see (`PassContext.calibration`, their statistics); `holdout`: the samples the quality
    gates measure on (`sparsec.pipeline.run_passes(holdout=...)`), which no pass ever sees, or None when `fraction`
    is 0 and the gates measure on `decision`. Gates on held-out samples judge a compression on data it was not
    chosen for.
    """

    decision: CalibrationSet
    holdout: CalibrationSet | None
    fraction: float

    def describe(self) -> dict:
        """What the report records: the fraction held out and each side's samples and valid tokens.

        Example:
            >>> calib = CalibrationSet({"input_ids": torch.zeros(5, 4, dtype=torch.long)}, source="ids")
            >>> calib.split(0.2, seed=0).describe()
            {'holdout': 0.2, 'decision': {'samples': 4, 'tokens': 16}, 'held_out': {'samples': 1, 'tokens': 4}}
        """
        sides = {"decision": self.decision, "held_out": self.holdout}
        return {
            "holdout": self.fraction,
            **{k: None if s is None else {"samples": len(s), "tokens": s.num_tokens()} for k, s in sides.items()},
        }


def describe_split(split: Mapping[str, Any]) -> str:
    """A `CalibrationSplit.describe()` in words, for the compile's log and summary.

    Example:
        >>> describe_split({"holdout": 0.2, "decision": {"samples": 13, "tokens": 312},
        ...                 "held_out": {"samples": 3, "tokens": 72}})
        'passes decide on 13 samples (312 tokens); quality measured on 3 held-out samples (72 tokens)'
    """
    decision, held = split["decision"], split["held_out"]
    passes = f"passes decide on {decision['samples']} samples ({decision['tokens']} tokens)"
    if held is None:
        return f"{passes}; quality measured on the same samples (calibration.holdout: 0)"
    return f"{passes}; quality measured on {held['samples']} held-out samples ({held['tokens']} tokens)"


TENSOR_SUFFIXES = (".safetensors", ".npz")
TEXT_SUFFIXES = (".txt", ".jsonl")


def _read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with np.load(path, allow_pickle=False) as data:
            return {k: torch.from_numpy(data[k]) for k in data.files}
    except Exception as exc:
        raise CalibrationError(
            f"cannot read calibration file {path}: {exc}; write it with safetensors.torch.save_file or numpy.savez"
        ) from exc


def _read_texts(path: Path) -> list[str]:
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"cannot read calibration file {path} as UTF-8 text: {exc}") from exc
    if path.suffix != ".jsonl":
        return lines
    texts = []
    for i, line in enumerate(lines, 1):
        try:
            texts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CalibrationError(f"{path}:{i}: expected a JSON object with a 'text' field") from exc
    return texts


def _calibration_path(path: str | Path) -> Path:
    """`path` as a calibration file that exists and has a supported suffix; `CalibrationError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist (or is not a file); check the path")
    if path.suffix not in TENSOR_SUFFIXES + TEXT_SUFFIXES:
        raise CalibrationError(
            f"calibration file {path}: unsupported type {path.suffix!r}; use .safetensors, .npz, .txt or .jsonl"
        )
    return path


def _tokenizer_or_error(path: Path, tokenizer_dir: str | Path | None, missing: str | None = None) -> Path:
    """The directory holding the model's tokenizer, for the text file `path`; `CalibrationError` without one, saying
    `missing` (where one was looked for and why there is none) or, by default, that the model directory has none."""
    if not tokenizer_files(tokenizer_dir):
        missing = missing or (
            f"the model directory {tokenizer_dir} has none; save the tokenizer there (tokenizer.save_pretrained)"
            if tokenizer_dir is not None
            else "a built-in model has none"
        )
        raise CalibrationError(
            f"text calibration file {path} needs the model's tokenizer, and {missing}; "
            "or pass tokenized inputs as .safetensors"
        )
    return Path(tokenizer_dir)


def check_calibration_file(
    path: str | Path, *, tokenizer_dir: str | Path | None = None, vocab: Mapping[str, int] | None = None
) -> None:
    """What can be checked of a calibration file before a model is loaded or captured (seconds, not after a long
    load): it exists and has a supported type; a text file has a tokenizer in `tokenizer_dir`; a tensor file
    reads, and its token ids and mask pass `check_inputs` with `vocab` (e.g. `{"input_ids": config.vocab_size}`).
    `load_calibration` checks the rest against the captured program. `CalibrationError` otherwise."""
    path = _calibration_path(path)
    if path.suffix in TEXT_SUFFIXES:
        _tokenizer_or_error(path, tokenizer_dir)
    else:
        check_inputs(_read_tensor_file(path), str(path), vocab or {})


def check_inputs(inputs: Mapping[str, torch.Tensor], source: str, vocab: Mapping[str, int]) -> None:
    """Refuse calibration inputs that would crash a run or silently mislead it, naming `source`, the sample, the
    offending value and the fix (`CalibrationError`):

    - token ids (`input_ids` and every input in `vocab`) that are not integers; for the inputs in `vocab` (name ->
      rows of the embedding table they index), ids outside [0, rows);
    - an `attention_mask` that is not [samples, seq] of the shape of `input_ids`, holds values other than 0 and 1,
      or has a sample without any valid token (its statistics would be empty, its cosine 0).
    """
    for name in dict.fromkeys(["input_ids", *vocab]):
        ids = inputs.get(name)
        if ids is None:
            continue
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise CalibrationError(
                f"calibration file {source}: {name} has dtype {str(ids.dtype).removeprefix('torch.')}; token ids "
                "must be integers: save them as int64 (ids.long())"
            )
        rows = vocab.get(name)
        if rows is not None and ids.numel() and ids.dim():
            bad = (ids < 0) | (ids >= rows)
            if bad.any():
                where = bad.nonzero()[0].tolist()
                raise CalibrationError(
                    f"calibration file {source}: sample {where[0]} of {name} holds token id "
                    f"{int(ids[tuple(where)])} at position {where[1:]}, outside the model's vocabulary [0, {rows}) "
                    f"({int(bad.sum())} such id(s) in the file); tokenize with this model's tokenizer"
                )
    mask, ids = inputs.get("attention_mask"), inputs.get("input_ids")
    if mask is None:
        return
    if mask.dim() != 2 or (ids is not None and mask.shape != ids.shape):
        raise CalibrationError(
            f"calibration file {source}: attention_mask has shape {list(mask.shape)}"
            + (f" and input_ids {list(ids.shape)}" if ids is not None else "")
            + "; the mask must be [samples, seq], one 0/1 value per token"
        )
    if ((mask != 0) & (mask != 1)).any():
        sample, position = ((mask != 0) & (mask != 1)).nonzero()[0].tolist()
        raise CalibrationError(
            f"calibration file {source}: sample {sample} of attention_mask holds {mask[sample, position].item()} "
            f"at position {position}; a mask is 1 for a real token and 0 for padding"
        )
    empty = (~mask.bool().any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise CalibrationError(
            f"calibration file {source}: sample(s) {empty[:10]} of attention_mask have no valid token (all 0"
            f"{f', {len(empty)} samples' if len(empty) > 10 else ''}); remove those samples or fix their masks"
        )


def embedding_sizes(program) -> dict[str, int]:
    """Program input name -> rows of the embedding table it indexes (an `aten.embedding` reads it as token ids):
    the bounds `check_inputs` holds token ids to."""
    users = set(program.exported.graph_signature.user_inputs)
    sizes = {}
    for node in program.graph.find_nodes(op="placeholder"):
        if node.name not in users:
            continue
        for user in node.users:
            if user.target is torch.ops.aten.embedding.default and user.args[1] is node:
                sizes[node.name] = int(user.args[0].meta["val"].shape[0])
    return sizes


def load_calibration(
    path: str | Path | None,
    *,
    input_names: Sequence[str],
    synthetic: Mapping[str, torch.Tensor] | None = None,
    tokenizer_dir: str | Path | None = None,
    tokenizer_missing: str | None = None,
    samples: int = 16,
    seq_len: int = 32,
    batch_size: int = 8,
    vocab: Mapping[str, int] | None = None,
    static_shapes: Mapping[str, Sequence[int]] | None = None,
) -> CalibrationSet:
    """Read calibration inputs for a program with inputs `input_names`, checked by `check_inputs`.

    Args:
        path: a .safetensors/.npz tensor file, a .txt/.jsonl text file, or None for the synthetic set.
        input_names: the program's inputs; a file must provide them (`attention_mask` defaults to ones).
        synthetic: the inputs to use when `path` is None (made by the caller from the model family).
        tokenizer_dir: model directory holding a tokenizer, for text files.
        tokenizer_missing: what the error for a text file says when `tokenizer_dir` is None or holds no tokenizer
            (where one was looked for and how to get one there, e.g. for a built-in model or an artifact).
        samples, seq_len: how many text samples to use and the length they are padded/truncated to.
        vocab: input name -> the embedding table's rows its token ids must stay below (`embedding_sizes`).
        static_shapes: input name -> the one shape a program captured with `capture: {dynamic: false}` takes; the
            samples must match it past the batch axis, and the set keeps whole batches (`static_batch`).
    """
    if path is None:
        if synthetic is None:
            raise CalibrationError("no calibration file given and no synthetic inputs available")
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in synthetic.items())
        return _fitted(
            CalibrationSet(
                dict(synthetic),
                source=f"synthetic random inputs ({shapes})",
                batch_size=batch_size,
                synthetic=True,
                static_batch=static_shapes is not None,
            ),
            static_shapes,
        )
    path = _calibration_path(path)
    if path.suffix in TENSOR_SUFFIXES:
        inputs = _read_tensor_file(path)
    else:
        tokenizer = _tokenizer_or_error(path, tokenizer_dir, tokenizer_missing)
        inputs = _tokenize(_read_texts(path)[:samples], tokenizer, seq_len, path)
    check_inputs(inputs, str(path), vocab or {})
    if "attention_mask" in input_names and "attention_mask" not in inputs and "input_ids" in inputs:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    missing = [n for n in input_names if n not in inputs]
    if missing:
        raise CalibrationError(f"calibration file {path} lacks model input(s) {missing}; it has {sorted(inputs)}")
    inputs = {n: inputs[n] for n in input_names}
    for name in ("input_ids", "attention_mask"):
        if name in inputs and inputs[name].dtype != torch.long:
            inputs[name] = inputs[name].long()
    return _fitted(
        CalibrationSet(inputs, source=str(path), batch_size=batch_size, static_batch=static_shapes is not None),
        static_shapes,
    )


def _fitted(calibration: CalibrationSet, static_shapes: Mapping[str, Sequence[int]] | None) -> CalibrationSet:
    """`calibration`, checked against the one shape of a fixed-shape program (`load_calibration`'s
    `static_shapes`), past the batch axis."""
    for name, shape in (static_shapes or {}).items():
        found = list(calibration.inputs[name].shape)
        if found[1:] != list(shape)[1:]:
            raise CalibrationError(
                f"calibration {calibration.source}: input {name!r} has samples of shape {found[1:]}, but the program "
                f"was captured with `capture: {{dynamic: false}}` and takes only {list(shape)}: give samples of shape "
                f"{list(shape)[1:]} (for text: calibration.seq_len follows capture.seq), or keep the capture dynamic"
            )
    return calibration


def _tokenize(texts: list[str], tokenizer_dir: Path, seq_len: int, path: Path) -> dict[str, torch.Tensor]:
    if not texts:
        raise CalibrationError(f"calibration file {path} has no text")
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
    def observed(
        self, nodes: Iterable[Node], desc: str = "calibration statistics"
    ) -> Iterator[tuple[dict[str, torch.Tensor], dict[Node, torch.Tensor]]]:
        """Each calibration batch with the floating-point values of `nodes` in it, in graph order, for reductions
        of one's own (the probe's per-modality block cosines and per-sample top neurons). Not cached; one pass in
        `passes_run`. Layer-sequential (`CalibrationSet.cuts`), a batch's values are held until its last segment
        ran, so every batch's are held at once: `get`, `cosine` and `samples` reduce as values come instead."""
        held: dict[int, dict[Node, torch.Tensor]] = {}

        def observe(index: int, node: Node, value) -> None:
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                held.setdefault(index, {})[node] = value

        for index, (batch, _) in enumerate(self._run(observe, set(nodes), desc)):
            yield batch, held.pop(index, {})

    def _run(
        self,
        observe: Callable[[int, Node, Any], None],
        nodes: set[Node],
        desc: str,
        calibration: CalibrationSet | None = None,
    ) -> Iterator[tuple[dict[str, torch.Tensor], dict]]:
        """One observed run; the logits are not computed when they are a plain projection nobody observes (their
        outputs are not read here, and at a large vocabulary the projection is much of the work)."""
        self.passes_run += 1
        head = unobserved_head(self.program, nodes) if nodes is not None else None  # None: every node observed
        outputs_from = None if head is None else head.outputs_from
        return (calibration or self.calibration).run(
            self.program, observe=observe, nodes=nodes, progress=self.progress, desc=desc, outputs_from=outputs_from
        )

    def samples(self, nodes: Sequence[Node], max_tokens: int) -> dict[str, torch.Tensor]:
        """The first `max_tokens` valid token vectors [T, C] of each node's value, in calibration order.

        Not cached (they are large): for fitting (an MoE router) and checks that need the values themselves.
        """
        needed = total = 0  # the batches up to the one that completes max_tokens valid tokens
        for batch in self.calibration.batches():
            mask = CalibrationSet.valid_mask(batch)
            needed, total = needed + 1, total + (int(mask.sum()) if mask is not None else 0)
            if mask is not None and total >= max_tokens:
                break
        subset = self.calibration.head(needed * self.calibration.batch_size)
        held: dict[Node, list[torch.Tensor]] = {n: [] for n in nodes}
        rows = dict.fromkeys(nodes, 0)
        masks = [CalibrationSet.valid_mask(b) for b in subset.batches()]

        def observe(index: int, node: Node, value) -> None:
            if isinstance(value, torch.Tensor) and value.is_floating_point() and rows[node] < max_tokens:
                held[node].append(token_vectors(value, masks[index]).detach())
                rows[node] += held[node][-1].shape[0]

        for _ in self._run(observe, set(nodes), "calibration samples", subset):
            pass
        return {n.name: torch.cat(values)[:max_tokens] for n, values in held.items() if values}

    def _collect(self, nodes: set[Node], pairs: list[tuple[Node, Node]]) -> None:
        """Channel statistics of `nodes` and the cosine sums of `pairs`, reduced as values are computed.

        A pair's first value of a batch waits (as valid-token vectors) for the second; the sums add batch after
        batch in the same order in both kinds of run, so whole-model and layer-sequential results are equal."""
        acc = {n: ChannelAccumulator() for n in nodes}
        pair_nodes = {n for pair in pairs for n in pair}
        partners: dict[Node, list[tuple[Node, Node]]] = {}
        for pair in dict.fromkeys(pairs):
            for n in dict.fromkeys(pair):
                partners.setdefault(n, []).append(pair)
        cos_sum = {(a.name, b.name): 0.0 for a, b in pairs}
        tokens = [0]
        masks = [CalibrationSet.valid_mask(b) for b in self.calibration.batches()]
        waiting: dict[int, dict[Node, torch.Tensor]] = {}
        done: dict[int, set[tuple[Node, Node]]] = {}

        def observe(index: int, node: Node, value) -> None:
            if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
                return
            if node in acc:
                acc[node].add(token_vectors(value, masks[index]))
            if node not in pair_nodes:
                return
            held, finished = waiting.setdefault(index, {}), done.setdefault(index, set())
            if not held and not finished:  # the first pair value of this batch counts its tokens
                tokens[0] += token_vectors(value, masks[index]).shape[0]
            held[node] = token_vectors(value, masks[index])
            for a, b in partners[node]:
                if (a, b) not in finished and a in held and b in held:
                    cos_sum[(a.name, b.name)] += cosine_sum(held[a].float(), held[b].float())
                    finished.add((a, b))
            for n in [n for n in held if all(p in finished for p in partners[n])]:
                del held[n]

        for _ in self._run(observe, nodes | pair_nodes, "calibration statistics"):
            pass
        self._stats.update({n.name: a.result() for n, a in acc.items() if a.sum_abs is not None})
        self._cosines.update({k: v / max(tokens[0], 1) for k, v in cos_sum.items()})
