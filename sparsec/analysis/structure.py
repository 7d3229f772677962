"""Structural patterns found in the graph itself, not by module class names.

Residual blocks: a block (decoder layer, encoder layer) hands on its residual streams (one; two in a
dual-stream MMDiT block), each built by a chain of adds `stream = stream + sublayer(stream)`, where a
post-norm block (BERT, the original Transformer) normalizes the stream after each add
(`stream = layer_norm(stream + sublayer(stream))`). `residual_streams` finds those chains and classifies each
sublayer as `attn` (it holds an attention op), `mlp` (it holds an FFN) or `parallel` (both: a parallel-residual
block, GPT-NeoX / Phi / Falcon, adds `attn(x) + mlp(x)` to the stream once). This is the dependency model depth
rewrites use: dropping a sublayer means replacing its add by the stream it adds to; dropping a block, replacing
its output by its input.

An FFN is found from its *down* projection backwards: a linear whose input is computed only by pointwise
ops from one or two other linears' outputs.

- gated (SwiGLU, GeGLU): `down(act(gate(x)) * up(x))`, gate and up reading the same `x`;
- plain (fc1 / act / fc2, as in ViT, SigLIP, MMDiT FeedForward): `down(act(up(x)))`;
- fused gated (Phi-3 `gate_up_proj`): one linear whose output is split in two halves (chunk / split),
  `down(act(half_g) * half_u)`.

Attention projections never match (a reshape or SDPA sits between them), and neither do chains whose
first projection also feeds something else (a timestep embedding read by every block's modulation), so
the finder is safe to run over a whole model.

Matchers say why: `match_ffn` and `match_residual_block` return a `NoMatch` (the rule broken, the node that
broke it) instead of nothing, and `ffn_misses` lists it for every linear no FFN holds (`sparsec inspect --why`).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.fx import Node

from sparsec.analysis.regions import Region, module_path, region_index
from sparsec.errors import PassError

aten = torch.ops.aten

LINEAR = aten.linear.default
PASSTHROUGH = frozenset(
    {aten.dropout.default, aten.clone.default, aten.alias.default, aten.to.dtype, aten._to_copy.default}
)
_ASSERT = aten._assert_tensor_metadata.default
SPLIT_OPS = frozenset({aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default})


def _is_half_split(node: Node) -> bool:
    """A split of the last dimension into two equal halves, or a `getitem` taking one of them."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return isinstance(node.args[0], Node) and _is_half_split(node.args[0])
    if node.target not in SPLIT_OPS:
        return False
    value = node.args[0].meta.get("val") if isinstance(node.args[0], Node) else None
    if value is None:
        return False
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if dim not in (-1, value.dim() - 1):
        return False
    width = value.shape[-1]
    size = node.args[1]
    if node.target is aten.chunk.default:
        return size == 2
    if node.target is aten.split.Tensor:
        return 2 * size == width
    return len(size) == 2 and size[0] == size[1]


def _is_pointwise(node: Node) -> bool:
    target = node.target
    return node.op == "call_function" and (
        target in PASSTHROUGH or (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags)
    )


def skip_passthrough(node: Node) -> Node:
    """Follow dtype casts, clones and (eval-mode) dropouts back to the value they pass through."""
    while node.op == "call_function" and node.target in PASSTHROUGH and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def skip_noop_casts(node: Node) -> Node:
    """Follow casts and copies that change neither dtype nor shape back to their source (same value)."""
    while (
        node.op == "call_function"
        and node.target in PASSTHROUGH - {aten.dropout.default}
        and isinstance(node.args[0], Node)
        and _same_dtype_and_shape(node, node.args[0])
    ):
        node = node.args[0]
    return node


def _same_dtype_and_shape(a: Node, b: Node) -> bool:
    from sparsec.ir.program import same_meta

    va = a.meta.get("val")
    return isinstance(va, torch.Tensor) and same_meta(va, b.meta.get("val"))


