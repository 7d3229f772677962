"""Component tags: which part of a unified model a region belongs to.

Every module path gets one tag out of `understanding`, `generation` or `shared`, decided by an ordered list
of rules `(glob, tag)`: the first rule that matches the path or one of its ancestors wins, and nothing
matching means `shared`. Family defaults come from `sparsec.families`; user rules (the recipe's `tags:`
section) are put in front of them, so they override.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sparsec.ir.paths import ancestors, glob_match

COMPONENTS = ("understanding", "generation", "shared")


@dataclass(frozen=True)
class TagRule:
    glob: str
    tag: str

    def __post_init__(self) -> None:
        if self.tag not in COMPONENTS:
            raise ValueError(f"tag: must be one of {list(COMPONENTS)}, got {self.tag!r}")


class Tagger:
    """Ordered tag rules.

    Example:
        >>> t = Tagger([TagRule("model.vision_model", "understanding")])
        >>> t.tag("model.vision_model.encoder.layers.0.mlp"), t.tag("model.language_model")
        ('understanding', 'shared')
    """

    def __init__(self, rules: Iterable[TagRule] = ()) -> None:
        self.rules: list[TagRule] = list(rules)

    def tag(self, path: str) -> str:
        for rule in self.rules:
            if any(glob_match(p, rule.glob) for p in ancestors(path)):
                return rule.tag
        return "shared"

    def with_overrides(self, rules: Sequence[TagRule]) -> Tagger:
        return Tagger([*rules, *self.rules])

    def to_list(self) -> list[dict[str, str]]:
        return [{"glob": r.glob, "tag": r.tag} for r in self.rules]

    @classmethod
    def from_list(cls, items: Iterable[dict[str, str]]) -> Tagger:
        return cls(TagRule(i["glob"], i["tag"]) for i in items)
