"""Plain decoder-only language models (transformers): Qwen2, Llama, Mistral, Phi-3, Qwen3, Gemma2, OLMo2,
StarCoder2, GPT-NeoX, Phi, Cohere, BLOOM, OPT, Falcon (GPT-2 works
as an unknown family: `gpt2` is the name the plugin example in the README registers).

Nothing here is specific to one of them: the passes find blocks and FFNs by graph structure. Naming the
`model_type`s only records the family in programs and reports (and spares the unknown-family note).

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
    Family(name="qwen3", model_types=("qwen3",), architecture="Qwen3ForCausalLM"),
    Family(name="gemma2", model_types=("gemma2",), architecture="Gemma2ForCausalLM"),
    Family(name="olmo2", model_types=("olmo2",), architecture="Olmo2ForCausalLM"),
    Family(name="starcoder2", model_types=("starcoder2",), architecture="Starcoder2ForCausalLM"),
    Family(name="gpt_neox", model_types=("gpt_neox",), architecture="GPTNeoXForCausalLM"),
    Family(name="phi", model_types=("phi",), architecture="PhiForCausalLM"),
    Family(name="cohere", model_types=("cohere",), architecture="CohereForCausalLM"),
    Family(name="bloom", model_types=("bloom",), architecture="BloomForCausalLM"),
    Family(name="opt", model_types=("opt",), architecture="OPTForCausalLM"),
    Family(name="falcon", model_types=("falcon",), architecture="FalconForCausalLM"),
)
