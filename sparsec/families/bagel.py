"""BAGEL (ByteDance-Seed/Bagel) checkpoints: `--model DIR` on a BAGEL-7B-MoT directory, and its programs.

A BAGEL checkpoint is no `save_pretrained` directory: it holds `llm_config.json` (a Qwen2 config), `vit_config.json`
(SigLIP), `ema.safetensors` (the whole model) and `ae.safetensors` (the VAE, which stays outside sparsec's programs),
plus tokenizer files. The family reads it as BAGEL's own loader (`app.py`) builds the model: the language model is
the Mixture-of-Transformers decoder of `sparsec.families.mot` with the loader's overrides (`qk_norm=True`,
`tie_word_embeddings=False`, `layer_module="Qwen2MoTDecoderLayer"`: q/k RMSNorms, q/k/v biases, an untied head and
a `_moe_gen` copy of every layer's weights for generation tokens), beside the modules BAGEL adds around it, under
BAGEL's tensor names (`ema.safetensors` maps one to one onto `BagelModel`'s parameters):

- `language_model.model.{embed_tokens, layers.{i}.*, norm, norm_moe_gen}`, `language_model.lm_head`;
- generation: `time_embedder.mlp.{0,2}`, `vae2llm`, `llm2vae`, `latent_pos_embed.pos_embed`;
- understanding: `vit_model.vision_model.*` (the SigLIP tower, its patch embedding stored as a Linear; `vit_config.json`
  with the loader's overrides `rope=False`, `num_hidden_layers -= 1`), `connector.fc{1,2}`, `vit_pos_embed.pos_embed`.

The latent patch (`latent_patch_size = 2` in `app.py`) and the VAE's latent channels (`z_channels = 16` in
`modeling/autoencoder.py`'s `load_ae`) are fixed in BAGEL's code, not in a config file; the position tables' sizes
(`max_latent_size = 64`, `vit_max_num_patch_per_side = 70` in `app.py`) are read from the tables' shapes.

Programs (`BagelFamily.entry_points`), computed as BAGEL's inference computes them (`modeling/bagel/bagel.py`), in one
pass over the whole context instead of a KV cache (the same attention, so the same result):

- `generation_step` (`BagelGenerationStep`): a prompt, noisy latent patches and their timestep -> the flow-matching
  velocity, at a latent grid fixed when the program is made (batch and prompt length dynamic);
- `understanding` (`BagelUnderstanding`): an image's ViT features and the text after it -> logits;
- `vit` (`BagelViT`): the SigLIP tower on one image's patches -> the ViT features `understanding` takes.

They share BAGEL's module paths (`language_model.model.layers.0.mlp_moe_gen`, `vit_model.vision_model.encoder`), so
tags and `where` globs mean the same in all three, and a recipe's passes change shared weights the same way in each.
What differs from BAGEL on purpose: BAGEL runs attention (flash-attention) and parts of the generation pass in bf16
whatever the weights' dtype; here every step runs in the weights' dtype.

The paper's released MoE checkpoints ("Understanding and Harnessing Sparsity in Unified Multimodal Models":
BAGEL-MoE-7B-GEN-16to8, -32to16) are BAGEL directories whose `llm_config.json` adds `num_experts`, `top_k`,
`num_shared_experts` and `transformed_gen` (`generation_moe_config`) and whose `ema.safetensors` holds the converted
layers' `mlp_moe_gen` in the paper's layout (`sparsec.ops.paper_moe`) instead of the dense tensors. Those FFNs are
built as `GenerationMoe`s, each a `sparsec::moe` (gating one_plus_logit) plus the gated shared expert, exactly what
`ffn_to_moe` makes of a dense FFN, and read from the paper's tensors (`BagelFamily.stored_names`: the experts
stacked, lazily too); so a program holds the checkpoint's MoEs before any pass and the quality gates compare passes
against the MoE model.

Example::

    loaded = sparsec.models.load_model("models/BAGEL-7B-MoT")      # llm_config.json + ema.safetensors
    step = entry_points(loaded.model)["generation_step"]
    step.module(**step.example_inputs(batch=2, seq=12))["velocity"].shape   # [2, 32 * 32, 64]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsec.errors import SparsecError
from sparsec.families.base import EntryPoint, Family
from sparsec.families.mot import FAMILIES as MOT_FAMILIES
from sparsec.families.mot import MOT_PRESETS, Modality, MoTConfig, MoTForCausalLM
from sparsec.ir.tags import TagRule
from sparsec.ops import moe as _moe  # noqa: F401  (registers torch.ops.sparsec.moe, which GenerationMoe calls)
from sparsec.ops.paper_moe import CONFIG_KEYS, GATING, LAYERS_KEY, paper_sizes, paper_tensor_names
from sparsec.resources import read_json_object

LLM_CONFIG = "llm_config.json"
VIT_CONFIG = "vit_config.json"
WEIGHTS = "ema.safetensors"
LATENT_PATCH = 2  # app.py: BagelConfig(latent_patch_size=2); with the VAE downsampling 8, 16 pixels a patch
LATENT_CHANNELS = 16  # modeling/autoencoder.py load_ae: AutoEncoderParams(z_channels=16)
TIMESTEP_FREQUENCIES = 256  # modeling_utils.TimestepEmbedder(frequency_embedding_size=256)
# Qwen2.5's ids of the tokens BAGEL wraps an image in (data_utils.add_special_tokens), when no tokenizer file names them
QWEN2_IMAGE_TOKENS = {"<|vision_start|>": 151652, "<|vision_end|>": 151653}


@dataclass(frozen=True)
class GenerationMoeConfig:
    """The paper's MoE of the generation FFNs (`sparsec.ops.paper_moe`), as a released checkpoint's
    `llm_config.json` states it (`num_experts`, `top_k`, `num_shared_experts`, `transformed_gen`).

    Attributes:
        experts, top_k, shared_experts: E, k and S of every converted FFN (sizes: `paper_sizes`).
        layers: the converted layers (`transformed_gen`: a list, or true for every layer).
    """

    experts: int
    top_k: int
    shared_experts: int
    layers: tuple[int, ...]


@dataclass(frozen=True)
class BagelConfig:
    """What a BAGEL checkpoint's files say about its shapes (see the module docstring for where each comes from).

    Attributes:
        llm: the language model's config (`llm_config.json` with BAGEL's loader overrides).
        vit: the SigLIP tower's config (`vit_config.json` with the loader's overrides: one layer fewer, no rope).
        max_latent_size: latent patches per side of the latent position table (`latent_pos_embed`).
        vit_max_patches: ViT patches per side of the ViT position table (`vit_pos_embed`).
        start_of_image, end_of_image: ids of `<|vision_start|>` / `<|vision_end|>`, which wrap every image.
        moe: the paper's MoE of the generation FFNs in a released MoE checkpoint (BAGEL-MoE-7B-GEN-16to8), else None.
    """

    llm: MoTConfig
    vit: Any  # transformers.SiglipVisionConfig
    max_latent_size: int
    vit_max_patches: int
    start_of_image: int
    end_of_image: int
    moe: GenerationMoeConfig | None = None

    @property
    def vit_hidden(self) -> int:
        """The ViT's width: the connector's input."""
        return int(self.vit.hidden_size)

    @property
    def patch_dim(self) -> int:
        """Width of one latent patch, channels-last: `latent_patch_size ** 2 * z_channels`."""
        return LATENT_PATCH * LATENT_PATCH * LATENT_CHANNELS


class TimestepEmbedder(nn.Module):
    """BAGEL's (DiT's) timestep embedding: `mlp(cat(cos(t * f), sin(t * f)))`, `f_i = 10000 ** (-i / 128)`, i < 128."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FREQUENCIES, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = TIMESTEP_FREQUENCIES // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.to(torch.float32)[:, None] * freqs[None]
        frequencies = torch.cat((torch.cos(args), torch.sin(args)), dim=-1)
        return self.mlp(frequencies.to(self.mlp[0].weight.dtype))


