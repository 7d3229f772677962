"""Module paths (`model.layers.3.mlp.down_proj`) and the glob language used everywhere to select them.

Globs: `*` matches within one path component, `**` matches across components (zero or more), `?` one
character, `[0-9]` a class, `{m-n}` a whole number from m to n. So `model.layers.*` is exactly the decoder
blocks, `**.mlp` every MLP, `model.layers.{1-26}.mlp` the MLPs of layers 1 to 26, and `model.vision_model.**`
everything under the vision tower.
"""

from __future__ import annotations

import functools
import re


@functools.lru_cache(maxsize=1024)
def compile_glob(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**.", i):
            out.append(r"(?:.*\.)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(r".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        elif pattern[i] == "{":
            end = pattern.find("}", i)
            bounds = pattern[i + 1 : end].split("-") if end > 0 else []
            if len(bounds) != 2 or not all(b.isdigit() for b in bounds) or int(bounds[0]) > int(bounds[1]):
                raise ValueError(f"glob {pattern!r}: '{{' starts a range of whole numbers {{m-n}} with m <= n")
            out.append("(?:" + "|".join(str(n) for n in range(int(bounds[0]), int(bounds[1]) + 1)) + ")")
            i = end + 1
        elif pattern[i] == "[":
            end = pattern.find("]", i)
            if end < 0:
                raise ValueError(f"unclosed '[' in glob {pattern!r}")
            out.append(pattern[i : end + 1].replace("[!", "[^"))
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def glob_match(path: str, pattern: str) -> bool:
    """True if module path `path` matches `pattern` (see the module docstring for the syntax)."""
    return compile_glob(pattern).match(path) is not None


def ancestors(path: str) -> list[str]:
    """`a.b.c` -> [`a`, `a.b`, `a.b.c`]. The root module (empty path) is not included."""
    parts = path.split(".") if path else []
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def normalize(path: str) -> str:
    """Strict-mode export writes `L['self'].model.layers[0]`; non-strict writes `model.layers.0`. Use the latter."""
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return re.sub(r"\['([^']+)'\]", r".\1", path).strip(".")
