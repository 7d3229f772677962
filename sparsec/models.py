"""Loading models: a Hugging Face `save_pretrained` directory, or a built-in tiny model.

Weights load only from safetensors (`use_safetensors=True`): a directory holding only pickled
`pytorch_model.bin` weights is refused, since unpickling runs arbitrary code. Built-in models
(`builtin:tiny-qwen2`, `builtin:tiny-llama`, `builtin:tiny-janus`, `builtin:tiny-mot`,
`builtin:tiny-qwenimage`, `builtin:tiny-chameleon`, `builtin:tiny-emu3`) are built from small configs with
seeded random weights: for demos, tests and the default compile.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sparsec.errors import SparsecError
from sparsec.families import Family, detect_family

BUILTIN_PREFIX = "builtin:"


def _tiny_text(model_type: str) -> dict:
    return dict(
        model_type=model_type, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )


def builtin_config(name: str):
    """The config of a built-in tiny model (`tiny-qwen2`, `tiny-llama`, `tiny-janus`, `tiny-chameleon`, `tiny-emu3`)."""
    import transformers

    if name == "tiny-mot":
        from sparsec.families.mot import MOT_PRESETS, MoTConfig

        return MoTConfig(**MOT_PRESETS["tiny"])
    if name == "tiny-qwen2":
        return transformers.Qwen2Config(**{k: v for k, v in _tiny_text("qwen2").items() if k != "model_type"})
    if name == "tiny-llama":
        return transformers.LlamaConfig(**{k: v for k, v in _tiny_text("llama").items() if k != "model_type"})
    if name == "tiny-janus":
        return transformers.JanusConfig(
            text_config=_tiny_text("llama"),
            vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, num_image_tokens=16,
                               patch_size=8, projection_dim=64, mlp_ratio=2.0),
            vq_config=dict(embed_dim=8, num_embeddings=64, base_channels=32, channel_multiplier=[1, 1],
                           num_res_blocks=1, latent_channels=8, projection_dim=64, image_token_embed_dim=64,
                           num_patches=4),
            image_token_id=255,
        )
    if name == "tiny-chameleon":
        return transformers.ChameleonConfig(
            **{k: v for k, v in _tiny_text("chameleon").items() if k != "model_type"},
            pad_token_id=0, bos_token_id=1, eos_token_id=2, vocabulary_map=_chameleon_vocabulary(),
            vq_config=dict(embed_dim=8, num_embeddings=TINY_IMAGE_CODES, latent_channels=8, resolution=16,
                           base_channels=32, channel_multiplier=[1, 1, 1], num_res_blocks=1),
        )
    if name == "tiny-emu3":
        return transformers.Emu3Config(
            text_config={**_tiny_text("emu3_text_model"), "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
            vocabulary_map=_emu3_vocabulary(),
            vq_config=dict(codebook_size=TINY_IMAGE_CODES, embed_dim=4, latent_channels=4, base_channels=32,
                           channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[], hidden_size=32,
                           num_attention_heads=1, temporal_downsample_factor=2),
        )
    if name == "tiny-qwenimage":
        raise SparsecError("tiny-qwenimage is a diffusers model with no transformers config: use "
                           "load_model('builtin:tiny-qwenimage') or sparsec.families.qwenimage.tiny_qwenimage()")
    raise SparsecError(f"unknown built-in model {name!r}; choose one of {BUILTINS}")


BUILTINS = ("tiny-qwen2", "tiny-llama", "tiny-janus", "tiny-mot", "tiny-qwenimage", "tiny-chameleon", "tiny-emu3")

# Early-fusion tiny models (Chameleon, Emu3): a 256-token vocabulary whose last 64 ids are the VQ codebook's
# image tokens (named as in the real tokenizers), a few special tokens at the start, text ids in between.
TINY_IMAGE_CODES = 64


def _chameleon_vocabulary() -> dict[str, int]:
    vocabulary = {"<pad>": 0, "<s>": 1, "</s>": 2, "<racm3:break>": 3, "<eoss>": 4, "<image>": 5}
    first = 256 - TINY_IMAGE_CODES
    for code in range(TINY_IMAGE_CODES):  # code 12 -> "IMGIMGBCZ" (digits spelled A-J), as Chameleon's tokenizer does
        vocabulary["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"] = first + code
    return vocabulary


def _emu3_vocabulary() -> dict[str, int]:
    vocabulary = {"<|endoftext|>": 0, "<|extra_203|>": 1, "<|extra_204|>": 2, "<|image start|>": 3,
                  "<|image end|>": 4, "<|image token|>": 5, "<image>": 6, "<|extra_200|>": 7, "<|extra_201|>": 8}
    first = 256 - TINY_IMAGE_CODES
    for code in range(TINY_IMAGE_CODES):
        vocabulary[f"<|visual token {code:06d}|>"] = first + code
    return vocabulary


def build_model(config, seed: int = 0) -> torch.nn.Module:
    """A Hugging Face model for `config` with seeded random weights, in eval mode."""
    cls = _model_class(config)
    torch.manual_seed(seed)
    return cls(config).eval()


def _model_class(config) -> type[torch.nn.Module]:
    """The model class for `config`: from transformers, or sparsec's own (`sparsec.families.mot`)."""
    import transformers

    from sparsec.families import mot

    names = list(getattr(config, "architectures", None) or [])
    defaults = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "janus": "JanusForConditionalGeneration", "chameleon": "ChameleonForConditionalGeneration",
                "emu3": "Emu3ForConditionalGeneration", mot.MoTConfig.model_type: "MoTForCausalLM"}
    if not names and config.model_type in defaults:
        names = [defaults[config.model_type]]
    for name in names:
        for namespace in (transformers, mot):
            if hasattr(namespace, name):
                return getattr(namespace, name)
    raise SparsecError(
        f"cannot tell which model class to build for model_type {config.model_type!r} "
        f"(config.architectures = {names}); add the class name to config.json's `architectures`"
    )


@dataclass
class LoadedModel:
    model: torch.nn.Module
    family: Family
    name: str
    directory: Path | None


def load_model(spec: str | Path) -> LoadedModel:
    """Load `builtin:NAME` or a `save_pretrained` directory (config.json + *.safetensors).

    Example:
        >>> loaded = load_model("builtin:tiny-qwen2")
        >>> loaded.family.name
        'qwen2'
    """
    spec = str(spec)
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name == "tiny-qwenimage":  # a diffusers model: no transformers config to build from
            from sparsec.families.qwenimage import tiny_qwenimage

            model = tiny_qwenimage()
        else:
            model = build_model(builtin_config(name))
        return LoadedModel(model, detect_family(model), spec, None)

    directory = Path(spec)
    if not (directory / "config.json").is_file():
        raise SparsecError(
            f"{directory} is not a Hugging Face model directory (no config.json); "
            f"pass a save_pretrained directory or one of {[BUILTIN_PREFIX + b for b in BUILTINS]}"
        )
    if not any(directory.glob("*.safetensors")):
        pickled = sorted(p.name for p in directory.glob("*.bin"))
        raise SparsecError(
            f"{directory} has no .safetensors weights"
            + (f" (only pickled {pickled}, which sparsec does not unpickle)" if pickled else "")
            + "; re-save the model with model.save_pretrained(dir, safe_serialization=True)"
        )
    import transformers

    from sparsec.families import mot  # noqa: F401  (registers its config with AutoConfig)

    config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    cls = _model_class(config)
    model = cls.from_pretrained(str(directory), local_files_only=True, use_safetensors=True, dtype=torch.float32).eval()
    return LoadedModel(model, detect_family(model), str(directory), directory)