@dataclass(frozen=True)
class Ffn:
    """A feed-forward network in the graph.

    Attributes:
        path: common module path of its linears (`model.layers.0.mlp`).
        kind: `gated` or `plain`.
        input: the hidden-state node entering the FFN.
        up: linear producing the value branch (`up_proj`; `fc1` for plain FFNs).
        gate: linear feeding the activation (`gate_proj`), None for plain FFNs.
        down: the output linear (`down_proj` / `fc2`).
        interior: pointwise nodes between up/gate and down (activation, product, casts, the split).
        intermediate_size: number of neurons (rows of up; half of them for a fused gate_up).
        gate_half: for `fused_gated`, which half of `up`'s output (0 or 1) is the gate; None otherwise.
    """

    path: str
    kind: str
    input: Node
    up: Node
    gate: Node | None
    down: Node
    interior: tuple[Node, ...]
    intermediate_size: int
    gate_half: int | None = None

    def row_blocks(self, role: str) -> tuple[int, int]:
        """(offset, size) of the rows of `up`'s weight that hold the `gate` or `up` half (fused) or all rows."""
        if self.gate_half is None:
            return 0, self.intermediate_size
        half = self.gate_half if role == "gate" else 1 - self.gate_half
        return half * self.intermediate_size, self.intermediate_size

    def describe(self) -> str:
        """`model.layers.0.mlp`, or where it is for an FFN of the top-level module."""
        return self.path or f"at the top level (output {self.down.name})"

    @property
    def linears(self) -> dict[str, Node]:
        roles = {"up": self.up, "down": self.down}
        if self.gate is not None:
            roles["gate"] = self.gate
        return roles

    def escaping_nodes(self) -> list[Node]:
        """Intermediate values (width `intermediate_size`) read by something outside the FFN.

        A width rewrite must refuse when this is not empty: slicing would change what those readers see.
        """
        inside = set(self.interior) | {self.down}
        produced = [self.up, *([self.gate] if self.gate is not None else []), *self.interior]
        return [n for n in produced if any(u not in inside and u.target is not _ASSERT for u in n.users)]


def _common_path(nodes: list[Node]) -> str:
    """Longest common module path; a container (`net` of `net.0`, `net.2`) gives way to its owner."""
    parts = [module_path(n).split(".") for n in nodes]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    if common and all(len(p) > len(common) and p[len(common)].isdigit() for p in parts):
        common.pop()
    return ".".join(common)


def _pointwise_cone(root: Node) -> tuple[list[Node], list[Node], Node | None]:
    """The linears feeding `root` through pointwise ops only, the pointwise nodes in between, and the first
    node of any other kind (view, matmul, softmax, a split not into halves, ...) met on the way, else None."""
    linears: list[Node] = []
    interior: list[Node] = []
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_function" and node.target is LINEAR:
            linears.append(node)
        elif _is_pointwise(node) or _is_half_split(node):
            interior.append(node)
            stack.extend(node.all_input_nodes)
        elif node.op == "placeholder" and getattr(node.meta.get("val"), "ndim", None) == 0:
            continue  # a lifted scalar constant
        else:
            return linears, interior, node
    return linears, interior, None


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


def _describe(node: Node) -> str:
    return f"{node.name} ({getattr(node.target, '__name__', node.target)})" if node.op == "call_function" else node.name


def _split_source(node: Node) -> Node | None:
    """The split a node is (or takes an item of), None if it is no split."""
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], Node):
        node = node.args[0]
    return node if node.op == "call_function" and node.target in SPLIT_OPS else None


def _cone_rule(down: Node, blocker: Node) -> NoMatch:
    path = module_path(down)
    split = _split_source(blocker)
    if split is not None:
        return NoMatch(
            "FFN",
            path,
            f"the input of {down.name} splits {_describe(split)} but not into two halves of "
            "the last dimension, as a fused gate_up projection is",
            split.name,
        )
    return NoMatch(
        "FFN",
        path,
        f"the input of {down.name} is not computed by pointwise ops from one or two linears: "
        f"{_describe(blocker)} lies on the way",
        blocker.name,
    )


def _product_sides(down: Node, hidden: Node, look_through) -> list[tuple[list[Node], list[Node]]] | NoMatch:
    """The pointwise cones of the two factors of `hidden` (a product), or why they are not an FFN's."""
    path = module_path(down)
    if hidden.target is not aten.mul.Tensor or not all(isinstance(a, Node) for a in hidden.args[:2]):
        return NoMatch(
            "FFN",
            path,
            f"the input of {down.name} is not a product act(gate) * up: it is {_describe(hidden)}",
            hidden.name,
        )
    sides = []
    for arg in hidden.args[:2]:
        linears, interior, blocker = _pointwise_cone(look_through(arg))
        if blocker is not None:
            return _cone_rule(down, blocker)
        sides.append((linears, interior))
    return sides


