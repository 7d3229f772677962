"""`inspect`: what a captured program is made of, per component (understanding / generation / shared): block stacks,
FFNs, MoE experts and attentions (query heads, KV heads and their groups).

It also says how each block stack was read (its sublayers: attn, mlp, parallel; post-norm) and what the
structural matchers did not recognise and why (`explain`, `sparsec inspect --why PATH`): the linears that are no
part of an FFN, the blocks without a residual structure and the block branches that are neither attention nor an
FFN (an FFN the matchers could not classify), each with the rule it broke.

FLOPs are counted by running the program once at the example shape under torch's `FlopCounterMode` and
attributing each node's FLOPs to its innermost module path (so they follow the same tags as parameters). A
program whose weights are not in memory (`Program.lazy_state`: read lazily, or captured from a config alone) is
run on fake tensors instead (shapes only, nothing read); where that cannot run (an op whose output shape depends
on values, such as the MoT's `aten.nonzero` token routing) FLOPs are absent and `flops_absent` says why.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from sparsec.analysis.blocks import match_residual_block
from sparsec.analysis.experts import expert_misses, find_experts
from sparsec.analysis.ffn import ffn_misses, match_ffn
from sparsec.analysis.heads import attention_misses, find_attentions
from sparsec.analysis.match import NoMatch
from sparsec.analysis.regions import Region, region_index
from sparsec.analysis.vocabulary import LINEAR, module_path
from sparsec.ir.program import Program
from sparsec.ir.tags import COMPONENTS


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels but not the one SDPA runs on the CPU: without this the attention
# core's two matmuls (q k^T, probs v) would count nothing, and the FLOP ideal of head pruning would be wrong.
_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def flops_by_path(program: Program, inputs: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """FLOPs of one forward pass at the shape of `inputs`, by innermost module path ('' for top level), attention
    cores included on every device.

    A lazily backed program runs on fake tensors (see the module docstring)."""
    out: dict[str, int] = defaultdict(int)
    counter = FlopCounterMode(display=False, custom_mapping=_ATTENTION_FLOPS)
    last = [0]

    def observe(node, _value) -> None:
        total = counter.get_total_flops()
        if total != last[0]:
            out[module_path(node)] += total - last[0]
            last[0] = total

    with counter:
        program.run(inputs, observe=observe, shapes_only=bool(program.lazy_state()))
    return dict(out)


def inspect_program(program: Program, inputs: Mapping[str, torch.Tensor]) -> dict:
    """A JSON-ready summary: components, block stacks, FFNs and top-level regions with params and FLOPs."""
    regions = region_index(program)
    tagger = program.tagger
    experts = find_experts(program)
    routers = {module_path(e.router) for e in experts}  # a router is no FFN, and is listed with its experts
    attentions = find_attentions(program)
    projection_names = {name for a in attentions for name in (*a.projections, a.output)}
    projections = {module_path(n) for n in program.graph.nodes if n.name in projection_names}  # their attention's
    params: dict[str, int] = defaultdict(int)
    for name in program.parameter_names():
        path = name.rsplit(".", 1)[0]
        params[tagger.tag(path)] += program.state_shape(name).numel()
    flops_absent = None
    try:
        flops = flops_by_path(program, inputs)
    except Exception as exc:
        if not program.lazy_state():
            raise
        flops = {}
        flops_absent = (
            f"the weights are not in memory and the program cannot run on shapes alone "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"
        )
    component_flops: dict[str, int] = defaultdict(int)
    for path, f in flops.items():
        component_flops[tagger.tag(path)] += f

    paths = regions.paths
    top = [p for p in paths if p.count(".") == 1 or ("." not in p and not any(q.startswith(p + ".") for q in paths))]
    summary = []
    for path in top:
        region = regions.region(path)
        summary.append(
            {
                "path": path,
                "type": region.type_name.rsplit(".", 1)[-1],
                "tag": region.tag,
                "parameters": region.num_parameters(),
                "flops": None
                if flops_absent
                else sum(f for p, f in flops.items() if p == path or p.startswith(path + ".")),
            }
        )
    return {
        "family": program.family,
        "inputs": {k: list(v.shape) for k, v in inputs.items()},
        "dynamic_dims": program.dynamic_dims,
        "dim_bounds": program.dim_bounds,
        "ops": sum(1 for n in program.graph.nodes if n.op == "call_function"),
        "parameters": program.num_parameters(),
        "weights": "not in memory: counts come from shapes, no weight was read"
        if program.lazy_state()
        else "in memory",
        "flops": None if flops_absent else sum(flops.values()),
        "flops_absent": flops_absent,
        "components": {
            c: {"parameters": params.get(c, 0), "flops": None if flops_absent else component_flops.get(c, 0)}
            for c in COMPONENTS
        },
        "tag_rules": program.tagger.to_list(),
        "regions": summary,
        "block_stacks": [
            {
                "path": s.path,
                "blocks": len(s.blocks),
                "type": s.blocks[0].type_name.rsplit(".", 1)[-1],
                "tag": s.blocks[0].tag,
                "structure": _structure(s.blocks[0], regions.ffns()),
            }
            for s in regions.block_stacks()
        ],
        "ffns": [
            {"path": f.path, "kind": f.kind, "intermediate_size": f.intermediate_size, "tag": tagger.tag(f.path)}
            for f in regions.ffns()
        ],
        "experts": [
            {
                "path": e.path,
                "router": e.router.name,
                "experts": e.num_experts,
                "top_k": e.top_k,
                "intermediate_size": e.intermediate_size,
                "tag": tagger.tag(e.path),
            }
            for e in experts
        ],
        "attentions": [
            {
                "path": a.path,
                "heads": a.num_heads,
                "kv_heads": a.num_kv_heads,
                "head_dim": a.head_dim,
                "tag": tagger.tag(a.path),
            }
            for a in attentions
        ],
        "not_attentions": [{"path": m.path, "reason": m.rule, "node": m.node} for m in attention_misses(program)],
        "not_experts": [{"path": m.path, "reason": m.rule, "node": m.node} for m in expert_misses(program)],
        "not_ffns": [
            {"path": m.path, "reason": m.rule, "node": m.node}
            for m in ffn_misses(program)
            if m.path not in routers and m.path not in projections
        ],
        "unclassified_blocks": [{"path": m.path, "reason": m.rule, "node": m.node} for m in _block_misses(program)],
        "unclassified_sublayers": _sublayer_misses(program),
    }


def _structure(block: Region, ffns: list) -> str:
    """How the first block of a stack was read: its sublayer kinds per stream, `post-norm` if it has one."""
    found = match_residual_block(block, ffns)
    if isinstance(found, NoMatch):
        return "no residual structure"
    streams = [
        " + ".join(s.kind for s in stream.sublayers) + (" (post-norm)" if stream.norms else "") for stream in found
    ]
    return "; ".join(streams)


def _sublayer_misses(program: Program) -> list[dict]:
    """Residual branches of blocks that hold neither an attention op nor an FFN, with why each linear in them
    is no FFN's down projection: an FFN the matchers could not classify."""
    regions = region_index(program)
    ffns = regions.ffns()
    misses = []
    for stack in regions.block_stacks():
        for block in stack.blocks:
            found = match_residual_block(block, ffns)
            if isinstance(found, NoMatch):
                continue
            for stream in found:
                for sub in stream.sublayers:
                    if sub.kind != "other":
                        continue
                    linears = [n for n in sub.nodes if n.target is LINEAR]
                    why = [str(m) for m in map(match_ffn, linears) if isinstance(m, NoMatch)]
                    reason = "holds no attention op (softmax, scaled_dot_product_attention) and no FFN" + (
                        f"; {'; '.join(why)}" if why else "; it holds no linear"
                    )
                    misses.append({"path": block.path, "reason": reason, "node": sub.residual_add.name})
    return misses


