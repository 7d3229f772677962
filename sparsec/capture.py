"""`sparsec.capture`: a model -> one `Program`, with the dynamic dims and component tags of its family.

The mechanics (torch.export, KV caches off, errors naming the failing module) are `sparsec.ir.capture`;
this adds what the model family knows (`sparsec.families`).

A model of no known family is captured with every region tagged `shared`: right for a plain LLM, wrong for a
multimodal model whose components nobody tagged. That is said in one line on the `sparsec.capture` logger
(level WARNING: printed to stderr as it is, without a source line, where the application configured no
logging; `logging.getLogger("sparsec.capture").setLevel(logging.ERROR)` silences it), not as a Python
warning, which reads as an error and quotes a line of sparsec.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from sparsec.families import GENERIC, Family, detect_family
from sparsec.ir.capture import capture_program, check_example_inputs
from sparsec.ir.program import Program
from sparsec.ir.tags import Tagger, TagRule

DynamicSpec = bool | Mapping[str, Mapping[int, str]]

log = logging.getLogger(__name__)


def capture(
    model: torch.nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    dynamic: DynamicSpec = True,
    *,
    family: Family | None = None,
    tags: Sequence[TagRule] = (),
) -> Program:
    """Capture `model` called as `model(**example_inputs)` as one `Program`.

    Args:
        model: the module (put in eval mode; Hugging Face KV caches are disabled during capture).
        example_inputs: keyword inputs by name; every tensor input of the deployed model must be here.
        dynamic: True for the family's dynamic dims (batch on every input, sequence on text inputs),
            False for static shapes, or `{input: {axis: dim_name}}`; equal names share one dimension.
        family: the model family (detected from `config.model_type` if None); its `dim_bounds` bound the
            dynamic dims of those names (`seq` at `max_position_embeddings`).
        tags: component tag rules put in front of the family's defaults.

    Raises:
        CaptureError: naming the failing module, the line of model code and a hint.

    A model of no known family, captured without `tags`, gets every region tagged `shared` and one line on the
    `sparsec.capture` logger saying so (see the module docstring).

    Example::
        ids = torch.randint(0, 100, (2, 16))
        program = sparsec.capture(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    """
    check_example_inputs(example_inputs)
    family = family or detect_family(model)
    if dynamic is True:
        dims = family.dynamic_dims(dict(example_inputs))
    elif dynamic is False:
        dims = {}
    else:
        dims = dynamic
    tagger = Tagger(family.tags).with_overrides(tags)
    bounds = family.dim_bounds(model)
    program = capture_program(model, example_inputs, dims, family=family.name, tagger=tagger, dim_bounds=bounds)
    config = getattr(model, "config", None)
    if callable(getattr(config, "to_dict", None)):  # with the class captured, which a config may not name
        program.source_config = {**config.to_dict(), "architectures": [type(model).__name__]}
    if family.name == GENERIC.name and not tags:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        log.warning(
            "note: %s (model_type %r) has no sparsec family, so every region is tagged 'shared' (right for a plain "
            "LLM); a multimodal model needs its components tagged: a recipe `tags:` section or capture(tags=...)",
            type(model).__name__,
            model_type,
        )
    return program