def match_ffn(down: Node) -> Ffn | NoMatch:
    """The FFN whose down projection is the linear `down`, or the rule it breaks (see the module docstring)."""
    path = module_path(down)
    if not isinstance(down.args[0], Node):
        return NoMatch("FFN", path, f"the input of {down.name} is not a graph value", down.name)
    hidden = skip_passthrough(down.args[0])
    linears, interior, blocker = _pointwise_cone(down.args[0])
    if blocker is not None:
        return _cone_rule(down, blocker)
    gate_half = None
    if len(linears) == 1 and any(n.target in SPLIT_OPS for n in interior):
        (up,) = linears
        sides = _product_sides(down, hidden, lambda a: a)
        if isinstance(sides, NoMatch):
            return sides
        activated = [any(n.target not in PASSTHROUGH and not _is_half_split(n) for n in side[1]) for side in sides]
        if activated.count(True) != 1:
            return NoMatch(
                "FFN",
                path,
                f"exactly one half of the split {up.name} must go through an activation, {activated.count(True)} do",
                hidden.name,
            )
        picks = [n for n in sides[activated.index(True)][1] if n.target is operator.getitem]
        if len(picks) != 1:
            return NoMatch(
                "FFN",
                path,
                f"the activated factor of {hidden.name} must take one half of {up.name}, it takes {len(picks)}",
                hidden.name,
            )
        gate, gate_half = None, int(picks[0].args[1])
    elif len(linears) == 1:
        (up,) = linears
        if all(n.target in PASSTHROUGH for n in interior):
            return NoMatch(
                "FFN", path, f"no activation between {up.name} and {down.name}: two linears back to back", up.name
            )
        gate = None
    elif len(linears) == 2:
        sides = _product_sides(down, hidden, skip_passthrough)
        if isinstance(sides, NoMatch):
            return sides
        if any(len(s[0]) != 1 for s in sides):
            return NoMatch(
                "FFN",
                path,
                f"each factor of {hidden.name} must come from one linear, they come from {[len(s[0]) for s in sides]}",
                hidden.name,
            )
        activated = [any(n.target not in PASSTHROUGH for n in s[1]) for s in sides]
        if activated.count(True) != 1:
            return NoMatch(
                "FFN",
                path,
                f"exactly one factor of {hidden.name} must go through an activation, {activated.count(True)} do",
                hidden.name,
            )
        gate_side = activated.index(True)
        gate, up = sides[gate_side][0][0], sides[1 - gate_side][0][0]
        if skip_passthrough(gate.args[0]) is not skip_passthrough(up.args[0]):
            return NoMatch("FFN", path, f"gate {gate.name} and up {up.name} read different inputs", gate.name)
    elif not linears:
        return NoMatch("FFN", path, f"no linear feeds the input of {down.name} through pointwise ops", hidden.name)
    else:
        return NoMatch(
            "FFN",
            path,
            f"{len(linears)} linears feed the input of {down.name} "
            f"({', '.join(sorted(n.name for n in linears))}); an FFN has one or two",
            hidden.name,
        )
    inside = set(interior) | {down}
    for producer in (up, gate):
        if producer is None:
            continue
        outside = [u for u in producer.users if u not in inside and u.target is not _ASSERT]
        if outside:  # e.g. one timestep embedding read by every block's modulation
            return NoMatch(
                "FFN", path, f"{producer.name} is also read outside the FFN, by {outside[0].name}", producer.name
            )
    width = up.args[1].meta["val"].shape[0] // (1 if gate_half is None else 2)
    return Ffn(
        path=_common_path([n for n in (up, gate, down) if n is not None]),
        kind="fused_gated" if gate_half is not None else "plain" if gate is None else "gated",
        input=skip_passthrough(up.args[0]),
        up=up,
        gate=gate,
        down=down,
        interior=tuple(interior),
        intermediate_size=int(width),
        gate_half=gate_half,
    )


ACTIVATION_OPS = {aten.silu.default: "silu", aten.relu.default: "relu", aten.gelu.default: "gelu"}


