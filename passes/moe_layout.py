"""The paper's MoE checkpoint layout: write sparsec's MoE nodes into it, read it into MoE nodes (`import_moe`).

"Understanding and Harnessing Sparsity in Unified Multimodal Models" released BAGEL checkpoints whose generation
FFNs are MoEs (BAGEL-MoE-7B-GEN-16to8: 16 experts, 8 active; -32to16). Its code (Shwai-He/SparseUnifiedModel,
`modeling/qwen2/modeling_qwen2.py` `Qwen2MoeSparseMoeBlock`, `modeling/bagel/qwen2_navit.py`
`Qwen2MoTDecoderLayer`) stores, for a converted FFN at module path P (BAGEL: `language_model.model.layers.{i}.
mlp_moe_gen`), all bias-free:

    P.gate.weight                              [E, H]     the router (top-k over raw logits, weights 1 + logit)
    P.gate_shared.weight                       [1, H]     the shared expert's gate (1 + gate_shared(x)); always
                                                          present, unused without a shared expert
    P.experts.{e}.{gate,up}_proj.weight        [I_e, H]   expert e, a SwiGLU FFN (`Qwen2MLP`)
    P.experts.{e}.down_proj.weight             [H, I_e]
    P.shared_expert.{gate,up,down}_proj.weight [I_s, H] / [H, I_s]   only when I_s > 0

and its LLM config (`llm_config.json`) holds `num_experts` (E), `top_k`, `num_shared_experts` (S) and
`transformed_gen` (the converted layers of the generation FFNs: a list of layer indices, or true for all; the
notebook `dense2sparse.ipynb` converts all but the first and last layer). The sizes are not stored: the code
derives them from the dense `intermediate_size` I as `I_s = I // (E + S) * S` and `I_e = (I - I_s) // E`, so a
MoE whose sizes do not follow that rule cannot be written (its conversion asserts the same). Differences from
the issue's summary, read in that code: `gate_shared` has no bias, and there is no config key for the sizes.

This module maps that layout onto `sparsec::moe` (gating `one_plus_logit`; `gate` -> `router_weight`, experts
stacked into `fc1/fc3/fc2_weight`, the shared expert kept as the dense FFN sliced to its neurons with
`<ffn>.moe.shared_gate_weight`; see `ffn_to_moe.rewrite_as_moe`). A checkpoint tensor name is `prefix` + the
program's FFN module path + the suffix above (sparsec's MoT model names BAGEL's FFNs `model.layers.{i}.mlp_moe_gen`,
so `prefix: language_model.` reads a BAGEL checkpoint). A layer index is the first integer in the path. Tensors
are written as the program holds them and read in the program's dtype.

A released BAGEL MoE checkpoint needs no pass: `--model DIR` builds its MoEs when it loads
(`sparsec.families.bagel.GenerationMoe`, the same nodes and names as this importer's), so the quality gates
compare every pass against the MoE model. `import_moe` puts the paper's MoEs into a program whose dense FFNs came
from elsewhere (another model class, a dense checkpoint); its gates compare against that dense program, which the
MoEs are not meant to match: turn them off there:
    passes:
      - import_moe: {path: BAGEL-MoE-7B-GEN-16to8, prefix: "language_model.", where: "model.layers.*.mlp_moe_gen"}
    quality: {gates: off}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sparsec.analysis.dependency import ffn_channel_group, linear_weight_node
from sparsec.analysis.ffn import Ffn, ffn_activation
from sparsec.analysis.match import NoMatch
from sparsec.analysis.regions import region_index
from sparsec.errors import PassError, SparsecError
from sparsec.ir.paths import glob_match
from sparsec.ir.program import Program
from sparsec.ops.paper_moe import CONFIG_KEYS, GATING, LAYERS_KEY, layer_index, paper_sizes, paper_tensor_names
from sparsec.passes.ffn_to_moe import ExpertWeights, moe_nodes, rewrite_as_moe
from sparsec.resources import read_json_object
from sparsec.transform.pass_manager import Pass, PassContext, PassResult

CONFIG_FILE = "llm_config.json"
TENSORS_FILE = "moe.safetensors"


def _shared_experts_for(intermediate: int, experts: int, shared: int, expert_size: int) -> int:
    """The `num_shared_experts` S under which the paper's code derives these sizes (SparsecError if none)."""
    for count in range(intermediate + 1):
        if paper_sizes(intermediate, experts, count) == (shared, expert_size):
            return count
    raise SparsecError(
        f"a MoE of {experts} experts of {expert_size} neurons and a shared expert of {shared} (FFN width "
        f"{intermediate}) fits no num_shared_experts S of the paper's code, which sizes the shared expert "
        f"I // (E + S) * S and each expert (I - shared) // E; convert with ffn_to_moe shared: S / (E + S) for an "
        "I divisible by E + S"
    )


