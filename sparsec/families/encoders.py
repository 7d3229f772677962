"""Encoders: BERT-style text encoders and ViT-style vision towers, recognised by their config, not by name.

- A text encoder's config has token types (`type_vocab_size`: BERT, RoBERTa, XLM-R, ELECTRA) and is no
  decoder; its programs take `input_ids`, `attention_mask`, `token_type_ids` and return `last_hidden_state`
  (and `pooler_output` where the model has a pooler). `seq` is bounded by `max_position_embeddings`.
- A vision tower's config has `image_size`, `patch_size` and `num_channels` and no vocabulary (ViT, SigLIP's
  vision model, CLIP's vision model): `pixel_values` [B, C, image_size, image_size], batch dynamic, the image
  size fixed (its position table holds one embedding per patch).

Both are tagged `shared` everywhere, like a plain decoder: they have one component.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from sparsec.families.base import DynamicDims, Family


def _config(model: nn.Module):
    return getattr(model, "config", None)


@dataclass(frozen=True, kw_only=True, eq=False)
class TextEncoderFamily(Family):
    """BERT-style encoders: token types in the config, not a decoder."""

    def matches(self, model: nn.Module) -> bool:
        config = _config(model)
        return (
            config is not None
            and isinstance(getattr(config, "type_vocab_size", None), int)
            and not getattr(config, "is_decoder", False)
        )

    def example_inputs(self, model: nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random ids, a full mask and random token types (all 0 where the model has one type)."""
        config = _config(model)
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
        types = torch.randint(0, config.type_vocab_size, (batch, seq), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": types}


@dataclass(frozen=True, kw_only=True, eq=False)
class VisionTowerFamily(Family):
    """ViT-style vision encoders: an image size and a patch size in the config, no vocabulary."""

    def matches(self, model: nn.Module) -> bool:
        config = _config(model)
        return (
            config is not None
            and all(isinstance(getattr(config, k, None), int) for k in ("image_size", "patch_size", "num_channels"))
            and getattr(config, "vocab_size", None) is None
        )

    def example_inputs(self, model: nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random pixel values at the config's image size (`seq` is not used: the patch grid is fixed)."""
        config = _config(model)
        gen = torch.Generator().manual_seed(seed)
        size = (batch, config.num_channels, config.image_size, config.image_size)
        return {"pixel_values": torch.randn(size, generator=gen)}

    def dynamic_dims(self, inputs: Mapping[str, torch.Tensor]) -> DynamicDims:
        """Batch only: the image size is fixed by the position table."""
        return {name: {0: "batch"} for name, value in inputs.items() if isinstance(value, torch.Tensor) and value.dim()}

    def dim_bounds(self, model: nn.Module) -> dict[str, int]:
        return {}


FAMILIES = (TextEncoderFamily(name="text_encoder"), VisionTowerFamily(name="vision_tower"))
