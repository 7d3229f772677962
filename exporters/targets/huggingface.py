"""The `hf` target: the transformed model as a Hugging Face checkpoint directory, which transformers'
`AutoModelForCausalLM.from_pretrained(OUT)` loads without remote code, and which serving engines that read
Hugging Face checkpoints (vLLM, SGLang, TensorRT-LLM) load as they load the source model.

The directory holds config.json (the source model's, rewritten to the program's architecture), model.safetensors
(the program's tensors in their own dtype, under the class's names), generation_config.json and the tokenizer
(`exporters/lowering/hf_checkpoint.py` decides how, or refuses naming why, before anything is written). Parity loads
the directory with transformers and compares its logits with the program's on the calibration samples.

Example::

    sparsec compile --model DIR --recipe recipe.yaml --target hf --out out/
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('out')"
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from sparsec.data.calibration import TOKENIZER_DIR, CalibrationSet
from sparsec.data.parity import ParityOptions, Precision, ProgramReference
from sparsec.errors import SparsecError
from sparsec.exporters.lowering.hf_checkpoint import plan_checkpoint, write_checkpoint
from sparsec.exporters.targets.base import InputSpec, Runner, Target, runner_parity
from sparsec.ir.program import Program

CONFIG = "config.json"
MOE_PASSES = ("ffn_to_moe", "import_moe")  # their programs hold sparsec's MoE operator


def _config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise SparsecError(f"{directory} has no {CONFIG} (a `sparsec compile --target hf --out` directory holds one)")
    return json.loads(path.read_text())


class HuggingFaceCheckpoint(Target):
    """The `hf` target (module docstring)."""

    name = "hf"
    description = (
        "a Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer) that transformers and "
        "vLLM load without remote code; causal LMs whose blocks share one shape"
    )
    needs_onnx = False
    builds_from_onnx = False
    artifacts = (CONFIG, "model.safetensors", "generation_config.json")

    def check(self, recipe: Any) -> None:
        if recipe.entry_points:
            raise SparsecError(
                "--target hf writes one causal language model, and the recipe compiles several entry points; use "
                "--target onnxruntime or aotinductor"
            )
        moe = [p.name for p in recipe.passes if p.name in MOE_PASSES]
        if moe:
            raise SparsecError(
                f"--target hf does not write MoE programs yet, and the recipe runs {moe[0]}; use --target "
                "onnxruntime or aotinductor"
            )

    def build(
        self,
        program: Program,
        onnx_path: Path | None,
        directory: Path,
        recipe: Any,
        calibration: CalibrationSet,
        log: Callable[[str], None],
    ) -> dict[str, Any]:
        plan = plan_checkpoint(program)
        log(f"writing a {plan.model_class} checkpoint")
        written = write_checkpoint(program, plan, directory)
        tokenizer = directory / TOKENIZER_DIR
        if tokenizer.is_dir():  # beside the weights, where from_pretrained and serving engines look
            for path in tokenizer.iterdir():
                shutil.copyfile(path, directory / path.name)
        return {"checkpoint": written}

    def load(self, directory: Path) -> Runner:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        _config(directory)
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # sparsec prints its own progress lines
        try:
            model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True).eval()
        finally:
            if shown:
                hf_logging.enable_progress_bar()

        def run(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                return {"logits": model(**inputs, use_cache=False).logits}

        return run

    def input_specs(self, directory: Path) -> list[InputSpec]:
        vocab = int(_config(directory)["vocab_size"])
        return [
            InputSpec("input_ids", torch.int64, ("batch", "seq"), vocab),
            InputSpec("attention_mask", torch.int64, ("batch", "seq")),
        ]

    def parity(
        self, reference: ProgramReference, directory: Path, options: ParityOptions, precision: Precision
    ) -> dict[str, Any]:
        return runner_parity(self, reference, directory, options, precision, backend="transformers")


TARGETS = (HuggingFaceCheckpoint(),)  # registered by name in sparsec.exporters.targets
