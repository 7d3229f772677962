"""Deployment targets: the backends an artifact is built for, run on and checked against.

A target is a `Target` (`base.py`) registered by name in `TARGET_REGISTRY` (a `sparsec.registry.Registry`). Built-ins
are the modules of this package, each listing its targets in a `TARGETS` tuple (`onnxruntime.py`: `onnxruntime`,
`onnxruntime-cuda`; `tensorrt.py`: `tensorrt`; `aotinductor.py`: `aotinductor`; `pytorch.py`: `pytorch`): a new
backend is one new module here. Installed packages add targets through the `sparsec.targets` entry-point group
(`name = "package.module:OBJECT"`, a `Target` instance or a subclass taking no arguments), or at run time with
`register_target`. A name is registered once: another target under a taken name is refused unless
`register_target(target, replace=True)`.

Example::

    # pyproject.toml of a third-party package
    [project.entry-points."sparsec.targets"]
    onnx-file = "my_targets:OnnxFile"
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from sparsec.exporters.targets.base import InputSpec, Lowering, Runner, Target
from sparsec.registry import Registry

__all__ = [
    "ENTRY_POINT_GROUP",
    "TARGET_REGISTRY",
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


def _checked_target(target: Any, others: Mapping[str, Target]) -> Target:
    """`target` as an instance (a `Target` subclass taking no arguments is instantiated), checked complete.

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
    return instance


def _register_builtins() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            imported = importlib.import_module(f"{__name__}.{module.name}")
            for target in imported.TARGETS:
                TARGET_REGISTRY.register(target, source=f"built-in module {imported.__name__}")


TARGET_REGISTRY: Registry[Target] = Registry(
    "target", "targets", group=ENTRY_POINT_GROUP, builtins=_register_builtins, prepare=_checked_target
)
register_target = TARGET_REGISTRY.register  # a Target instance, or a subclass taking no arguments (a decorator)
unregister_target = TARGET_REGISTRY.unregister
get_target = TARGET_REGISTRY.get


def available_targets() -> dict[str, Target]:
    """Every registered target by name, sorted: the built-in modules, entry points, `register_target` calls."""
    return dict(sorted(TARGET_REGISTRY.items().items()))
