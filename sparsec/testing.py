"""Helpers for verifying graph rewrites in unit tests.

Example::
    from sparsec import testing
    program = testing.capture(model, inputs)
    before = testing.parameter_names(program)
    testing.apply_pass(program, "my_pass", where="model.layers.1.mlp")
    testing.assert_parameters_removed(before, program, ["model.layers.1.mlp.*"])
    testing.assert_op_count(program, "model.layers.1.**", "aten.linear.default", 4)
    testing.assert_equivalent(program, reference_model, other_shape_inputs)
    testing.assert_onnx_equivalent("model.onnx", reference_model, other_shape_inputs, output="logits")
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from sparsec.analysis.regions import region_index
from sparsec.capture import capture  # noqa: F401  (re-exported: a test imports this one module)
from sparsec.data.calibration import CalibrationSet
from sparsec.data.quality import QualityGates
from sparsec.ir.paths import glob_match
from sparsec.ir.program import Program
from sparsec.pipeline import run_passes
from sparsec.transform.pass_manager import Pass, PassRecord, get_pass


def apply_pass(
    program: Program,
    p: Pass | str,
    *,
    calibration: CalibrationSet | Mapping[str, torch.Tensor] | None = None,
    gates: QualityGates | None = None,
    **options: Any,
) -> PassRecord:
    """Run one pass through the `PassManager` (verification and bookkeeping on; `sparsec.pipeline.run_passes`:
    measured and gated on `calibration` when given), return its record.

    `p` is a pass instance or a registered name with `options`. `calibration` may be a dict of inputs.
    """
    if isinstance(p, str):
        p = get_pass(p)(**options)
    elif options:
        raise TypeError("options go with a pass name, not with a pass instance")
    if calibration is not None and not isinstance(calibration, CalibrationSet):
        calibration = CalibrationSet(dict(calibration), source="test inputs")
    (record,) = run_passes(program, [p], calibration, gates=gates, progress=False)
    return record


def parameter_names(program: Program) -> set[str]:
    """Snapshot of the program's parameter names (take it before a pass)."""
    return set(program.parameter_names())


def op_counts(program: Program, where: str = "**") -> Counter[str]:
    """`Counter` of call targets (`aten.linear.default`) of the nodes in regions matching `where`."""
    regions = region_index(program)
    if where == "**":
        nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    else:
        seen: dict = {}
        for region in regions.match(where):
            for node in region.nodes:
                seen[node] = None
        nodes = list(seen)
    return Counter(str(n.target) for n in nodes)


def assert_op_count(program: Program, where: str, target: str | Callable, expected: int) -> None:
    """Assert that regions matching `where` hold exactly `expected` calls of `target`."""
    name = str(target)
    got = op_counts(program, where)[name]
    assert got == expected, f"{name} under {where!r}: expected {expected}, found {got}"


def assert_node_targets(program: Program, where: str, allowed: Iterable[str | Callable]) -> None:
    """Assert that every call in regions matching `where` is one of `allowed` targets."""
    allowed_names = {str(t) for t in allowed}
    unexpected = {t for t in op_counts(program, where) if t not in allowed_names}
    assert not unexpected, f"unexpected targets under {where!r}: {sorted(unexpected)}"


def assert_parameters_removed(before: set[str], program: Program, expected: Iterable[str]) -> None:
    """Assert that exactly the parameters matching the `expected` globs/names left the program."""
    after = set(program.parameter_names())
    removed = before - after
    patterns = list(expected)
    expected_names = {n for n in before if any(n == p or glob_match(n, p) for p in patterns)}
    assert not (after - before), f"parameters appeared: {sorted(after - before)}"
    assert removed == expected_names, (
        f"removed parameters differ: missing {sorted(expected_names - removed)}, unexpected {sorted(removed - expected_names)}"
    )
    for name in removed:
        assert name not in program.exported.state_dict, f"{name} is still in the state dict"


