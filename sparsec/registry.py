"""One registry for everything sparsec finds by name: passes, targets and model families.

A `Registry` holds named items (each has a `name`) from three sources, in this order:

1. built-ins: a loader the registry calls once, on first use (e.g. the modules of `sparsec/families/`);
2. installed packages: the registry's entry-point group (`sparsec.passes`, `sparsec.targets`,
   `sparsec.families`), read lazily on first use and again when `sys.path` has changed since (a package put on
   the path later is found). An entry point's name is the name of the item it loads (or of one of them, for a
   tuple of items);
3. `register(item)` calls (also a decorator), after the built-ins and installed ones.

Duplicates are refused: registering a name that is taken raises an error naming both sources, unless it is the
same definition again (the same object, or a class of the same module and qualified name: a module reloaded, a
notebook cell run again), which replaces the old one quietly, or `replace=True` says to replace it. `unregister`
removes a name; `temporarily(...)` registers for the length of a `with` block and restores the registry as it
was after it (what tests use, so that nothing they register outlives them).

Example::

    from sparsec.transform.pass_manager import PASS_REGISTRY, register_pass

    register_pass(MyPass)                         # or @register_pass on the class
    register_pass(MyDropLayers, replace=True)     # a name that is taken: only when asked
    with PASS_REGISTRY.temporarily(SkipFfn):      # in a test: gone again after the block
        ...
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Generic, TypeVar

from sparsec.errors import SparsecError

T = TypeVar("T")


@dataclass(frozen=True)
class _Entry(Generic[T]):
    item: T  # what lookups return
    given: Any  # what was registered (a class the item was made from, or the item): tells a redefinition
    source: str  # where it came from, for the duplicate error


class Registry(Generic[T]):
    """Items of one kind by name; see the module docstring for sources, order and the duplicate policy.

    Args:
        kind: what an item is, in messages (`pass`, `target`, `model family`).
        plural: the plural for listings in messages (`passes`).
        group: the entry-point group installed packages register under.
        builtins: called once on first use to register the built-ins (through `register`).
        prepare: turns what `register` is given into the item and checks it against the other registered items
            (`(given, others) -> item`); raises `TypeError` or `error` for an unfit one.
        error: the `SparsecError` subclass raised for an unknown name, a duplicate or a bad entry point.
    """

    def __init__(
        self,
        kind: str,
        plural: str,
        group: str,
        builtins: Callable[[], None] | None = None,
        prepare: Callable[[Any, Mapping[str, T]], T] | None = None,
        error: type[SparsecError] = SparsecError,
    ) -> None:
        self.kind = kind
        self.plural = plural
        self.group = group
        self.error = error
        self._builtins = builtins
        self._prepare = prepare
        self._entries: dict[str, _Entry[T]] = {}
        self._loaded_entry_points: set[tuple[str, str]] = set()
        self._builtins_loaded = False
        self._scanned_path: tuple[str, ...] | None = None
        self._discovering = False

    # ----- registering ----------------------------------------------------------------------------------
    def register(self, given: Any = None, /, *, replace: bool = False, source: str | None = None) -> Any:
        """Register `given` under its `name` and return it (so it works as a class decorator, also as
        `@register(replace=True)`).

        Raises:
            error: the name is taken by another definition and `replace` is False (the message names both).
            TypeError: `given` is not an item of this kind (`prepare` says why).
        """
        if given is None:
            return lambda cls: self.register(cls, replace=replace, source=source)
        self._discover()
        self._add(given, replace=replace, source=source or _describe(given))
        return given

    def unregister(self, name: str) -> T:
        """Remove `name` and return its item (e.g. to replace a built-in with no trace of it)."""
        self._discover()
        if name not in self._entries:
            raise self.error(
                f"no {self.kind} {name!r} is registered; registered {self.plural}: {sorted(self._entries)}"
            )
        return self._entries.pop(name).item

    @contextmanager
    def temporarily(self, *given: Any, replace: bool = False) -> Iterator[list[T]]:
        """Register `given` (none: only protect the registry) for the block; yield their items. Afterwards the
        registry is as it was before, whatever the block registered, replaced or removed."""
        self._discover()
        saved = dict(self._entries), set(self._loaded_entry_points), self._scanned_path
        try:
            yield [self._add(g, replace=replace, source=_describe(g)) for g in given]
        finally:
            self._entries, self._loaded_entry_points, self._scanned_path = saved[0], saved[1], saved[2]

    # ----- looking up -----------------------------------------------------------------------------------
    def get(self, name: str) -> T:
        """The item called `name`; `error` listing the registered names otherwise."""
        self._discover()
        if name not in self._entries:
            raise self.error(
                f"unknown {self.kind} {name!r}; registered {self.plural}: {sorted(self._entries) or 'none'}"
            )
        return self._entries[name].item

    def items(self) -> dict[str, T]:
        """Every registered item by name, in registration order (built-ins, entry points, `register` calls)."""
        self._discover()
        return {name: entry.item for name, entry in self._entries.items()}

    def source(self, name: str) -> str:
        """Where `name` was registered from (a module, an entry point and its package, a `register` call)."""
        self.get(name)
        return self._entries[name].source

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._entries

    # ----- internals ------------------------------------------------------------------------------------
    def _add(self, given: Any, replace: bool, source: str) -> T:
        others = {n: e.item for n, e in self._entries.items()}
        name = getattr(given, "name", None)
        if isinstance(name, str):
            others.pop(name, None)
        item = self._prepare(given, others) if self._prepare is not None else given
        name = getattr(item, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"a {self.kind} needs a non-empty string `name`; {given!r} has {name!r}")
        old = self._entries.get(name)
        if old is not None and not replace and not _same_definition(old.given, given):
            raise self.error(
                f"a {self.kind} named {name!r} is registered already, from {old.source}; {source} registers "
                f"another: give it another name, or pass replace=True to replace the registered one"
            )
        self._entries[name] = _Entry(item, given, source)
        return item

    def _discover(self) -> None:
        """Register the built-ins (once) and the entry points not loaded yet, when `sys.path` changed since the
        last look. All or nothing for each: an entry point that fails leaves none of this look's entry points
        registered (and the built-ins in place)."""
        path = tuple(sys.path)
        if self._discovering or (self._builtins_loaded and self._scanned_path == path):
            return
        self._discovering = True
        try:
            if not self._builtins_loaded:
                self._all_or_nothing(self._builtins or (lambda: None))
                self._builtins_loaded = True
            self._all_or_nothing(self._load_entry_points)
            self._scanned_path = path
        finally:
            self._discovering = False

    def _all_or_nothing(self, register: Callable[[], None]) -> None:
        saved = dict(self._entries), set(self._loaded_entry_points)
        try:
            register()
        except BaseException:
            self._entries, self._loaded_entry_points = saved
            raise

    def _load_entry_points(self) -> None:
        for ep in sorted(entry_points(group=self.group), key=lambda e: (e.name, e.value)):
            if (ep.name, ep.value) not in self._loaded_entry_points:
                self._load_entry_point(ep)

    def _load_entry_point(self, ep: EntryPoint) -> None:
        dist = getattr(getattr(ep, "dist", None), "name", None)
        where = f"entry point {ep.name} = {ep.value} (group {self.group}{f', package {dist}' if dist else ''})"
        try:
            loaded = ep.load()
        except Exception as exc:
            raise self.error(f"{where} failed to load ({type(exc).__name__}: {exc}); fix or uninstall it") from exc
        given = tuple(loaded) if isinstance(loaded, (tuple, list)) else (loaded,)
        names = [getattr(g, "name", None) for g in given]
        if ep.name not in names:
            raise self.error(
                f"{where} loads no {self.kind} named {ep.name!r} (it loads {names}); name the entry point after the "
                f"{self.kind} it registers"
            )
        for g in given:
            self._add(g, replace=False, source=where)
        self._loaded_entry_points.add((ep.name, ep.value))


def _same_definition(old: Any, new: Any) -> bool:
    """Whether `new` is `old` again: the same object, an equal one, or a class of the same module and name."""
    if old is new:
        return True
    if isinstance(old, type) and isinstance(new, type):
        return (old.__module__, old.__qualname__) == (new.__module__, new.__qualname__)
    return not isinstance(old, type) and not isinstance(new, type) and type(old) is type(new) and old == new


def _describe(given: Any) -> str:
    """Where a `register` call's argument comes from: its class, and its name for an instance."""
    if isinstance(given, type):
        return f"{given.__module__}.{given.__qualname__}"
    return f"{type(given).__module__}.{type(given).__qualname__} {getattr(given, 'name', None)!r}"
