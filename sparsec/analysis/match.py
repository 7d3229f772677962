"""How a structural matcher says no: a returned `NoMatch`, never an exception reaching its caller.

Every matcher of `sparsec.analysis` (`match_ffn`, `ffn_activation`, `match_residual_block`, `match_experts`,
`match_attention`, `hidden_channel_group`) returns what it found or a `NoMatch`: the pattern, where, the rule that
broke and the node that broke it. `sparsec inspect --why` lists those; a pass that cannot go on without the match
raises its own `PassError` with that reason. (A match that a rewrite then refuses, such as an FFN whose neurons are
read outside it, is the rewrite's `PassError`, not a `NoMatch`: `sparsec.analysis.dependency`.)

Deep inside a matcher (a walk over the graph, a helper three calls down), the rule breaks where the walk meets it:
there the matcher raises `Mismatch`, and its entry point catches it, once, and returns `miss.no_match(...)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Node


@dataclass(frozen=True)
class NoMatch:
    """Why a structural pattern did not match: the rule that broke and the node that broke it.

    Attributes:
        pattern: what was looked for (`FFN`, `residual block`).
        path: module path of the candidate (the linear tried as an FFN's down projection, the block).
        rule: the requirement that failed, in words.
        node: name of the node that broke it ('' when no single node did).
    """

    pattern: str
    path: str
    rule: str
    node: str = ""

    def __str__(self) -> str:
        article = "an" if self.pattern[:1] in "AEFIOU" else "a"  # an FFN, a residual block
        return f"{self.path or 'the top level'}: not {article} {self.pattern}: {self.rule}"


class Mismatch(Exception):
    """A matcher's rule broke at `node` (None when no single node broke it), raised where the matcher's walk meets
    it; the matcher's entry point catches it and returns `no_match`, so it never reaches the matcher's callers."""

    def __init__(self, rule: str, node: Node | None = None) -> None:
        super().__init__(rule)
        self.rule, self.node = rule, node

    def no_match(self, pattern: str, path: str) -> NoMatch:
        """The `NoMatch` the matcher of `pattern` returns for the candidate at `path`."""
        return NoMatch(pattern, path, self.rule, self.node.name if self.node is not None else "")