class PositionEmbedding(nn.Module):
    """A stored 2D position table `pos_embed` [side ** 2, H] (BAGEL fills it with fixed sin-cos values, saved in the
    checkpoint), indexed by `row * side + column`."""

    def __init__(self, side: int, hidden: int) -> None:
        super().__init__()
        self.side = side
        self.pos_embed = nn.Parameter(torch.zeros(side * side, hidden), requires_grad=False)

    def grid_ids(self, rows: int, cols: int) -> torch.Tensor:
        """[rows * cols] table rows of a `rows` x `cols` grid, row-major (`get_flattened_position_ids_extrapolate`)."""
        if rows > self.side or cols > self.side:
            raise SparsecError(
                f"a {rows} x {cols} patch grid exceeds the checkpoint's {self.side} x {self.side} position table; "
                f"use at most {self.side} patches a side"
            )
        return (torch.arange(rows)[:, None] * self.side + torch.arange(cols)[None, :]).reshape(-1)

    def grid(self, rows: int, cols: int) -> torch.Tensor:
        """[rows * cols, H]: the table's rows of a `rows` x `cols` grid."""
        return self.pos_embed[self.grid_ids(rows, cols).to(self.pos_embed.device)]


class Connector(nn.Module):
    """BAGEL's `MLPconnector`: ViT features -> the language model's width, `fc2(gelu_tanh(fc1(x)))`."""

    def __init__(self, vit_hidden: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vit_hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEmbeddings(nn.Module):
    """BAGEL's SigLIP patch embedding, stored as a Linear over patches flattened `(row, column, channel)`
    (`convert_conv2d_to_linear`), plus the tower's learned position table (`rope=False`)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        width, patch = config.hidden_size, config.patch_size
        self.patch_embedding = nn.Linear(config.num_channels * patch * patch, width)
        self.position_embedding = nn.Embedding((config.image_size // patch) ** 2, width)


class SiglipTower(nn.Module):
    """BAGEL's SigLIP vision model (`siglip_navit.SiglipVisionTransformer`) under its names: embeddings, the
    encoder (transformers' `SiglipEncoder`: the same layers, `layer_norm1`, `self_attn.{q,k,v,out}_proj`,
    `layer_norm2`, `mlp.fc{1,2}`) and `post_layernorm`."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers.models.siglip.modeling_siglip import SiglipEncoder

        self.embeddings = SiglipEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class SiglipVision(nn.Module):
    """`vit_model`: the tower under `vision_model`, as BAGEL's `SiglipVisionModel` holds it."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.vision_model = SiglipTower(config)


class MoeOperands(nn.Module):
    """The `sparsec::moe` operands of a `GenerationMoe`, named as `ffn_to_moe` names them (`<ffn>.moe.*`)."""

    def __init__(self, hidden: int, experts: int, expert_size: int, shared: bool) -> None:
        super().__init__()
        self.router_weight = nn.Parameter(torch.zeros(experts, hidden))
        self.fc1_weight = nn.Parameter(torch.empty(experts, expert_size, hidden))
        self.fc3_weight = nn.Parameter(torch.empty(experts, expert_size, hidden))
        self.fc2_weight = nn.Parameter(torch.empty(experts, hidden, expert_size))
        if shared:
            self.shared_gate_weight = nn.Parameter(torch.zeros(1, hidden))


class GenerationMoe(nn.Module):
    """A converted generation FFN of a released MoE checkpoint: the paper's `Qwen2MoeSparseMoeBlock`,
    `sum_e f_e(x) * (1 + w_e)` over the top-k raw router logits `w` plus `f_shared(x) * (1 + gate_shared(x))`.

    It is the program `ffn_to_moe` (gating one_plus_logit) makes of a dense FFN, as a module: one `sparsec::moe` call
    on `moe.*` and, with a shared expert, that expert as the SwiGLU `gate_proj` / `up_proj` / `down_proj` gated by
    `moe.shared_gate_weight`; so its capture holds the same nodes under the same names, and the MoE's lowerings and
    `export_paper_moe` treat a loaded checkpoint's MoE as one `ffn_to_moe` converted. `BagelFamily.stored_names` maps these
    parameters onto the checkpoint's tensors (each expert stored on its own, stacked here).
    """

    def __init__(self, hidden: int, intermediate: int, config: GenerationMoeConfig) -> None:
        super().__init__()
        shared, expert_size = paper_sizes(intermediate, config.experts, config.shared_experts)
        self.top_k = config.top_k
        self.has_shared = shared > 0
        self.moe = MoeOperands(hidden, config.experts, expert_size, self.has_shared)
        if self.has_shared:
            self.gate_proj = nn.Linear(hidden, shared, bias=False)
            self.up_proj = nn.Linear(hidden, shared, bias=False)
            self.down_proj = nn.Linear(shared, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.moe
        routed = torch.ops.sparsec.moe(
            x, m.router_weight, None, m.fc1_weight, None, m.fc3_weight, None, m.fc2_weight, self.top_k, "silu", GATING
        )
        if not self.has_shared:
            return routed
        shared = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return shared * (F.linear(x, m.shared_gate_weight) + 1.0) + routed

    def stored_names(self, path: str) -> dict[str, str | tuple[str, ...]]:
        """This module's parameters (at module path `path`) -> their tensors in the paper's layout."""
        own = {name for name, _ in self.named_parameters()}
        names = paper_tensor_names(path, self.moe.router_weight.shape[0], self.has_shared)
        return {f"{path}.{name}": stored for name, stored in names.items() if name in own}


class BagelModel(nn.Module):
    """BAGEL's modules under its checkpoint's names (module docstring); the programs are its entry points. In a
    released MoE checkpoint (`config.moe`) the converted layers' `mlp_moe_gen` is a `GenerationMoe`."""

    def __init__(self, config: BagelConfig) -> None:
        super().__init__()
        self.bagel_config = config
        hidden = config.llm.hidden_size
        self.language_model = MoTForCausalLM(config.llm)
        for i in config.moe.layers if config.moe is not None else ():
            layer = self.language_model.model.layers[i]
            layer.mlp_moe_gen = GenerationMoe(hidden, config.llm.intermediate_size, config.moe)
        self.time_embedder = TimestepEmbedder(hidden)
        self.vae2llm = nn.Linear(config.patch_dim, hidden)
        self.llm2vae = nn.Linear(hidden, config.patch_dim)
        self.latent_pos_embed = PositionEmbedding(config.max_latent_size, hidden)
        self.vit_model = SiglipVision(config.vit)
        self.connector = Connector(config.vit_hidden, hidden)
        self.vit_pos_embed = PositionEmbedding(config.vit_max_patches, hidden)


def _padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] rotary positions of padded text: each sample's valid tokens count 0, 1, ... as if packed alone."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


