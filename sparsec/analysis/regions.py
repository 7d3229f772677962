"""Regions: the graph seen through the model's module tree.

Every call node of a captured program carries `meta["nn_module_stack"]`, the modules it was called under.
A *region* is a module path (`model.layers.3`) and the nodes computed under it; its parameters are the
state whose name starts with that path. Module stacks sometimes skip a level (QwenImage, Janus' vision
encoder: a node under `encoder.layers.0.mlp.fc1` with no `encoder` entry); every ancestor of every path
on the stack is therefore a region too, so queries never depend on which levels the stack kept.

Example::
    layer = region_index(program).region("model.layers.3")
    [n.name for n in layer.inputs()]          # residual stream in, rotary cos/sin, mask
    region_index(program).blocks("model.layers.*")   # the decoder blocks, in order
    region_index(program).ffns("**.mlp")             # structural FFNs (gated or plain) under any `mlp`
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property

from torch.fx import Node

from sparsec.analysis.ffn import Ffn, ffn_misses, find_ffns
from sparsec.analysis.vocabulary import module_stack
from sparsec.errors import PassError, SparsecError
from sparsec.ir.paths import ancestors, glob_match
from sparsec.ir.program import Program


@dataclass
class Region:
    """One module path of the program: its nodes (graph order), its state (parameters and buffers) and tag."""

    path: str
    type_name: str
    nodes: list[Node]
    parameters: list[str]
    tag: str
    _program: Program = field(repr=False)

    @cached_property
    def _node_set(self) -> set[Node]:
        return set(self.nodes)

    @property
    def index(self) -> int | None:
        """The position in its module list (`model.layers.3` -> 3), or None."""
        last = self.path.rsplit(".", 1)[-1]
        return int(last) if last.isdigit() else None

    def inputs(self) -> list[Node]:
        """Values computed outside the region that its nodes read (user inputs included, weights excluded)."""
        seen: dict[Node, None] = {}
        for node in self.nodes:
            for arg in node.all_input_nodes:
                if arg not in self._node_set and self._program.state_name(arg) is None:
                    seen[arg] = None
        return list(seen)

    def outputs(self) -> list[Node]:
        """Region nodes whose values are read outside the region (or are graph outputs)."""
        return [n for n in self.nodes if any(u not in self._node_set for u in n.users)]

    def num_parameters(self) -> int:
        names = set(self._program.parameter_names())
        return sum(self._program.state_shape(p).numel() for p in self.parameters if p in names)


@dataclass
class BlockStack:
    """A module list of repeated blocks (decoder layers, encoder layers, DiT blocks)."""

    path: str
    blocks: list[Region]


class RegionIndex:
    """Every module path of a program, with its nodes and state. Get it with `region_index(program)` (cached)."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self._types: dict[str, str] = {}
        self._nodes: dict[str, list[Node]] = defaultdict(list)
        for node in program.graph.nodes:
            if node.op != "call_function":
                continue
            owners: dict[str, None] = {}
            for path, typ in module_stack(node):
                self._types[path] = typ
                for prefix in ancestors(path):
                    owners[prefix] = None
            for prefix in owners:
                self._types.setdefault(prefix, "")
                self._nodes[prefix].append(node)
        self._state: dict[str, list[str]] = defaultdict(list)
        for name in program.state_placeholders():
            for prefix in ancestors(name.rsplit(".", 1)[0] if "." in name else ""):
                self._state[prefix].append(name)
                self._types.setdefault(prefix, "")

    @property
    def paths(self) -> list[str]:
        return sorted(self._types)

    def __contains__(self, path: str) -> bool:
        return path in self._types

    def region(self, path: str) -> Region:
        """The region at exactly `path`; a clear error (with close matches) if there is none."""
        if path not in self._types:
            close = difflib.get_close_matches(path, self.paths, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise SparsecError(f"no module path {path!r} in the program{hint}")
        return Region(
            path=path,
            type_name=self._types[path],
            nodes=self._nodes.get(path, []),
            parameters=list(self._state.get(path, [])),
            tag=self.program.tagger.tag(path),
            _program=self.program,
        )

    def match(self, pattern: str) -> list[Region]:
        """All regions whose path matches the glob (see `sparsec.ir.paths`), outermost first."""
        return [self.region(p) for p in self.paths if glob_match(p, pattern)]

    def block_stacks(self) -> list[BlockStack]:
        """Module lists of blocks: paths `X.<int>` of one type whose nodes come from submodules.

        Lists of bare leaves (a ModuleList of Linear layers) are not block stacks.
        """
        groups: dict[str, list[str]] = defaultdict(list)
        for path in self._types:
            parent, _, last = path.rpartition(".")
            if last.isdigit() and parent:
                groups[parent].append(path)
        stacks = []
        for parent, paths in sorted(groups.items()):
            paths.sort(key=lambda p: int(p.rsplit(".", 1)[1]))
            has_children = all(any(q.startswith(p + ".") for q in self._types) for p in paths)
            if has_children and len({self._types[p] for p in paths} - {""}) <= 1:
                stacks.append(BlockStack(parent, [self.region(p) for p in paths]))
        return stacks

    def blocks(self, where: str = "**") -> list[Region]:
        """Blocks of every block stack whose block paths match `where` (e.g. `model.layers.*`)."""
        return [b for s in self.block_stacks() for b in s.blocks if glob_match(b.path, where)]

    def ffns(self, where: str = "**") -> list[Ffn]:
        """Feed-forward networks found by graph structure (see `sparsec.analysis.ffn.find_ffns`)."""
        return [f for f in self.program.analysis(find_ffns) if glob_match(f.path, where)]

    def require_ffns(self, where: str, who: str) -> list[Ffn]:
        """`ffns(where)`, or a `PassError` from pass `who` listing the model's FFNs and, for the candidates
        closest to `where` (linears under it, else the nearest paths), why they are not FFNs."""
        ffns = self.ffns(where)
        if not ffns:
            known = [f.path for f in self.ffns()]
            listing = f"{known[:6]}{' ...' if len(known) > 6 else ''}" if known else "none"
            misses = ffn_misses(self.program)
            close = [m for m in misses if any(glob_match(p, where) for p in ancestors(m.path))]
            if not close:
                near = set(difflib.get_close_matches(where, [m.path for m in misses], n=3, cutoff=0.0))
                close = [m for m in misses if m.path in near]
            reasons = "; ".join(str(m) for m in close[:3])
            raise PassError(
                f"{who}: where={where!r} matches no FFN; FFNs in this model: {listing}"
                + (f". Closest candidates: {reasons}" if reasons else "")
            )
        return ffns

    def tags(self) -> dict[str, str]:
        """Tag of every region path."""
        return {p: self.program.tagger.tag(p) for p in self.paths}


def region_index(program: Program) -> RegionIndex:
    """The `RegionIndex` of the program's current graph, computed once per graph version (`Program.analysis`)."""
    return program.analysis(RegionIndex)


def block_boundaries(program: Program) -> list[Node]:
    """The last output node of every block of every block stack, in graph order: the cuts of layer-sequential
    calibration (`CalibrationSet.cuts`, `Program.run_segmented`), so that between two blocks only the values
    crossing the boundary (the residual stream, masks, rotary tables) are held for all batches."""
    position = {n: i for i, n in enumerate(program.graph.nodes)}
    cuts = {block.outputs()[-1] for block in region_index(program).blocks() if block.outputs()}
    return sorted(cuts, key=position.__getitem__)
