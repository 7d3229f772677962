"""Emu3 (transformers `Emu3ForConditionalGeneration`): an early-fusion decoder over text and VQ image tokens.

Its VQ model has an encoder (understanding: images to tokens) and a decoder (generation: tokens to pixels);
the codebook serves both. `builtin:tiny-emu3`: vocabulary 256 whose last 64 ids are the image tokens.
"""

from __future__ import annotations

from sparsec.families.base import tiny_decoder_config
from sparsec.families.early_fusion import (
    TINY_IMAGE_CODES,
    EarlyFusionFamily,
    ImageTokenSpan,
)
from sparsec.ir.tags import TagRule


def tiny_emu3_config():
    """The config of `builtin:tiny-emu3`: a tiny decoder and VQ model, `TINY_IMAGE_CODES` image tokens."""
    import transformers

    return transformers.Emu3Config(
        text_config={**tiny_decoder_config("emu3_text_model"), "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
        vocabulary_map=_emu3_vocabulary(),
        vq_config=dict(
            codebook_size=TINY_IMAGE_CODES,
            embed_dim=4,
            latent_channels=4,
            base_channels=32,
            channel_multiplier=[1, 1],
            num_res_blocks=1,
            attn_resolutions=[],
            hidden_size=32,
            num_attention_heads=1,
            temporal_downsample_factor=2,
        ),
    )


def _emu3_vocabulary() -> dict[str, int]:
    vocabulary = {
        "<|endoftext|>": 0,
        "<|extra_203|>": 1,
        "<|extra_204|>": 2,
        "<|image start|>": 3,
        "<|image end|>": 4,
        "<|image token|>": 5,
        "<image>": 6,
        "<|extra_200|>": 7,
        "<|extra_201|>": 8,
    }
    first = 256 - TINY_IMAGE_CODES
    for code in range(TINY_IMAGE_CODES):
        vocabulary[f"<|visual token {code:06d}|>"] = first + code
    return vocabulary


FAMILIES = (
    EarlyFusionFamily(
        name="emu3",
        model_types=("emu3",),
        tags=(
            TagRule("model.vqmodel.encoder", "understanding"),
            TagRule("model.vqmodel.quant_conv", "understanding"),
            TagRule("model.vqmodel.decoder", "generation"),
            TagRule("model.vqmodel.post_quant_conv", "generation"),
            TagRule(
                "model.vqmodel.quantize", "shared"
            ),  # its codebook serves encode (nearest code) and decode (lookup)
        ),
        image_tokens=ImageTokenSpan("<|visual token", "<|image start|>", "<|image end|>"),
        architecture="Emu3ForConditionalGeneration",
        builtin_configs={"tiny-emu3": tiny_emu3_config},
    ),
)
