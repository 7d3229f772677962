"""Data of the `sparsec_tiny_mc` task: `tiny_mc.jsonl` beside this file, as a `datasets.DatasetDict` with a `test`
split (lm-eval calls `load` for the task's `custom_dataset`)."""

from pathlib import Path

import datasets


def load(**kwargs) -> datasets.DatasetDict:
    path = Path(__file__).with_name("tiny_mc.jsonl")
    return datasets.load_dataset("json", data_files={"test": str(path)})
