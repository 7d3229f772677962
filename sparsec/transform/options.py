"""Typed option sections built from dataclasses: one validator for recipe sections and pass options.

A section is a dataclass. `parse_section(cls, data, where)` rejects unknown keys (listing the allowed
ones), checks each value against the field's annotation (`int`, `float`, `bool`, `str`, `Literal[...]`,
`X | None`, `list[...]`, `dict[..., ...]`, nested sections), then runs the dataclass's `__post_init__`, whose `ValueError`s
are range checks. Every error names the full key (`passes[0].drop_layers.ratio`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from sparsec.errors import RecipeError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if get_origin(tp) is dict:
        return f"mapping of {_type_name(get_args(tp)[0])} to {_type_name(get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _convert(value, option, where)
            except RecipeError:
                continue
        raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise RecipeError(f"{where}: {value!r} is not allowed; choose one of {list(get_args(tp))}")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = get_args(tp)
        return {_convert(k, key_type, where): _convert(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if tp is type(None):
        if value is None:
            return None
        raise RecipeError(f"{where}: expected null, got {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return parse_section(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, tp):
        return value
    raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def parse_section(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass `cls` from a mapping, with errors that name `where.key` and the allowed values."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping of options, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise RecipeError(f"{where}: unknown option(s) {unknown}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise RecipeError(f"{where}: missing required option(s) {missing}")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise RecipeError(f"{where}.{exc}" if str(exc)[:1].isidentifier() else f"{where}: {exc}") from exc


def describe_section(cls: type) -> list[tuple[str, str, Any]]:
    """(name, type, default) of each option, for `sparsec passes` and docs."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        )
        out.append((f.name, _type_name(hints[f.name]), default))
    return out


def as_dict(section: Any) -> dict[str, Any]:
    return dataclasses.asdict(section)


def check_keep(keep_ratio: float | None, keep: int | None, *, decided_elsewhere: bool = False) -> None:
    """The `ValueError`s of a pruning pass's `keep_ratio` / `keep` pair (for an options `__post_init__`): exactly
    one is given (or neither, when `decided_elsewhere`: a `kept` list pins the result), the ratio lies in (0, 1],
    the count is at least 1."""
    if keep_ratio is not None and keep is not None or (keep_ratio is None and keep is None and not decided_elsewhere):
        raise ValueError("give exactly one of keep_ratio, keep" + (" (or kept)" if decided_elsewhere else ""))
    if keep_ratio is not None and not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio: must be in (0, 1], got {keep_ratio}")
    if keep is not None and keep < 1:
        raise ValueError(f"keep: must be >= 1, got {keep}")
