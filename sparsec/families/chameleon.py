"""Chameleon (transformers `ChameleonForConditionalGeneration`): an early-fusion decoder over text and VQ
image tokens.

Its VQ model tokenizes images (encoder, quant conv, codebook: understanding); transformers has no Chameleon
VQ decoder, so only `post_quant_conv` is on the generation side. `builtin:tiny-chameleon`: vocabulary 256
whose last 64 ids are the image tokens, named as Chameleon's tokenizer names them (`IMGIMG...Z`).
"""

from __future__ import annotations

from sparsec.families.base import tiny_decoder_config
from sparsec.families.early_fusion import (
    TINY_IMAGE_CODES,
    EarlyFusionFamily,
    ImageTokenSpan,
)
from sparsec.ir.tags import TagRule


def tiny_chameleon_config():
    """The config of `builtin:tiny-chameleon`: a tiny decoder and VQ model, `TINY_IMAGE_CODES` image tokens."""
    import transformers

    return transformers.ChameleonConfig(
        **{k: v for k, v in tiny_decoder_config("chameleon").items() if k != "model_type"},
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        vocabulary_map=_chameleon_vocabulary(),
        vq_config=dict(
            embed_dim=8,
            num_embeddings=TINY_IMAGE_CODES,
            latent_channels=8,
            resolution=16,
            base_channels=32,
            channel_multiplier=[1, 1, 1],
            num_res_blocks=1,
        ),
    )


def _chameleon_vocabulary() -> dict[str, int]:
    vocabulary = {"<pad>": 0, "<s>": 1, "</s>": 2, "<racm3:break>": 3, "<eoss>": 4, "<image>": 5}
    first = 256 - TINY_IMAGE_CODES
    for code in range(TINY_IMAGE_CODES):  # code 12 -> "IMGIMGBCZ" (digits spelled A-J), as Chameleon's tokenizer does
        vocabulary["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"] = first + code
    return vocabulary


FAMILIES = (
    EarlyFusionFamily(
        name="chameleon",
        model_types=("chameleon",),
        tags=(
            TagRule("model.vqmodel.encoder", "understanding"),
            TagRule("model.vqmodel.quant_conv", "understanding"),
            TagRule("model.vqmodel.quantize", "understanding"),
            TagRule("model.vqmodel.post_quant_conv", "generation"),  # transformers has no Chameleon VQ decoder
        ),
        image_tokens=ImageTokenSpan("IMGIMG", "<racm3:break>", "<eoss>"),
        architecture="ChameleonForConditionalGeneration",
        builtin_configs={"tiny-chameleon": tiny_chameleon_config},
    ),
)
