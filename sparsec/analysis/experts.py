"""Routed experts of MoE language models, found by graph structure (transformers' Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE, DeepSeek-V3 and their kin), not by module class names.

transformers 5 stores a block's experts as fused 3D parameters, `gate_up_proj` [E, 2I, H] (or `up_proj` [E, I, H])
and `down_proj` [E, H, I], and captures them (`experts_implementation="batched_mm"`, which `sparsec.ir.capture`
selects: the other implementations loop over the experts a batch hits, which torch.export cannot capture, or call
an opaque grouped-GEMM op) as:

    ids     = reshape(topk(route(linear(x, W_router)), k)[1])            # [T*k], the chosen expert per pair
    h       = act(half_g) * half_u of bmm(index(gate_up_proj, [ids]), x_pair)   (or act(bmm(index(up_proj, ..))))
    out     = sum(view(bmm(index(down_proj, [ids]), h) * weight_pair, [T, k, H]), 1)

`match_experts(topk)` recognises that from the `topk` node: a router (exactly one linear in the cone the top-k
reads, with E output rows), expert tensors `index(param [E, ...], [ids])`, an up `bmm` reading the tokens and a
down `bmm` reading the up one's output through pointwise ops (fused gate/up halves split by chunk/split) only.
Whether a weight sits before or after the token operand of its `bmm` gives its layout (`[E, out, in]` or
transposed `[E, in, out]`). A `topk` that is not such a router returns a `NoMatch` naming the rule and the node.

Two rewrites use this dependency model: `expert_channel_group` (each expert's intermediate neurons, the same
count kept per expert so the fused tensors stay rectangular: `slice_neurons`) and `remove_experts` (whole
experts: their slices of every expert tensor and the router's rows: `prune_experts`).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.fx import Node

from sparsec.analysis.dependency import ChannelGroup, ParamSlice
from sparsec.analysis.match import Mismatch, NoMatch
from sparsec.analysis.vocabulary import (
    LINEAR,
    METADATA_ASSERT,
    PASSTHROUGH,
    SPLIT_OPS,
    VIEW_OPS,
    common_path,
    describe,
    is_half_split,
    is_pointwise,
    module_path,
    skip_passthrough,
)
from sparsec.errors import PassError
from sparsec.ir.paths import glob_match

aten = torch.ops.aten

TOPK = aten.topk.default
INDEX = aten.index.Tensor
BMM = aten.bmm.default
_TOKEN_OPS = frozenset({aten.unsqueeze.default, aten.squeeze.dim, aten.transpose.int, *VIEW_OPS})


@dataclass(frozen=True)
class ExpertTensor:
    """A state tensor with one slice per expert along dim 0, read through `index(tensor, [ids])`.

    Attributes:
        name: the state name (`model.layers.0.mlp.experts.gate_up_proj`).
        index: the `aten.index.Tensor` node selecting each token-expert pair's slice.
        role: `up` (the tokens' projection, gate and up fused or up alone), `down`, or `other` (e.g. a bias).
        neuron_dim: the dim of the full tensor indexing the intermediate neurons (None for `other`).
    """

    name: str
    index: Node
    role: str
    neuron_dim: int | None


@dataclass(frozen=True)
class MoeExperts:
    """One MoE block's router and routed experts in the graph.

    Attributes:
        path: module path of the experts (`model.layers.0.mlp.experts`).
        block_path: common path of router and experts (the MoE block, `model.layers.0.mlp`).
        router: the linear computing the router logits [T, E].
        topk: the `topk` choosing each token's experts.
        expert_ids: the flat chosen expert per token-expert pair [T*k].
        tensors: every per-expert tensor (`up` and `down` first).
        up: the `bmm` of the up (gate_up) projection; down: that of the down projection.
        hidden: the intermediate value [T*k, I], the down `bmm`'s input before it is reshaped.
        weighted: the down output times the routing weight [T*k, H] (the routed contribution of each pair).
        output: the experts' output [T, H] (the sum over the k pairs of a token).
        interior: pointwise nodes between up and down (split, activation, product).
        num_experts, top_k, intermediate_size: E, k, I.
        gate_half: which half of the fused up output is the gate (0 or 1), None without a fused gate.
    """

    path: str
    block_path: str
    router: Node
    topk: Node
    expert_ids: Node
    tensors: tuple[ExpertTensor, ...]
    up: Node
    down: Node
    hidden: Node
    weighted: Node
    output: Node
    interior: tuple[Node, ...]
    num_experts: int
    top_k: int
    intermediate_size: int
    gate_half: int | None

    def tensor(self, role: str) -> ExpertTensor:
        return next(t for t in self.tensors if t.role == role)


def _users(node: Node) -> list[Node]:
    return [u for u in node.users if u.target is not METADATA_ASSERT]


def _single_user(node: Node, targets) -> Node | None:
    users = _users(node)
    return users[0] if len(users) == 1 and users[0].target in targets else None


def _follow(node: Node, ops) -> Node:
    """Down a chain of single users with targets in `ops`, to its last node."""
    while (nxt := _single_user(node, ops)) is not None:
        node = nxt
    return node


def _strip(node: Node) -> Node:
    """Back through reshapes, (un)squeezes, transposes and casts to the value they carry."""
    while node.op == "call_function" and node.target in _TOKEN_OPS | PASSTHROUGH and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def _indexing_view(indices: Node) -> Node | None:
    """The one reshape (or cast) of the top-k indices that indexes tensors, None if there is not exactly one."""
    found, stack = [], [indices]
    while stack:
        node = stack.pop()
        if any(u.target is INDEX for u in _users(node)):
            found.append(node)
        stack.extend(u for u in _users(node) if u.target in VIEW_OPS | PASSTHROUGH)
    return found[0] if len(found) == 1 else None


def _router_cone(topk: Node) -> tuple[list[Node], list[Node]]:
    """The linears the top-k's input is computed from within the router's module, and the nodes in between."""
    path = module_path(topk)
    linears, seen, stack = [], [], [topk.args[0]]
    while stack:
        node = stack.pop()
        if not isinstance(node, Node) or node in seen or node.op != "call_function":
            continue
        if node.target is LINEAR:
            linears.append(node)
        elif module_path(node) == path or module_path(node).startswith(path + "."):
            seen.append(node)
            stack.extend(node.all_input_nodes)
    return linears, seen


def _pointwise_from(hidden: Node, up: Node) -> list[Node] | Node:
    """The pointwise (and half-split) nodes computing `hidden` from the bmm `up`, or the first node that is not."""
    interior, seen, stack = [], set(), [hidden]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if _strip(node) is up:
            continue
        if is_pointwise(node) or is_half_split(node):
            interior.append(node)
            stack.extend(node.all_input_nodes)
        elif not (node.op == "placeholder" and getattr(node.meta.get("val"), "ndim", None) == 0):
            return node
    return interior


def match_experts(topk: Node) -> MoeExperts | NoMatch:
    """The router and routed experts whose expert choice is the `topk` node, or the rule they break."""
    try:
        return _experts(topk)
    except Mismatch as miss:
        return miss.no_match("MoE router", module_path(topk))


def _experts(topk: Node) -> MoeExperts:
    picks = {u.args[1]: u for u in topk.users if u.target is operator.getitem}
    ids = _indexing_view(picks[1]) if 1 in picks else None
    readers = [u for u in _users(ids) if u.target is INDEX] if ids is not None else []
    if not readers:
        raise Mismatch(f"the indices {topk.name} chooses index no per-expert tensor (index(param, [ids]))", topk)
    linears, _ = _router_cone(topk)
    if len(linears) != 1:
        found = sorted(n.name for n in linears)
        raise Mismatch(f"{topk.name} must choose from the logits of one linear (the router), it reads {found}", topk)
    (router,) = linears
    num_experts = int(router.meta["val"].shape[-1])
    bmms: dict[Node, Node] = {}
    for index in readers:
        source = skip_passthrough(index.args[0])
        if source.op != "placeholder" or len(index.args[1]) != 1 or source.meta["val"].shape[0] != num_experts:
            raise Mismatch(
                f"{index.name} indexes {describe(source)} by the chosen experts, which is not a state tensor with "
                f"one slice per expert ({num_experts}, the router's outputs) along dim 0",
                index,
            )
        bmm = next((u for u in _users(_follow(index, PASSTHROUGH)) if u.target is BMM), None)
        if bmm is not None:
            bmms[index] = bmm

    def token_operand(index: Node) -> Node:
        bmm = bmms[index]
        return bmm.args[1] if _strip(bmm.args[0]) is _strip(index) else bmm.args[0]

    downs = [
        i
        for i in bmms
        if any(
            _strip(token_operand(i)) is _strip(b) or _computed_from(token_operand(i), b)
            for b in bmms.values()
            if b is not bmms[i]
        )
    ]
    ups = [i for i in bmms if i not in downs]
    if len(ups) != 1 or len(downs) != 1:
        raise Mismatch(
            f"the experts {topk.name} chooses are not one up and one down batched matmul (bmm) of per-expert "
            f"weights, the second reading the first ({len(ups)} up, {len(downs)} down)",
            topk,
        )
    (up_index,), (down_index,) = ups, downs
    up, down = bmms[up_index], bmms[down_index]
    hidden = _strip(token_operand(down_index))
    interior = _pointwise_from(hidden, up)
    if isinstance(interior, Node):
        raise Mismatch(
            f"the input of the down bmm {down.name} is not computed by pointwise ops from the up bmm {up.name}: "
            f"{describe(interior)} lies on the way",
            interior,
        )
    width = int(hidden.meta["val"].shape[-1])
    up_transposed = _strip(up.args[0]) is not _strip(up_index)
    up_width = int(skip_passthrough(up_index.args[0]).meta["val"].shape[2 if up_transposed else 1])
    gate_half = None
    if any(n.target in SPLIT_OPS for n in interior):
        activated = [n for n in interior if n.target is operator.getitem and _activated(n, interior)]
        if up_width != 2 * width or len(activated) != 1:
            raise Mismatch(
                f"{up.name} (width {up_width}) is split, but not into a gate half through an activation and an up "
                f"half of the expert width {width}",
                up,
            )
        gate_half = int(activated[0].args[1])
    elif up_width != width or all(n.target in PASSTHROUGH for n in interior):
        raise Mismatch(f"{up.name} (width {up_width}) is not act(up) of the expert width {width}", up)
    weighted = _single_user(_follow(down, _TOKEN_OPS | PASSTHROUGH), {aten.mul.Tensor})
    output = _single_user(_follow(weighted, VIEW_OPS), {aten.sum.dim_IntList}) if weighted is not None else None
    if output is None:
        raise Mismatch(f"the output of the down bmm {down.name} is not weighted (mul) and summed per token", down)
    tensors = []
    for index in sorted(readers, key=lambda i: (i is not up_index, i is not down_index)):
        role = "up" if index is up_index else "down" if index is down_index else "other"
        transposed = role != "other" and _strip(bmms[index].args[0]) is not _strip(index)
        neuron_dim = None if role == "other" else (1 if (role == "up") != transposed else 2)
        tensors.append(ExpertTensor(skip_passthrough(index.args[0]).name, index, role, neuron_dim))
    return MoeExperts(
        path=common_path([up_index, down_index]),
        block_path=common_path([router, up_index, down_index]),
        router=router,
        topk=topk,
        expert_ids=ids,
        tensors=tuple(tensors),
        up=up,
        down=down,
        hidden=hidden,
        weighted=weighted,
        output=output,
        interior=tuple(interior),
        num_experts=num_experts,
        top_k=int(topk.args[1]),
        intermediate_size=width,
        gate_half=gate_half,
    )


def _computed_from(node: Node, source: Node) -> bool:
    """Whether `node` is computed from `source` by pointwise, split and reshaping ops only."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is source:
            return True
        if n in seen or not isinstance(n, Node) or n.op != "call_function":
            continue
        seen.add(n)
        if n.target in _TOKEN_OPS or is_pointwise(n) or is_half_split(n):
            stack.extend(n.all_input_nodes)
    return False


def _activated(pick: Node, interior: list[Node]) -> bool:
    """Whether the half `pick` of a split goes through a non-cast pointwise op before a product."""
    inside, stack = set(interior), [pick]
    while stack:
        for user in stack.pop().users:
            if user not in inside or user.target is aten.mul.Tensor:
                continue
            if user.target not in PASSTHROUGH:
                return True
            stack.append(user)
    return False


def find_experts(program, where: str = "**") -> list[MoeExperts]:
    """Every MoE block's router and routed experts whose experts' or block's path matches the glob `where`, in
    graph order (cached per graph version); the tensors carry state names."""
    found = [m for m in program.analysis(_match_every_topk) if isinstance(m, MoeExperts)]
    return [e for e in found if glob_match(e.path, where) or glob_match(e.block_path, where)]


def expert_misses(program) -> list[NoMatch]:
    """Why each `topk` of the program that is no MoE router's is not (what `sparsec inspect` lists)."""
    return [m for m in program.analysis(_match_every_topk) if isinstance(m, NoMatch)]


def _match_every_topk(program) -> list[MoeExperts | NoMatch]:
    found = []
    for node in program.graph.find_nodes(op="call_function", target=TOPK):
        match = match_experts(node)
        if isinstance(match, MoeExperts):
            tensors = tuple(
                dataclasses.replace(t, name=program.state_name(skip_passthrough(t.index.args[0])))
                for t in match.tensors
            )
            match = dataclasses.replace(match, tensors=tensors)
        found.append(match)
    return found


def _escaping(experts: MoeExperts) -> list[Node]:
    """Intermediate values of the experts (the up output and what lies between it and down) read elsewhere."""
    inside = set(experts.interior)
    chain = {experts.down}
    node = experts.down.args[0] if _strip(experts.down.args[0]) is experts.hidden else experts.down.args[1]
    while node is not experts.hidden:  # the reshapes between the intermediate value and the down bmm
        chain.add(node)
        node = node.args[0]
    node = experts.up
    while (nxt := _single_user(node, _TOKEN_OPS | PASSTHROUGH)) is not None:  # and after the up bmm
        chain.add(nxt)
        node = nxt
    produced = [experts.up, *chain - {experts.down}, *experts.interior]
    allowed = inside | chain
    return [n for n in produced if any(u not in allowed for u in _users(n))]


def expert_channel_group(program, experts: MoeExperts) -> ChannelGroup:
    """The tensors coupled through the experts' intermediate neurons (rows of each expert's gate and up, columns
    of its down, along `neuron_dim`), for `ChannelGroup.apply` with one row of kept neurons per expert;
    `PassError` if they cannot be sliced safely."""
    others = [t.name for t in experts.tensors if t.role == "other"]
    if others:
        raise PassError(
            f"{experts.path}: per-expert tensors {others} besides the up and down projections (biases) are not "
            "sliced yet; its experts' neurons are left alone"
        )
    escaping = _escaping(experts)
    if escaping:
        raise PassError(
            f"{experts.path}: the experts' intermediate values ({[n.name for n in escaping]}) are also read outside "
            "the experts; slicing their neurons would change what those readers see"
        )
    up, down = experts.tensor("up"), experts.tensor("down")
    width = experts.intermediate_size
    offsets = (0,) if experts.gate_half is None else (0, width)
    params = (ParamSlice(up.name, up.neuron_dim, offsets), ParamSlice(down.name, down.neuron_dim))
    return ChannelGroup(experts.path, width, params, tuple(n for n in experts.interior if n.target in SPLIT_OPS))


def _expert_weights(program, experts: MoeExperts, role: str) -> torch.Tensor:
    """An expert tensor as [E, neurons, other] (the neuron dim second)."""
    t = experts.tensor(role)
    weight = program.state_tensor(t.name).float()
    return weight if t.neuron_dim == 1 else weight.transpose(1, 2)


def _pair_mask(batch, experts: MoeExperts, pairs: int) -> torch.Tensor | None:
    """[T*k] bool: token-expert pairs of valid tokens (tokens flattened batch-major, as the block does)."""
    mask = batch.get("attention_mask")
    if mask is None or mask.numel() * experts.top_k != pairs:
        return None
    return mask.reshape(-1).bool().repeat_interleave(experts.top_k)


def routing_statistics(program, calibration, experts: Sequence[MoeExperts]) -> list[dict[str, torch.Tensor]]:
    """Per MoE block, over the valid tokens of `calibration` (a `CalibrationSet`, one run over it):
    `pairs` [E] (token-expert pairs routed to each expert), `frequency` [E] (their share), `mass` [E] (the share of
    the routed output norm sum ||w_te * expert_e(x_t)|| each expert produced) and `mean_abs` [E, I] (E[|h_j|] of
    each expert's neurons over its tokens).
    """
    sums = [
        {
            "pairs": torch.zeros(e.num_experts, dtype=torch.float64),
            "mass": torch.zeros(e.num_experts, dtype=torch.float64),
            "abs": torch.zeros(e.num_experts, e.intermediate_size, dtype=torch.float64),
        }
        for e in experts
    ]
    wanted = {
        n: (i, field)
        for i, e in enumerate(experts)
        for n, field in ((e.expert_ids, "ids"), (e.hidden, "h"), (e.weighted, "w"))
    }
    held: dict[int, dict[tuple[int, str], torch.Tensor]] = {}

    def observe(index: int, node: Node, value) -> None:
        held.setdefault(index, {})[wanted[node]] = value

    for index, (batch, _) in enumerate(calibration.run(program, observe=observe, nodes=set(wanted), desc="routing")):
        values = held.pop(index)
        for i, (e, acc) in enumerate(zip(experts, sums)):
            ids, hidden, weighted = values[(i, "ids")], values[(i, "h")].double(), values[(i, "w")].double()
            mask = _pair_mask(batch, e, ids.numel())
            if mask is not None:
                ids, hidden, weighted = ids[mask], hidden[mask], weighted[mask]
            acc["pairs"] += torch.bincount(ids, minlength=e.num_experts).double()
            acc["mass"].index_add_(0, ids, weighted.norm(dim=-1))
            acc["abs"].index_add_(0, ids, hidden.abs())
    return [
        {
            "pairs": acc["pairs"],
            "frequency": acc["pairs"] / acc["pairs"].sum().clamp_min(1),
            "mass": acc["mass"] / acc["mass"].sum().clamp_min(1e-30),
            "mean_abs": acc["abs"] / acc["pairs"].clamp_min(1)[:, None],
        }
        for acc in sums
    ]


def expert_neuron_importance(
    program, experts: Sequence[MoeExperts], kind: str, calibration=None, seed: int = 0
) -> list[torch.Tensor]:
    """One score per neuron of every expert, [E, I] per MoE block, as `sparsec.analysis.importance` scores
    dense FFN neurons: `activation` E[|h_j|] over the expert's tokens times ||W_down,e[:, j]||, `magnitude`
    ||W_down,e[:, j]|| * ||W_up,e[j]|| (* ||W_gate,e[j]||), `random`. An expert no calibration token reached
    is scored by magnitude."""
    if kind == "random":
        gen = torch.Generator().manual_seed(seed)
        return [torch.rand(e.num_experts, e.intermediate_size, generator=gen) for e in experts]
    scores = []
    for e in experts:
        up, down = _expert_weights(program, e, "up").norm(dim=2), _expert_weights(program, e, "down").norm(dim=2)
        width = e.intermediate_size
        if e.gate_half is None:
            scores.append(down * up)
        else:
            gate = up[:, e.gate_half * width : (e.gate_half + 1) * width]
            value = up[:, (1 - e.gate_half) * width : (2 - e.gate_half) * width]
            scores.append(down * value * gate)
    if kind == "magnitude":
        return scores
    if kind != "activation":
        raise ValueError(f"importance must be activation, magnitude or random, got {kind!r}")
    if calibration is None:
        raise ValueError("activation importance needs calibration data")
    stats = routing_statistics(program, calibration, experts)
    result = []
    for e, s, magnitude in zip(experts, stats, scores):
        down = _expert_weights(program, e, "down").norm(dim=2)
        activation = s["mean_abs"].float() * down
        result.append(torch.where((s["pairs"] > 0)[:, None], activation, magnitude))
    return result


def expert_slices(program, experts: MoeExperts) -> list[tuple[str, int]]:
    """(state name, dim) of every tensor with one entry per expert: the expert tensors (dim 0), the router's
    weight rows and bias, and per-expert tensors its scores read on the way to the top-k (a score bias,
    last dim); `PassError` naming the node where the expert count is written into the graph as a constant
    (a group-limited router's reshape to [-1, groups, E / groups]), which removing experts cannot follow."""
    slices = [(t.name, 0) for t in experts.tensors]
    slices += [(program.state_name(a), 0) for a in experts.router.args[1:] if isinstance(a, Node)]
    _, cone = _router_cone(experts.topk)
    count = experts.num_experts
    for node in [*cone, experts.topk]:
        for arg in node.all_input_nodes:
            name = program.state_name(skip_passthrough(arg))
            if name is not None and name not in dict(slices):
                shape = program.state_shape(name)
                if shape and shape[-1] == count and shape.numel() == count:
                    slices.append((name, len(shape) - 1))
                elif shape.numel() > 1:
                    raise PassError(
                        f"{experts.block_path}: the router reads {name} of shape {tuple(shape)} on the way to "
                        f"its top-k, which is not one value per expert; cannot remove experts"
                    )
        if node.target in VIEW_OPS | {aten.expand.default} and _constant_size(node.args[1]) == count:
            raise PassError(
                f"{experts.block_path}: the router's {describe(node)} writes the expert count into its shape "
                f"{node.args[1]}; removing experts would leave it stale (a group-limited router), so it is refused"
            )
    return slices


def _constant_size(shape) -> int | None:
    """The product of a shape's constant sizes (-1 and symbolic sizes left out), None if it has none."""
    sizes = [d for d in shape if isinstance(d, int) and d > 0] if isinstance(shape, (list, tuple)) else []
    return math.prod(sizes) if sizes else None


def remove_experts(program, experts: MoeExperts, kept: torch.Tensor) -> None:
    """Keep only experts `kept` (sorted, unique) of the MoE block: their slices of every per-expert tensor and
    the router's rows (`expert_slices`). The top-k then chooses among the kept experts, renumbered 0..K-1,
    which is what deleting the others from the model computes."""
    kept = torch.as_tensor(kept, dtype=torch.long)
    for name, dim in expert_slices(program, experts):
        program.replace_state(name, program.state_tensor(name).index_select(dim, kept).contiguous())
