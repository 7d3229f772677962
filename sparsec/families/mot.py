"""A BAGEL-style Mixture-of-Transformers decoder: the reference implementation sparsec compiles.

BAGEL's code is not in transformers, so this module holds a faithful small implementation of its language
model (`Qwen2MoTForCausalLM` in ByteDance's BAGEL repository): a Qwen2-style decoder in which every layer
holds two copies of its weights, one for *understanding* tokens (text, ViT tokens) and one for *generation*
tokens (image tokens being generated), chosen per token by a modality mask, while attention runs over the
whole packed sequence:

- per layer: `input_layernorm`, `self_attn.{q,k,v,o}_proj`, `self_attn.{q,k}_norm` (per-head RMSNorm on
  queries and keys, as BAGEL does), `post_attention_layernorm`, `mlp` (SwiGLU) for understanding tokens, and
  the same names with the suffix `_moe_gen` for generation tokens; the final norm is `norm` / `norm_moe_gen`.
  Module names are BAGEL's, so its checkpoints' tensor names map one to one.
- tokens are routed the way BAGEL's packed implementation does it: the residual stream is packed to
  [B*S, H] once, before the first layer; each copy runs on the rows `index_select`ed for its modality, and results are put back with
  `index_copy`. Each weight copy thus computes only its own tokens (no 2x work), and in the captured graph
  the generation FFN's activations are exactly the generation tokens' (calibration statistics need no mask).
- attention: causal over the packed sequence, with the padding mask; grouped-query attention; rotary
  positions 0..S-1.

What differs from BAGEL, on purpose: BAGEL's generation tokens are VAE latents (in via `vae2llm`, out via
`llm2vae`, trained by flow matching) and its understanding tokens may include SigLIP ViT features; here both
modalities are token ids of one shared vocabulary (embedding and `lm_head` shared), so a generated image is
a sequence of discrete image tokens. The decoder, the part the paper compresses, is BAGEL's. Inputs are
`input_ids`, `attention_mask` and `gen_mask` (1 where a token is a generation token); the output is `logits`.

Example:
    >>> from sparsec.families.mot import MoTConfig, MoTForCausalLM
    >>> model = MoTForCausalLM(MoTConfig(**MOT_PRESETS["tiny"])).eval()
    >>> ids = torch.randint(0, 256, (2, 12)); gen = torch.zeros_like(ids); gen[:, 6:] = 1
    >>> model(input_ids=ids, attention_mask=torch.ones_like(ids), gen_mask=gen).logits.shape
    torch.Size([2, 12, 256])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from sparsec.families.base import Family
from sparsec.ir.tags import TagRule

GEN = "_moe_gen"

MOT_PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    # BAGEL-7B-MoT's language model (Qwen2.5-7B shapes; 7B active, about 14B with both copies).
    "bagel-7b": dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        rope_theta=1_000_000.0,
        max_position_embeddings=32768,
    ),
}


class MoTConfig(PretrainedConfig):
    """Configuration of `MoTForCausalLM` (Qwen2 field names; `MOT_PRESETS` has the tiny and BAGEL-7B shapes)."""

    model_type = "sparsec_mot"

    def __init__(
        self,
        vocab_size: int = 256,
        hidden_size: int = 64,
        intermediate_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 4096,
        tie_word_embeddings: bool = False,
        **kwargs,
    ) -> None:
        if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must divide into num_attention_heads ({num_attention_heads}) heads, "
                f"and those into num_key_value_heads ({num_key_value_heads}) groups"
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class Modality:
    """Row indices of the flattened [B*S] sequence belonging to each modality; both None: every row is an
    understanding row (a program without generation tokens then holds no generation weight)."""

    und: torch.Tensor | None
    gen: torch.Tensor | None

    def apply(
        self,
        und_fn: Callable[[torch.Tensor], torch.Tensor],
        gen_fn: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
    ) -> torch.Tensor:
        """[N, C] -> [N, C']: rows of each modality through that modality's function."""
        if self.gen is None:
            return und_fn(x)
        y_und = und_fn(x.index_select(0, self.und))
        y_gen = gen_fn(x.index_select(0, self.gen))
        out = x.new_zeros(x.shape[0], y_und.shape[-1])
        return out.index_copy(0, self.und, y_und).index_copy(0, self.gen, y_gen)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class MoTAttention(nn.Module):
    def __init__(self, config: MoTConfig) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        for suffix in ("", GEN):
            setattr(self, "q_proj" + suffix, nn.Linear(h, self.heads * d, bias=True))
            setattr(self, "k_proj" + suffix, nn.Linear(h, self.kv_heads * d, bias=True))
            setattr(self, "v_proj" + suffix, nn.Linear(h, self.kv_heads * d, bias=True))
            setattr(self, "o_proj" + suffix, nn.Linear(self.heads * d, h, bias=False))
            setattr(self, "q_norm" + suffix, RMSNorm(d, config.rms_norm_eps))
            setattr(self, "k_norm" + suffix, RMSNorm(d, config.rms_norm_eps))

    def _project(self, suffix: str, x: torch.Tensor) -> torch.Tensor:
        """[n, H] -> [n, (heads + 2 kv_heads) * d]: normed queries and keys, values, of one weight copy."""
        n, d = x.shape[0], self.head_dim
        q = getattr(self, "q_norm" + suffix)(getattr(self, "q_proj" + suffix)(x).view(n, self.heads, d))
        k = getattr(self, "k_norm" + suffix)(getattr(self, "k_proj" + suffix)(x).view(n, self.kv_heads, d))
        v = getattr(self, "v_proj" + suffix)(x)
        return torch.cat((q.reshape(n, self.heads * d), k.reshape(n, self.kv_heads * d), v), dim=-1)

    def forward(
        self,
        x: torch.Tensor,
        modality: Modality,
        shape: tuple[int, int],
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        batch, seq = shape
        d = self.head_dim
        qkv = modality.apply(lambda t: self._project("", t), lambda t: self._project(GEN, t), x)
        q, k, v = qkv.view(batch, seq, -1).split((self.heads * d, self.kv_heads * d, self.kv_heads * d), dim=-1)
        groups = self.heads // self.kv_heads
        # rotated and repeated in [B, S, heads, d], heads moved forward last: torch.export cannot prove the
        # contiguity of a transposed sequence of the form S + n (BAGEL's programs add image tokens) otherwise
        q = _rotate(q.view(batch, seq, self.heads, d), cos, sin).transpose(1, 2)
        k = _rotate(k.view(batch, seq, self.kv_heads, d), cos, sin).repeat_interleave(groups, dim=2).transpose(1, 2)
        v = v.view(batch, seq, self.kv_heads, d).repeat_interleave(groups, dim=2).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        attn = attn.transpose(1, 2).reshape(batch * seq, self.heads * d)
        return modality.apply(self.o_proj, self.o_proj_moe_gen, attn)


class MoTDecoderLayer(nn.Module):
    def __init__(self, config: MoTConfig) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = MoTAttention(config)
        for suffix in ("", GEN):
            setattr(self, "input_layernorm" + suffix, RMSNorm(h, eps))
            setattr(self, "post_attention_layernorm" + suffix, RMSNorm(h, eps))
            setattr(self, "mlp" + suffix, MLP(h, config.intermediate_size))

    def forward(
        self,
        flat: torch.Tensor,
        modality: Modality,
        shape: tuple[int, int],
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """`flat`: the packed residual stream [B*S, H]; `shape`: (B, S) for attention."""
        normed = modality.apply(self.input_layernorm, self.input_layernorm_moe_gen, flat)
        flat = flat + self.self_attn(normed, modality, shape, cos, sin, mask)
        return flat + modality.apply(
            lambda t: self.mlp(self.post_attention_layernorm(t)),
            lambda t: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(t)),
            flat,
        )


class MoTModel(nn.Module):
    def __init__(self, config: MoTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, gen_mask: torch.Tensor) -> torch.Tensor:
        batch, seq = input_ids.shape
        hidden = self.embed_tokens(input_ids)
        is_gen = gen_mask.reshape(-1) != 0
        modality = Modality(und=torch.nonzero(~is_gen).squeeze(1), gen=torch.nonzero(is_gen).squeeze(1))
        positions = torch.arange(seq, device=input_ids.device)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device).tril()
        keys = attention_mask.bool()[:, None, None, :]
        # a query always sees itself, so fully padded rows stay finite
        mask = causal & (keys | torch.eye(seq, dtype=torch.bool, device=input_ids.device))
        return self.decode(hidden, modality, positions, mask)

    def decode(
        self, hidden: torch.Tensor, modality: Modality, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The decoder on embedded tokens: `hidden` [B, S, H], rows routed by `modality` (over the flattened
        [B*S]), rotary `positions` [S] or [B, S], boolean attention `mask` [B or 1, 1, S, S] (True: may attend);
        returns the final-normed hidden states [B, S, H]. `forward` is its causal text case; programs whose tokens
        are not all text ids (BAGEL's latents and ViT features: `sparsec.families.bagel`) embed and mask their own.
        """
        batch, seq, _ = hidden.shape
        d = self.config.head_dim
        # computed here, not held in a buffer: from_pretrained leaves non-persistent buffers uninitialised
        inv_freq = 1.0 / (
            self.config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=hidden.device) / d)
        )
        angles = positions.to(torch.float32)[..., None] * inv_freq
        angles = torch.cat((angles, angles), dim=-1).unsqueeze(-2)  # [(B,) S, 1, d]: broadcast over the heads
        cos, sin = angles.cos().to(hidden.dtype), angles.sin().to(hidden.dtype)
        flat = hidden.reshape(batch * seq, -1)
        for layer in self.layers:
            flat = layer(flat, modality, (batch, seq), cos, sin, mask)
        return modality.apply(self.norm, self.norm_moe_gen, flat).view(batch, seq, -1)


