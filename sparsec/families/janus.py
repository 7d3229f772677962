"""Janus (transformers `JanusForConditionalGeneration`): one Llama decoder shared by an understanding path
(vision encoder + aligner) and a generation path (VQ model + generation embeddings / aligner / head).

Its `forward()` runs only the understanding path (pixels + ids -> text logits); image generation runs the
language model under a different embedding and head, then decodes image tokens with the VQ model, all inside
`generate()`. The wrappers here turn those two into modules with tensor-only inputs, so the family has three
entry points:

- `understanding`: the Hugging Face model itself (`input_ids`, `attention_mask`, `pixel_values` -> `logits`).
- `generation_step`: one image-generation step (`JanusGenerationStep`).
- `vq_decode`: image tokens -> pixels (`JanusVQDecode`).

The wrappers hold the model's own `JanusModel` under the attribute `model`, as the Hugging Face class does,
so weights are shared (not copied) with the understanding path and module paths inside every program are
the Hugging Face ones (`model.language_model.layers.0.mlp`, `model.generation_head.proj_out`): the janus
family's component tags and every `where` glob mean the same in all three programs.

Example:
    >>> from sparsec.families import entry_points
    >>> from sparsec.models import load_model
    >>> model = load_model("builtin:tiny-janus").model
    >>> step = entry_points(model)["generation_step"]
    >>> program = step.capture(batch=2, seq=8)      # prompt length and image-token count stay dynamic
    >>> inputs = step.example_inputs(batch=3, seq=5)
    >>> program.run(inputs)["logits"].shape         # [batch, image tokens so far + 1, codebook size]
    torch.Size([3, 3, 64])
"""

from __future__ import annotations

import torch
from torch import nn

from sparsec.errors import SparsecError
from sparsec.families.base import EntryPoint, Family, tiny_decoder_config
from sparsec.ir.tags import TagRule


class JanusGenerationStep(nn.Module):
    """One step of Janus image generation, the conditional branch, without a KV cache.

    Computes what `JanusForConditionalGeneration.generate(generation_mode="image")` computes per step, over
    the whole prefix at once:

        embeds = cat(embed_tokens(input_ids), generation_aligner(generation_embeddings(image_ids)))
        hidden = language_model(inputs_embeds=embeds, attention_mask=cat(attention_mask, ones(B, T)))
        logits = generation_head(hidden[:, S - 1:])          # [B, T + 1, codebook size]

    `logits[:, j]` scores image token `j` given the prompt and image tokens `0 .. j-1` (causal attention),
    so `logits[:, -1]` is the step's next-token scores and one call with all tokens but the last reproduces
    every step of a generation. Positions run 0 .. S+T-1 whatever the padding, as in `generate()`.

    Outside the program, as in `generate()`: classifier-free guidance (run the batch twice, conditional
    prompts then unconditional ones, i.e. every token but BOS and `boi_token_id` replaced by the pad token,
    and mix `uncond + scale * (cond - uncond)`), sampling / argmax, and the KV cache.

    Inputs: `input_ids` [B, S] prompt ids, `attention_mask` [B, S] (0 = padding), `image_ids` [B, T] image
    tokens generated so far (T >= 0; captured dynamic needs T >= 2 in the example). Output: `{"logits": ...}`.

    Example::

        step = JanusGenerationStep(model)
        step(input_ids=ids, attention_mask=mask, image_ids=tokens)["logits"][:, -1].argmax(-1)  # next token
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        _require_janus(model)
        self.model = model.model  # the same JanusModel: shared weights, Hugging Face module paths
        self.config = model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_ids: torch.Tensor) -> dict:
        janus = self.model
        text = janus.get_input_embeddings()(input_ids)
        image = janus.generation_aligner(janus.generation_embeddings(image_ids))
        embeds = torch.cat([text, image], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(image_ids.shape)], dim=1)
        hidden = janus.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        prompt_length = input_ids.shape[1]
        return {"logits": janus.generation_head(hidden[:, prompt_length - 1 :])}


class JanusVQDecode(nn.Module):
    """Janus image tokens -> pixels, as `JanusForConditionalGeneration.decode_image_tokens` computes them.

    `model.vqmodel.decode` (codebook lookup, L2 normalisation, post-quant conv, decoder), then channels last.
    Input: `image_ids` [B, num_patches**2] (the VQ model fixes the token grid, so only batch is dynamic).
    Output: `{"pixel_values": [B, H, W, C]}`, in the model's normalised range; de-normalising to uint8 is the
    processor's `postprocess`, outside the program.

    Example::

        JanusVQDecode(model)(image_ids=torch.randint(0, 64, (2, 16)))["pixel_values"].shape
        # -> torch.Size([2, 8, 8, 3])
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        _require_janus(model)
        self.model = model.model
        self.config = model.config

    def forward(self, image_ids: torch.Tensor) -> dict:
        pixels = self.model.vqmodel.decode(image_ids)
        return {"pixel_values": pixels.permute(0, 2, 3, 1)}


