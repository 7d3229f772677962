"""Supported model families: how to recognise them, their default component tags, and their inputs.

A family is recognised from `config.model_type`, or, for models without one (diffusers), by the class
of a module in the model's tree (`Family.module_classes`). Anything else is treated as a generic causal LM over
`input_ids` / `attention_mask` with every region tagged `shared` (say how to tag it in the recipe's
`tags:` section).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparsec.families.qwenimage import qwenimage_example_inputs
from sparsec.ir.tags import TagRule

TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


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

    def sample_ids(self, vocabulary_map: dict[str, int], vocab: int, batch: int, seq: int,
                   gen: torch.Generator) -> torch.Tensor:
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
            ids[:, start + 1 : start + length - 1] = codes[torch.randint(0, len(codes), (batch, length - 2), generator=gen)]
            ids[:, start + length - 1] = vocabulary_map[self.end]
        return ids


@dataclass(frozen=True)
class Family:
    """Facts sparsec knows about one model family.

    Attributes:
        name: short name (`qwen2`, `janus`).
        model_types: `config.model_type` values that select this family.
        tags: default component tag rules (first match wins).
        image_inputs: whether the forward takes `pixel_values` next to the text.
        image_tokens: for early-fusion models (one decoder over text and VQ image tokens), how an image is
            written in the token sequence; example inputs then hold an image span.
        modality_mask: for Mixture-of-Transformers models, the [B, S] input that is 1 on generation tokens
            (each token uses the weight copy of its modality); example inputs mark the second half.
        module_classes: class names that select this family when the model has no `config.model_type`
            (diffusers models), found anywhere in the module tree so a wrapper around the model matches too.
        make_inputs: `(model, batch, seq, seed) -> inputs` for families whose forward does not take token
            ids (a diffusion step); replaces the text / image example inputs.
    """

    name: str
    model_types: tuple[str, ...]
    tags: tuple[TagRule, ...] = ()
    image_inputs: bool = False
    image_tokens: ImageTokenSpan | None = None
    modality_mask: str | None = None
    module_classes: tuple[str, ...] = ()
    make_inputs: Callable[[torch.nn.Module, int, int, int], dict[str, torch.Tensor]] | None = None

    def example_inputs(self, model: torch.nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random but valid inputs for capture, at the given batch size and text length."""
        if self.make_inputs is not None:
            return self.make_inputs(model, batch, seq, seed)
        config = model.config
        gen = torch.Generator().manual_seed(seed)
        text_config = getattr(config, "text_config", config)
        vocab = int(text_config.vocab_size)
        if self.image_tokens is not None:
            ids = self.image_tokens.sample_ids(config.vocabulary_map, vocab, batch, seq, gen)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.modality_mask is not None:
            ids = torch.randint(0, vocab, (batch, seq), generator=gen)
            is_gen = torch.zeros_like(ids)
            is_gen[:, seq // 2:] = 1
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), self.modality_mask: is_gen}
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
            if (name in TEXT_INPUTS or name == self.modality_mask) and value.dim() >= 2:
                dims[name][1] = "seq"
        return dims


GENERIC = Family("unknown", ())

# BAGEL-style Mixture-of-Transformers (`sparsec.families.mot`): each layer's `*_moe_gen` copy serves generation tokens,
# the plain copy understanding tokens; embeddings and the head serve both.
MOT_TAGS = (
    TagRule("model.layers.*.*_moe_gen", "generation"),
    TagRule("model.layers.*.self_attn.*_moe_gen", "generation"),
    TagRule("model.norm_moe_gen", "generation"),
    TagRule("model.layers.*.self_attn.*_proj", "understanding"),
    TagRule("model.layers.*.self_attn.*_norm", "understanding"),
    TagRule("model.layers.*.input_layernorm", "understanding"),
    TagRule("model.layers.*.post_attention_layernorm", "understanding"),
    TagRule("model.layers.*.mlp", "understanding"),
    TagRule("model.norm", "understanding"),
)