# ----- export --------------------------------------------------------------------------------------------------
def paper_moe_state(
    program: Program, *, prefix: str = "", where: str = "**", layers_key: str = LAYERS_KEY
) -> tuple[dict[str, torch.Tensor], dict]:
    """The program's MoE nodes under `where` in the paper's layout: (tensors by name, config keys).

    Refuses (SparsecError) what the paper's block cannot hold: gating other than one_plus_logit, a non-SwiGLU FFN,
    biases (a router bias that is not zero included), output width other than the hidden size, MoEs that differ
    in E, top_k or sizes (the config is one for the model), sizes outside the paper's rule (`paper_sizes`).
    """
    nodes = {path: node for path, node in moe_nodes(program).items() if glob_match(path, where)}
    if not nodes:
        raise SparsecError(f"no MoE node under {where!r} to export; run ffn_to_moe (gating: {GATING}) first")
    shared_ffns = {f.path: f for f in region_index(program).ffns(where)}
    tensors: dict[str, torch.Tensor] = {}
    shapes = set()
    for path, node in sorted(nodes.items(), key=lambda item: layer_index(item[0])):
        _, router_w, router_b, fc1, fc1_b, fc3, fc3_b, fc2, top_k, activation, gating = node.args
        value = {name: None if n is None else program.state_tensor(program.state_name(n)) for name, n in
                 (("router_weight", router_w), ("router_bias", router_b), ("fc1", fc1), ("fc1_bias", fc1_b),
                  ("fc3", fc3), ("fc3_bias", fc3_b), ("fc2", fc2))}  # fmt: skip
        why = None
        if gating != GATING:
            why = f"gating {gating} (the paper's block routes by {GATING}; convert with gating: {GATING})"
        elif activation != "silu" or value["fc3"] is None:
            why = f"a {activation} {'gated ' if value['fc3'] is not None else ''}FFN (the paper's experts are SwiGLU)"
        elif value["fc1_bias"] is not None or value["fc3_bias"] is not None:
            why = "expert biases (the paper's experts have none)"
        elif value["router_bias"] is not None and value["router_bias"].any():
            why = "a router bias (the paper's router has none; convert with router: zero)"
        elif value["fc2"].shape[1] != value["fc1"].shape[2]:
            why = "an output width other than its input width"
        shared = shared_ffns.get(path)
        if why is None and shared is not None and (shared.kind != "gated" or _has_biases(shared)):
            why = "a shared expert that is not a bias-free SwiGLU FFN"
        if why is not None:
            raise SparsecError(f"the MoE at {path} has {why}; the paper's layout cannot hold it")
        experts, expert_size, hidden = value["fc1"].shape
        shared_size = shared.intermediate_size if shared is not None else 0
        shapes.add((experts, expert_size, shared_size, top_k))
        gate = f"{path}.moe.shared_gate_weight"  # `rewrite_as_moe`'s, with a shared expert only
        values = {
            "moe.router_weight": value["router_weight"],
            "moe.shared_gate_weight": (
                program.state_tensor(gate) if shared is not None else value["router_weight"].new_zeros(1, hidden)
            ),
            "moe.fc1_weight": value["fc1"],
            "moe.fc3_weight": value["fc3"],
            "moe.fc2_weight": value["fc2"],
        }
        if shared is not None:
            weights = ExpertWeights.of(program, shared)
            values |= {"gate_proj.weight": weights.fc1, "up_proj.weight": weights.fc3, "down_proj.weight": weights.fc2}
        for role, names in paper_tensor_names(f"{prefix}{path}", experts, shared is not None).items():
            tensors |= dict(zip(names, values[role])) if isinstance(names, tuple) else {names: values[role]}
    if len(shapes) > 1:
        raise SparsecError(
            f"the MoEs under {where!r} differ in (experts, expert width, shared width, top_k): {sorted(shapes)}; "
            "the paper's config holds one shape for every converted layer"
        )
    ((experts, expert_size, shared_size, top_k),) = shapes
    config = {
        "num_experts": experts,
        "top_k": top_k,
        "num_shared_experts": _shared_experts_for(
            experts * expert_size + shared_size, experts, shared_size, expert_size
        ),
        layers_key: sorted(layer_index(p) for p in nodes),
    }
    return {k: v.detach().contiguous().clone() for k, v in tensors.items()}, config


