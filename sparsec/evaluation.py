"""`sparsec eval`: what a model is worth in the terms users report: perplexity on a text, agreement with a baseline.

A model here is a `CausalLM`: a compiled artifact run by its target (`sparsec.runner.load_artifact`: ONNX Runtime,
AOTInductor, `pytorch` for program.pt2), or the uncompressed Hugging Face model (`--model`), both seen the same
way: token ids (and an attention mask, when the program takes one) in, `logits` out.

The protocol (`TextProtocol`) is fixed by its options and recorded with every result, so two runs of it agree
exactly and two models are compared on the same predicted tokens:

- the text (its sha256) and the tokenizer: the artifact's `OUT/tokenizer` (the model directory's, copied by
  compile), the model directory's, or `--tokenizer DIR`; special tokens as the tokenizer adds them (BOS or not is
  recorded as `adds_bos`);
- `lines` (default): one sample per non-empty line, tokenized alone and truncated to `seq_len` tokens;
- `windows`: the file's whole text tokenized once (no special tokens) and cut into non-overlapping windows of
  `seq_len` tokens, each starting with BOS when the tokenizer adds one (the last window may be shorter);
- samples are batched in file order and right-padded (the mask excludes the padding, and right padding leaves a
  causal model's logits at real tokens unchanged); the loss is `sparsec.data.language_model.next_token_loss`:
  every real token but a sample's first is predicted from those before it, in the same sample only.
  Perplexity is exp(total nats / predicted tokens).

Example::

    model = load_causal_lm(artifact="out/", target="onnxruntime")
    samples = TextSamples.read("held_out.txt", tokenizer_dir="out/tokenizer", protocol="lines", seq_len=512)
    perplexity(model, samples, batch_size=8).perplexity
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from sparsec.data.calibration import TOKENIZER_DIR, tokenizer_files
from sparsec.data.language_model import NextTokenLoss, next_token_loss
from sparsec.data.quality import compare_outputs
from sparsec.errors import SparsecError
from sparsec.progress import progress_bar
from sparsec.runner import artifact_report, load_artifact

Protocol = Literal["lines", "windows"]
PROTOCOLS: tuple[str, ...] = ("lines", "windows")
LOGITS = "logits"
TOKEN_INPUTS = ("input_ids", "attention_mask")


@dataclass(frozen=True)
class TextProtocol:
    """How a text was turned into scored samples (module docstring): enough to reproduce the number."""

    text: str
    text_sha256: str
    tokenizer: str
    tokenizer_class: str
    adds_bos: bool
    protocol: Protocol
    seq_len: int
    samples: int
    predicted_tokens: int
    padding: str = "right"

    def describe(self) -> str:
        split = (
            "one sample per non-empty line, truncated to"
            if self.protocol == "lines"
            else "the whole text in non-overlapping windows of"
        )
        return (
            f"{self.protocol}: {split} {self.seq_len} tokens; {self.samples} samples, {self.predicted_tokens} "
            f"predicted tokens; tokenizer {self.tokenizer} ({self.tokenizer_class}, "
            f"{'adds BOS' if self.adds_bos else 'no BOS'}); text {self.text} sha256 {self.text_sha256[:16]}..."
        )


def find_tokenizer(directory: str | Path | None, given: str | Path | None, what: str) -> Path:
    """The tokenizer directory: `given` (--tokenizer), else `directory` itself or its `tokenizer/` (an artifact's
    copy; for an entry point's `OUT/NAME`, `OUT/tokenizer`). `SparsecError` naming where it looked and the fix."""
    if given is not None:
        if not tokenizer_files(given):
            raise SparsecError(f"--tokenizer {given} holds no tokenizer (tokenizer.json, vocab files, ...)")
        return Path(given)
    candidates = []
    if directory is not None:
        directory = Path(directory)
        candidates = [directory, directory / TOKENIZER_DIR, directory.parent / TOKENIZER_DIR]
    for candidate in candidates:
        if tokenizer_files(candidate):
            return candidate
    raise SparsecError(
        f"{what} has no tokenizer (looked in {', '.join(map(str, candidates)) or 'nothing: a built-in model'}); "
        "give one with --tokenizer DIR (a directory saved with tokenizer.save_pretrained)"
    )


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS before a text by itself (`add_special_tokens=True`)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def read_text(path: str | Path) -> tuple[str, str]:
    """(the file's text, its sha256); `SparsecError` when it is missing, not UTF-8, or holds no text."""
    path = Path(path)
    if not path.is_file():
        raise SparsecError(f"--text {path} does not exist (or is not a file); give a UTF-8 text file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SparsecError(f"--text {path} is not UTF-8 text: {exc}") from exc
    if not text.strip():
        raise SparsecError(f"--text {path} holds no text (empty or whitespace only); nothing to score")
    return text, hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class TextSamples:
    """Token id lists to score and the protocol that made them."""

    ids: list[list[int]]
    pad_id: int
    protocol: TextProtocol

    @classmethod
    def read(cls, path: str | Path, *, tokenizer_dir: Path, protocol: Protocol, seq_len: int) -> TextSamples:
        """Tokenize the text file `path` by `protocol` (module docstring). `SparsecError` for a bad option."""
        if protocol not in PROTOCOLS:
            raise SparsecError(f"--protocol {protocol!r}: choose one of {list(PROTOCOLS)}")
        if seq_len < 2:
            raise SparsecError(f"--seq-len {seq_len}: a sample needs at least 2 tokens to predict one")
        text, sha256 = read_text(path)
        tokenizer = load_tokenizer(tokenizer_dir)
        bos = adds_bos(tokenizer)
        if protocol == "lines":
            lines = [line for line in text.splitlines() if line.strip()]
            ids = [tokenizer(line, truncation=True, max_length=seq_len)["input_ids"] for line in lines]
        else:
            flat = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            prefix = [tokenizer.bos_token_id] if bos else []
            step = seq_len - len(prefix)
            ids = [prefix + flat[start : start + step] for start in range(0, len(flat), step)]
        ids = [sample for sample in ids if sample]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        record = TextProtocol(
            text=str(path),
            text_sha256=sha256,
            tokenizer=str(tokenizer_dir),
            tokenizer_class=type(tokenizer).__name__,
            adds_bos=bos,
            protocol=protocol,
            seq_len=seq_len,
            samples=len(ids),
            predicted_tokens=sum(max(len(sample) - 1, 0) for sample in ids),
        )
        if not record.predicted_tokens:
            raise SparsecError(f"--text {path}: no sample has 2 tokens or more under {protocol}; nothing to predict")
        return cls(ids, 0 if pad is None else pad, record)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids, attention_mask) of `batch_size` samples at a time, in order, right-padded."""
        for start in range(0, len(self.ids), batch_size):
            yield pad_right(self.ids[start : start + batch_size], self.pad_id)


def pad_right(samples: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [len(samples), longest]: each sample left-aligned, `pad_id` after it."""
    width = max(len(sample) for sample in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, : len(sample)] = torch.tensor(sample, dtype=torch.long)
        mask[row, : len(sample)] = 1
    return ids, mask


@dataclass
class CausalLM:
    """A model as eval runs it: `run` takes named inputs (`input_names`, a subset of input_ids and attention_mask)
    and returns named outputs holding `logits` [batch, seq, vocab]. `source` says what it is."""

    run: Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]
    input_names: tuple[str, ...]
    source: str

    @property
    def takes_mask(self) -> bool:
        return "attention_mask" in self.input_names

    def outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Mapping[str, torch.Tensor]:
        """The outputs on one batch. A program without a mask input gets one sample at a time, unpadded."""
        if not self.takes_mask and input_ids.shape[0] != 1:
            raise ValueError("a model without an attention_mask input runs one sample at a time")
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        return self.run({name: inputs[name] for name in self.input_names})

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return _logits_of(self.outputs(input_ids, attention_mask))


