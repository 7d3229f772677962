"""Loading models: a Hugging Face `save_pretrained` directory, or a built-in tiny model.

Weights load only from safetensors (`use_safetensors=True`): a directory holding only pickled
`pytorch_model.bin` weights is refused, since unpickling runs arbitrary code; remote code is never trusted.
Built-in models (`builtin:tiny-qwen2`, ...: `builtin_names()`) come from the model families
(`sparsec.families`), built from small configs with seeded random weights: for demos, tests and the default
compile. The model class for a config lacking `architectures` comes from its family too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sparsec.errors import SparsecError
from sparsec.families import Family, available_families, builtin_family, builtin_names, detect_family, family_for_model_type

BUILTIN_PREFIX = "builtin:"


def builtin_config(name: str):
    """The config of a built-in tiny model (`tiny-qwen2`, `tiny-janus`, ...: `builtin_names()`)."""
    family = builtin_family(name)
    if name not in family.builtin_configs:
        raise SparsecError(f"{name} has no transformers config (a {family.name} model built directly): use "
                           f"load_model('{BUILTIN_PREFIX}{name}')")
    return family.builtin_configs[name]()


def build_model(config, seed: int = 0) -> torch.nn.Module:
    """A Hugging Face model for `config` with seeded random weights, in eval mode."""
    cls = _model_class(config)
    torch.manual_seed(seed)
    return cls(config).eval()


def _model_class(config) -> type[torch.nn.Module]:
    """The model class for `config`: `config.architectures`, else its family's default, as its family resolves it."""
    family = family_for_model_type(config.model_type)
    names = list(getattr(config, "architectures", None) or [])
    if not names and family.architecture:
        names = [family.architecture]
    for name in names:
        cls = family.model_class(name)
        if cls is not None:
            return cls
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
        family = builtin_family(name)
        model = family.builtin_models[name](0) if name in family.builtin_models else build_model(builtin_config(name))
        return LoadedModel(model, detect_family(model), spec, None)

    directory = Path(spec)
    if not (directory / "config.json").is_file():
        raise SparsecError(
            f"{directory} is not a Hugging Face model directory (no config.json); "
            f"pass a save_pretrained directory or one of {[BUILTIN_PREFIX + b for b in builtin_names()]}"
        )
    if not any(directory.glob("*.safetensors")):
        pickled = sorted(p.name for p in directory.glob("*.bin"))
        raise SparsecError(
            f"{directory} has no .safetensors weights"
            + (f" (only pickled {pickled}, which sparsec does not unpickle)" if pickled else "")
            + "; re-save the model with model.save_pretrained(dir, safe_serialization=True)"
        )
    import transformers

    available_families()  # family modules register their own configs with AutoConfig (sparsec.families.mot)
    config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    cls = _model_class(config)
    model = cls.from_pretrained(str(directory), local_files_only=True, use_safetensors=True, dtype=torch.float32).eval()
    return LoadedModel(model, detect_family(model), str(directory), directory)
