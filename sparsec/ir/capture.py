"""Capture mechanics: a PyTorch module -> one `Program`, with `torch.export.export(strict=False)`.

This is the IR's front door and knows no model families: the caller passes the dynamic dims and the tagger
(`sparsec.capture` derives both from the model's family; `EntryPoint.capture` from its entry point).

transformers 5 has no torch.fx tracer and `torch.fx.symbolic_trace` fails on these models; non-strict
export captures them whole, with `nn_module_stack` on every node. Projections written without `nn.Linear`
(GPT-2's Conv1D, `x @ weight.T`) are made `aten.linear` nodes (`sparsec.ir.canonical`). When it fails, the error names the
innermost module that was running, the line of model code, and a hint.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import traceback
from collections.abc import Iterator, Mapping, Sequence

import torch

from sparsec.errors import CaptureError
from sparsec.ir.canonical import canonicalize_linears
from sparsec.ir.program import Program
from sparsec.ir.tags import Tagger

DynamicDims = Mapping[str, Mapping[int, str]]

_HINTS = (
    (
        ("DynamicCache", "Cache'>", "past_key_values"),
        "the model returns a KV cache; capture with the cache disabled (config.use_cache = False on the model "
        "and every sub-config; sparsec does this for Hugging Face models)",
    ),
    (
        ("Constraints violated", "specializ", "not in range", "Not all values of"),
        "a dimension marked dynamic is fixed by the model's code (the message above names the guard); capture "
        "with static shapes (a recipe's `capture: {dynamic: false}`, or dynamic=False in Python: the program then "
        "takes only the capture shape, `capture: {batch: B, seq: S}`), or a dict naming only the dims that vary",
    ),
    (
        ("data-dependent", "DataDependent", "GuardOnDataDependent", "unbacked"),
        "the model branches on tensor values; pass concrete example inputs that take the path you deploy, or "
        "guard the value with torch._check in the model code",
    ),
)
_DEFAULT_HINT = "check that the example inputs match the model's forward() signature and run in eager mode"


def _hf_configs(model: torch.nn.Module) -> list:
    """Every distinct Hugging Face config in the model, sub-configs (`text_config`, ...) included."""
    found: dict[int, object] = {}
    pending = [getattr(m, "config", None) for m in model.modules()]
    while pending:
        config = pending.pop()
        if config is None or id(config) in found or not hasattr(config, "to_dict"):
            continue
        found[id(config)] = config
        pending += [getattr(config, name, None) for name in getattr(config, "sub_configs", {})]
    return list(found.values())


@contextlib.contextmanager
def kv_cache_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Set `use_cache = False` on every Hugging Face config in the model for the duration, then restore."""
    saved = [(c, c.use_cache) for c in _hf_configs(model) if hasattr(c, "use_cache")]
    for config, _ in saved:
        config.use_cache = False
    try:
        yield
    finally:
        for config, value in saved:
            config.use_cache = value


EXPORTABLE_EXPERTS = "batched_mm"


@contextlib.contextmanager
def exportable_experts(model: torch.nn.Module) -> Iterator[None]:
    """Run Hugging Face MoE experts with `experts_implementation="batched_mm"` for the duration, then restore.

    transformers 5 stores experts as fused 3D weights and dispatches their forward by
    `config._experts_implementation`: `eager` loops over the experts a batch hits (a data-dependent loop,
    which torch.export refuses), `grouped_mm` (the default) sorts the token-expert pairs and calls an opaque
    grouped-GEMM op (`transformers::grouped_mm_fallback` on CPU) that neither sparsec's matchers nor ONNX
    see into. `batched_mm` gathers each pair's expert weights (`index(gate_up_proj, [ids])`) and multiplies
    them with `bmm`: plain ATen ops, the same values, exportable to ONNX (`Gather` + `MatMul`). Its cost is
    memory: the gathered weights hold T*k copies of an expert's matrices.
    """
    key = "_experts_implementation_internal"  # set per config: the public setter also rewrites sub-configs
    saved = [(c, vars(c)[key]) for c in _hf_configs(model) if key in vars(c)]
    for config, _ in saved:
        setattr(config, key, EXPORTABLE_EXPERTS)
    try:
        yield
    finally:
        for config, value in saved:
            setattr(config, key, value)