class BagelGenerationStep(nn.Module):
    """One denoising step of BAGEL's image generation (`Bagel._forward_flow`, the conditional branch) at a latent
    grid fixed when the module is made.

    The context is the prompt (`input_ids` as BAGEL's `prepare_prompts` makes them: `<|im_start|>`, the text,
    `<|im_end|>`; causal, understanding weights), then the image being generated: `<|vision_start|>`, the latent
    tokens, `<|vision_end|>`, all at one rotary position (the prompt's length) and attending to the whole prompt and
    to each other, not causally. The latent tokens are `vae2llm(x_t) + time_embedder(t) + latent_pos_embed[grid]`
    through the `_moe_gen` weights; the markers through the understanding ones. The velocity is
    `llm2vae(norm_moe_gen(hidden))` at the latent tokens; a sampler steps `x_t <- x_t - v * dt` from `t = 1`
    (noise) to 0.

    Inputs: `input_ids` [B, S], `attention_mask` [B, S] (0: padding, anywhere: each sample computes what BAGEL
    computes for its prompt alone), `latents` [B, rows * cols, 64] (the patchified noisy latent, each patch
    `(p, q, channel)` channels-last, as BAGEL's `einsum("chpwq->hwpqc")`), `timestep` [B] (the flow time `t` in
    [0, 1], shifted as the sampler schedules it). Output `{"velocity": [B, rows * cols, 64]}`.

    Outside the program, as in BAGEL: the VAE (encoding, and decoding the final latent), the schedule and its
    shift, classifier-free guidance (the same step on the text-free and image-free contexts; BAGEL's empty text-free
    context of text-to-image is a prompt whose `attention_mask` is all 0) and its renormalisation.
    """

    def __init__(self, bagel: BagelModel, rows: int, cols: int) -> None:
        super().__init__()
        config = bagel.bagel_config
        self.language_model = bagel.language_model
        self.time_embedder = bagel.time_embedder
        self.vae2llm = bagel.vae2llm
        self.llm2vae = bagel.llm2vae
        self.latent_pos_embed = bagel.latent_pos_embed
        self.grid = (int(rows), int(cols))
        self.markers = (config.start_of_image, config.end_of_image)
        bagel.latent_pos_embed.grid_ids(rows, cols)  # a grid beyond the table: refused here

    @property
    def image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, latents: torch.Tensor, timestep: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        decoder = self.language_model.model
        batch, prompt = input_ids.shape
        n = self.image_tokens
        total = prompt + n + 2
        text = decoder.embed_tokens(input_ids)
        start, end = decoder.embed_tokens(torch.tensor(self.markers, device=input_ids.device)).unbind(0)
        image = self.vae2llm(latents) + self.time_embedder(timestep)[:, None] + self.latent_pos_embed.grid(*self.grid)
        hidden = torch.cat((text, start.expand(batch, 1, -1), image.to(text.dtype), end.expand(batch, 1, -1)), dim=1)
        rows = torch.arange(batch * total, device=input_ids.device).view(batch, total)
        modality = Modality(
            und=torch.cat((rows[:, : prompt + 1], rows[:, prompt + 1 + n :]), dim=1).reshape(-1),
            gen=rows[:, prompt + 1 : prompt + 1 + n].reshape(-1),
        )
        image_position = attention_mask.long().sum(1, keepdim=True).expand(batch, n + 2)
        positions = torch.cat((_padded_positions(attention_mask), image_position), dim=1)
        index = torch.arange(total, device=input_ids.device)
        # prompt rows: causal over the prompt; image rows: the whole prompt and the whole image
        allowed = (index[None, :] <= index[:, None]) | (index[:, None] >= prompt)
        keys = torch.cat((attention_mask.bool(), attention_mask.new_ones(batch, n + 2, dtype=torch.bool)), dim=1)
        mask = allowed & (keys[:, None, None, :] | torch.eye(total, dtype=torch.bool, device=input_ids.device))
        out = decoder.decode(hidden, modality, positions, mask)
        return {"velocity": self.llm2vae(out[:, prompt + 1 : prompt + 1 + n])}


