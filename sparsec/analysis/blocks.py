"""Residual blocks found in the graph itself, not by module class names.

A block (decoder layer, encoder layer) hands on its residual streams (one; two in a dual-stream MMDiT block), each
built by a chain of adds `stream = stream + sublayer(stream)`, where a post-norm block (BERT, the original
Transformer) normalizes the stream after each add (`stream = layer_norm(stream + sublayer(stream))`).
`match_residual_block` finds those chains and classifies each sublayer as `attn` (it holds an attention op), `mlp`
(it holds an FFN, `sparsec.analysis.ffn`, or MoE experts) or `parallel` (both: a parallel-residual block,
GPT-NeoX / Phi / Falcon, adds `attn(x) + mlp(x)` to the stream once). This is the dependency model depth rewrites
use: dropping a sublayer means replacing its add by the stream it adds to; dropping a block, replacing its output
by its input. A block that is no residual chain is a `NoMatch` naming the rule and the node that broke it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.fx import Node

from sparsec.analysis.experts import find_experts
from sparsec.analysis.ffn import Ffn
from sparsec.analysis.match import Mismatch, NoMatch
from sparsec.analysis.regions import Region, region_index
from sparsec.analysis.vocabulary import METADATA_ASSERT, VIEW_OPS, describe, skip_passthrough

aten = torch.ops.aten

ATTENTION_OPS = frozenset(
    {
        aten.scaled_dot_product_attention.default,
        aten._softmax.default,
        aten.softmax.int,
        aten._safe_softmax.default,
    }
)


@dataclass(frozen=True)
class Sublayer:
    """One residual branch of a block: `residual_add = stream_in + branch`.

    Attributes:
        kind: `attn` (holds an attention op), `mlp` (holds an FFN), `parallel` (both, added to the stream by
            one add: a parallel-residual block) or `other`.
        residual_add: the add that puts the branch on the stream.
        stream_in: the residual stream the branch reads and is added to.
        branch: the branch's output (e.g. the o_proj / down_proj linear).
        nodes: the branch's nodes inside the block (norm, projections, ...), graph order.
    """

    kind: str
    residual_add: Node
    stream_in: Node
    branch: Node
    nodes: tuple[Node, ...]


@dataclass(frozen=True)
class ResidualBlock:
    """One residual stream of a block: `output = input + sublayer_1(...) + ... + sublayer_n(...)`.

    `norms`: the layer norms a post-norm block applies to the stream after its residual adds (empty for
    pre-norm blocks); they belong to no sublayer, so dropping a sublayer keeps them.
    """

    path: str
    input: Node
    output: Node
    sublayers: tuple[Sublayer, ...]
    norms: tuple[Node, ...] = ()

    def sublayer(self, kind: str) -> Sublayer | None:
        found = [s for s in self.sublayers if s.kind == kind]
        return found[0] if len(found) == 1 else None


def _branch_nodes(branch: Node, stream_in: Node, inside: set[Node]) -> list[Node]:
    seen, stack = set(), [branch]
    while stack:
        node = stack.pop()
        if node in seen or node is stream_in or node not in inside:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return [n for n in branch.graph.nodes if n in seen]


def match_residual_block(
    region: Region, ffns: list[Ffn], experts: Sequence[Node] = ()
) -> list[ResidualBlock] | NoMatch:
    """The residual structure of a block region, one chain per stream it hands on, or the rule its structure
    breaks and the node that broke it.

    A decoder layer hands on one stream; a dual-stream MMDiT block (Qwen-Image, SD3, Flux) two, image and text,
    whose attention branches share one joint attention op. `ffns`: the program's FFNs (`find_ffns`), which
    tell MLP sublayers apart, and so do `experts`: the outputs of MoE blocks' routed experts
    (`sparsec.analysis.experts.find_experts`).
    """
    inside = set(region.nodes)
    # symbolic sizes (`s0 * s1`) computed in one block and reused by later ones are not part of the stream
    outputs = [
        n for n in region.outputs() if n.target is not METADATA_ASSERT and isinstance(n.meta.get("val"), torch.Tensor)
    ]
    if not outputs:
        return NoMatch("residual block", region.path, "it hands on no tensor")
    down_nodes = {f.down for f in ffns}
    try:
        return [_residual_chain(region.path, inside, output, down_nodes, set(experts)) for output in outputs]
    except Mismatch as miss:
        return miss.no_match("residual block", region.path)


def _stream_step(node: Node, inside: set[Node]) -> Node | None:
    """The residual add a stream node is computed from, if it is a layer norm of one (a post-norm block,
    BERT) or a per-token relayout of one (OPT flattens the stream to [tokens, hidden] for its FFN); else None."""
    if node.op != "call_function" or not isinstance(node.args[0] if node.args else None, Node):
        return None
    source = skip_passthrough(node.args[0])
    if source not in inside:
        return None
    if node.target is aten.layer_norm.default:
        pass
    elif node.target in VIEW_OPS:
        value, before = node.meta.get("val"), source.meta.get("val")
        if (
            not (isinstance(value, torch.Tensor) and isinstance(before, torch.Tensor))
            or value.shape[-1:] != before.shape[-1:]
        ):
            return None
    else:
        return None
    if source.target is aten.add.Tensor or _stream_step(source, inside) is not None:
        return source
    return None


def _reads(node: Node, value: Node, inside: set[Node]) -> bool:
    """Whether `node` is computed from `value` within the block."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is value:
            return True
        if n in seen or n not in inside:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _residual_chain(
    path: str, inside: set[Node], output: Node, down_nodes: set[Node], experts: set[Node]
) -> ResidualBlock:
    """The chain of residual adds from the block output `output` back to a value from before the block."""
    chain: list[Sublayer] = []
    norms: list[Node] = []

    def on_stream(n: Node) -> bool:  # an earlier residual add, or its post-norm or relayout
        return n.target is aten.add.Tensor or _stream_step(n, inside) is not None

    node = skip_passthrough(output)
    while node in inside:
        source = _stream_step(node, inside)
        if source is not None:
            if node.target is aten.layer_norm.default:
                norms.append(node)
            node = source
            continue
        if node.target is not aten.add.Tensor:
            break
        a, b = node.args[:2]
        if not (isinstance(a, Node) and isinstance(b, Node)):
            break
        # the stream operand comes from outside the block or is an earlier residual add (casts looked through)
        sa, sb = skip_passthrough(a), skip_passthrough(b)
        # the branch is computed from the stream: it may end in an add (routed + shared experts) or a relayout
        if sa not in inside or (sb in inside and on_stream(sa) and (not on_stream(sb) or _reads(sb, sa, inside))):
            stream, branch, upstream = a, b, sa
        elif sb not in inside or on_stream(sb):
            stream, branch, upstream = b, a, sb
        else:
            break
        nodes = _branch_nodes(branch, stream, inside)
        attention = any(n.target in ATTENTION_OPS for n in nodes)
        ffn = any(n in down_nodes for n in nodes)
        if any(n in experts for n in nodes):  # an MoE block (its router's softmax is no attention)
            kind = "mlp"
        else:
            kind = "parallel" if attention and ffn else "attn" if attention else "mlp" if ffn else "other"
        chain.append(Sublayer(kind, node, stream, branch, tuple(nodes)))
        node = upstream
    if not chain or node in inside:
        start = f"its output {output.name} ({output.target})"
        if not chain:
            rule = f"{start} is not a residual add `stream + sublayer(stream)` of a value from before the block"
        elif node.target is aten.add.Tensor:
            rule = (
                f"{start} is not a chain of residual adds back to the block input: {node.name} adds two values "
                "computed inside the block, neither of them a residual stream"
            )
        else:
            rule = (
                f"{start} is not a chain of residual adds back to the block input: it stops at "
                f"{describe(node)}, computed inside the block"
            )
        raise Mismatch(rule, node)
    return ResidualBlock(path, node, output, tuple(reversed(chain)), tuple(reversed(norms)))


class ResidualStructure:
    """`match_residual_block` of a program's blocks, each computed once per graph version; get it with
    `residual_structure(program)` (cached by `Program.analysis`, so a recompile invalidates it)."""

    def __init__(self, program) -> None:
        self.program = program
        self._streams: dict[str, list[ResidualBlock] | NoMatch] = {}

    def streams(self, path: str) -> list[ResidualBlock] | NoMatch:
        """The residual streams of the block region at `path`, or why it has no residual structure."""
        if path not in self._streams:
            regions = region_index(self.program)
            experts = [e.output for e in find_experts(self.program)]
            self._streams[path] = match_residual_block(regions.region(path), regions.ffns(), experts)
        return self._streams[path]


def residual_structure(program) -> ResidualStructure:
    """The program's `ResidualStructure` at its current graph version."""
    return program.analysis(ResidualStructure)
