"""A transformed program as a Hugging Face checkpoint of its source model's class: config.json rewritten to the
program's architecture, the program's tensors under the class's own names.

`plan_checkpoint` decides, from the program alone, whether the model class of its `source_config` can compute what
the program computes, and how: blocks dropped are removed and the rest renumbered (with every per-layer config list
sliced to match), and the widths the passes changed are written to the config (`num_hidden_layers`,
`intermediate_size`, `num_attention_heads`, `num_key_value_heads`, `head_dim` kept, `hidden_size`; through the
config class's `attribute_map`, so GPT-2's `n_layer` is set too). The tensors the class expects are matched by name
and shape against the program's state; anything the class has no place for, or a shape it would not build, is a
refusal naming it (`CheckpointRefused`, before anything is written). What the class computes from those tensors is
then checked against the program by the `hf` target's parity, never assumed.

Not expressible, so refused with the recipe change that makes it so: a model of no class AutoModelForCausalLM loads
(encoders, vision towers, multimodal models), blocks of different widths (one `intermediate_size`, one head
count per config), a block without its attention or FFN (a sublayer drop), MoE programs (`ffn_to_moe`, a source
MoE model), attention heads the graph does not show (`Architecture.unread`), a head width the family derives from
`hidden_size / num_attention_heads` that pruning changed.

generation_config.json is made from the rewritten config (`GenerationConfig.from_model_config`): the source
directory's own, with its sampling defaults, is not carried over.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparsec.analysis.architecture import Architecture, architecture
from sparsec.errors import SparsecError

FFN_WIDTH_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size")  # the FFN width, by family


class CheckpointRefused(SparsecError):
    """The program cannot be written as a checkpoint of its source model's class; the message says why and what
    recipe change makes it expressible."""


@dataclass(frozen=True)
class CheckpointPlan:
    """How to write a program as a checkpoint: `config` (config.json's content), `tensors` (checkpoint name ->
    the program's state name) and `kept_blocks` (the source model's indices of the blocks kept, in order)."""

    config: dict[str, Any]
    tensors: dict[str, str]
    kept_blocks: tuple[int, ...]
    model_class: str


def plan_checkpoint(program) -> CheckpointPlan:
    """The `CheckpointPlan` of `program`, or `CheckpointRefused` (module docstring)."""
    source = program.source_config
    if not source or not source.get("model_type"):
        raise CheckpointRefused(
            "--target hf writes the model as a checkpoint of the class it was loaded as, but this program has no "
            "source config (it was not captured from a Hugging Face model); use another --target"
        )
    model_class = _model_class(source)
    arch = architecture(program)
    _check_expressible(arch)
    kept = tuple(_block_index(arch.stack, b.path) for b in arch.blocks)
    config = _rewritten_config(source, arch, kept)
    tensors = _match_tensors(program, config, model_class, arch.stack, kept)
    return CheckpointPlan(config, tensors, kept, model_class.__name__)


def _check_expressible(arch: Architecture) -> None:
    if arch.unread:
        raise CheckpointRefused(f"--target hf: the program's architecture is not fully known: {arch.unread[0]}")
    if not arch.blocks:
        raise CheckpointRefused("--target hf: no block stack found in the program")
    if any(b.experts is not None for b in arch.blocks):
        raise CheckpointRefused(
            "--target hf does not write MoE programs yet (ffn_to_moe, prune_experts, a source MoE model); use "
            "--target onnxruntime or aotinductor"
        )
    partial = [b.path for b in arch.blocks if b.heads is None or b.ffn is None]
    if partial:
        raise CheckpointRefused(
            f"--target hf: block {partial[0]} has no attention or no FFN (a sublayer was dropped), which a "
            "Hugging Face config cannot state; drop whole blocks instead (drop_layers without `kind`)"
        )
    for field, fix in (
        ("ffn", "slice every FFN to one width (slice_neurons with `keep` or `keep_ratio`, not a global `scope`)"),
        ("heads", "prune every attention to one head count (prune_heads with `keep` or `keep_ratio`)"),
        ("kv_heads", "prune every attention to one KV head count (prune_heads with `keep` or `keep_ratio`)"),
        ("head_dim", "keep one head width"),
    ):
        if arch.uniform(field) is None:
            raise CheckpointRefused(
                f"--target hf: the blocks have different {field} ({arch.values(field)}), and a Hugging Face config "
                f"has one; {fix}"
            )


def _block_index(stack: str, path: str) -> int:
    index = path[len(stack) + 1 :]
    if not index.isdigit():
        raise CheckpointRefused(f"--target hf: block {path} is not numbered under {stack}")
    return int(index)


def _rewritten_config(source: dict[str, Any], arch: Architecture, kept: tuple[int, ...]) -> dict[str, Any]:
    """`source` with the program's architecture: through the config class, so each family's own key is set."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(**copy.deepcopy(source))
    layers = config.num_hidden_layers
    heads, kv_heads, head_dim = arch.uniform("heads"), arch.uniform("kv_heads"), arch.uniform("head_dim")
    derived_head_dim = "head_dim" not in config.to_dict()  # hidden_size / heads, as a property or in the model
    if derived_head_dim and arch.hidden // heads != head_dim:
        raise CheckpointRefused(
            f"--target hf: {config.model_type} derives the head width from hidden_size / num_attention_heads, so "
            f"{heads} heads of {head_dim} in a hidden width of {arch.hidden} cannot be stated; leave its heads "
            "unpruned"
        )
    values = {"num_hidden_layers": len(kept), "hidden_size": arch.hidden, "num_attention_heads": heads}
    if hasattr(config, "num_key_value_heads"):
        values["num_key_value_heads"] = kv_heads
    elif kv_heads != heads:
        raise CheckpointRefused(
            f"--target hf: {config.model_type} has no num_key_value_heads, so {kv_heads} KV heads for {heads} query "
            "heads cannot be stated; prune with `unit: kv_group`"
        )
    if not derived_head_dim:
        values["head_dim"] = head_dim
    stated = config.to_dict()
    ffn_key = next((k for k in FFN_WIDTH_KEYS if k in stated), None)  # GPT-2's n_inner: None means 4 x hidden
    if ffn_key is not None:
        values[ffn_key] = arch.uniform("ffn")
    elif arch.uniform("ffn") != 4 * arch.hidden:
        raise CheckpointRefused(
            f"--target hf: {config.model_type}'s config states no FFN width (it is 4 x hidden_size), so an FFN of "
            f"{arch.uniform('ffn')} cannot be stated; leave its FFNs unsliced"
        )
    for key, value in values.items():
        setattr(config, key, value)
    out = config.to_dict()
    for key, value in list(out.items()):
        if isinstance(value, list) and len(value) == layers and key != "architectures":
            out[key] = [value[i] for i in kept]  # per-layer lists: layer_types, ...
    return out