def _has_biases(ffn: Ffn) -> bool:
    return any(len(linear.args) > 2 and linear.args[2] is not None for linear in (ffn.gate, ffn.up, ffn.down))


def export_paper_moe(
    program: Program,
    directory: str | Path,
    *,
    prefix: str = "",
    where: str = "**",
    layers_key: str = LAYERS_KEY,
) -> dict:
    """Write the program's MoEs in the paper's layout: `directory/moe.safetensors` (`paper_moe_state`'s tensors) and
    the config keys into `directory/llm_config.json` (merged into the one there, else written alone); return
    the config keys. Both files are staged and renamed into place only once both are written. To continue training with the paper's code, put these tensors into its `ema.safetensors`
    in place of the converted FFNs' dense `{gate,up,down}_proj` and the keys into its `llm_config.json`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, config = paper_moe_state(program, prefix=prefix, where=where, layers_key=layers_key)
    config_path = directory / CONFIG_FILE
    fix = "restore it, or remove it to write the paper's keys alone"
    merged = {**(read_json_object(config_path, fix) if config_path.exists() else {}), **config}
    tensors_partial, config_partial = directory / f".{TENSORS_FILE}.partial", directory / f".{CONFIG_FILE}.partial"
    save_file(tensors, str(tensors_partial))
    config_partial.write_text(json.dumps(merged, indent=2) + "\n")
    tensors_partial.replace(directory / TENSORS_FILE)  # both written before either replaces what was there
    config_partial.replace(config_path)
    return config


# ----- import --------------------------------------------------------------------------------------------------
@dataclass
class _Planned:
    ffn: Ffn
    activation: str
    shared: int
    expert_size: int


def _planned(
    program: Program, config: Mapping, where: str, layers_key: str, who: str
) -> tuple[list[_Planned], int, int]:
    """The FFNs to convert with their sizes, and (experts, top_k), checked against the config."""
    missing = [k for k in (*CONFIG_KEYS, layers_key) if k not in config]
    if missing:
        raise SparsecError(f"{who}: the paper's config lacks {missing}; it needs {[*CONFIG_KEYS, layers_key]}")
    experts, top_k, shared_experts, layers = (config[k] for k in (*CONFIG_KEYS, layers_key))
    if layers is False or layers == []:
        raise SparsecError(f"{who}: the config's {layers_key} is {layers!r}: the checkpoint converts no FFN")
    ffns = region_index(program).require_ffns(where, who)
    if layers is not True:
        ffns = [f for f in ffns if layer_index(f.path) in set(layers)]
        absent = sorted(set(layers) - {layer_index(f.path) for f in ffns})
        if absent:
            raise SparsecError(f"{who}: {layers_key} lists layers {absent}, which have no FFN under {where!r}")
    planned = []
    for ffn in ffns:
        if (
            ffn.kind != "gated"
            or _has_biases(ffn)
            or any(linear_weight_node(x)[1] for x in (ffn.gate, ffn.up, ffn.down))
        ):
            raise PassError(f"{who}: FFN {ffn.describe()} is not a bias-free SwiGLU FFN like the paper's experts")
        shared, expert_size = paper_sizes(ffn.intermediate_size, experts, shared_experts)
        if expert_size < 1 or not 1 <= top_k <= experts:
            raise SparsecError(f"{who}: num_experts={experts}, top_k={top_k} do not fit FFN {ffn.describe()}")
        activation = ffn_activation(ffn)
        if isinstance(activation, NoMatch):
            raise PassError(f"{who}: FFN {ffn.describe()}: {activation.rule}")
        planned.append(_Planned(ffn, activation, shared, expert_size))
    return planned, experts, top_k


def _expected(plan: _Planned, experts: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor of the paper's layout (of each expert's part), by `paper_tensor_names`' role."""
    width, shared = plan.expert_size, plan.shared
    return {
        "moe.router_weight": (experts, hidden),
        "moe.shared_gate_weight": (1, hidden),
        "moe.fc1_weight": (width, hidden),
        "moe.fc3_weight": (width, hidden),
        "moe.fc2_weight": (hidden, width),
        "gate_proj.weight": (shared, hidden),
        "up_proj.weight": (shared, hidden),
        "down_proj.weight": (hidden, shared),
    }