@contextlib.contextmanager
def _module_tracker(model: torch.nn.Module, stack: list[str]) -> Iterator[None]:
    """Keep `stack` equal to the module paths currently executing (hooks run under non-strict export)."""

    def enter(label: str) -> None:
        stack.append(label)

    def leave() -> None:
        if stack:
            stack.pop()

    handles = []
    for name, module in model.named_modules():
        label = name or type(module).__name__
        handles.append(module.register_forward_pre_hook(lambda *_, label=label: enter(label)))
        handles.append(module.register_forward_hook(lambda *_: leave(), always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _model_frame(exc: BaseException) -> str:
    """`file:line in func: code` of the innermost traceback frame outside torch itself."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)]
    here = os.path.dirname(os.path.dirname(__file__))  # the sparsec package: its own frames are not model code
    frames = [f for f in frames if not f.filename.startswith(here)]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def _capture_error(exc: BaseException, module_stack: Sequence[str]) -> CaptureError:
    lines = str(exc).strip().splitlines()
    message = lines[0] if lines else type(exc).__name__
    guard = next((line.strip() for line in lines[1:] if line.strip().startswith("- ")), None)
    if guard:  # a constraint violation: the first guard says which code fixes the dim
        message += " " + guard
    hint = next((h for keys, h in _HINTS if any(k in str(exc) for k in keys)), _DEFAULT_HINT)
    where = module_stack[-1] if module_stack else "(top level, outside any submodule)"
    frame = _model_frame(exc)
    lines = [
        f"torch.export could not capture the model: {type(exc).__name__}: {message[:500]}",
        f"  failing module: {where}",
    ]
    if frame:
        lines.append(f"  failing op at:  {frame}")
    lines.append(f"  hint: {hint}")
    return CaptureError("\n".join(lines))


def _export(model, example_inputs, dims: dict, bounds: dict[str, int]) -> torch.export.ExportedProgram:
    """`torch.export.export` (non-strict) of `model` with `dims` dynamic within `bounds`, the KV cache off and MoE
    experts in their exportable form. A failure is raised as it is, carrying the module path that was running
    (`sparsec_stack`), which `_failed` turns into a `CaptureError` naming the module and the line."""
    symbols = {n: torch.export.Dim(n, max=bounds.get(n)) for axes in dims.values() for n in axes.values()}
    dynamic_shapes = {k: ({a: symbols[n] for a, n in dims[k].items()} if k in dims else None) for k in example_inputs}
    stack: list[str] = []
    was_training = model.training
    model.eval()
    # torch.export prints the partial graph of a failed export to stderr; keep it on the error instead.
    printed = io.StringIO()
    try:
        with (
            kv_cache_disabled(model),
            exportable_experts(model),
            _module_tracker(model, stack),
            torch.no_grad(),
            contextlib.redirect_stderr(printed),
        ):
            exported = torch.export.export(
                model, (), dict(example_inputs), dynamic_shapes=dynamic_shapes if dims else None, strict=False
            )
    except Exception as exc:
        exc.sparsec_stack = list(stack)
        raise
    finally:
        model.train(was_training)
    sys.stderr.write(printed.getvalue())
    return exported


def _failed(exc: BaseException) -> CaptureError:
    error = _capture_error(exc, getattr(exc, "sparsec_stack", []))
    error.partial_graph = str(getattr(exc, "partial_fx_graph", "")) or None
    return error


_NOT_AT = re.compile(r"satisfy the generated guard L\['(?P<input>\w+)'\]\.size\(\)\[(?P<axis>\d+)\] != (?P<size>\d+)\.")


def _bound_below_limit(message: str, example_inputs, dims: dict, bounds: dict[str, int]) -> dict[str, int] | None:
    """The bounds with a dim lowered by one where torch.export's constraint violation says the model's code
    branches at exactly that dim's bound (a guard `size != N`, N the bound: MPT's ALiBi table of `max_seq_len`
    columns is sliced only below it); None when the message names no such guard."""
    refined = dict(bounds)
    for found in _NOT_AT.finditer(message):
        name = dims.get(found["input"], {}).get(int(found["axis"]))
        size = int(found["size"])
        if (
            name is not None
            and refined.get(name) == size
            and example_inputs[found["input"]].shape[int(found["axis"])] < size
        ):
            refined[name] = size - 1
    return refined if refined != bounds else None


def check_example_inputs(example_inputs: Mapping[str, torch.Tensor]) -> None:
    """Refuse example inputs torch.export would mis-capture: not a dict of tensors."""
    if not isinstance(example_inputs, Mapping) or not example_inputs:
        raise CaptureError("example_inputs must be a non-empty dict of keyword inputs, e.g. {'input_ids': ids}")
    bad = [k for k, v in example_inputs.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CaptureError(
            f"example_inputs {bad} are not tensors; settings such as use_cache belong in the model config, "
            "since non-tensor inputs would be frozen into the program"
        )


def capture_program(
    model: torch.nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    dynamic_dims: DynamicDims,
    *,
    family: str = "unknown",
    tagger: Tagger | None = None,
    dim_bounds: Mapping[str, int] | None = None,
) -> Program:
    """Capture `model(**example_inputs)` as one `Program` with exactly `dynamic_dims` (`{input: {axis: name}}`).

    `dim_bounds`: `{dim name: largest size}` for dynamic dims the model's code bounds (a position table of
    `max_position_embeddings` rows); torch.export refuses an unbounded dim there ("Constraints violated").
    Dims not named stay unbounded; the bounds are kept on the program (`Program.dim_bounds`), the ONNX dims
    stay symbolic.

    Raises:
        CaptureError: naming the failing module, the line of model code and a hint.
    """
    check_example_inputs(example_inputs)
    dims = {k: {int(a): str(n) for a, n in v.items()} for k, v in dynamic_dims.items()}
    for name, axes in dims.items():
        if name not in example_inputs:
            raise CaptureError(
                f"dynamic dims given for {name!r}, which is not an example input ({sorted(example_inputs)})"
            )
        shape = tuple(example_inputs[name].shape)
        for axis, dim_name in axes.items():
            if axis >= len(shape) or shape[axis] < 2:
                raise CaptureError(
                    f"input {name!r} has shape {shape}: dynamic dim {dim_name!r} (axis {axis}) needs an example size "
                    ">= 2, because torch.export specializes sizes 0 and 1; use a larger example"
                )
    bounds = {n: int(b) for n, b in (dim_bounds or {}).items() if any(n in axes.values() for axes in dims.values())}
    for name, axes in dims.items():
        for axis, dim_name in axes.items():
            if dim_name in bounds and example_inputs[name].shape[axis] > bounds[dim_name]:
                raise CaptureError(
                    f"input {name!r} has shape {tuple(example_inputs[name].shape)}: dim {dim_name!r} is at most "
                    f"{bounds[dim_name]} for this model; use a smaller example"
                )
    for attempt in range(2):
        try:
            exported = _export(model, example_inputs, dims, bounds)
            break
        except Exception as exc:
            refined = _bound_below_limit(str(exc), example_inputs, dims, bounds) if attempt == 0 else None
            if refined is None:
                raise _failed(exc) from exc
            bounds = refined  # the model branches at its own limit: the program takes every size below it

    signature = exported.graph_signature
    canonicalize_linears(exported.graph, {*signature.inputs_to_parameters, *signature.inputs_to_buffers})
    program = Program(exported, family=family, tagger=tagger or Tagger(), dynamic_dims=dims, dim_bounds=bounds)
    program.prune()  # drop state the graph never reads (e.g. unused rotary buffers)
    return program