def _block_misses(program: Program) -> list[NoMatch]:
    regions = region_index(program)
    ffns = regions.ffns()
    experts = [e.output for e in find_experts(program)]
    found = (match_residual_block(b, ffns, experts) for s in regions.block_stacks() for b in s.blocks)
    return [m for m in found if isinstance(m, NoMatch)]


def explain(program: Program, path: str) -> list[str]:
    """What the structural matchers make of module `path`: whether it is an FFN (if not, why each linear under
    it is no FFN's down projection), which attentions under it have prunable heads (and why the others' do not)
    and whether it is a residual block (if not, which node broke which rule).
    `SparsecError` (with close matches) for a path the program does not have.

    Example::

        explain(program, "model.layers.0.self_attn")
        # ['model.layers.0.self_attn: no FFN',
        #  'model.layers.0.self_attn.q_proj: not an FFN: the input of linear is not computed by ...', ...,
        #  'model.layers.0.self_attn: not a residual block: its output linear_3 ...']
    """
    regions = region_index(program)
    region = regions.region(path)
    ffns = regions.ffns()
    lines = [
        f"{path}: an FFN, {f.kind}, width {f.intermediate_size} (up {f.up.name}, down {f.down.name})"
        for f in ffns
        if f.path == path
    ]
    misses = [str(m) for m in ffn_misses(program) if m.path == path or m.path.startswith(path + ".")]
    experts = find_experts(program)
    lines += [
        f"{path}: MoE experts, {e.num_experts} experts, top-{e.top_k}, width {e.intermediate_size} "
        f"(router {e.router.name}, up {e.up.name}, down {e.down.name})"
        for e in experts
        if path in (e.path, e.block_path)
    ]
    lines += [str(m) for m in expert_misses(program) if m.path == path or m.path.startswith(path + ".")]
    if not lines:
        lines.append(f"{path}: no FFN" + ("" if misses else ", and no linear outside an FFN under it"))
    lines += misses
    lines += [
        f"{a.path}: an attention, {a.num_heads} heads / {a.num_kv_heads} KV heads of {a.head_dim} (prune_heads)"
        for a in find_attentions(program)
        if a.path == path or a.path.startswith(path + ".")
    ]
    lines += [str(m) for m in attention_misses(program) if m.path == path or m.path.startswith(path + ".")]
    found = match_residual_block(region, ffns, [e.output for e in experts])
    if isinstance(found, NoMatch):
        lines.append(str(found))
    else:
        for stream in found:
            kinds = ", ".join(f"{s.kind} ({s.residual_add.name})" for s in stream.sublayers)
            norms = f", post-norm ({', '.join(n.name for n in stream.norms)})" if stream.norms else ""
            lines.append(
                f"{path}: a residual block, stream {stream.input.name} -> {stream.output.name}: {kinds}{norms}"
            )
    return lines


