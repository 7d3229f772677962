"""Model families as plugins: the registry that recognises a model's family and finds its built-in models.

A family (`sparsec.families.base.Family`) knows how to recognise a model, its default component tags, example
inputs, dynamic dims, entry points and tiny built-in models. Families come from three places, registered in
this order:

1. built-in modules of this package: every module with a `FAMILIES` tuple (adding a family = adding a file);
2. installed packages, through the entry-point group `sparsec.families` (name = the family's name, value = a
   `Family` instance or a tuple of them), e.g. in pyproject.toml:
   `[project.entry-points."sparsec.families"]` / `gpt2 = "mypkg.families:GPT2"`;
3. `register_family(family)` calls.

A model's family is the one claiming its `config.model_type`; if none does (diffusers models have no
`model_type`), the first family in registration order whose `matches(model)` holds (a module class in its
tree); else `GENERIC`, a causal LM over `input_ids` / `attention_mask` with every region tagged `shared`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points as _package_entry_points
from pathlib import Path

from torch import nn

from sparsec.errors import FamilyError
from sparsec.families.base import GENERIC, EntryPoint, Family

ENTRY_POINT_GROUP = "sparsec.families"

_FAMILIES: dict[str, Family] = {}
_BY_MODEL_TYPE: dict[str, Family] = {}
_loaded = False


def register_family(family: Family) -> Family:
    """Register `family` after the built-in and installed ones; its name and model types must be new.

    Raises:
        FamilyError: not a `Family`, or its name or one of its `model_types` is registered already.
    """
    _load()
    _add(family, origin="register_family")
    return family


def available_families() -> dict[str, Family]:
    """Every registered family by name, in registration order (the order `detect_family` tries `matches`)."""
    _load()
    return dict(_FAMILIES)


def family_by_name(name: str) -> Family:
    """The registered family called `name` (`unknown` is `GENERIC`)."""
    if name == GENERIC.name:
        return GENERIC
    families = available_families()
    if name not in families:
        raise FamilyError(f"unknown model family {name!r}; registered families: {sorted(families)}")
    return families[name]


def family_for_model_type(model_type: str | None) -> Family:
    """The family claiming `config.model_type`, `GENERIC` if none does."""
    _load()
    return _BY_MODEL_TYPE.get(model_type, GENERIC) if model_type is not None else GENERIC


def detect_family(model: nn.Module) -> Family:
    """The family of a model by `config.model_type`, else the first whose `matches(model)` holds; `GENERIC`.

    `model_type` is asked first, so a Hugging Face model holding a module another family recognises by class
    (e.g. a diffusers transformer) keeps its own family; a wrapper without a config (`QwenImageStep`, a user's
    own step module) is recognised by what it holds.
    """
    family = family_for_model_type(getattr(getattr(model, "config", None), "model_type", None))
    if family is not GENERIC:
        return family
    return next((f for f in _FAMILIES.values() if f.matches(model)), GENERIC)


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


def _load() -> None:
    """Register the built-in and installed families, once; on a failure none stays registered."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        _load_all()
    except BaseException:
        _FAMILIES.clear()
        _BY_MODEL_TYPE.clear()
        _loaded = False
        raise


def _load_all() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for family in getattr(module, "FAMILIES", ()):
            _add(family, origin=module.__name__)
    for ep in sorted(_package_entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        loaded = ep.load()
        families = tuple(loaded) if isinstance(loaded, Iterable) else (loaded,)
        if ep.name not in {getattr(f, "name", None) for f in families}:
            raise FamilyError(
                f"entry point {ep.name!r} ({ep.value}) in group {ENTRY_POINT_GROUP!r} loads no family "
                f"named {ep.name!r}; name the entry point after the family it registers"
            )
        for family in families:
            _add(family, origin=f"entry point {ep.name} ({ep.value})")


def _add(family: Family, origin: str) -> None:
    if not isinstance(family, Family):
        raise FamilyError(f"{origin}: {family!r} is not a sparsec.families.base.Family")
    if family.name in _FAMILIES or family.name == GENERIC.name:
        raise FamilyError(f"{origin}: a model family named {family.name!r} is registered already; give it another name")
    taken = [t for t in family.model_types if t in _BY_MODEL_TYPE]
    if taken:
        raise FamilyError(
            f"{origin}: model_type {taken[0]!r} of family {family.name!r} is claimed by family "
            f"{_BY_MODEL_TYPE[taken[0]].name!r} already; a model_type selects one family"
        )
    builtins = set(_builtin_names(_FAMILIES.values()))
    clash = [b for b in family.builtin_names() if b in builtins]
    if clash:
        raise FamilyError(f"{origin}: built-in model {clash[0]!r} of family {family.name!r} exists already; rename it")
    _FAMILIES[family.name] = family
    _BY_MODEL_TYPE.update(dict.fromkeys(family.model_types, family))


def _builtin_names(families: Iterable[Family]) -> list[str]:
    return [name for family in families for name in family.builtin_names()]


__all__ = [
    "ENTRY_POINT_GROUP",
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
