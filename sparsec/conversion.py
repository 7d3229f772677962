"""A checkpoint's tensors under the names a transformers model loads them by: the conversion `from_pretrained` applies.

transformers 5 renames and fuses tensors while it loads a checkpoint (`transformers.conversion_mapping`, applied by
`transformers.core_model_loading`): legacy prefixes (LLaVA's stored `language_model.model.*` is the model's
`model.language_model.*`; Qwen2-VL's and Emu3's alike), renamed tensors (GPT-NeoX stores `embed_out`, the model
calls it `lm_head`) and MoE experts stored one by one, fused into one tensor (Mixtral's `experts.{i}.w1` and `w3`,
stacked and concatenated into `experts.gate_up_proj`; Qwen2/3-MoE's `experts.{i}.gate_proj` / `up_proj` alike).
`save_pretrained` writes the checkpoint back in the stored layout, so a directory it has just written holds these
names.

`checkpoint_tensors(model, where)` maps the state names of `model` to the tensors the checkpoint gives them, through
transformers' own conversion (the mapping it registers for the model's classes, `rename_source_key`, its
converters), not a table of sparsec's; nothing is read. A renamed tensor is read as it lies (`StoredTensor`); a
converted one is a `ConvertedTensor`, which reads its pieces and runs transformers' converter on them when asked.
Its shape comes from running the converter once on meta tensors; a conversion that cannot run so (an op that needs
real values) is reported in `CheckpointTensors.failed`, and its tensors are left out.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparsec.ir.stored import ConvertedTensor, StoredTensor

Index = dict[str, tuple[Path, tuple[int, ...]]]  # stored key -> (file, shape), as `sparsec.models` reads the headers


@dataclass
class CheckpointTensors:
    """What a checkpoint gives a model, after transformers' conversion.

    Attributes:
        stored: state name (parameter or buffer) -> its tensor, for every name the checkpoint gives one.
        unused: the name transformers loads a stored tensor as -> the stored key, for tensors the model has no place
            for (`from_pretrained`'s unexpected keys).
        failed: one line per conversion that could not be planned (its tensors are not in `stored`).
    """

    stored: dict[str, StoredTensor] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)


def checkpoint_tensors(model: torch.nn.Module, where: Index) -> CheckpointTensors:
    """The tensors of the checkpoint indexed by `where` that `model` loads, by the model's state names, converted as
    `from_pretrained` converts them (see the module docstring): the same keys, renamed the same way, in the same
    order (a fused tensor stacks its pieces as transformers does), each read in the dtype of the model's tensor.
    A model that is no transformers `PreTrainedModel` gets no conversion: names as stored, `base_model_prefix`
    added or removed."""
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    renamings, converters = _transforms(model)
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    found = CheckpointTensors()
    renamed: dict[str, str] = {}  # state name -> stored key
    fused: dict[str, tuple[object, list[tuple[str, str]]]] = {}  # first target -> (converter, [(pattern, key)])
    for key in sorted(where, key=dot_natural_key):  # as from_pretrained: the order experts are stacked in
        name, pattern = rename_source_key(key, renamings, converters, prefix, state)
        if name not in state and key in state:  # as from_pretrained: a key renamed away from its own name
            name, pattern = rename_source_key(key, [], [], prefix, state)
        if name not in state:
            found.unused.setdefault(name, key)
        elif pattern is None:
            renamed.setdefault(name, key)
        else:
            fused.setdefault(name, (by_pattern[pattern], []))[1].append((pattern, key))
    for name, key in renamed.items():
        found.stored[name] = StoredTensor(where[key][0], key, where[key][1], state[name].dtype)
    if fused:
        shapes = _Shapes({name: (tuple(t.shape), t.dtype) for name, t in state.items()}, model.config)
        for first, (converter, pieces) in fused.items():
            _plan(converter, first, pieces, where, state, shapes, found)
    return found


def _transforms(model: torch.nn.Module) -> tuple[list, list]:
    """transformers' renamings and converters for `model`, as `from_pretrained` collects them; none for a model
    that is no `PreTrainedModel`."""
    from transformers import PreTrainedModel
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    transforms = get_model_conversion_mapping(model) if isinstance(model, PreTrainedModel) else []
    return (
        [t for t in transforms if isinstance(t, WeightRenaming)],
        [t for t in transforms if isinstance(t, WeightConverter)],
    )


def _plan(
    converter,
    first: str,
    pieces: list[tuple[str, str]],
    where: Index,
    state: dict[str, torch.Tensor],
    shapes: _Shapes,
    found: CheckpointTensors,
) -> None:
    """Add to `found.stored` the tensors that `converter` makes of the stored `pieces` ((source pattern, key)), whose
    first target is the state name `first`; their shapes from a run on meta tensors. A failed run goes to
    `found.failed`."""
    dtype = state[first].dtype  # from_pretrained casts every piece to the first target's dtype before converting
    patterns = tuple(pattern for pattern, _ in pieces)
    try:
        metas = [torch.empty(where[key][1], dtype=dtype, device="meta") for _, key in pieces]
        results = _convert(converter, first, patterns, metas, shapes)
    except Exception as exc:
        ops = ", ".join(type(op).__name__ for op in getattr(converter, "operations", ()))
        found.failed.append(
            f"{pieces[0][1]!r} and {len(pieces) - 1} more -> {first!r} ({ops}: {type(exc).__name__}: {exc})"
        )
        return
    sources = tuple((where[key][0], key) for _, key in pieces)
    for target, meta in results.items():
        if target not in state:
            found.unused.setdefault(target, pieces[0][1])
            continue
        found.stored.setdefault(
            target,
            ConvertedTensor(
                file=sources[0][0],
                key=f"{target} (converted from {sources[0][1]} and {len(sources) - 1} more)",
                shape=tuple(meta.shape),
                dtype=dtype,
                sources=sources,
                convert=_Conversion(converter, first, patterns, target, shapes),
            ),
        )


def _convert(converter, first: str, patterns: tuple[str, ...], tensors: list[torch.Tensor], shapes: _Shapes) -> dict:
    """Run (a copy of) transformers' `converter` on `tensors`, collected under their source `patterns` for the
    target `first` as `from_pretrained` collects them: target state name -> tensor."""
    converter = copy.deepcopy(converter)  # collecting and converting consume the converter's state
    for pattern, tensor in zip(patterns, tensors, strict=True):
        converter.add_tensor(first, "", pattern, lambda tensor=tensor: tensor)  # a callable: read synchronously
    results = converter.convert(first, model=shapes, config=shapes.config)
    return {name: value[0] if isinstance(value, list) else value for name, value in results.items()}


@dataclass(frozen=True, eq=False)
class _Shapes:
    """What transformers' conversion ops ask of the model: a parameter's shape and dtype (`get_parameter`, as a meta
    tensor) and the config; holds no weight, so a `ConvertedTensor` keeps no model alive."""

    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]
    config: object

    def get_parameter(self, name: str) -> torch.Tensor:
        shape, dtype = self.shapes[name]
        return torch.empty(shape, dtype=dtype, device="meta")


@dataclass(frozen=True, eq=False)
class _Conversion:
    """The `convert` of a `ConvertedTensor`: the read pieces -> its `target` tensor, by transformers' converter."""

    converter: object
    first: str
    patterns: tuple[str, ...]
    target: str
    shapes: _Shapes

    def __call__(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return _convert(self.converter, self.first, self.patterns, tensors, self.shapes)[self.target]
