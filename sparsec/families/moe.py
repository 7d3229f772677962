"""Mixture-of-experts language models (transformers): Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3.

Decoder-only LMs like the plain decoders (one `shared` component, token-id inputs) whose MLP sublayers are MoE
blocks: a router, routed experts stored as fused 3D weights, in Qwen2-MoE and DeepSeek-V3 also a shared expert.
sparsec finds their experts by graph structure (`sparsec.analysis.experts`), so these entries only name the
families and their tiny built-in models: 3 layers of width 32, 8 experts of width 16 (Mixtral, OLMoE: 32), top-2 (DeepSeek-V3: the first layer dense),
seeded random weights.
"""

from __future__ import annotations

from sparsec.families.base import Family

_TINY = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    num_experts_per_tok=2,
)


def tiny_mixtral_config():
    """The config of `builtin:tiny-mixtral` (softmax, top-2, renormalised)."""
    import transformers

    return transformers.MixtralConfig(**_TINY, intermediate_size=32, num_local_experts=8)


def tiny_qwen2_moe_config():
    """The config of `builtin:tiny-qwen2-moe` (top-2 softmax probabilities, a sigmoid-gated shared expert)."""
    import transformers

    return transformers.Qwen2MoeConfig(
        **_TINY,
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_experts=8,
        norm_topk_prob=False,
    )


def tiny_qwen3_moe_config():
    """The config of `builtin:tiny-qwen3-moe` (renormalised top-2, QK norm)."""
    import transformers

    return transformers.Qwen3MoeConfig(
        **_TINY, intermediate_size=64, moe_intermediate_size=16, num_experts=8, head_dim=8, norm_topk_prob=True
    )


def tiny_olmoe_config():
    """The config of `builtin:tiny-olmoe`."""
    import transformers

    return transformers.OlmoeConfig(**_TINY, intermediate_size=32, num_experts=8)


def tiny_deepseek_v3_config():
    """The config of `builtin:tiny-deepseek-v3`: layer 0 dense, layers 1-2 MoE with a shared expert; sigmoid
    scores with a correction bias, one expert group (MLA attention as in DeepSeek-V3)."""
    import transformers

    return transformers.DeepseekV3Config(
        **{**_TINY, "num_key_value_heads": 4},
        intermediate_size=64,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        head_dim=8,
        rope_scaling=None,
    )


FAMILIES = (
    Family(
        name="mixtral",
        model_types=("mixtral",),
        architecture="MixtralForCausalLM",
        builtin_configs={"tiny-mixtral": tiny_mixtral_config},
    ),
    Family(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        architecture="Qwen2MoeForCausalLM",
        builtin_configs={"tiny-qwen2-moe": tiny_qwen2_moe_config},
    ),
    Family(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        architecture="Qwen3MoeForCausalLM",
        builtin_configs={"tiny-qwen3-moe": tiny_qwen3_moe_config},
    ),
    Family(
        name="deepseek_v3",
        model_types=("deepseek_v3",),
        architecture="DeepseekV3ForCausalLM",
        builtin_configs={"tiny-deepseek-v3": tiny_deepseek_v3_config},
    ),
    Family(
        name="olmoe",
        model_types=("olmoe",),
        architecture="OlmoeForCausalLM",
        builtin_configs={"tiny-olmoe": tiny_olmoe_config},
    ),
)
