"""Supported model families: how to recognise them, their default component tags, and their inputs.

A family is recognised from `config.model_type`. Anything else is treated as a generic causal LM over
`input_ids` / `attention_mask` with every region tagged `shared` (say how to tag it in the recipe's
`tags:` section).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tags import TagRule

TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


@dataclass(frozen=True)
class Family:
    """Facts sparsec knows about one model family.

    Attributes:
        name: short name (`qwen2`, `janus`).
        model_types: `config.model_type` values that select this family.
        tags: default component tag rules (first match wins).
        image_inputs: whether the forward takes `pixel_values` next to the text.
    """

    name: str
    model_types: tuple[str, ...]
    tags: tuple[TagRule, ...] = ()
    image_inputs: bool = False

    def example_inputs(self, model: torch.nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random but valid inputs for capture, at the given batch size and text length."""
        config = model.config
        gen = torch.Generator().manual_seed(seed)
        text_config = getattr(config, "text_config", config)
        vocab = int(text_config.vocab_size)
        if not self.image_inputs:
            ids = torch.randint(0, vocab, (batch, seq), generator=gen)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        vision = config.vision_config
        n_image = (vision.image_size // vision.patch_size) ** 2
        image_token = int(config.image_token_id)
        ids = torch.randint(0, min(vocab, image_token), (batch, seq + n_image), generator=gen)
        ids[:, 1 : 1 + n_image] = image_token
        pixels = torch.randn(batch, vision.num_channels, vision.image_size, vision.image_size, generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}

    def dynamic_dims(self, inputs: dict[str, torch.Tensor]) -> dict[str, dict[int, str]]:
        """Batch is dynamic on every input; sequence length on the token-aligned text inputs."""
        dims: dict[str, dict[int, str]] = {}
        for name, value in inputs.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            dims[name] = {0: "batch"}
            if name in TEXT_INPUTS and value.dim() >= 2:
                dims[name][1] = "seq"
        return dims


GENERIC = Family("unknown", ())

FAMILIES: tuple[Family, ...] = (
    Family("qwen2", ("qwen2",)),
    Family("llama", ("llama",)),
    Family("mistral", ("mistral",)),
    Family(
        "janus",
        ("janus",),
        tags=(
            TagRule("model.vision_model", "understanding"),
            TagRule("model.aligner", "understanding"),
            TagRule("model.vqmodel", "generation"),
            TagRule("model.generation_*", "generation"),
            TagRule("model.language_model", "shared"),
        ),
        image_inputs=True,  # forward() is the understanding path: pixels + ids -> logits
    ),
)


def detect_family(model: torch.nn.Module) -> Family:
    """The family of a Hugging Face model by `config.model_type`; `GENERIC` if unknown."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return GENERIC


def family_by_name(name: str) -> Family:
    for family in (*FAMILIES, GENERIC):
        if family.name == name:
            return family
    raise KeyError(name)