FAMILIES: tuple[Family, ...] = (
    Family("mot", ("sparsec_mot",), tags=MOT_TAGS, modality_mask="gen_mask"),
    Family("qwen2", ("qwen2",)),
    Family("llama", ("llama",)),
    Family("mistral", ("mistral",)),
    Family("phi3", ("phi3",)),
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
    # Early fusion: the captured entry is the decoder over token ids (image tokens are ordinary ids), the
    # program that both understands and generates. The VQ model tokenizes images before it (encoder side)
    # and turns generated image tokens back into pixels after it (decoder side).
    Family(
        "chameleon",
        ("chameleon",),
        tags=(
            TagRule("model.vqmodel.encoder", "understanding"),
            TagRule("model.vqmodel.quant_conv", "understanding"),
            TagRule("model.vqmodel.quantize", "understanding"),
            TagRule("model.vqmodel.post_quant_conv", "generation"),  # transformers has no Chameleon VQ decoder
        ),
        image_tokens=ImageTokenSpan("IMGIMG", "<racm3:break>", "<eoss>"),
    ),
    Family(
        "emu3",
        ("emu3",),
        tags=(
            TagRule("model.vqmodel.encoder", "understanding"),
            TagRule("model.vqmodel.quant_conv", "understanding"),
            TagRule("model.vqmodel.decoder", "generation"),
            TagRule("model.vqmodel.post_quant_conv", "generation"),
            TagRule("model.vqmodel.quantize", "shared"),  # its codebook serves encode (nearest code) and decode (lookup)
        ),
        image_tokens=ImageTokenSpan("<|visual token", "<|image start|>", "<|image end|>"),
    ),
    # Qwen-Image's MMDiT (diffusers, no model_type), captured as one denoising step (`sparsec.families.qwenimage.QwenImageStep`;
    # example `seq` = prompt length). Each block has an image stream (generation) and a text stream (the prompt,
    # understanding) that meet in one joint attention; timestep embedding, rotary and the attention op are shared.
    # norm_out / proj_out read only image tokens: generation.
    Family(
        "qwenimage",
        (),
        tags=(
            TagRule("**.img_in", "generation"),
            TagRule("**.img_mod", "generation"),
            TagRule("**.img_norm*", "generation"),
            TagRule("**.img_mlp", "generation"),
            TagRule("**.attn.to_q", "generation"),
            TagRule("**.attn.to_k", "generation"),
            TagRule("**.attn.to_v", "generation"),
            TagRule("**.attn.to_out", "generation"),
            TagRule("**.attn.norm_q", "generation"),
            TagRule("**.attn.norm_k", "generation"),
            TagRule("**.norm_out", "generation"),
            TagRule("**.proj_out", "generation"),
            TagRule("**.txt_in", "understanding"),
            TagRule("**.txt_norm*", "understanding"),
            TagRule("**.txt_mod", "understanding"),
            TagRule("**.txt_mlp", "understanding"),
            TagRule("**.attn.add_q_proj", "understanding"),
            TagRule("**.attn.add_k_proj", "understanding"),
            TagRule("**.attn.add_v_proj", "understanding"),
            TagRule("**.attn.to_add_out", "understanding"),
            TagRule("**.attn.norm_added_q", "understanding"),
            TagRule("**.attn.norm_added_k", "understanding"),
        ),
        module_classes=("QwenImageTransformer2DModel",),
        make_inputs=qwenimage_example_inputs,
    ),
    # Qwen2.5-VL: in Qwen-Image it is the text encoder (prompt -> last hidden states, `Qwen2_5_VLModel` on
    # input_ids + attention_mask), the understanding side; as a stand-alone VLM it only understands too.
    Family(
        "qwen2_5_vl",
        ("qwen2_5_vl",),
        tags=(
            TagRule("**.visual", "understanding"),
            TagRule("**.language_model", "understanding"),
            TagRule("lm_head", "understanding"),
        ),
    ),
)


def detect_family(model: torch.nn.Module) -> Family:
    """The family of a model by `config.model_type`, else by a module class in its tree; `GENERIC` if unknown.

    The class-name rule is for diffusers models, which have no `model_type`: it recognises the bare model
    and any wrapper around it (`QwenImageStep`, a user's own step module) without the wrapper declaring
    anything. `model_type` is asked first, so a Hugging Face model holding such a module keeps its family.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    classes = {type(m).__name__ for m in model.modules()}
    for family in FAMILIES:
        if classes.intersection(family.module_classes):
            return family
    return GENERIC


def family_by_name(name: str) -> Family:
    for family in (*FAMILIES, GENERIC):
        if family.name == name:
            return family
    raise KeyError(name)
