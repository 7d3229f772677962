"""The paper's MoE block as its released checkpoints store it: the config keys and the sizes rule.

"Understanding and Harnessing Sparsity in Unified Multimodal Models" (Shwai-He/SparseUnifiedModel,
`modeling/qwen2/modeling_qwen2.py` `Qwen2MoeSparseMoeBlock`, `modeling/bagel/qwen2_navit.py`
`Qwen2MoTDecoderLayer`) computes `sparsec::moe` under gating `one_plus_logit` plus a gated shared expert. Its
checkpoints hold, for a converted FFN at module path P, the tensors `P.gate.weight` [E, H], `P.gate_shared.weight`
[1, H], `P.experts.{e}.{gate,up,down}_proj.weight` and (with a shared expert) `P.shared_expert.{gate,up,down}_proj.
weight`, and in `llm_config.json` the keys `CONFIG_KEYS` and `LAYERS_KEY`. Both the BAGEL family (which builds
these MoEs when it loads such a checkpoint) and the `import_moe` / `export_paper_moe` layout (`sparsec.passes.
moe_layout`) read these facts here, one definition for both.
"""

from __future__ import annotations

import re

from sparsec.errors import SparsecError

GATING = "one_plus_logit"
CONFIG_KEYS = ("num_experts", "top_k", "num_shared_experts")
LAYERS_KEY = "transformed_gen"  # the converted layers of the generation FFNs: a list of indices, or true for all
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def paper_sizes(intermediate: int, experts: int, shared_experts: int) -> tuple[int, int]:
    """(shared width I_s, expert width I_e) for a dense FFN of `intermediate` neurons, as the paper's code derives
    them (`Qwen2MoTDecoderLayer.__init__`: `I_s = I // (E + S) * S`, `I_e = (I - I_s) // E`); the sizes are stored
    nowhere else."""
    shared = intermediate // (experts + shared_experts) * shared_experts
    return shared, (intermediate - shared) // experts


def layer_index(path: str) -> int:
    """The layer index of an FFN module path: its first integer component (`model.layers.3.mlp_moe_gen` -> 3)."""
    found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    if found is None:
        raise SparsecError(f"FFN {path!r} has no layer index in its module path; the paper's config lists layers")
    return int(found.group(1))


def paper_tensor_names(path: str, experts: int, shared: bool) -> dict[str, str | tuple[str, ...]]:
    """The paper's tensors of the MoE at module path `path`, by the name `ffn_to_moe` gives each under `path.`:
    `moe.router_weight` <- `gate.weight`, `moe.shared_gate_weight` <- `gate_shared.weight` (stored with or without
    a shared expert), `moe.fc1_weight` / `fc3_weight` / `fc2_weight` <- every expert's `gate_proj` / `up_proj` /
    `down_proj` (a tuple, in expert order: stacked, they are the operand) and, with a shared expert,
    `{gate,up,down}_proj.weight` (the dense FFN sliced to its neurons) <- `shared_expert.*`."""
    names: dict[str, str | tuple[str, ...]] = {
        "moe.router_weight": f"{path}.gate.weight",
        "moe.shared_gate_weight": f"{path}.gate_shared.weight",
    }
    for operand, proj in zip(("fc1_weight", "fc3_weight", "fc2_weight"), PROJECTIONS):
        names[f"moe.{operand}"] = tuple(f"{path}.experts.{e}.{proj}.weight" for e in range(experts))
    if shared:
        names |= {f"{proj}.weight": f"{path}.shared_expert.{proj}.weight" for proj in PROJECTIONS}
    return names