class BagelUnderstanding(nn.Module):
    """BAGEL's understanding of an image and the text after it (`forward_cache_update_vit`, then the text), the
    language model's logits over the text.

    The context is the image: `<|vision_start|>`, the ViT tokens `connector(vit_features) + vit_pos_embed[grid]`,
    `<|vision_end|>`, all at rotary position 0 and attending to each other (not causally); then the text (`input_ids`,
    e.g. `<|im_start|>` question `<|im_end|>` `<|im_start|>`), causal, at positions 1, 2, ...; every token through
    the understanding weights (this program holds no `_moe_gen` weight).

    Inputs: `input_ids` [B, S], `attention_mask` [B, S] (0: padding), `vit_features` [B, rows * cols, vit_hidden]
    (the SigLIP tower's output, after its `post_layernorm`, for a ViT patch grid fixed when the module is made).
    Output `{"logits": [B, S, vocab]}` at the text tokens.
    """

    def __init__(self, bagel: BagelModel, rows: int, cols: int) -> None:
        super().__init__()
        config = bagel.bagel_config
        self.language_model = bagel.language_model
        self.connector = bagel.connector
        self.vit_pos_embed = bagel.vit_pos_embed
        self.grid = (int(rows), int(cols))
        self.markers = (config.start_of_image, config.end_of_image)
        bagel.vit_pos_embed.grid_ids(rows, cols)

    @property
    def image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vit_features: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        decoder = self.language_model.model
        batch, length = input_ids.shape
        block = self.image_tokens + 2
        total = block + length
        text = decoder.embed_tokens(input_ids)
        start, end = decoder.embed_tokens(torch.tensor(self.markers, device=input_ids.device)).unbind(0)
        image = self.connector(vit_features) + self.vit_pos_embed.grid(*self.grid)
        hidden = torch.cat((start.expand(batch, 1, -1), image.to(text.dtype), end.expand(batch, 1, -1), text), dim=1)
        positions = torch.cat(
            (attention_mask.new_zeros(batch, block, dtype=torch.long), _padded_positions(attention_mask) + 1), dim=1
        )
        index = torch.arange(total, device=input_ids.device)
        allowed = (index[None, :] <= index[:, None]) | (index[None, :] < block)  # text causal; image block full
        keys = torch.cat((attention_mask.new_ones(batch, block, dtype=torch.bool), attention_mask.bool()), dim=1)
        mask = allowed & (keys[:, None, None, :] | torch.eye(total, dtype=torch.bool, device=input_ids.device))
        out = decoder.decode(hidden, Modality(und=None, gen=None), positions, mask)
        return {"logits": self.language_model.lm_head(out[:, block:])}