def ffn_activation(ffn: Ffn) -> str:
    """The FFN's activation as a `sparsec.ops.moe.ACTIVATIONS` name, checking that it computes exactly
    `down(act(gate x) * up x)` (gated, fused gated) or `down(act(up x))` (plain) and nothing else.

    Rewrites that re-implement the FFN (the MoE operator) need this; `PassError` names the ops otherwise.
    Casts that keep the dtype and inactive dropouts (`train=False` or `p=0`) are looked through; an activation
    spelled out as arithmetic (`gelu_new`) is recognised by what its ops compute.
    """
    seen: set[Node] = set()

    def identity(node: Node) -> bool:
        if node.target is aten.dropout.default:
            return node.args[2] is False or node.args[1] == 0
        return _same_dtype_and_shape(node, node.args[0])

    def strip(node: Node) -> Node:
        while (
            node.op == "call_function"
            and node.target in PASSTHROUGH
            and isinstance(node.args[0], Node)
            and identity(node)
        ):
            seen.add(node)
            node = node.args[0]
        return node

    def half(node: Node, which: int) -> bool:  # `getitem(split(up), which)` of a fused projection
        if node.target is not operator.getitem or node.args[1] != which:
            return False
        split = node.args[0]
        seen.update((node, split))
        return split.target in SPLIT_OPS and strip(split.args[0]) is ffn.up

    def activation(node: Node, source) -> str | None:
        if node.op != "call_function" or node.target not in ACTIVATION_OPS or not source(strip(node.args[0])):
            return None
        seen.add(node)
        name = ACTIVATION_OPS[node.target]
        if name == "gelu":
            approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            name = "gelu_tanh" if approximate == "tanh" else "gelu"
        return name

    if ffn.gate_half is None:
        gate_source, up_source = (lambda n: n is ffn.gate), (lambda n: n is ffn.up)
    else:
        gate_source, up_source = (lambda n: half(n, ffn.gate_half)), (lambda n: half(n, 1 - ffn.gate_half))
    hidden = strip(ffn.down.args[0])
    found = None
    if ffn.kind == "plain":
        found = activation(hidden, up_source)
    elif (
        hidden.op == "call_function"
        and hidden.target is aten.mul.Tensor
        and all(isinstance(a, Node) for a in hidden.args)
    ):
        seen.add(hidden)
        a, b = (strip(arg) for arg in hidden.args)
        found = activation(a, gate_source) if up_source(b) else activation(b, gate_source) if up_source(a) else None
    if found is None or set(ffn.interior) - seen:
        found = _computed_activation(ffn)
    if found is None:
        ops = sorted({str(n.target) for n in ffn.interior})
        raise PassError(
            f"FFN {ffn.describe()}: the ops between its projections ({ops}) are not act(gate x) * up x or act(fc1 x) with "
            f"a supported activation ({sorted(set(ACTIVATION_OPS.values()) | {'gelu_tanh'})})"
        )
    return found


_ACTIVATION_FUNCTIONS = {
    "silu": torch.nn.functional.silu,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
}


def _computed_activation(ffn: Ffn) -> str | None:
    """The supported activation an FFN's pointwise ops compute when they spell it out as arithmetic (GPT-2's
    and Phi's `gelu_new`, BLOOM's GELU: `tanh`, `pow`, `mul`, `add`), found by running those ops on probe
    values in float64: `act(g) * u` (gated) or `act(u)` (plain) within 1e-6 of one activation, else None."""
    if ffn.gate_half is not None:
        return None
    gen = torch.Generator().manual_seed(0)
    probe = torch.linspace(-8, 8, 257, dtype=torch.float64)
    values = {ffn.gate if ffn.gate is not None else ffn.up: probe}
    if ffn.gate is not None:
        values[ffn.up] = torch.randn(probe.shape, generator=gen, dtype=torch.float64)
    order = {n: i for i, n in enumerate(ffn.down.graph.nodes)}

    def value(arg):
        if isinstance(arg, Node):
            if arg not in values:
                raise LookupError(arg.name)
            return values[arg]
        if isinstance(arg, (list, tuple)):
            return type(arg)(value(a) for a in arg)
        return arg

    try:
        for node in sorted(ffn.interior, key=order.__getitem__):
            kwargs = {k: v for k, v in node.kwargs.items() if k not in ("dtype", "device", "layout")}
            values[node] = node.target(*value(node.args), **value(kwargs))
        out = values[ffn.down.args[0]].to(torch.float64)
    except (LookupError, RuntimeError, TypeError):
        return None
    up = values[ffn.up] if ffn.gate is not None else 1.0
    for name, act in _ACTIVATION_FUNCTIONS.items():
        if out.shape == probe.shape and torch.allclose(out, act(probe) * up, rtol=1e-6, atol=1e-6):
            return name
    return None


