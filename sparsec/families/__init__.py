"""Model families as plugins: the registry that recognises a model's family and finds its built-in models.

A family (`sparsec.families.base.Family`) knows how to recognise a model, its default component tags, example
inputs, dynamic dims, entry points and tiny built-in models. Families come from three places, registered in
this order:

1. built-in modules of this package: every module with a `FAMILIES` tuple (adding a family = adding a file);
2. installed packages, through the entry-point group `sparsec.families` (name = the family's name, value = a
   `Family` instance or a tuple of them), e.g. in pyproject.toml:
   `[project.entry-points."sparsec.families"]` / `gpt2 = "mypkg.families:GPT2"`;
3. `register_family(family)` calls.

They live in `FAMILY_REGISTRY` (a `sparsec.registry.Registry`): names, model types and built-in model names
are unique (a taken name is refused unless `register_family(family, replace=True)`), and
`FAMILY_REGISTRY.temporarily(family)` registers one for a `with` block (tests).

A model's family is the one claiming its `config.model_type`; if none does (diffusers models have no
`model_type`), the first family in registration order whose `matches(model)` holds (a module class in its
tree); else `GENERIC`, a causal LM over `input_ids` / `attention_mask` with every region tagged `shared`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from torch import nn

from sparsec.errors import FamilyError
from sparsec.families.base import GENERIC, EntryPoint, Family
from sparsec.registry import Registry

ENTRY_POINT_GROUP = "sparsec.families"


def _register_builtins() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for family in getattr(module, "FAMILIES", ()):
            FAMILY_REGISTRY.register(family, source=f"built-in module {module.__name__}")


def _checked_family(family: Family, others: Mapping[str, Family]) -> Family:
    """`family`, checked to be a `Family` whose name, model types and built-in models are its own."""
    if not isinstance(family, Family):
        raise FamilyError(f"{family!r} is not a sparsec.families.base.Family")
    if family.name == GENERIC.name:
        raise FamilyError(f"a model family named {family.name!r} is registered already; give it another name")
    for other in others.values():
        taken = [t for t in family.model_types if t in other.model_types]
        if taken:
            raise FamilyError(
                f"model_type {taken[0]!r} of family {family.name!r} is claimed by family {other.name!r} already; "
                "a model_type selects one family"
            )
    clash = [b for b in family.builtin_names() if b in _builtin_names(others.values())]
    if clash:
        raise FamilyError(f"built-in model {clash[0]!r} of family {family.name!r} exists already; rename it")
    return family


FAMILY_REGISTRY: Registry[Family] = Registry(
    "model family",
    "families",
    group=ENTRY_POINT_GROUP,
    builtins=_register_builtins,
    prepare=_checked_family,
    error=FamilyError,
)


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Register `family` after the built-in and installed ones; its name, model types and built-in models must be
    new (a name may be taken with `replace=True`).

    Raises:
        FamilyError: not a `Family`, or its name (unless `replace`), one of its `model_types` or built-in models
            is registered already.
    """
    return FAMILY_REGISTRY.register(family, replace=replace)


def available_families() -> dict[str, Family]:
    """Every registered family by name, in registration order (the order `detect_family` tries `matches`)."""
    return FAMILY_REGISTRY.items()


def family_by_name(name: str) -> Family:
    """The registered family called `name` (`unknown` is `GENERIC`)."""
    return GENERIC if name == GENERIC.name else FAMILY_REGISTRY.get(name)


def family_for_model_type(model_type: str | None) -> Family:
    """The family claiming `config.model_type`, `GENERIC` if none does."""
    if model_type is None:
        return GENERIC
    return next((f for f in available_families().values() if model_type in f.model_types), GENERIC)


def detect_family(model: nn.Module) -> Family:
    """The family of a model by `config.model_type`, else the first whose `matches(model)` holds; `GENERIC`.

    `model_type` is asked first, so a Hugging Face model holding a module another family recognises by class
    (e.g. a diffusers transformer) keeps its own family; a wrapper without a config (`QwenImageStep`, a user's
    own step module) is recognised by what it holds.
    """
    family = family_for_model_type(getattr(getattr(model, "config", None), "model_type", None))
    if family is not GENERIC:
        return family
    return next((f for f in available_families().values() if f.matches(model)), GENERIC)


def family_for_directory(directory: Path) -> Family | None:
    """The first registered family that reads `directory` as a checkpoint layout of its own
    (`Family.reads_directory`: BAGEL's), None for a `save_pretrained` directory."""
    return next((f for f in available_families().values() if f.reads_directory(directory)), None)


def entry_points(model: nn.Module) -> Mapping[str, EntryPoint]:
    """The entry points of a model, as its family names them (`{"forward": ...}` for single-program families).

    Example::

        sorted(entry_points(janus_model))
        # -> ['generation_step', 'understanding', 'vq_decode']
    """
    return detect_family(model).entry_points(model)


def builtin_family(name: str) -> Family:
    """The family whose built-in tiny model is `name` (`tiny-qwen2`).

    Raises:
        FamilyError: no family has that built-in (the message lists the built-ins).
    """
    for family in available_families().values():
        if name in family.builtin_names():
            return family
    raise FamilyError(f"unknown built-in model {name!r}; choose one of {builtin_names()}")


def builtin_names() -> list[str]:
    """The names of every registered family's built-in tiny models."""
    return _builtin_names(available_families().values())


def _builtin_names(families: Iterable[Family]) -> list[str]:
    return [name for family in families for name in family.builtin_names()]


__all__ = [
    "ENTRY_POINT_GROUP",
    "FAMILY_REGISTRY",
    "EntryPoint",
    "Family",
    "FamilyError",
    "GENERIC",
    "available_families",
    "builtin_family",
    "builtin_names",
    "detect_family",
    "entry_points",
    "family_by_name",
    "family_for_directory",
    "family_for_model_type",
    "register_family",
]