class BagelViT(nn.Module):
    """BAGEL's SigLIP tower on one image's patches (`SiglipVisionTransformer.forward`), at a patch grid fixed when
    the module is made: `patch_embedding(patches) + position_embedding[row * side + column]` (BAGEL's
    `get_flattened_position_ids_extrapolate`, `side` = `vit_max_num_patch_per_side`), the encoder (attention over the
    image's patches, not causal), `post_layernorm`.

    Input: `patches` [B, rows * cols, 3 * p * p], each patch flattened `(row, column, channel)` as BAGEL's `patchify`
    (`einsum("chpwq->hwpqc")`) does, pixels normalised as its `vit_transform`. Output `{"vit_features": [B, rows *
    cols, vit_hidden]}`, the `understanding` program's input.
    """

    def __init__(self, bagel: BagelModel, rows: int, cols: int) -> None:
        super().__init__()
        self.vit_model = bagel.vit_model
        self.grid = (int(rows), int(cols))
        self.register_buffer("positions", bagel.vit_pos_embed.grid_ids(rows, cols), persistent=False)

    def forward(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        tower = self.vit_model.vision_model
        positions = tower.embeddings.position_embedding(self.positions)
        hidden = tower.embeddings.patch_embedding(patches) + positions
        hidden = tower.encoder(inputs_embeds=hidden).last_hidden_state
        return {"vit_features": tower.post_layernorm(hidden)}


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, "restore it from the BAGEL checkpoint")


def llm_config(directory: Path) -> MoTConfig:
    """`llm_config.json` as BAGEL's loader reads it (`qk_norm=True`, `tie_word_embeddings=False`, the MoT layers).

    Raises:
        SparsecError: a field is missing, or the config asks for what BAGEL's decoder does not do (another
            activation, rope scaling).
    """
    raw = _read_json(directory / LLM_CONFIG)
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [f for f in fields if not isinstance(raw.get(f), int)]
    if missing:
        raise SparsecError(f"{directory / LLM_CONFIG} lacks {missing}; restore it from the BAGEL checkpoint")
    if raw.get("hidden_act", "silu") != "silu" or raw.get("rope_scaling"):
        raise SparsecError(
            f"{directory / LLM_CONFIG}: hidden_act {raw.get('hidden_act')!r}, rope_scaling {raw.get('rope_scaling')!r}; "
            "BAGEL's decoder is SiLU-gated with plain rotary positions, which is all sparsec's MoT implements"
        )
    optional = ("num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings")
    kwargs = {f: raw[f] for f in (*fields, *optional) if raw.get(f) is not None}
    return MoTConfig(**kwargs, tie_word_embeddings=False)