def find_ffns(program) -> list[Ffn]:
    """Every FFN of the program, in graph order."""
    return [m for m in _ffn_matches(program) if isinstance(m, Ffn)]


def ffn_misses(program) -> list[NoMatch]:
    """Why each linear that is no part of an FFN is not an FFN's down projection, in graph order.

    The candidates `sparsec inspect` lists and "matches no FFN" errors quote: an attention projection reads a
    reshape, a projection read twice escapes, a split is not into halves.
    """
    matches = _ffn_matches(program)
    used = {n for m in matches if isinstance(m, Ffn) for n in m.linears.values()}
    return [
        m
        for m, node in zip(matches, program.graph.find_nodes(op="call_function", target=LINEAR))
        if isinstance(m, NoMatch) and node not in used
    ]


def _ffn_matches(program) -> list[Ffn | NoMatch]:
    return program.analysis(_match_every_linear)


def _match_every_linear(program) -> list[Ffn | NoMatch]:
    return [match_ffn(node) for node in program.graph.find_nodes(op="call_function", target=LINEAR)]


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


def residual_streams(region: Region, ffns: list[Ffn], experts: Sequence[Node] = ()) -> list[ResidualBlock]:
    """The residual structure of a block region, one chain per stream it hands on; `PassError` naming what is
    missing if an output is not a residual chain (`match_residual_block` returns that reason instead).

    A decoder layer hands on one stream; a dual-stream MMDiT block (Qwen-Image, SD3, Flux) two, image and text,
    whose attention branches share one joint attention op. `ffns`: the program's FFNs (`find_ffns`), which
    tell MLP sublayers apart, and so do `experts`: the outputs of MoE blocks' routed experts
    (`sparsec.analysis.experts.find_experts`).
    """
    found = match_residual_block(region, ffns, experts)
    if isinstance(found, NoMatch):
        raise PassError(f"cannot find the residual structure of {region.path}: {found.rule}")
    return found


def match_residual_block(
    region: Region, ffns: list[Ffn], experts: Sequence[Node] = ()
) -> list[ResidualBlock] | NoMatch:
    """`residual_streams` of the region, or the rule its structure breaks and the node that broke it."""
    inside = set(region.nodes)
    # symbolic sizes (`s0 * s1`) computed in one block and reused by later ones are not part of the stream
    outputs = [n for n in region.outputs() if n.target is not _ASSERT and isinstance(n.meta.get("val"), torch.Tensor)]
    if not outputs:
        return NoMatch("residual block", region.path, "it hands on no tensor")
    down_nodes = {f.down for f in ffns}
    streams = []
    for output in outputs:
        chain = _residual_chain(region, inside, output, down_nodes, set(experts))
        if isinstance(chain, NoMatch):
            return chain
        streams.append(chain)
    return streams


RESHAPES = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})


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
    elif node.target in RESHAPES:
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
    region: Region, inside: set[Node], output: Node, down_nodes: set[Node], experts: set[Node]
) -> ResidualBlock | NoMatch:
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
                f"{_describe(node)}, computed inside the block"
            )
        return NoMatch("residual block", region.path, rule, node.name)
    return ResidualBlock(region.path, node, output, tuple(reversed(chain)), tuple(reversed(norms)))


class ResidualStructure:
    """`residual_streams` of a program's blocks, each computed once per graph version; get it with
    `residual_structure(program)` (cached by `Program.analysis`, so a recompile invalidates it)."""

    def __init__(self, program) -> None:
        self.program = program
        self._streams: dict[str, list[ResidualBlock]] = {}

    def streams(self, path: str) -> list[ResidualBlock]:
        """The residual streams of the block region at `path` (`PassError` if it has no residual structure)."""
        if path not in self._streams:
            from sparsec.analysis.experts import find_experts

            regions = region_index(self.program)
            experts = [e.output for e in find_experts(self.program)]
            self._streams[path] = residual_streams(regions.region(path), regions.ffns(), experts)
        return self._streams[path]


def residual_structure(program) -> ResidualStructure:
    """The program's `ResidualStructure` at its current graph version."""
    return program.analysis(ResidualStructure)
