"""Entry points: the programs a model is deployed as, each one capturable on its own.

A model's `forward()` is one entry point; unified models have more. Janus' `forward()` runs only the
understanding path (pixels + ids -> text logits); image generation runs the language model under a
different embedding and head, then decodes image tokens with a VQ model, all inside `generate()`. The
wrappers here turn those two into modules with tensor-only inputs so `sparsec.capture` can export them:

- `understanding`: the Hugging Face model itself (`input_ids`, `attention_mask`, `pixel_values` -> `logits`).
- `generation_step`: one image-generation step (`JanusGenerationStep`).
- `vq_decode`: image tokens -> pixels (`JanusVQDecode`).

The wrappers hold the model's own `JanusModel` under the attribute `model`, as the Hugging Face class does,
so weights are shared (not copied) with the understanding path and module paths inside every program are
the Hugging Face ones (`model.language_model.layers.0.mlp`, `model.generation_head.proj_out`): the janus
family's component tags and every `where` glob mean the same in all three programs.

Example:
    >>> from sparsec.models import build_model, builtin_config
    >>> model = build_model(builtin_config("tiny-janus"))
    >>> entries = janus_entry_points(model)
    >>> step = entries["generation_step"]
    >>> program = step.capture(batch=2, seq=8)      # prompt length and image-token count stay dynamic
    >>> inputs = step.example_inputs(batch=3, seq=5)
    >>> program.run(inputs)["logits"].shape         # [batch, image tokens so far + 1, codebook size]
    torch.Size([3, 3, 64])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sparsec.errors import SparsecError
from sparsec.families import Family, detect_family
from sparsec.ir.capture import capture_program
from sparsec.ir.program import Program
from sparsec.ir.tags import TagRule, Tagger

DynamicDims = dict[str, dict[int, str]]


@dataclass(frozen=True)
class EntryPoint:
    """One capturable program of a model.

    Attributes:
        name: `understanding`, `generation_step`, `vq_decode`, ...
        module: the module to capture, called as `module(**inputs)`; shares weights with the model.
        make_inputs: `(batch, seq, seed) -> inputs`, random but valid example inputs (see `example_inputs`).
        dynamic_dims: `{input: {axis: dim_name}}` for `sparsec.capture(dynamic=...)`.
        family: the model family (its component tags apply to every entry point).
        description: one line on what the program computes.
    """

    name: str
    module: nn.Module
    make_inputs: Callable[[int, int, int], dict[str, torch.Tensor]]
    dynamic_dims: DynamicDims
    family: Family
    description: str

    def example_inputs(self, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random valid inputs; what `seq` sizes depends on the entry point (see its `description`)."""
        return self.make_inputs(batch, seq, seed)

    def capture(self, batch: int = 2, seq: int = 16, seed: int = 0, *, dynamic: bool = True,
                tags: Sequence[TagRule] = ()) -> Program:
        """Capture `module` at example inputs of this size, with this entry point's dynamic dims (or static
        shapes with `dynamic=False`) and its family's component tags, `tags` in front."""
        tagger = Tagger(self.family.tags).with_overrides(tags)
        return capture_program(self.module, self.example_inputs(batch, seq, seed),
                               self.dynamic_dims if dynamic else {}, family=self.family.name, tagger=tagger)


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

    Example:
        >>> step = JanusGenerationStep(model)
        >>> step(input_ids=ids, attention_mask=mask, image_ids=tokens)["logits"][:, -1].argmax(-1)  # next token
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
        return {"logits": janus.generation_head(hidden[:, prompt_length - 1:])}


class JanusVQDecode(nn.Module):
    """Janus image tokens -> pixels, as `JanusForConditionalGeneration.decode_image_tokens` computes them.

    `model.vqmodel.decode` (codebook lookup, L2 normalisation, post-quant conv, decoder), then channels last.
    Input: `image_ids` [B, num_patches**2] (the VQ model fixes the token grid, so only batch is dynamic).
    Output: `{"pixel_values": [B, H, W, C]}`, in the model's normalised range; de-normalising to uint8 is the
    processor's `postprocess`, outside the program.

    Example:
        >>> JanusVQDecode(model)(image_ids=torch.randint(0, 64, (2, 16)))["pixel_values"].shape
        torch.Size([2, 8, 8, 3])
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
    missing = [n for n in ("language_model", "generation_embeddings", "generation_aligner", "generation_head", "vqmodel")
               if not hasattr(inner, n)]
    if missing:
        raise SparsecError(
            f"{type(model).__name__} is not a transformers JanusForConditionalGeneration (model.model lacks {missing}); "
            "build the Janus entry points from JanusForConditionalGeneration"
        )


def janus_image_token_grid(model: nn.Module) -> int:
    """Number of image tokens one Janus image is made of (`num_patches ** 2` of the VQ model)."""
    rows, cols = model.model.vqmodel.quantize.quant_state_dims
    return int(rows) * int(cols)


def janus_entry_points(model: nn.Module) -> dict[str, EntryPoint]:
    """The three programs of a Janus model: `understanding`, `generation_step`, `vq_decode`.

    `example_inputs(batch, seq)` means: understanding, `seq` text tokens plus the image placeholders;
    generation step, a `seq`-token prompt and `max(2, seq // 2)` image tokens (at most one image's worth
    less one); VQ decode, one image's token grid (`seq` unused).

    Example:
        >>> entries = janus_entry_points(model)
        >>> {name: e.dynamic_dims for name, e in entries.items()}["vq_decode"]
        {'image_ids': {0: 'batch'}}
        >>> program = entries["vq_decode"].capture(batch=2)
    """
    _require_janus(model)
    family = detect_family(model)
    codebook = int(model.model.generation_embeddings.num_embeddings)
    vocab = int(model.config.text_config.vocab_size)
    grid = janus_image_token_grid(model)

    def understanding_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
        return family.example_inputs(model, batch, seq, seed=seed)

    def step_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        image_count = max(2, min(seq // 2, grid - 1))
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "image_ids": torch.randint(0, codebook, (batch, image_count), generator=gen)}

    def vq_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {"image_ids": torch.randint(0, codebook, (batch, grid), generator=gen)}

    understanding_dims = family.dynamic_dims(understanding_inputs(2, 2, 0))
    text = {0: "batch", 1: "seq"}
    return {
        "understanding": EntryPoint(
            "understanding", model, understanding_inputs, understanding_dims, family,
            "forward(): pixels + prompt ids -> text logits"),
        "generation_step": EntryPoint(
            "generation_step", JanusGenerationStep(model), step_inputs,
            {"input_ids": dict(text), "attention_mask": dict(text), "image_ids": {0: "batch", 1: "image_seq"}}, family,
            "prompt ids + image tokens so far -> next-image-token logits (conditional branch, no KV cache)"),
        "vq_decode": EntryPoint(
            "vq_decode", JanusVQDecode(model), vq_inputs, {"image_ids": {0: "batch"}}, family,
            f"{grid} image tokens -> pixels [B, H, W, C] (decode_image_tokens)"),
    }


def entry_points(model: nn.Module) -> Mapping[str, EntryPoint]:
    """The entry points of a model: Janus' three, or `{"forward": ...}` for single-program families.

    Example:
        >>> sorted(entry_points(janus_model))
        ['generation_step', 'understanding', 'vq_decode']
    """
    family = detect_family(model)
    if family.name == "janus":
        return janus_entry_points(model)

    def forward_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
        return family.example_inputs(model, batch, seq, seed=seed)

    dims = family.dynamic_dims(forward_inputs(2, 2, 0))
    return {"forward": EntryPoint("forward", model, forward_inputs, dims, family, "forward()")}