def generation_moe_config(directory: Path, llm: MoTConfig) -> GenerationMoeConfig | None:
    """The paper's MoE of the generation FFNs as `llm_config.json` states it (`sparsec.ops.paper_moe`), read as the
    paper's `Qwen2MoTDecoderLayer` reads it: the layers `transformed_gen` lists (true: all) are MoEs; without it (or
    false, or empty) the checkpoint is dense, whatever other keys say. Unlike that code, which takes 8 experts, top-2
    and one shared expert for an absent key, a missing key is refused: a released checkpoint states all three.

    Raises:
        SparsecError: a key missing or not an integer, layers outside the model, E / k / S that leave an expert no
            neuron or pick no expert, or `transformed_und` (MoEs of the understanding FFNs, which sparsec does not
            load).
    """
    raw = _read_json(directory / LLM_CONFIG)
    where = directory / LLM_CONFIG
    if raw.get("transformed_und"):
        raise SparsecError(
            f"{where}: transformed_und {raw['transformed_und']!r} converts the understanding FFNs into MoEs (with an "
            "image router, gate_img); sparsec loads only the generation FFNs' MoEs (transformed_gen)"
        )
    layers = raw.get(LAYERS_KEY, False)
    if layers is False or layers == []:
        return None
    count = llm.num_hidden_layers
    layers = list(range(count)) if layers is True else layers
    values = [raw.get(k) for k in CONFIG_KEYS]
    if not isinstance(layers, list) or not all(type(v) is int for v in (*values, *layers)):
        raise SparsecError(
            f"{where}: the paper's MoE needs {list(CONFIG_KEYS)} as integers and {LAYERS_KEY} as true or a list of "
            f"layer indices, got {dict(zip((*CONFIG_KEYS, LAYERS_KEY), (*values, raw[LAYERS_KEY])))}; restore the "
            "file from the checkpoint"
        )
    experts, top_k, shared = values
    fits = experts > 0 and shared >= 0 and paper_sizes(llm.intermediate_size, experts, shared)[1] > 0
    if not fits or not 1 <= top_k <= experts or not all(0 <= i < count for i in layers):
        raise SparsecError(
            f"{where}: {LAYERS_KEY} {raw[LAYERS_KEY]}, num_experts={experts}, top_k={top_k}, num_shared_experts="
            f"{shared} do not fit {count} layers (0..{count - 1}) of FFNs of {llm.intermediate_size} neurons (each "
            "expert needs a neuron, top_k must be in [1, num_experts])"
        )
    return GenerationMoeConfig(experts, top_k, shared, tuple(sorted(set(layers))))


def _image_token_ids(directory: Path, vocab: int) -> tuple[int, int]:
    """The ids of `<|vision_start|>` / `<|vision_end|>`: as the tokenizer files name them, else Qwen2.5's."""
    named: dict[str, int] = {}
    tokenizer = directory / "tokenizer.json"
    if tokenizer.is_file():
        named.update({t["content"]: t["id"] for t in _read_json(tokenizer).get("added_tokens", [])})
    settings = directory / "tokenizer_config.json"
    if settings.is_file():
        decoder = _read_json(settings).get("added_tokens_decoder", {})
        named.update({t["content"]: int(i) for i, t in decoder.items()})
    ids = tuple(named.get(token, default) for token, default in QWEN2_IMAGE_TOKENS.items())
    if max(ids) >= vocab:
        raise SparsecError(
            f"{directory}: the image tokens {list(QWEN2_IMAGE_TOKENS)} have ids {list(ids)}, beyond the vocabulary "
            f"({vocab}); add the checkpoint's tokenizer_config.json (its added_tokens_decoder names them)"
        )
    return ids


def _table_side(directory: Path, key: str) -> int:
    """Patches per side of a stored position table `key` [side ** 2, H], read from the safetensors header."""
    from sparsec.resources import checkpoint_headers

    header = checkpoint_headers(directory).get(directory / WEIGHTS, {})
    if key not in header:
        raise SparsecError(
            f"{directory / WEIGHTS} has no tensor {key!r} (expected shape [side * side, hidden]); "
            "the checkpoint is incomplete: copy it again"
        )
    rows = header[key]["shape"][0]
    side = math.isqrt(rows)
    if side * side != rows:
        raise SparsecError(f"{directory / WEIGHTS}: {key!r} has {rows} rows, not a square number of patches")
    return side


