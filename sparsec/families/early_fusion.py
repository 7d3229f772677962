"""What early-fusion families (`chameleon`, `emu3`) share: one decoder over text and VQ image tokens.

The captured entry is the decoder over token ids (image tokens are ordinary ids), the program that both
understands and generates. The VQ model tokenizes images before it (encoder side) and turns generated image
tokens back into pixels after it (decoder side). Example inputs hold one image span, written as the
tokenizer writes it (`ImageTokenSpan`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsec.families.base import Family

# The tiny early-fusion models: a 256-token vocabulary whose last 64 ids are the VQ codebook's image tokens
# (named as in the real tokenizers), a few special tokens at the start, text ids in between.
TINY_IMAGE_CODES = 64


@dataclass(frozen=True)
class ImageTokenSpan:
    """How an early-fusion tokenizer writes one image: a begin token, the VQ codes as tokens, an end token.

    Names are keys of `config.vocabulary_map` (the tokenizer's vocabulary, stored in the config).

    Attributes:
        code_prefix: the image-code tokens are the names starting with this (`IMGIMG` in Chameleon).
        begin: the begin-of-image token (`<racm3:break>` in Chameleon).
        end: the end-of-image token (`<eoss>` in Chameleon).

    Example:
        >>> span = ImageTokenSpan("IMGIMG", "<racm3:break>", "<eoss>")
        >>> span.code_ids({"<eoss>": 4, "IMGIMGAZ": 192, "IMGIMGBZ": 193})
        [192, 193]
    """

    code_prefix: str
    begin: str
    end: str

    def code_ids(self, vocabulary_map: dict[str, int]) -> list[int]:
        """The token ids of the image codes, sorted."""
        return sorted(i for name, i in vocabulary_map.items() if name.startswith(self.code_prefix))

    def sample_ids(
        self, vocabulary_map: dict[str, int], vocab: int, batch: int, seq: int, gen: torch.Generator
    ) -> torch.Tensor:
        """Random ids [batch, seq]: text (any non-image id), and from seq 4 on one image span in the middle,
        begin + random image codes + end, covering half the sequence."""
        codes = torch.tensor(self.code_ids(vocabulary_map), dtype=torch.long)
        if len(codes) == 0:
            raise ValueError(f"config.vocabulary_map has no image tokens (names starting with {self.code_prefix!r})")
        is_code = torch.zeros(vocab, dtype=torch.bool)
        is_code[codes] = True
        text = torch.nonzero(~is_code).flatten()
        ids = text[torch.randint(0, len(text), (batch, seq), generator=gen)]
        if seq >= 4:
            start, length = seq // 4, max(seq // 2, 2)
            ids[:, start] = vocabulary_map[self.begin]
            ids[:, start + 1 : start + length - 1] = codes[
                torch.randint(0, len(codes), (batch, length - 2), generator=gen)
            ]
            ids[:, start + length - 1] = vocabulary_map[self.end]
        return ids


@dataclass(frozen=True, kw_only=True, eq=False)
class EarlyFusionFamily(Family):
    """A family of early-fusion decoders: example inputs hold an image span written as `image_tokens` says.

    Attributes:
        image_tokens: how an image is written in the token sequence.
    """

    image_tokens: ImageTokenSpan

    def example_inputs(self, model: nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
        config = model.config
        vocab = int(getattr(config, "text_config", config).vocab_size)
        ids = self.image_tokens.sample_ids(
            config.vocabulary_map, vocab, batch, seq, torch.Generator().manual_seed(seed)
        )
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
