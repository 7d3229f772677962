"""Plain-text presentation of reports: aligned tables and pass decisions short enough to read.

Used by the command line (`sparsec compile --dry-run`) and by passes that describe their decisions their own way
(`DescribesDecisions`); the pass infrastructure renders nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class DescribesDecisions(Protocol):
    """A pass class whose decisions read better as lines of its own (`drop_layers`: its ranking)."""

    @classmethod
    def describe_decisions(cls, decisions: Any) -> list[str]: ...


def describe_decisions(pass_class: type, decisions: Any) -> list[str]:
    """The decisions of a pass of `pass_class` as indented lines: its own `describe_decisions` where it has one
    (`DescribesDecisions`), else `decision_lines`."""
    if isinstance(pass_class, DescribesDecisions):
        return pass_class.describe_decisions(decisions)
    return decision_lines(decisions)


def decision_lines(decisions: Any) -> list[str]:
    """A pass's `PassResult.decisions` as indented lines, for `sparsec compile --dry-run`.

    Each key and its value, long lists summarised as `<N items>` (decisions.json has them in full), and a list of
    records (one per FFN) as a table of their plain values (`table_lines`). A pass whose decisions read better
    otherwise describes them itself (`DescribesDecisions`), and may end with these lines for the rest.
    """
    if not isinstance(decisions, dict):
        decisions = {"decisions": decisions}
    lines = []
    for key, value in decisions.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(f"  {key}:")
            lines += table_lines([_plain_columns(compact(v)) for v in value], indent=4)
        else:
            lines.append(f"  {key}: {compact(value)}")
    return lines


def compact(value: Any, limit: int = 8) -> Any:
    """`value` with lists longer than `limit` (kept indices, expert membership) as `<N items>` and floats to 6
    significant digits: decisions short enough to read."""
    if isinstance(value, dict):
        return {k: compact(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return f"<{len(value)} items>" if len(value) > limit else [compact(v, limit) for v in value]
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


def _plain_columns(record: dict, prefix: str = "") -> dict[str, Any]:
    """`record`'s scalar values, nested records flattened (`importance.min`); lists and `<N items>` left out."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_plain_columns(value, f"{prefix}{key}."))
        elif not isinstance(value, list) and not (isinstance(value, str) and value.endswith(" items>")):
            out[f"{prefix}{key}"] = value
    return out


def table_lines(rows: Sequence[Mapping[str, Any]], width: int = 100, indent: int = 0) -> list[str]:
    """`rows` (records with the same keys) as aligned text columns no wider than `width`: columns that do not
    fit go to a further table below, which repeats the first column (the row's name).

    Example:
        >>> print("\\n".join(table_lines([{"pass": "drop_layers", "params": "181,312 -> 144,192"}])))
        pass         params
        drop_layers  181,312 -> 144,192
    """
    if not rows:
        return []
    keys = list(dict.fromkeys(k for row in rows for k in row))
    cells = {k: [k] + ["" if row.get(k) is None else str(row.get(k)) for row in rows] for k in keys}
    widths = {k: max(len(c) for c in cells[k]) for k in keys}
    groups: list[list[str]] = []
    for key in keys[1:]:
        if groups and indent + sum(widths[k] + 2 for k in [keys[0], *groups[-1], key]) - 2 <= width:
            groups[-1].append(key)
        else:
            groups.append([key])
    lines = []
    for group in groups or [[]]:
        columns = [keys[0], *group]
        for i in range(len(rows) + 1):
            lines.append(" " * indent + "  ".join(cells[k][i].ljust(widths[k]) for k in columns).rstrip())
    return lines