def _model_class(config: dict[str, Any]) -> type:
    """The class the program was captured from (`architectures`, as `sparsec.capture` records it): one that
    `AutoModelForCausalLM` loads, else refused."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = (config.get("architectures") or ["(none)"])[0]
    cls = getattr(transformers, name, None)
    if cls is None or name not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        raise CheckpointRefused(
            f"--target hf writes causal language models (a class AutoModelForCausalLM loads); the program was "
            f"captured from {name}; use --target onnxruntime or aotinductor"
        )
    return cls


def _match_tensors(program, config: dict[str, Any], model_class: type, stack: str, kept: tuple[int, ...]):
    """Checkpoint name -> program state name for every tensor the class saves, checked by shape; refused where the
    class expects a parameter the program lacks or of another shape, or the program has a parameter with no place.
    Tied tensors (an LM head tied to the embedding) are saved once, under the first name (the one the class ties
    the others to when it loads); buffers the program does not read are left to the class to make."""
    from transformers import AutoConfig

    with torch.device("meta"):
        skeleton = model_class(AutoConfig.for_model(**config))
    parameters = {name for name, _ in skeleton.named_parameters(remove_duplicate=False)}
    shapes = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    renumber = re.compile(rf"^{re.escape(stack)}\.(\d+)\.")
    state = set(program.state_placeholders())
    tensors, missing, mismatched = {}, [], []
    for names in _tensor_groups(skeleton):
        sources = [renumber.sub(lambda m: f"{stack}.{kept[int(m.group(1))]}.", n) for n in names]
        found = next((s for s in sources if s in state), None)
        if found is None:
            if parameters & set(names):
                missing.append(names[0])
            continue
        want, shape = shapes[names[0]], tuple(program.state_shape(found))
        if shape != want:
            mismatched.append(f"{names[0]}: the program's {found} is {list(shape)}, the class builds {list(want)}")
            continue
        tensors[names[0]] = found
    unplaced = sorted(set(program.parameter_names()) - set(tensors.values()))
    if missing or mismatched or unplaced:
        what = [*(f"missing {n}" for n in missing[:3]), *mismatched[:3], *(f"no place for {n}" for n in unplaced[:3])]
        raise CheckpointRefused(
            f"--target hf: the program's tensors do not fit {model_class.__name__} with the rewritten config: "
            + "; ".join(what)
        )
    return tensors


def _tensor_groups(model) -> list[list[str]]:
    """The names of each tensor the model saves, in state-dict order; tied ones (the LM head and the embedding)
    share one group."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def write_checkpoint(program, plan: CheckpointPlan, directory: Path) -> dict[str, Any]:
    """config.json, model.safetensors (the program's tensors in their own dtype) and generation_config.json into
    `directory`; returns what was written (the report's `checkpoint`)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, GenerationConfig

    tensors = {name: program.state_tensor(source).detach().contiguous() for name, source in plan.tensors.items()}
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    config = AutoConfig.for_model(**{**plan.config, "dtype": str(dtype).removeprefix("torch.")})
    config.architectures = [plan.model_class]
    config.save_pretrained(directory)
    GenerationConfig.from_model_config(config).save_pretrained(directory)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return {
        "model_class": plan.model_class,
        "dtype": str(dtype).removeprefix("torch."),
        "kept_blocks": list(plan.kept_blocks),
        "tensors": len(tensors),
    }