def vit_config(directory: Path) -> Any:
    """`vit_config.json` as BAGEL's loader reads it: a `SiglipVisionConfig` with `num_hidden_layers - 1` layers (the
    last layer's output is not used; `rope=False`: the tower's own learned position table)."""
    from transformers import SiglipVisionConfig

    raw = _read_json(directory / VIT_CONFIG) if (directory / VIT_CONFIG).is_file() else {}
    fields = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "patch_size",
        "image_size",
    )
    missing = [f for f in fields if not isinstance(raw.get(f), int)]
    if missing:
        raise SparsecError(f"{directory / VIT_CONFIG} is missing or lacks {missing}; restore it from the checkpoint")
    optional = ("num_channels", "layer_norm_eps", "hidden_act")
    kwargs = {f: raw[f] for f in (*fields, *optional) if raw.get(f) is not None}
    kwargs["num_hidden_layers"] -= 1
    config = SiglipVisionConfig(**kwargs)
    config._attn_implementation = "sdpa"
    return config


def bagel_config(directory: Path) -> BagelConfig:
    """A BAGEL checkpoint directory's `BagelConfig`, from its config files and its weights' header.

    Raises:
        SparsecError: a config file is missing or unreadable, or the ViT's position table and BAGEL's ViT position
            ids disagree (`vit_max_num_patch_per_side` must be the tower's `image_size // patch_size`).
    """
    llm = llm_config(directory)
    vit = vit_config(directory)
    start, end = _image_token_ids(directory, llm.vocab_size)
    vit_side = _table_side(directory, "vit_pos_embed.pos_embed")
    if vit.image_size // vit.patch_size != vit_side:
        raise SparsecError(
            f"{directory}: vit_config.json's image_size / patch_size is {vit.image_size // vit.patch_size} patches a "
            f"side, vit_pos_embed {vit_side}; BAGEL indexes both tables with the same position ids"
        )
    return BagelConfig(
        llm=llm,
        vit=vit,
        max_latent_size=_table_side(directory, "latent_pos_embed.pos_embed"),
        vit_max_patches=vit_side,
        start_of_image=start,
        end_of_image=end,
        moe=generation_moe_config(directory, llm),
    )


