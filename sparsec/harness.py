"""Task accuracy through lm-evaluation-harness (`sparsec eval --tasks`): an lm-eval model backend that runs a
`sparsec.evaluation.CausalLM` (a compiled artifact on its target, or the Hugging Face model).

`SparsecLM` encodes requests as lm-eval's own `hf` backend does (it is a `TemplateLM`, like `HFLM`: the same
context/continuation split, trailing spaces moved to the continuation, the BOS/EOS prefix for an empty context, the
tokenizer's own special tokens), so an artifact and the model it was compiled from score the same tokens:
- `loglikelihood`: the continuation's summed log-probability, `sparsec.data.language_model.next_token_loss` over
  the continuation's positions, and whether greedy decoding would produce it; the last `max_length` + 1 tokens are
  kept, as `hf` does;
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows of `max_length` tokens;
- `generate_until`: greedy decoding by full recompute (the artifacts have no KV cache): the whole sequence is run
  again for every new token, up to `max_gen_toks` or a stop string. Sampling options are ignored (greedy only).

Tasks come from lm-eval's registry and `--tasks-dir` (task YAML files and their data, e.g. `dataset_path: json`
with local `data_files`, or a `custom_dataset` function; no hub is needed for such a task).

lm-eval is an optional dependency: `pip install -e ".[eval]"`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sparsec.data.language_model import next_token_loss
from sparsec.errors import SparsecError
from sparsec.evaluation import CausalLM, pad_right
from sparsec.progress import progress_bar

INSTALL = 'pip install -e ".[eval]"'


def require_lm_eval() -> None:
    """`SparsecError` (exit 2) saying how to install lm-eval when it is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise SparsecError(f"--tasks runs lm-evaluation-harness, which is not installed: {INSTALL}") from exc


def task_manager(names: list[str], tasks_dir: str | Path | None):
    """lm-eval's `TaskManager` that knows the tasks `names`: over `tasks_dir` alone when it defines them all (seconds
    saved: indexing lm-eval's thousands of built-in task files takes ~10 s), else over the built-in tasks too.
    `SparsecError` naming the unknown tasks, with those `tasks_dir` defines."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    local: list[str] = []
    if tasks_dir is not None:
        if not Path(tasks_dir).is_dir():
            raise SparsecError(f"--tasks-dir {tasks_dir} is not a directory (of lm-eval task YAML files)")
        manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        local = sorted(manager.all_tasks)
        if set(names) <= set(local):
            return manager
    manager = TaskManager(include_path=str(tasks_dir) if tasks_dir else None)
    unknown = [name for name in names if name not in set(manager.all_tasks)]
    if unknown:
        where = f"--tasks-dir {tasks_dir} defines {local or 'none'}" if tasks_dir else "no --tasks-dir given"
        raise SparsecError(
            f"--tasks: unknown task(s) {unknown}; {where}, and lm-eval has {len(manager.all_tasks) - len(local)} "
            "built-in tasks and groups (lm-eval ls tasks; most need the Hugging Face hub)"
        )
    return manager


def _lm_base():
    require_lm_eval()
    from lm_eval.api.model import TemplateLM

    return TemplateLM


def make_lm(model: CausalLM, tokenizer, *, max_length: int, batch_size: int, progress: bool = False):
    """An lm-eval model (`TemplateLM`) running `model` with `tokenizer` (module docstring)."""
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class SparsecLM(_lm_base()):
        def __init__(self) -> None:
            super().__init__()
            self.tokenizer = tokenizer
            self.max_length = max_length
            self.batch_size = batch_size if model.takes_mask else 1

        @property
        def eot_token_id(self) -> int:
            return tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            if add_special_tokens is None and string.startswith(tokenizer.decode(self.prefix_token_id)):
                add_special_tokens = False
            special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            return tokenizer.encode(string, **special)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            results = []
            batches = range(0, len(requests), self.batch_size)
            for start in progress_bar(batches, desc="loglikelihood", enabled=progress and not disable_tqdm):
                chunk = requests[start : start + self.batch_size]
                windows = [(context + continuation)[-(self.max_length + 1) :] for _, context, continuation in chunk]
                ids, mask = pad_right(windows, tokenizer.eos_token_id or 0)
                logits = model.logits(ids, mask)
                for row, (window, (_, _, continuation)) in enumerate(zip(windows, chunk)):
                    scored = torch.zeros(1, ids.shape[1], dtype=torch.long)
                    scored[0, len(window) - len(continuation) - 1 : len(window)] = 1  # predictions of the continuation
                    loss = next_token_loss(logits[row : row + 1], ids[row : row + 1], scored)
                    first = len(window) - len(continuation) - 1
                    greedy = logits[row, first : len(window) - 1].argmax(-1)
                    results.append((-loss.nll, bool((greedy == ids[row, first + 1 : len(window)]).all())))
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            totals = []
            for (text,) in [request.args for request in requests]:
                windows = [
                    (None, *make_disjoint_window(pair))
                    for pair in get_rolling_token_windows(
                        token_list=self.tok_encode(text),
                        prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length,
                        context_len=1,
                    )
                ]
                totals.append(sum(ll for ll, _ in self._loglikelihood_tokens(windows, disable_tqdm=True)))
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            eos = tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
            texts = []
            for context, gen_kwargs in progress_bar(
                [request.args for request in requests], desc="generate", enabled=progress and not disable_tqdm
            ):
                options = normalize_gen_kwargs(dict(gen_kwargs), 256)
                until = handle_stop_sequences(options["until"], eos=eos)
                budget = int(options["max_gen_toks"])
                ids = self.tok_encode(context)[-max(self.max_length - budget, 1) :]
                generated: list[int] = []
                for _ in range(budget):
                    window = torch.tensor([ids + generated])
                    token = int(model.logits(window, torch.ones_like(window))[0, -1].argmax())
                    if token == self.eot_token_id:
                        break
                    generated.append(token)
                    if any(stop in tokenizer.decode(generated) for stop in until):
                        break
                texts.append(postprocess_generated_text(tokenizer.decode(generated), until, None))
            return texts

    return SparsecLM()


def run_tasks(
    lm, names: list[str], manager, *, limit: int | None = None, num_fewshot: int | None = None
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of `lm` on the tasks `names`: per task its metrics, and every item's
    loglikelihoods (`samples`: what lets two backends be compared item by item)."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(
        model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot, bootstrap_iters=0
    )
    return {
        "results": results["results"],
        "versions": {k: str(v) for k, v in results.get("versions", {}).items()},
        "n_samples": results.get("n-samples", {}),
        "samples": results.get("samples", {}),
    }