@dataclass(frozen=True, kw_only=True)
class ImportedFfn:
    """One dense FFN replaced by the checkpoint's MoE: its experts, their width, top-k, the shared expert's width
    and the state tensors the MoE node reads."""

    path: str
    experts: int
    expert_size: int
    top_k: int
    shared_neurons: int
    state: list[str]


@dataclass(frozen=True, kw_only=True)
class ImportDecisions:
    """What `import_moe` did (decisions.json holds these fields): the config read, the gating and each FFN."""

    config: str
    gating: str
    ffns: list[ImportedFfn]


def import_paper_moe(
    program: Program,
    read: Callable[[str], torch.Tensor | None],
    config: Mapping,
    *,
    prefix: str = "",
    where: str = "**",
    layers_key: str = LAYERS_KEY,
    source: str = "the checkpoint",
    who: str = "import_moe",
) -> list[ImportedFfn]:
    """Turn the dense FFNs under `where` of the layers the config converts into the paper's MoEs read by `read`
    (a tensor name -> tensor, None if absent); return one decision per FFN. Every tensor is checked (present, shape)
    before the program changes: a SparsecError names the tensor, its shape and the expected shape."""
    planned, experts, top_k = _planned(program, config, where, layers_key, who)
    loaded: list[dict[str, torch.Tensor]] = []
    for plan in planned:
        hidden = plan.ffn.up.args[0].meta["val"].shape[-1]
        expected = _expected(plan, experts, hidden)
        tensors = {}
        for role, names in paper_tensor_names(f"{prefix}{plan.ffn.path}", experts, plan.shared > 0).items():
            parts = []
            for name in names if isinstance(names, tuple) else (names,):
                shape, tensor = expected[role], read(name)
                if tensor is None:
                    raise SparsecError(
                        f"{who}: {name} is missing from {source}; expected a tensor of shape {list(shape)}"
                    )
                if tuple(tensor.shape) != shape:
                    raise SparsecError(
                        f"{who}: {name} in {source} has shape {list(tensor.shape)}, expected {list(shape)} "
                        f"(num_experts={experts}, num_shared_experts={config['num_shared_experts']}, FFN width "
                        f"{plan.ffn.intermediate_size}, hidden {hidden})"
                    )
                parts.append(tensor)
            tensors[role] = torch.stack(parts) if isinstance(names, tuple) else parts[0]
        loaded.append(tensors)
    decisions = []
    for plan, tensors in zip(planned, loaded):
        ffn = plan.ffn
        dtype = program.state_tensor(program.state_name(linear_weight_node(ffn.gate)[0])).dtype

        stacked = {
            "fc1_weight": tensors["moe.fc1_weight"].to(dtype),
            "fc1_bias": None,
            "fc3_weight": tensors["moe.fc3_weight"].to(dtype),
            "fc3_bias": None,
            "fc2_weight": tensors["moe.fc2_weight"].to(dtype),
        }
        shared_idx = torch.arange(plan.shared)
        names = rewrite_as_moe(
            program,
            ffn,
            ffn_channel_group(program, ffn),
            shared_idx,
            stacked,
            tensors["moe.router_weight"].to(dtype),
            None,
            plan.activation,
            top_k,
            GATING,
            tensors["moe.shared_gate_weight"].to(dtype),
        )
        for proj, linear in (("gate_proj", ffn.gate), ("up_proj", ffn.up), ("down_proj", ffn.down)):
            if plan.shared:  # the sliced dense FFN becomes the checkpoint's shared expert
                weight = program.state_name(linear_weight_node(linear)[0])
                program.replace_state(weight, tensors[f"{proj}.weight"].to(dtype))
        decisions.append(
            ImportedFfn(
                path=ffn.path,
                experts=experts,
                expert_size=plan.expert_size,
                top_k=top_k,
                shared_neurons=plan.shared,
                state=sorted(names.values()),
            )
        )
    return decisions