class BagelFamily(Family):
    """The `bagel` family: BAGEL checkpoint directories (module docstring), compiled as two programs.

    Attributes:
        latent_grid: latent patches (rows, cols) of `generation_step`, at most the latent position table's side:
            32 x 32 is a 512 x 512 image (16 pixels a patch), BAGEL's smallest; a program serves one grid.
        vit_grid: ViT patches (rows, cols) of `understanding`, at most the ViT position table's side: 16 x 16 is a
            224 x 224 image (14 pixels a patch), BAGEL's smallest.
    """

    latent_grid: tuple[int, int] = (32, 32)
    vit_grid: tuple[int, int] = (16, 16)

    def reads_directory(self, directory: Path) -> bool:
        return (directory / LLM_CONFIG).is_file() and (directory / WEIGHTS).is_file()

    def build_from_directory(self, directory: Path) -> nn.Module:
        return BagelModel(bagel_config(directory))

    def stored_names(self, model: nn.Module) -> dict[str, str | tuple[str, ...]]:
        """The converted generation FFNs' parameters (`GenerationMoe.stored_names`) in a released MoE checkpoint."""
        names: dict[str, str | tuple[str, ...]] = {}
        for path, module in model.named_modules():
            if isinstance(module, GenerationMoe):
                names |= module.stored_names(path)
        return names

    def directory_config(self, directory: Path) -> dict[str, Any]:
        return llm_config(directory).to_dict()

    def example_inputs(self, model: nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """The first entry point's (`generation_step`): a BagelModel has no forward of its own."""
        return self.entry_points(model)["generation_step"].example_inputs(batch, seq, seed)

    def entry_points(self, model: nn.Module) -> dict[str, EntryPoint]:
        """`generation_step`, `understanding` and `vit` of a `BagelModel`, at the family's grids; `example_inputs(batch,
        seq)`: `seq` prompt tokens (generation step) or text tokens (understanding). The generation step comes first:
        it is what a recipe without `entry_points` compiles and `sparsec inspect` shows, and it holds both weight
        copies (the prompt's understanding weights, the latents' `_moe_gen` ones)."""
        if not isinstance(model, BagelModel):
            raise SparsecError(f"{type(model).__name__} is not a BagelModel; load the checkpoint with load_model(DIR)")
        config = model.bagel_config
        vocab = config.llm.vocab_size
        latent_grid = tuple(min(n, config.max_latent_size) for n in self.latent_grid)
        vit_grid = tuple(min(n, config.vit_max_patches) for n in self.vit_grid)
        understanding = BagelUnderstanding(model, *vit_grid)
        step = BagelGenerationStep(model, *latent_grid)
        vit = BagelViT(model, *vit_grid)
        patch = config.vit.patch_size
        dtype = model.vae2llm.weight.dtype

        def text(batch: int, seq: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
            ids = torch.randint(0, vocab, (batch, seq), generator=gen)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        def understanding_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
            gen = torch.Generator().manual_seed(seed)
            shape = (batch, understanding.image_tokens, config.vit_hidden)
            return {**text(batch, seq, gen), "vit_features": torch.randn(shape, generator=gen).to(dtype)}

        def step_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
            gen = torch.Generator().manual_seed(seed)
            latents = torch.randn((batch, step.image_tokens, config.patch_dim), generator=gen).to(dtype)
            return {**text(batch, seq, gen), "latents": latents, "timestep": torch.rand(batch, generator=gen)}

        def vit_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
            gen = torch.Generator().manual_seed(seed)
            shape = (batch, vit.grid[0] * vit.grid[1], config.vit.num_channels * patch * patch)
            return {"patches": torch.randn(shape, generator=gen).to(dtype)}

        prompt = {0: "batch", 1: "seq"}
        return {
            "generation_step": EntryPoint(
                "generation_step",
                step,
                step_inputs,
                {"input_ids": prompt, "attention_mask": prompt, "latents": {0: "batch"}, "timestep": {0: "batch"}},
                self,
                f"prompt ids + noisy latent patches ({latent_grid[0]} x {latent_grid[1]}) + timestep -> velocity",
            ),
            "understanding": EntryPoint(
                "understanding",
                understanding,
                understanding_inputs,
                {"input_ids": prompt, "attention_mask": prompt, "vit_features": {0: "batch"}},
                self,
                f"ViT features ({vit_grid[0]} x {vit_grid[1]} patches) + text ids -> logits at the text",
            ),
            "vit": EntryPoint(
                "vit",
                vit,
                vit_inputs,
                {"patches": {0: "batch"}},
                self,
                f"one image's {vit_grid[0]} x {vit_grid[1]} patches ({patch} pixels a side) -> ViT features",
            ),
        }


def sincos_table(side: int, width: int) -> torch.Tensor:
    """BAGEL's fixed 2D position table (`get_2d_sincos_pos_embed`, DiT's) [side ** 2, width], row-major: the first
    half of a patch's row encodes its column, the second half its row, each as `sin(p * w), cos(p * w)` with
    `w_i = 10000 ** (-i / (width / 4))`. Checkpoints store it; `builtin:tiny-bagel` computes it."""
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))
    angles = torch.outer(torch.arange(side, dtype=torch.float64), omega)
    axis = torch.cat((angles.sin(), angles.cos()), dim=-1)  # [side, width / 2]
    columns, rows = axis[None, :, :].expand(side, side, -1), axis[:, None, :].expand(side, side, -1)
    return torch.cat((columns, rows), dim=-1).reshape(side * side, width).to(torch.float32)


def tiny_bagel(seed: int = 0) -> BagelModel:
    """`builtin:tiny-bagel`: the tiny MoT (`MOT_PRESETS["tiny"]`, vocabulary 256 whose last two ids wrap images), a
    2-layer SigLIP tower of width 32 on 16 x 16 images (4 x 4 patches of 4 pixels), 4 x 4 latent and ViT position
    tables (BAGEL's sin-cos values), seeded random weights, in eval mode."""
    from transformers import SiglipVisionConfig

    vit = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=16
    )
    vit._attn_implementation = "sdpa"
    llm = MoTConfig(**MOT_PRESETS["tiny"])
    config = BagelConfig(llm=llm, vit=vit, max_latent_size=4, vit_max_patches=4, start_of_image=254, end_of_image=255)
    torch.manual_seed(seed)
    model = BagelModel(config).eval()
    with torch.no_grad():
        model.latent_pos_embed.pos_embed.copy_(sincos_table(4, llm.hidden_size))
        model.vit_pos_embed.pos_embed.copy_(sincos_table(4, llm.hidden_size))
    return model


FAMILIES = (
    BagelFamily(
        name="bagel",
        module_classes=(BagelModel.__name__,),
        tags=(
            TagRule("time_embedder", "generation"),
            TagRule("vae2llm", "generation"),
            TagRule("llm2vae", "generation"),
            TagRule("latent_pos_embed", "generation"),
            TagRule("vit_model", "understanding"),
            TagRule("connector", "understanding"),
            TagRule("vit_pos_embed", "understanding"),
            # the language model's copies as the MoT tags them (`_moe_gen`: generation), embeddings and head shared
            *(TagRule("language_model." + rule.glob, rule.tag) for rule in MOT_FAMILIES[0].tags),
        ),
        task_entry_points={"generation": "generation_step"},
        builtin_models={"tiny-bagel": tiny_bagel},
    ),
)