def artifact_directory(artifact: str | Path, entry: str | None) -> Path:
    """The program directory of a compile output: `artifact` itself, or `artifact/ENTRY` for a multi-program
    output (report.json with `entry_points`), which must then be chosen. `SparsecError` listing the programs."""
    artifact = Path(artifact)
    if not artifact.is_dir():
        raise SparsecError(f"--artifact {artifact} is not a directory (a `sparsec compile --out` directory)")
    programs = list((artifact_report(artifact) or {}).get("entry_points", {}))
    if entry is not None:
        if entry not in programs:
            raise SparsecError(f"--entry {entry!r}: {artifact} holds the programs {programs or '(one, unnamed)'}")
        return artifact / entry
    if programs:
        raise SparsecError(
            f"{artifact} holds one program per entry point ({', '.join(programs)}), each in {artifact}/NAME; choose "
            f"one with --entry NAME (e.g. --entry {programs[0]})"
        )
    return artifact


def artifact_input_names(directory: Path, target: str) -> tuple[str, ...]:
    """The artifact's inputs, checked to be those of a causal LM eval can feed. Cheap (no weights are run)."""
    from sparsec.runner import artifact_inputs

    names = tuple(spec.name for spec in artifact_inputs(directory, target))
    if "input_ids" not in names or not set(names) <= set(TOKEN_INPUTS):
        raise SparsecError(
            f"{directory} takes inputs {list(names)}; eval scores causal language models taking input_ids "
            "(and attention_mask) and returning logits"
        )
    return names