def _reference_outputs(reference: Any, inputs: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    if isinstance(reference, Program):
        return reference.run(inputs)
    with torch.no_grad():
        result = reference(**inputs)
    if isinstance(result, torch.Tensor):
        return {names[0]: result}
    return {name: _leaf(result, name) for name in names}


def _leaf(result: Any, name: str) -> Any:
    """The output a program names `name` (`logits`, `image_outputs.last_hidden_state`, `0`) in a module's
    result: the path is walked through mappings (ModelOutputs), attributes and sequence indices."""
    value = result
    for key in name.split("."):
        if isinstance(value, Mapping) and key in value:
            value = value[key]
        elif isinstance(value, (list, tuple)) and key.isdigit():
            value = value[int(key)]
        else:
            value = getattr(value, key)
    return value


def _assert_close_on_valid(
    got: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    inputs: Mapping[str, torch.Tensor],
    names: list[str],
    rtol,
    atol,
) -> None:
    mask = CalibrationSet.valid_mask(inputs)
    for name in names:
        a, b = got[name], expected[name]
        if mask is not None and a.dim() >= 3 and tuple(a.shape[:2]) == tuple(mask.shape):
            a, b = a[mask], b[mask]
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, name=name: f"output {name!r}: {m}")


def assert_equivalent(
    program: Program,
    reference: torch.nn.Module | Program | Callable[..., Any],
    inputs: Mapping[str, torch.Tensor],
    *,
    output: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """`torch.testing.assert_close` between the program and a reference on `inputs`.

    The reference is a module/callable called as `reference(**inputs)` (its `.logits` or output dict is
    used) or another Program. Only valid positions (attention_mask == 1) are compared. With `output` None,
    every output of the program is compared.
    """
    got = program.run(inputs)
    names = [output] if output else list(got)
    _assert_close_on_valid(got, _reference_outputs(reference, inputs, names), inputs, names, rtol, atol)


def assert_onnx_equivalent(
    onnx_path: str | os.PathLike,
    reference: torch.nn.Module | Program | Callable[..., Any],
    inputs: Mapping[str, torch.Tensor],
    *,
    output: str | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> None:
    """Like `assert_equivalent`, for an ONNX file run in ONNX Runtime (CPU) against the reference.

    Example::
        export_onnx(program, "m.onnx")
        testing.assert_onnx_equivalent("m.onnx", hand_edited_model, other_shape_inputs, output="logits")
    """
    from sparsec.exporters.targets import onnxruntime as ort_backend

    got = ort_backend.run(ort_backend.session(onnx_path), inputs)
    names = [output] if output else list(got)
    _assert_close_on_valid(got, _reference_outputs(reference, inputs, names), inputs, names, rtol, atol)


def linear_rows(linear: torch.nn.Linear, kept: torch.Tensor) -> torch.nn.Linear:
    """A copy of `linear` keeping only output features `kept` (rows of weight and bias): an FFN's up / gate
    projection sliced by hand, the reference a neuron-slicing rewrite is compared with.

    Example::
        mlp.up_proj = testing.linear_rows(mlp.up_proj, kept)
    """
    out = torch.nn.Linear(linear.in_features, len(kept), bias=linear.bias is not None)
    with torch.no_grad():
        out.weight.copy_(linear.weight[kept])
        if linear.bias is not None:
            out.bias.copy_(linear.bias[kept])
    return out


def linear_columns(linear: torch.nn.Linear, kept: torch.Tensor) -> torch.nn.Linear:
    """A copy of `linear` reading only input features `kept` (weight columns; bias unchanged): an FFN's down
    projection sliced by hand.

    Example::
        mlp.down_proj = testing.linear_columns(mlp.down_proj, kept)
    """
    out = torch.nn.Linear(len(kept), linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        out.weight.copy_(linear.weight[:, kept])
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
    return out


def save_word_tokenizer(
    directory: str | os.PathLike, words: list[str], *, bos: str | None = None, eos: str | None = None
) -> None:
    """Save a whitespace word-level tokenizer (`words[i]` is token id i; `[PAD]` and `[UNK]` must be among them)
    as transformers saves one, so a tiny model directory reads text like a real checkpoint: for tests of text
    calibration and evaluation. `bos` (one of `words`) is prepended to every sequence and is its BOS token; `eos`
    names its EOS token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    special = {key: token for key, token in [("bos_token", bos), ("eos_token", eos)] if token is not None}
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", **special
    ).save_pretrained(directory)