def read_checkpoint(path: Path) -> tuple[Callable[[str], torch.Tensor | None], str]:
    """A reader of tensors by name from a .safetensors file or every one in a directory (read on demand)."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise SparsecError(f"import_moe: {path} is not a .safetensors file or a directory holding some")
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            where |= dict.fromkeys(f.keys(), file)

    def read(name: str) -> torch.Tensor | None:
        if name not in where:
            return None
        with safe_open(str(where[name]), framework="pt") as f:
            return f.get_tensor(name)

    return read, ", ".join(f.name for f in files)


@dataclass(frozen=True)
class ImportPlan:
    """The paper's MoE config (checked against the program) and the file it came from."""

    config: dict
    config_path: Path


class ImportMoe(Pass):
    """The paper's released MoE checkpoint (`path`) into the program's dense FFNs (see the module docstring)."""

    name = "import_moe"

    @dataclass
    class Options:
        path: str = ""
        prefix: str = ""
        where: str = "**"
        config: str = ""  # default: llm_config.json beside the tensors
        layers_key: str = LAYERS_KEY

        def __post_init__(self) -> None:
            if not self.path:
                raise ValueError("path: the checkpoint (a .safetensors file or its directory) is required")

    def _config(self) -> tuple[dict, Path]:
        path = Path(self.options.path)
        config = (
            Path(self.options.config) if self.options.config else (path if path.is_dir() else path.parent) / CONFIG_FILE
        )
        if not config.is_file():
            raise SparsecError(f"import_moe: no config {config}; set config: to the paper's {CONFIG_FILE}")
        return read_json_object(config, f"set config: to the paper's {CONFIG_FILE}"), config

    def requires(self, program: Program, ctx: PassContext) -> ImportPlan:
        config, path = self._config()
        _planned(program, config, self.options.where, self.options.layers_key, self.name)
        return ImportPlan(config, path)

    def run(self, program: Program, ctx: PassContext, plan: ImportPlan) -> PassResult:
        config, config_path = plan.config, plan.config_path
        o = self.options
        read, source = read_checkpoint(Path(o.path))
        decisions = import_paper_moe(
            program, read, config, prefix=o.prefix, where=o.where, layers_key=o.layers_key, source=source
        )
        return PassResult(
            modified=True,
            stats={"ffns": len(decisions), "experts": config["num_experts"], "top_k": config["top_k"]},
            decisions=ImportDecisions(config=str(config_path), gating=GATING, ffns=decisions),
        )