class MoTForCausalLM(PreTrainedModel):
    """BAGEL-style MoT decoder with a language-model head (see the module docstring)."""

    config_class = MoTConfig
    base_model_prefix = "model"
    _no_split_modules = ["MoTDecoderLayer"]

    def __init__(self, config: MoTConfig) -> None:
        super().__init__(config)
        self.model = MoTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, gen_mask: torch.Tensor | None = None
    ) -> CausalLMOutput:
        """`gen_mask` [B, S]: 1 where the token is a generation token (default: none are)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if gen_mask is None:
            gen_mask = torch.zeros_like(input_ids)
        return CausalLMOutput(logits=self.lm_head(self.model(input_ids, attention_mask, gen_mask)))


AutoConfig.register(MoTConfig.model_type, MoTConfig, exist_ok=True)


class MoTFamily(Family):
    """The `mot` family: example inputs mark their second half as generation tokens (`gen_mask`)."""

    def example_inputs(self, model: nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
        inputs = super().example_inputs(model, batch, seq, seed)
        is_gen = torch.zeros_like(inputs["input_ids"])
        is_gen[:, seq // 2 :] = 1
        return {**inputs, self.modality_mask: is_gen}

    def model_class(self, name: str) -> type[nn.Module] | None:
        return MoTForCausalLM if name == MoTForCausalLM.__name__ else super().model_class(name)


def tiny_mot_config() -> MoTConfig:
    """The config of `builtin:tiny-mot` (`MOT_PRESETS["tiny"]`)."""
    return MoTConfig(**MOT_PRESETS["tiny"])


# Each layer's `*_moe_gen` copy serves generation tokens, the plain copy understanding tokens; embeddings and the
# head serve both.
FAMILIES = (
    MoTFamily(
        name="mot",
        model_types=(MoTConfig.model_type,),
        tags=(
            TagRule("model.layers.*.*_moe_gen", "generation"),
            TagRule("model.layers.*.self_attn.*_moe_gen", "generation"),
            TagRule("model.norm_moe_gen", "generation"),
            TagRule("model.layers.*.self_attn.*_proj", "understanding"),
            TagRule("model.layers.*.self_attn.*_norm", "understanding"),
            TagRule("model.layers.*.input_layernorm", "understanding"),
            TagRule("model.layers.*.post_attention_layernorm", "understanding"),
            TagRule("model.layers.*.mlp", "understanding"),
            TagRule("model.norm", "understanding"),
        ),
        modality_mask="gen_mask",
        architecture=MoTForCausalLM.__name__,
        builtin_configs={"tiny-mot": tiny_mot_config},
    ),
)
