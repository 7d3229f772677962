"""Plain decoder-only language models (transformers): Qwen2, Llama, Mistral, Phi-3.

Their forward takes token ids; every region is one component, `shared` (they both understand and generate
text), so they need no tag rules. `builtin:tiny-qwen2` and `builtin:tiny-llama` are 4-layer decoders of
width 64 with seeded random weights.
"""

from __future__ import annotations

from sparsec.families.base import Family, tiny_decoder_config


def tiny_qwen2_config():
    """The config of `builtin:tiny-qwen2`."""
    import transformers

    return transformers.Qwen2Config(**{k: v for k, v in tiny_decoder_config("qwen2").items() if k != "model_type"})


def tiny_llama_config():
    """The config of `builtin:tiny-llama`."""
    import transformers

    return transformers.LlamaConfig(**{k: v for k, v in tiny_decoder_config("llama").items() if k != "model_type"})


FAMILIES = (
    Family(
        name="qwen2",
        model_types=("qwen2",),
        architecture="Qwen2ForCausalLM",
        builtin_configs={"tiny-qwen2": tiny_qwen2_config},
    ),
    Family(
        name="llama",
        model_types=("llama",),
        architecture="LlamaForCausalLM",
        builtin_configs={"tiny-llama": tiny_llama_config},
    ),
    Family(name="mistral", model_types=("mistral",), architecture="MistralForCausalLM"),
    Family(name="phi3", model_types=("phi3",), architecture="Phi3ForCausalLM"),
)