def load_artifact_lm(directory: Path, target: str, input_names: tuple[str, ...]) -> CausalLM:
    """The artifact in `directory` run by `target` (`sparsec.runner.load_artifact`)."""
    run = load_artifact(directory, target)
    return CausalLM(run, input_names, f"{directory} on {target}")


def load_model_lm(spec: str, dtype: str = "auto") -> CausalLM:
    """The uncompressed Hugging Face model `spec` (a directory or builtin:NAME, `sparsec.models.load_model`)."""
    from sparsec.models import load_model

    model = load_model(spec, dtype=dtype).model.eval()

    def run(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {LOGITS: model(**inputs).logits}

    return CausalLM(run, TOKEN_INPUTS, f"{spec} (Hugging Face model, PyTorch)")


@dataclass(frozen=True)
class Perplexity:
    """Next-token loss of a model over a protocol's samples, and how long it took."""

    loss: NextTokenLoss
    seconds: float

    @property
    def perplexity(self) -> float:
        return self.loss.perplexity

    def describe(self) -> dict[str, Any]:
        return {
            "perplexity": self.loss.perplexity,
            "loss": self.loss.mean,
            "tokens": self.loss.tokens,
            "seconds": self.seconds,
            "tokens_per_second": self.loss.tokens / self.seconds if self.seconds else None,
        }


def _batches(samples: TextSamples, size: int, progress: bool, desc: str):
    total = -(-len(samples.ids) // size)
    return progress_bar(samples.batches(size), desc=desc, total=total, enabled=progress)


def _loss(logits: Any, ids: torch.Tensor, mask: torch.Tensor) -> NextTokenLoss:
    if not torch.is_tensor(logits) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
        shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise SparsecError(
            f"the model's `logits` output is {shape} for input_ids {tuple(ids.shape)}; eval needs "
            "[batch, seq, vocab] logits of a causal language model"
        )
    return next_token_loss(logits, ids, mask)


def perplexity(model: CausalLM, samples: TextSamples, *, batch_size: int, progress: bool = False) -> Perplexity:
    """`model`'s next-token loss over `samples` (module docstring)."""
    total, start = NextTokenLoss(), time.perf_counter()
    for ids, mask in _batches(samples, batch_size if model.takes_mask else 1, progress, "perplexity"):
        total += _loss(_logits_of(model.outputs(ids, mask)), ids, mask)
    return Perplexity(total, time.perf_counter() - start)


def _logits_of(outputs: Mapping[str, Any]) -> Any:
    if LOGITS not in outputs:
        raise SparsecError(f"the model returns {sorted(outputs)}, no `logits`; eval scores causal language models")
    return outputs[LOGITS]


@dataclass(frozen=True)
class Agreement:
    """An artifact against a baseline on the same samples: both perplexities and the per-output metrics of
    `sparsec.data.quality.compare_outputs` (the baseline is the reference: KL(baseline || artifact))."""

    artifact: Perplexity
    baseline: Perplexity
    outputs: dict[str, dict[str, float]]

    def describe(self) -> dict[str, Any]:
        """The baseline's side of the result: its perplexity, the ratio artifact / baseline, the output metrics."""
        return {
            **self.baseline.describe(),
            "perplexity_ratio": self.artifact.perplexity / self.baseline.perplexity,
            "outputs": self.outputs,
        }


def agreement(
    model: CausalLM, baseline: CausalLM, samples: TextSamples, *, batch_size: int, progress: bool = False
) -> Agreement:
    """Run `model` and `baseline` batch by batch on `samples`: both losses and their outputs' agreement."""
    losses = {"model": NextTokenLoss(), "baseline": NextTokenLoss()}
    seconds = {"model": 0.0, "baseline": 0.0}
    size = batch_size if model.takes_mask and baseline.takes_mask else 1

    def pairs():
        for ids, mask in _batches(samples, size, progress, "agreement"):
            outputs = {}
            for name, lm in (("model", model), ("baseline", baseline)):
                start = time.perf_counter()
                outputs[name] = lm.outputs(ids, mask)
                seconds[name] += time.perf_counter() - start
                losses[name] += _loss(_logits_of(outputs[name]), ids, mask)
            yield outputs["baseline"], outputs["model"], mask

    metrics = compare_outputs(pairs())
    return Agreement(
        Perplexity(losses["model"], seconds["model"]), Perplexity(losses["baseline"], seconds["baseline"]), metrics
    )
