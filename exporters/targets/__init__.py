"""Deployment targets: the backends an artifact is built for, run on and checked against.

A target is a `Target` (`base.py`) registered by name. Built-ins are the modules of this package, each registering
its targets when imported (`onnxruntime.py`: `onnxruntime`, `onnxruntime-cuda`; `tensorrt.py`: `tensorrt`;
`aotinductor.py`: `aotinductor`): a new
backend is one new module here. Installed packages add targets through the `sparsec.targets` entry-point group
(`name = "package.module:OBJECT"`, a `Target` instance or a subclass taking no arguments), or at run time with
`register_target`.

Example::

    # pyproject.toml of a third-party package
    [project.entry-points."sparsec.targets"]
    onnx-file = "my_targets:OnnxFile"
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from importlib.metadata import entry_points

from sparsec.errors import SparsecError
from sparsec.exporters.targets.base import InputSpec, Lowering, Runner, Target

__all__ = [
    "ENTRY_POINT_GROUP",
    "InputSpec",
    "Lowering",
    "Runner",
    "Target",
    "available_targets",
    "get_target",
    "register_target",
    "unregister_target",
]

ENTRY_POINT_GROUP = "sparsec.targets"

_REGISTRY: dict[str, Target] = {}
_builtins_loaded = False


def register_target(target: Target | type[Target]) -> Target | type[Target]:
    """Register `target` (an instance, or a `Target` subclass taking no arguments: usable as a class decorator)
    under its `name`. Re-registering a name replaces it. Returns its argument.

    Raises `TypeError` for an object that is not a complete `Target` (no name, a section without an options
    dataclass or the other way round, abstract methods left).
    """
    instance = target() if isinstance(target, type) and issubclass(target, Target) else target
    if not isinstance(instance, Target) or not instance.name:
        raise TypeError(
            f"register_target takes a Target (instance or subclass) with a non-empty `name`, got {target!r}"
        )
    if (instance.section is None) != (instance.options is None):
        raise TypeError(f"target {instance.name!r}: `section` and `options` go together (both set or both None)")
    if instance.options is not None and not dataclasses.is_dataclass(instance.options):
        raise TypeError(f"target {instance.name!r}: `options` must be a dataclass")
    _REGISTRY[instance.name] = instance
    return target


def unregister_target(name: str) -> Target:
    """Remove the target `name` from the registry and return it (e.g. to replace a built-in, or after a test)."""
    _load_builtins()
    if name not in _REGISTRY:
        raise SparsecError(f"no target {name!r} is registered; registered: {sorted(_REGISTRY)}")
    return _REGISTRY.pop(name)


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


def _load_entry_points() -> None:
    """Register the group's targets not registered yet (read on every lookup, so a package installed or put on
    `sys.path` since the last one is found)."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        loaded = ep.load()
        if getattr(loaded, "name", None) != ep.name:
            raise SparsecError(
                f"entry point {ep.name!r} ({ep.value}) in group {ENTRY_POINT_GROUP} loads a target named "
                f"{getattr(loaded, 'name', None)!r}; the entry point's name must be the target's"
            )
        register_target(loaded)


def available_targets() -> dict[str, Target]:
    """Every registered target by name, sorted: the built-in modules, entry points, `register_target` calls."""
    _load_builtins()
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_target(name: str) -> Target:
    """The target registered as `name`; `SparsecError` naming every registered target otherwise."""
    targets = available_targets()
    if name not in targets:
        raise SparsecError(f"--target {name!r}: choose one of {list(targets)}")
    return targets[name]