def _human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def format_inspection(info: dict) -> str:
    """The inspection as text tables."""
    lines = [
        f"family: {info['family']}   ops: {info['ops']}   parameters: {info['parameters']:,}   "
        f"FLOPs at {info['inputs']}: {_human(info['flops'])}",
        f"dynamic dims: {info['dynamic_dims']}" + (f"   bounds: {info['dim_bounds']}" if info["dim_bounds"] else ""),
        f"weights: {info['weights']}",
        *([f"FLOPs absent: {info['flops_absent']}"] if info["flops_absent"] else []),
        "",
        f"{'component':<15}{'parameters':>14}{'FLOPs':>10}",
    ]
    for c, v in info["components"].items():
        lines.append(f"{c:<15}{v['parameters']:>14,}{_human(v['flops']):>10}")
    lines += ["", f"{'region':<40}{'type':<28}{'tag':<15}{'parameters':>12}{'FLOPs':>10}"]
    for r in info["regions"]:
        lines.append(f"{r['path']:<40}{r['type'][:27]:<28}{r['tag']:<15}{r['parameters']:>12,}{_human(r['flops']):>10}")
    lines += ["", "block stacks:"]
    lines += [
        f"  {s['path']}.[0-{s['blocks'] - 1}]  {s['type']}  ({s['tag']})  sublayers: {s['structure']}"
        for s in info["block_stacks"]
    ] or ["  none"]
    lines += ["", f"MoE experts ({len(info['experts'])}):"]
    lines += [
        f"  {e['path']}  {e['experts']} experts, top-{e['top_k']}, width {e['intermediate_size']}  ({e['tag']})"
        for e in info["experts"]
    ] or ["  none"]
    lines += ["", f"FFNs ({len(info['ffns'])}):"]
    lines += [f"  {f['path']}  {f['kind']}  width {f['intermediate_size']}  ({f['tag']})" for f in info["ffns"]] or [
        "  none"
    ]
    lines += ["", f"attentions ({len(info['attentions'])}; heads prune_heads can remove):"]
    lines += [
        f"  {a['path']}  {a['heads']} query heads, {a['kv_heads']} KV heads ({a['kv_heads']} group(s) of "
        f"{a['heads'] // a['kv_heads']}), head dim {a['head_dim']}  ({a['tag']})"
        for a in info["attentions"]
    ] or ["  none"]
    for key, title, shown in (  # every unclassified block and branch; many linears in short
        ("not_attentions", "attention cores whose heads cannot be pruned", None),
        ("not_ffns", "linears no part of an FFN or attention", 12),
        ("not_experts", "top-k ops that choose no experts", None),
        ("unclassified_blocks", "blocks without residual structure", None),
        ("unclassified_sublayers", "block sublayers neither attention nor FFN", None),
    ):
        misses = info[key]
        lines += ["", f"{title} ({len(misses)}; why one is not: sparsec inspect --why PATH):"]
        lines += [f"  {m['path']}: {m['reason']}" for m in misses[:shown]] or ["  none"]
        if shown is not None and len(misses) > shown:
            lines.append(f"  ... {len(misses) - shown} more (--json lists all)")
    lines += [
        "",
        "tag rules (first match wins, default shared): "
        + (", ".join(f"{r['glob']} -> {r['tag']}" for r in info["tag_rules"]) or "none"),
    ]
    return "\n".join(lines)