def _require_janus(model: nn.Module) -> None:
    inner = getattr(model, "model", None)
    missing = [
        n
        for n in ("language_model", "generation_embeddings", "generation_aligner", "generation_head", "vqmodel")
        if not hasattr(inner, n)
    ]
    if missing:
        raise SparsecError(
            f"{type(model).__name__} is not a transformers JanusForConditionalGeneration (model.model lacks {missing}); "
            "build the Janus entry points from JanusForConditionalGeneration"
        )


def janus_image_token_grid(model: nn.Module) -> int:
    """Number of image tokens one Janus image is made of (`num_patches ** 2` of the VQ model)."""
    rows, cols = model.model.vqmodel.quantize.quant_state_dims
    return int(rows) * int(cols)


class JanusFamily(Family):
    """The `janus` family: understanding inputs hold an image, and three entry points (module docstring)."""

    def example_inputs(self, model: nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """`seq` text tokens plus one image's placeholders, and the image's pixels."""
        config = model.config
        gen = torch.Generator().manual_seed(seed)
        vocab = int(config.text_config.vocab_size)
        vision = config.vision_config
        n_image = (vision.image_size // vision.patch_size) ** 2
        image_token = int(config.image_token_id)
        ids = torch.randint(0, min(vocab, image_token), (batch, seq + n_image), generator=gen)
        ids[:, 1 : 1 + n_image] = image_token
        pixels = torch.randn(batch, vision.num_channels, vision.image_size, vision.image_size, generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}

    def entry_points(self, model: nn.Module) -> dict[str, EntryPoint]:
        """The three programs of a Janus model: `understanding`, `generation_step`, `vq_decode`.

        `example_inputs(batch, seq)` means: understanding, `seq` text tokens plus the image placeholders;
        generation step, a `seq`-token prompt and `max(2, seq // 2)` image tokens (at most one image's worth
        less one); VQ decode, one image's token grid (`seq` unused).

        Example::

            entries = JANUS.entry_points(model)
            {name: e.dynamic_dims for name, e in entries.items()}["vq_decode"]
            # -> {'image_ids': {0: 'batch'}}
            program = entries["vq_decode"].capture(batch=2)
        """
        _require_janus(model)
        codebook = int(model.model.generation_embeddings.num_embeddings)
        vocab = int(model.config.text_config.vocab_size)
        grid = janus_image_token_grid(model)

        def understanding_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
            return self.example_inputs(model, batch, seq, seed=seed)

        def step_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
            gen = torch.Generator().manual_seed(seed)
            image_count = max(2, min(seq // 2, grid - 1))
            ids = torch.randint(0, vocab, (batch, seq), generator=gen)
            return {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "image_ids": torch.randint(0, codebook, (batch, image_count), generator=gen),
            }

        def vq_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
            gen = torch.Generator().manual_seed(seed)
            return {"image_ids": torch.randint(0, codebook, (batch, grid), generator=gen)}

        understanding_dims = self.dynamic_dims(understanding_inputs(2, 2, 0))
        text = {0: "batch", 1: "seq"}
        return {
            "understanding": EntryPoint(
                "understanding",
                model,
                understanding_inputs,
                understanding_dims,
                self,
                "forward(): pixels + prompt ids -> text logits",
            ),
            "generation_step": EntryPoint(
                "generation_step",
                JanusGenerationStep(model),
                step_inputs,
                {"input_ids": dict(text), "attention_mask": dict(text), "image_ids": {0: "batch", 1: "image_seq"}},
                self,
                "prompt ids + image tokens so far -> next-image-token logits (conditional branch, no KV cache)",
            ),
            "vq_decode": EntryPoint(
                "vq_decode",
                JanusVQDecode(model),
                vq_inputs,
                {"image_ids": {0: "batch"}},
                self,
                f"{grid} image tokens -> pixels [B, H, W, C] (decode_image_tokens)",
            ),
        }


def tiny_janus_config():
    """The config of `builtin:tiny-janus`: a tiny Llama decoder, SigLIP encoder (32x32 images) and VQ model."""
    import transformers

    return transformers.JanusConfig(
        text_config=tiny_decoder_config("llama"),
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            num_image_tokens=16,
            patch_size=8,
            projection_dim=64,
            mlp_ratio=2.0,
        ),
        vq_config=dict(
            embed_dim=8,
            num_embeddings=64,
            base_channels=32,
            channel_multiplier=[1, 1],
            num_res_blocks=1,
            latent_channels=8,
            projection_dim=64,
            image_token_embed_dim=64,
            num_patches=4,
        ),
        image_token_id=255,
    )


JANUS = JanusFamily(
    name="janus",
    model_types=("janus",),
    tags=(
        TagRule("model.vision_model", "understanding"),
        TagRule("model.aligner", "understanding"),
        TagRule("model.vqmodel", "generation"),
        TagRule("model.generation_*", "generation"),
        TagRule("model.language_model", "shared"),
    ),
    architecture="JanusForConditionalGeneration",
    builtin_configs={"tiny-janus": tiny_janus_config},
    task_entry_points={"generation": "generation_step"},
)

FAMILIES = (JANUS,)
