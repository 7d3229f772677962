"""The `Family` protocol: what sparsec knows about one kind of model, and the `EntryPoint`s it is deployed as.

A family recognises its models (`config.model_type`, else `matches(model)`), tags their components, makes
valid example inputs with their dynamic dims, names their programs (`entry_points`), builds its tiny
built-in models (`builtin:NAME`) and picks the model class for a config without `architectures`. The base
class is a generic causal LM over `input_ids` / `attention_mask`; a family module overrides what differs and
lists its families in a module-level `FAMILIES` tuple (`sparsec.families` finds them there).

Example::

    import transformers

    from sparsec.families.base import Family
    from sparsec.ir.tags import TagRule

    FAMILIES = (Family(
        name="gpt2", model_types=("gpt2",), architecture="GPT2LMHeadModel",
        tags=(TagRule("transformer.h.*.mlp", "understanding"),),
        builtin_configs={"tiny-gpt2": lambda: transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2)},
    ),)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsec.ir.capture import capture_program
from sparsec.ir.program import Program
from sparsec.ir.tags import Tagger, TagRule

TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")

DynamicDims = dict[str, dict[int, str]]

# Config fields that state the longest sequence a model takes, the first one a config has wins.
SEQUENCE_LIMITS = ("max_position_embeddings", "max_seq_len", "n_positions", "max_sequence_length", "seq_length")


@dataclass(frozen=True, kw_only=True, eq=False)
class Family:
    """Facts and behaviour sparsec knows about one model family; subclass to change the behaviour.

    Attributes:
        name: short name (`qwen2`, `janus`), unique among registered families; programs record it.
        model_types: `config.model_type` values that select this family (unique among families; asked first).
        module_classes: class names that select it when no family claims the model's `model_type`
            (diffusers models have none), found anywhere in the module tree so a wrapper matches too.
        tags: default component tag rules (first match wins).
        modality_mask: for Mixture-of-Transformers models, the [B, S] input that is 1 on generation tokens.
        architecture: the model class name for a config whose `architectures` is missing.
        builtin_configs: `{builtin name: () -> config}`, tiny models with seeded random weights
            (`builtin:NAME`), built with the class `model_class` picks.
        builtin_models: `{builtin name: seed -> model}`, tiny models that have no transformers config.
        task_entry_points: `{probe task: entry point}` for tasks not served by the entry point of their name
            or by the first one (`sparsec analyze`).
    """

    name: str
    model_types: tuple[str, ...] = ()
    module_classes: tuple[str, ...] = ()
    tags: tuple[TagRule, ...] = ()
    modality_mask: str | None = None
    architecture: str | None = None
    builtin_configs: Mapping[str, Callable[[], Any]] = field(default_factory=dict)
    builtin_models: Mapping[str, Callable[[int], nn.Module]] = field(default_factory=dict)
    task_entry_points: Mapping[str, str] = field(default_factory=dict)

    def matches(self, model: nn.Module) -> bool:
        """Whether `model` is of this family although no family claims its `config.model_type`: by default,
        a module of one of `module_classes` anywhere in its tree (no import of the classes' library needed)."""
        return bool(self.module_classes) and any(type(m).__name__ in self.module_classes for m in model.modules())

    def example_inputs(self, model: nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random but valid inputs for capture, at the given batch size and text length."""
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, _vocab_size(model), (batch, seq), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def dynamic_dims(self, inputs: Mapping[str, torch.Tensor]) -> DynamicDims:
        """Batch is dynamic on every input; sequence length on the token-aligned text inputs."""
        dims: DynamicDims = {}
        for name, value in inputs.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            dims[name] = {0: "batch"}
            if (name in TEXT_INPUTS or name == self.modality_mask) and value.dim() >= 2:
                dims[name][1] = "seq"
        return dims

    def dim_bounds(self, model: nn.Module) -> dict[str, int]:
        """Largest sizes of the dynamic dims the model's own tables bound: `seq` at the config's longest sequence
        (`SEQUENCE_LIMITS`: `max_position_embeddings`, or a family's own name for it, e.g. MPT's `max_seq_len`):
        a learned position table, a `position_ids` buffer or an ALiBi table built at that length and sliced to the
        input's (torch.export refuses such a dim unbounded). Every model with the field gets the bound: a rotary
        model's code does not read past it either way."""
        config = getattr(model, "config", None)
        config = getattr(config, "text_config", config)
        limit = next((getattr(config, k) for k in SEQUENCE_LIMITS if isinstance(getattr(config, k, None), int)), None)
        return {"seq": int(limit)} if limit is not None and limit >= 2 else {}

    def entry_points(self, model: nn.Module) -> dict[str, EntryPoint]:
        """The programs `model` is deployed as; by default one, `forward`."""

        def forward_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
            return self.example_inputs(model, batch, seq, seed=seed)

        dims = self.dynamic_dims(forward_inputs(2, 2, 0))
        return {
            "forward": EntryPoint("forward", model, forward_inputs, dims, self, "forward()", self.dim_bounds(model))
        }

    def model_class(self, name: str) -> type[nn.Module] | None:
        """The model class called `name` (an entry of `config.architectures`, or `architecture`), None if
        unknown: from transformers; families with their own model classes override this."""
        import transformers

        return getattr(transformers, name, None)

    def reads_directory(self, directory: Path) -> bool:
        """Whether `directory` is a checkpoint in a layout of this family's own rather than a `save_pretrained` one
        (BAGEL's `llm_config.json` + `ema.safetensors`); `--model DIR` then builds it with `build_from_directory`."""
        return False

    def build_from_directory(self, directory: Path) -> nn.Module:
        """The model of a checkpoint in this family's own layout (`reads_directory`), built from its config files in
        the default dtype and device, reading no weight; its parameter names are the checkpoint's tensor names (or
        `stored_names` says which they are), so `sparsec.models` reads (or lazily maps) each one from the safetensors files and checks its shape."""
        raise NotImplementedError(f"family {self.name!r} reads no checkpoint layout of its own")

    def stored_names(self, model: nn.Module) -> dict[str, str | tuple[str, ...]]:
        """The parameters of a model `build_from_directory` made that its checkpoint stores under other names:
        parameter name -> the tensor's name, or the names of the tensors whose stack (along a new first dimension,
        in order) it is (the paper's MoE checkpoints store each expert on its own, `sparsec::moe` takes them
        stacked). Every other parameter is stored under its own name."""
        return {}

    def directory_config(self, directory: Path) -> dict[str, Any]:
        """The language model's config fields (`vocab_size`, `hidden_size`, `num_hidden_layers`) of a checkpoint in
        this family's own layout, for the compile's memory estimate before the model loads."""
        raise NotImplementedError(f"family {self.name!r} reads no checkpoint layout of its own")

    def builtin_names(self) -> tuple[str, ...]:
        """The names of this family's built-in tiny models."""
        return (*self.builtin_configs, *self.builtin_models)


GENERIC = Family(name="unknown")


@dataclass(frozen=True)
class EntryPoint:
    """One capturable program of a model.

    Attributes:
        name: `forward`, `understanding`, `generation_step`, `vq_decode`, ...
        module: the module to capture, called as `module(**inputs)`; shares weights with the model.
        make_inputs: `(batch, seq, seed) -> inputs`, random but valid example inputs (see `example_inputs`).
        dynamic_dims: `{input: {axis: dim_name}}` for `sparsec.capture(dynamic=...)`.
        family: the model family (its component tags apply to every entry point).
        description: one line on what the program computes.
        dim_bounds: `{dim name: largest size}` for the dynamic dims the model bounds (`Family.dim_bounds`).
    """

    name: str
    module: nn.Module
    make_inputs: Callable[[int, int, int], dict[str, torch.Tensor]]
    dynamic_dims: DynamicDims
    family: Family
    description: str
    dim_bounds: Mapping[str, int] = field(default_factory=dict)

    def example_inputs(self, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random valid inputs; what `seq` sizes depends on the entry point (see its `description`)."""
        return self.make_inputs(batch, seq, seed)

    def capture(
        self, batch: int = 2, seq: int = 16, seed: int = 0, *, dynamic: bool = True, tags: Sequence[TagRule] = ()
    ) -> Program:
        """Capture `module` at example inputs of this size, with this entry point's dynamic dims (or static
        shapes with `dynamic=False`) and its family's component tags, `tags` in front."""
        tagger = Tagger(self.family.tags).with_overrides(tags)
        return capture_program(
            self.module,
            self.example_inputs(batch, seq, seed),
            self.dynamic_dims if dynamic else {},
            family=self.family.name,
            tagger=tagger,
            dim_bounds=self.dim_bounds,
        )


def _vocab_size(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "text_config", config).vocab_size)


def tiny_decoder_config(model_type: str) -> dict:
    """Config fields of the tiny decoders the built-in models use (4 layers, width 64, vocabulary 256)."""
    return dict(
        model_type=model_type,
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
