"""A program's architecture as a model config states it: blocks, hidden width, and per block its attention heads,
FFN width and experts, read from the graph (the matchers of `regions`, `heads`, `experts`), never from a config.

Heads come from the shapes of every attention core (`head_shapes`), prunable or not. After compression the
original config no longer describes the model: this is what does (`report.json`'s
`architecture`, the compile summary's `result` line), and what a target that writes a Hugging Face checkpoint
rewrites the config from. Values the blocks of a stack share are stated once (`Architecture.uniform`).

Example::

    arch = architecture(program)
    arch.describe()   # '3 blocks (model.layers); hidden 64; heads 4, kv heads 2, head dim 16; FFN 512'
    arch.uniform("ffn")   # 512, or None where the blocks differ
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsec.analysis.experts import find_experts
from sparsec.analysis.heads import head_shapes
from sparsec.analysis.match import NoMatch
from sparsec.analysis.regions import region_index

BLOCK_FIELDS = ("heads", "kv_heads", "head_dim", "ffn", "experts", "top_k", "expert_ffn")


@dataclass(frozen=True)
class BlockShape:
    """One block: `heads` / `kv_heads` / `head_dim` of its attention (None: it has none), `ffn` the intermediate
    width of its dense FFN (None: none), `experts` / `top_k` / `expert_ffn` of its MoE (None: none)."""

    path: str
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    ffn: int | None = None
    experts: int | None = None
    top_k: int | None = None
    expert_ffn: int | None = None


@dataclass(frozen=True)
class Architecture:
    """`hidden`: the residual stream's width (None where it cannot be told); `stack`: the path of the program's main
    block stack ('' without one) and `blocks` its blocks in order; `unread`: what is there but could not be read
    (a block's None then means unknown, not absent), with why."""

    hidden: int | None
    stack: str
    blocks: tuple[BlockShape, ...]
    unread: tuple[str, ...] = ()

    def uniform(self, field: str) -> int | None:
        """`field` (one of `BLOCK_FIELDS`) where every block has the same value, else None."""
        values = set(self.values(field))
        return values.pop() if len(values) == 1 else None

    def values(self, field: str) -> list[int | None]:
        """`field` of every block, in order."""
        return [getattr(b, field) for b in self.blocks]

    def to_dict(self) -> dict:
        """JSON-ready: the stack, its number of blocks, the hidden width, and each of `BLOCK_FIELDS` as one value
        where the blocks share it, else as the list of every block's."""
        out: dict = {"stack": self.stack, "blocks": len(self.blocks), "hidden": self.hidden}
        for field in BLOCK_FIELDS:
            values = self.values(field)
            out[field] = values[0] if len(set(values)) == 1 else values
        if self.unread:
            out["unread"] = list(self.unread)
        return out

    def describe(self) -> str:
        """One line: blocks, hidden width, heads, FFN and experts; per-block values as their range."""
        parts = [f"{len(self.blocks)} blocks" + (f" ({self.stack})" if self.stack else ""), f"hidden {self.hidden}"]
        heads = ", ".join(
            f"{label} {self._span(field)}"
            for label, field in (("heads", "heads"), ("kv heads", "kv_heads"), ("head dim", "head_dim"))
            if any(v is not None for v in self.values(field))
        )
        if heads:
            parts.append(heads)
        if any(v is not None for v in self.values("ffn")):
            parts.append(f"FFN {self._span('ffn')}")
        if any(v is not None for v in self.values("experts")):
            parts.append(
                f"{self._span('experts')} experts (top {self._span('top_k')}, FFN {self._span('expert_ffn')} each)"
            )
        if self.unread:
            parts.append(f"{len(self.unread)} unread ({self.unread[0]}{', ...' if len(self.unread) > 1 else ''})")
        return "; ".join(parts)

    def _span(self, field: str) -> str:
        values = self.values(field)
        known = [v for v in values if v is not None]
        text = str(known[0]) if len(set(known)) == 1 else f"{min(known)}-{max(known)} (per block)"
        return text + (" (some blocks none)" if len(known) < len(values) else "")


def architecture(program) -> Architecture:
    """The `Architecture` of `program` (module docstring). Its main block stack is the one with the most blocks."""
    regions = region_index(program)
    stacks = sorted(regions.block_stacks(), key=lambda s: len(s.blocks), reverse=True)
    if not stacks:
        return Architecture(_hidden_width(program), "", (), ())
    stack = stacks[0]
    heads, ffns, experts = head_shapes(program), regions.ffns(), find_experts(program)
    blocks, unread = [], []
    for block in stack.blocks:

        def inside(path: str, block_path: str = block.path) -> bool:
            return path == block_path or path.startswith(block_path + ".")

        found = {}
        attention = next((shape for path, shape in heads.items() if inside(path)), None)
        if isinstance(attention, NoMatch):
            unread.append(f"{block.path}: attention heads not read ({attention.rule})")
        elif attention is not None:
            found.update(heads=attention.heads, kv_heads=attention.kv_heads, head_dim=attention.head_dim)
        moe = next((e for e in experts if inside(e.path)), None)
        if moe is not None:
            found.update(experts=moe.num_experts, top_k=moe.top_k, expert_ffn=moe.intermediate_size)
        dense = [f for f in ffns if inside(f.path) and (moe is None or not f.path.startswith(moe.path))]
        if dense:
            found["ffn"] = dense[0].intermediate_size
        blocks.append(BlockShape(block.path, **found))
    return Architecture(_hidden_width(program, stack), stack.path, tuple(blocks), tuple(unread))


def _hidden_width(program, stack=None) -> int | None:
    """The residual stream's width: the last dimension of the first block's output, or without blocks the width
    of the first token embedding table the program reads (`aten.embedding` of a state tensor)."""
    outputs = stack.blocks[0].outputs() if stack is not None else []
    value = outputs[-1].meta.get("val") if outputs else None
    if isinstance(value, torch.Tensor) and value.dim() >= 2:
        return int(value.shape[-1])
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.embedding.default:
            name = program.state_name(node.args[0])
            if name is not None:
                return int(program.state_shape(name)[-1])
    return None


def as_report(program) -> dict:
    """`architecture(program).to_dict()` plus its one-line `summary`."""
    arch = architecture(program)
    return {**arch.to_dict(), "summary": arch.describe()}
