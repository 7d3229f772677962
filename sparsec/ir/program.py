"""The IR: a captured model as one `torch.export` program, plus what passes need to rewrite it safely.

A `Program` owns one `ExportedProgram` (ATen-level FX graph with lifted parameters). Passes edit
`program.graph` in place; the `PassManager` then calls `program.recompile()` and `program.verify()`.
Parameters are graph inputs here, so "a weight is gone" has a precise meaning: no placeholder, no
signature entry, no tensor in the state dict. `prune()` establishes that after a rewrite.

State (parameters, buffers, constants) changes only through `add_state` / `add_parameter`, `replace_state`
and `remove_state`, which keep placeholders, signature and tensors in step; every signature edit goes
through one helper. Passes never change a state tensor in place: they put a new tensor in its place with
`replace_state`. That is what makes `snapshot()` cheap (it shares the tensors) and `restore()` exact; the
`PassManager` checks it after every pass (`changed_in_place`).

Weights read lazily: a program captured without its weights in memory (`sparsec.models.load_model(...,
weights="lazy")`) is backed by the checkpoint's files (`attach_weights`): its state dict holds meta tensors (shapes
and dtypes), `state_tensor` reads a weight from its file on each call (not cached), `replace_state` stores the new
(small) tensor, `prune` drops entries, and `num_parameters` / `parameter_bytes` / `state_shape` never read.
With `spill_to(directory)`, the tensors a pass puts in place
of lazily backed ones (a sliced FFN: half the weights of a 14B model) are written there and read back lazily too,
so memory stays at one tensor. Running it reads every weight for each call: `run` reads them all at once,
`run_segmented` reads each segment's (a block's) weights once for all batches and drops them after it (layer by
layer onloading: a model larger than memory runs in it). `materialize()` first to run it repeatedly in memory;
`save` and the ONNX exporter materialise it before they write. Passes call `state_tensor` and cannot tell the difference.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import operator
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputKind,
    OutputSpec,
    TensorArgument,
)
from torch.fx import Graph, GraphModule, Node

from sparsec.errors import SparsecError, VerificationError
from sparsec.ir.stored import StoredTensor
from sparsec.ir.tags import Tagger

aten = torch.ops.aten
T = TypeVar("T")

STATE_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
StateKind = Literal["parameter", "buffer", "constant"]
_KIND = {"parameter": InputKind.PARAMETER, "buffer": InputKind.BUFFER, "constant": InputKind.CONSTANT_TENSOR}
_PLACEHOLDER_PREFIX = {"parameter": "p_", "buffer": "b_", "constant": "c_"}

# Checks torch.export leaves in the graph. They have no users, so plain DCE keeps them (they are impure)
# and they would pin otherwise-dead subgraphs. A metadata check guards a `.to()` cast of the same tensor in
# the same module: once that cast is gone, the check is dead too.
_METADATA_ASSERT = aten._assert_tensor_metadata.default
_CASTS = (aten.to.dtype, aten._to_copy.default)
RUNTIME_ASSERTS = frozenset(
    {
        aten._assert_tensor_metadata.default,
        aten._assert_scalar.default,
        aten._assert_async.default,
        aten._assert_async.msg,
        aten.sym_constrain_range_for_size.default,
        aten.sym_constrain_range.default,
    }
)


def _module_of(node: Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


def _is_dead_metadata_assert(node: Node) -> bool:
    if node.target is not _METADATA_ASSERT or not node.args or not isinstance(node.args[0], Node):
        return False
    module = _module_of(node)
    return not any(u.target in _CASTS and _module_of(u) == module for u in node.args[0].users)


def _is_dead_inplace_update(node: Node) -> bool:
    """An unused in-place op (`x /= x.sum()` in a router, `k[..., :n] = ...` into a fresh tensor) whose written
    tensor, with every view of it, is read by no node after it: removing it changes no value."""
    target = node.target
    if node.op != "call_function" or node.users or not isinstance(target, torch._ops.OpOverload):
        return False
    written = [
        a for a, s in zip(node.args, target._schema.arguments) if s.alias_info is not None and s.alias_info.is_write
    ]
    if len(written) != 1 or not isinstance(written[0], Node):
        return False
    root = written[0]
    while root.op == "call_function" and _may_alias(root) and isinstance(root.args[0], Node):
        root = root.args[0]  # back through views to the tensor they view
    if root.op != "call_function" or _may_alias(root):
        return False  # a graph input, state or a value of unknown aliasing: the write is observable
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    group, stack = set(), [root]
    while stack:
        member = stack.pop()
        if member in group:
            continue
        group.add(member)
        for user in member.users:
            if user.op == "call_function" and _may_alias(user) and user.args and user.args[0] is member:
                stack.append(user)  # a view of the tensor
            elif order[user] > order[node] and not (_writes(user) and not user.users):
                return False  # read after the write (later unused writes read nothing anyone sees)
    return True


def _writes(node: Node) -> bool:
    """Whether the node is an ATen op that writes one of its arguments in place."""
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and any(
        a.alias_info is not None and a.alias_info.is_write for a in target._schema.arguments
    )


def _may_alias(node: Node) -> bool:
    """Whether the node's value may share memory with another value (a view, or not an ATen op at all)."""
    if node.target is operator.getitem and isinstance(node.args[0], Node):  # one output of a multi-output op
        return _may_alias(node.args[0])
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return True
    return any(r.alias_info is not None for r in node.target._schema.returns)


_INPUTS_KEY = "sparsec_inputs"  # node meta: the inputs its meta["val"] was inferred from


def _fake_mode(graph: Graph) -> Any:
    """The fake-tensor mode of the graph's shape metadata (None if its placeholders carry none)."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode([n.meta.get("val") for n in graph.find_nodes(op="placeholder")])


def _tensor_versions(ep: ExportedProgram) -> dict[str, int]:
    """In-place version counter of every state tensor (bumped by each in-place op on it)."""
    tensors = {**ep.state_dict, **ep.constants}
    return {name: t._version for name, t in tensors.items() if isinstance(t, torch.Tensor)}


def _input_names(node: Node) -> str:
    """The node's arguments, with nodes by name: changes when it is rewired or a constant argument changes."""
    return str(torch.fx.node.map_arg((node.args, node.kwargs), lambda a: a.name))


def same_meta(old: Any, new: Any) -> bool:
    """Same shapes (symbolic dims compared by name), dtypes and structure."""
    if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
        return old.dtype == new.dtype and [str(d) for d in old.shape] == [str(d) for d in new.shape]
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return len(old) == len(new) and all(same_meta(a, b) for a, b in zip(old, new))
    return type(old) is type(new) and str(old) == str(new)


def _leaf_names(spec: Any, prefix: str = "") -> list[str]:
    """Names of the leaves of a pytree spec: `logits` for a ModelOutput, `0`, `1` for a tuple."""
    if spec.is_leaf():
        return [prefix or "output"]
    context = spec.context
    if isinstance(context, (list, tuple)) and len(context) == spec.num_children:
        keys = [str(k) for k in context]
    else:
        keys = [str(i) for i in range(spec.num_children)]
    names: list[str] = []
    for key, child in zip(keys, spec.children()):
        names += _leaf_names(child, f"{prefix}.{key}" if prefix else key)
    return names


_PLAIN_CONTAINERS = (tuple, list, dict)


def plain_spec(spec: Any) -> Any:
    """`spec` with every node that is not a tuple, list or dict (a Hugging Face `ModelOutput`, a namedtuple, an
    OrderedDict, any class registered with pytree) made a dict of the same keys, or a tuple where it has none.

    torch.export serializes such nodes by their class name and its loader must find that class registered with
    pytree: a program returning `CausalLMOutputWithPast` does not load without transformers imported.
    """
    if spec.is_leaf():
        return spec
    children = [plain_spec(child) for child in spec.children()]
    if spec.type in _PLAIN_CONTAINERS:
        return torch.utils._pytree.TreeSpec(spec.type, spec.context, children)
    context = getattr(spec.context, "_fields", spec.context)  # a namedtuple's spec holds its class
    if isinstance(context, (list, tuple)) and len(context) == len(children):
        return torch.utils._pytree.TreeSpec(dict, [str(k) for k in context], children)
    return torch.utils._pytree.TreeSpec(tuple, None, children)


def _with_plain_outputs(exported: ExportedProgram) -> None:
    """Make the program's output structure plain containers (`plain_spec`), in place; the leaves keep their names."""
    calls = exported.module_call_graph
    for i, entry in enumerate(calls):
        spec = entry.signature.out_spec if entry.signature is not None else None
        if spec is not None:
            calls[i] = dataclasses.replace(
                entry, signature=dataclasses.replace(entry.signature, out_spec=plain_spec(spec))
            )


@dataclass(frozen=True)
class ValueRewrite:
    """For `Program.run(rewrite=...)`: the node's value becomes `fn(value, *values of reads)`.

    Example::

        skip = ValueRewrite(lambda out, inp: inp, reads=(block.input,))   # the block passes its input on
        program.run(batch, rewrite={block.output: skip})
    """

    fn: Callable[..., Any]
    reads: tuple[Node, ...] = ()


@dataclass(frozen=True)
class ProgramSnapshot:
    """A program as it was at `Program.snapshot()`, for `Program.restore`.

    The graph is a copy (nodes and their metadata dicts); signature entries and tensors are shared with the
    program, which is safe because mutations replace them rather than edit them. `tensor_versions` holds each
    tensor's in-place version counter, so in-place changes can be detected (`Program.changed_in_place`).
    """

    graph: Graph
    signature: ExportGraphSignature
    state_dict: dict[str, torch.Tensor | StoredCopy]
    constants: dict[str, Any]
    family: str
    tagger: Tagger
    dynamic_dims: dict[str, dict[int, str]]
    tensor_versions: dict[str, int]
    stored: dict[str, StoredTensor | None]


@dataclass(frozen=True)
class StoredCopy:
    """A state tensor held in memory whose exact copy lies in a file (`Program.note_stored_copies`): a snapshot
    keeps this, not the tensor, so a weight a pass replaces is freed at once and `restore` reads it back if needed.

    `tensor` is a weak reference; the copy stands for the program's tensor while that is the same object at the
    same in-place version (`holds`)."""

    stored: StoredTensor
    tensor: weakref.ref
    version: int
    device: torch.device
    requires_grad: bool | None  # None: not a Parameter

    def holds(self, tensor: Any) -> bool:
        return self.tensor() is tensor and tensor._version == self.version

    def resolve(self, cache: dict[tuple[Path, str], torch.Tensor]) -> torch.Tensor:
        """The tensor if it still lives, else a fresh read (once per stored key: tied weights stay tied)."""
        alive = self.tensor()
        if alive is not None and alive._version == self.version:
            return alive
        key = (self.stored.file, self.stored.key)
        if key not in cache:
            tensor = self.stored.read().to(self.device)
            if self.requires_grad is not None:
                tensor = torch.nn.Parameter(tensor, requires_grad=self.requires_grad)
            cache[key] = tensor
        return cache[key]


class Program:
    """A whole model as one FX graph that passes rewrite in place.

    Attributes:
        exported: the underlying `torch.export.ExportedProgram`.
        family: the model family the tag defaults came from (`qwen2`, `janus`, ... or `unknown`).
        tagger: component tag rules (understanding / generation / shared) for module paths.
        dynamic_dims: for each input, `{axis: name}` of its dynamic dimensions (e.g. `{0: "batch", 1: "seq"}`).
        dim_bounds: `{dim name: largest size}` of the dynamic dims the model bounds (BERT's `seq` at
            `max_position_embeddings`); the others are unbounded.

    The program's outputs are plain containers: a model returning a `ModelOutput` (or any other pytree class)
    returns a dict of the same names (`logits`) from `exported.module()`. This is done once, when the `Program`
    is made (captured, loaded or copied), not only in `save`, so the program that passes, parity and the ONNX
    export see is the one `program.pt2` holds, and that file loads with torch alone (`save`).

    Example::

        program = sparsec.capture(model, {"input_ids": ids, "attention_mask": mask})
        region_index(program).region("model.layers.0").parameters[:2]
        # ['model.layers.0.self_attn.q_proj.weight', 'model.layers.0.self_attn.q_proj.bias']
        program.run({"input_ids": ids, "attention_mask": mask})["logits"].shape
        # torch.Size([2, 16, 128])
    """

    def __init__(
        self,
        exported: ExportedProgram,
        *,
        family: str = "unknown",
        tagger: Tagger | None = None,
        dynamic_dims: Mapping[str, Mapping[int, str]] | None = None,
        dim_bounds: Mapping[str, int] | None = None,
    ) -> None:
        _with_plain_outputs(exported)
        self.exported = exported
        self.family = family
        self.tagger = tagger or Tagger()
        self.dynamic_dims = {k: dict(v) for k, v in (dynamic_dims or {}).items()}
        self.dim_bounds = dict(dim_bounds or {})
        self._version = 0
        self._analyses: dict[Callable, Any] = {}
        self._analyses_version = 0
        self._stored: dict[str, StoredTensor | None] = {}
        self._on_disk: dict[str, StoredCopy] = {}
        self._spill: Path | None = None
        for node in self.graph.nodes:
            node.meta[_INPUTS_KEY] = _input_names(node)

    # ----- views -----------------------------------------------------------------------------------
    @property
    def graph_module(self) -> GraphModule:
        return self.exported.graph_module

    @property
    def graph(self) -> Graph:
        return self.exported.graph_module.graph

    @property
    def input_names(self) -> list[str]:
        """The user inputs, in call order (all captured as keyword arguments)."""
        kwargs_spec = self.exported.call_spec.in_spec.child(1)
        return [str(k) for k in kwargs_spec.context]

    @property
    def output_names(self) -> list[str]:
        return _leaf_names(self.exported.call_spec.out_spec)

    @property
    def device(self) -> torch.device:
        """Where the program's weights are (the first materialised state tensor's device; CPU for a program
        without any: a lazily backed program reads its weights onto the CPU)."""
        ep = self.exported
        for tensor in [*ep.state_dict.values(), *ep.constants.values()]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                return tensor.device
        return torch.device("cpu")

    @property
    def version(self) -> int:
        """Incremented by every `recompile()`: analyses and statistics computed at an older version are stale."""
        return self._version

    def analysis(self, compute: Callable[[Program], T]) -> T:
        """`compute(self)`, cached until the next `recompile()`.

        Analyses of the graph (the region index, the FFN list, residual structure) are computed once per graph
        version instead of on every query; `compute` is the cache key, so pass the same function each time.

        Example::

            program.analysis(RegionIndex) is program.analysis(RegionIndex)
            # True
        """
        if self._analyses_version != self._version:
            self._analyses, self._analyses_version = {}, self._version
        if compute not in self._analyses:
            self._analyses[compute] = compute(self)
        return self._analyses[compute]

    def state_placeholders(self) -> dict[str, Node]:
        """Fully qualified state name (parameter, buffer, constant) -> its placeholder node."""
        nodes = {n.name: n for n in self.graph.find_nodes(op="placeholder")}
        return {
            spec.target: nodes[spec.arg.name]
            for spec in self.exported.graph_signature.input_specs
            if spec.kind in STATE_KINDS and spec.arg.name in nodes
        }

    def state_name(self, node: Node) -> str | None:
        """The parameter/buffer name a placeholder node stands for, or None for user inputs and other nodes."""
        if node.op != "placeholder":
            return None
        for spec in self.exported.graph_signature.input_specs:
            if spec.kind in STATE_KINDS and spec.arg.name == node.name:
                return spec.target
        return None

    def state_tensor(self, name: str) -> torch.Tensor:
        """The state tensor `name`; a lazily backed one is read from its file now (see the module docstring)."""
        if name in self._stored:
            stored = self._stored[name]
            if stored is None:
                raise SparsecError(
                    f"{name} has no weights: the program was captured from a config without a "
                    "checkpoint; a decision that reads weights needs the model's .safetensors files"
                )
            return stored.read()
        return self._held(name)

    def _held(self, name: str) -> torch.Tensor:
        """The tensor the exported program holds for `name` (a meta tensor for a lazily backed one)."""
        ep = self.exported
        return ep.state_dict[name] if name in ep.state_dict else ep.constants[name]

    def state_shape(self, name: str) -> torch.Size:
        """The shape of state tensor `name`, never read from a file (parameter counts of lazily backed programs)."""
        return self._held(name).shape

    def attach_weights(self, sources: Mapping[str, StoredTensor | None]) -> None:
        """Back state tensors by tensors stored on disk, read when needed (None: there is no tensor, only its shape).

        The program drops what it held for them (e.g. the never-written parameters of a model built without
        weights) and keeps a meta tensor of the same shape and dtype. `SparsecError` for an unknown name or a
        stored tensor of another shape or dtype.
        """
        ep = self.exported
        for name, stored in sources.items():
            if name not in ep.state_dict and name not in ep.constants:
                raise SparsecError(f"attach_weights: the program has no state tensor named {name!r}")
            held = self._held(name)
            if stored is not None and (tuple(held.shape) != stored.shape or held.dtype != stored.dtype):
                raise SparsecError(
                    f"{stored.file}: {stored.key!r} is {list(stored.shape)} {stored.dtype}, the program's "
                    f"{name} is {list(held.shape)} {held.dtype}; the checkpoint does not fit the config"
                )
            meta = held.detach().to("meta")
            if isinstance(held, torch.nn.Parameter):
                meta = torch.nn.Parameter(meta, requires_grad=held.requires_grad)
            (ep.state_dict if name in ep.state_dict else ep.constants)[name] = meta
            self._stored[name] = stored

    def spill_to(self, directory: str | os.PathLike | None) -> None:
        """Write the tensors `replace_state` puts in place of lazily backed ones into safetensors files in
        `directory` (which the caller owns and removes) and back them lazily, instead of holding them; None stops."""
        self._spill = Path(directory) if directory is not None else None

    def note_stored_copies(self, sources: Mapping[str, StoredTensor]) -> None:
        """Record that the in-memory state tensors named in `sources` are exact copies of those stored tensors (a
        model read from its checkpoint, `sparsec.models`). Snapshots then refer to the file instead of holding the
        tensor (`StoredCopy`), so the `PassManager`'s snapshot of a pass does not keep every weight the pass drops or
        slices alive until the pass ends; `restore` reads back what was freed. A tensor replaced or changed in place
        afterwards is no longer taken for its copy. `SparsecError` for an unknown name or another shape or dtype."""
        for name, stored in sources.items():
            if name in self._stored:
                continue  # lazily backed: nothing held
            try:
                held = self._held(name)
            except KeyError:
                raise SparsecError(f"note_stored_copies: the program has no state tensor named {name!r}") from None
            if tuple(held.shape) != stored.shape or held.dtype != stored.dtype:
                raise SparsecError(
                    f"{stored.file}: {stored.key!r} is {list(stored.shape)} {stored.dtype}, the program's "
                    f"{name} is {list(held.shape)} {held.dtype}; it is no copy of it"
                )
            grad = held.requires_grad if isinstance(held, torch.nn.Parameter) else None
            self._on_disk[name] = StoredCopy(stored, weakref.ref(held), held._version, held.device, grad)

    def lazy_state(self) -> list[str]:
        """Names of the state tensors not in memory (read from their files when asked for)."""
        return sorted(self._stored)

    def materialize(self) -> None:
        """Read every lazily backed state tensor into memory, one at a time; afterwards the program is ordinary.

        `SparsecError` (nothing read) when some tensor has no stored weights (captured from a config only).
        """
        missing = [name for name, stored in self._stored.items() if stored is None]
        if missing:
            raise SparsecError(
                f"{len(missing)} state tensors have no weights ({missing[:3]}...): the program was "
                "captured from a config without a checkpoint and cannot run or be written"
            )
        ep = self.exported
        for name in list(self._stored):
            held, tensor = self._held(name), self._stored.pop(name).read()
            if isinstance(held, torch.nn.Parameter):
                tensor = torch.nn.Parameter(tensor, requires_grad=held.requires_grad)
            (ep.state_dict if name in ep.state_dict else ep.constants)[name] = tensor

    def replace_state(self, name: str, value: torch.Tensor) -> None:
        """Put `value` in place of the state tensor `name` (e.g. a sliced copy); a parameter stays a parameter.

        The program keeps its own copy of a new parameter. A changed shape or dtype is re-inferred by `verify()`.
        """
        ep = self.exported
        old = self._held(name)
        if self._stored.pop(name, None) is not None and self._spill is not None:
            self._replace_spilled(name, old, value)
            return
        if isinstance(old, torch.nn.Parameter):
            value = torch.nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad)
        if name in ep.state_dict:
            ep.state_dict[name] = value
        else:
            ep.constants[name] = value
        if not same_meta(old, value):
            self.state_placeholders()[name].meta.pop("val", None)

    def _replace_spilled(self, name: str, old: torch.Tensor, value: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = self._spill / f"{name}.{self._version}.{len(os.listdir(self._spill))}.safetensors"
        save_file({name: value.detach().contiguous().cpu()}, str(path))
        held = torch.empty_like(value, device="meta")
        if isinstance(old, torch.nn.Parameter):
            held = torch.nn.Parameter(held, requires_grad=old.requires_grad)
        (self.exported.state_dict if name in self.exported.state_dict else self.exported.constants)[name] = held
        self._stored[name] = StoredTensor(path, name, tuple(value.shape), value.dtype)
        if not same_meta(old, value):
            self.state_placeholders()[name].meta.pop("val", None)

    def add_state(
        self, name: str, value: torch.Tensor, kind: StateKind = "parameter", *, persistent: bool = True
    ) -> Node:
        """Add a parameter, buffer or constant tensor and return its placeholder node.

        The placeholder, its signature entry (after the other state of its kind, in torch.export's order:
        parameters, buffers, constants) and the tensor (a copy of `value`) are added together; the placeholder
        carries shape metadata, so new nodes reading it can be shape-inferred at once. A non-persistent buffer
        lives with the constants, as torch.export keeps it. For rewrites that introduce tensors (an MoE router,
        stacked experts, the real and imaginary parts of a complex table).
        """
        if kind not in _KIND:
            raise SparsecError(f"unknown state kind {kind!r}; use one of {sorted(_KIND)}")
        ep = self.exported
        if name in ep.state_dict or name in ep.constants:
            raise SparsecError(f"the program already has a tensor named {name!r}; pick another name")
        order = STATE_KINDS[: STATE_KINDS.index(_KIND[kind]) + 1]
        specs = list(ep.graph_signature.input_specs)
        position = max((i for i, s in enumerate(specs) if s.kind in order), default=-1) + 1
        placeholders = self.graph.find_nodes(op="placeholder")
        anchor = (
            self.graph.inserting_after(placeholders[position - 1])
            if position
            else self.graph.inserting_before(placeholders[0])
        )
        with anchor:
            node = self.graph.placeholder(_PLACEHOLDER_PREFIX[kind] + name.replace(".", "_"))
        tensor = value.detach().clone()
        if kind == "parameter":
            tensor = torch.nn.Parameter(tensor, requires_grad=False)
        fake_mode = _fake_mode(self.graph)
        if fake_mode is not None:
            node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True)
        specs.insert(
            position, InputSpec(_KIND[kind], TensorArgument(node.name), name, persistent if kind == "buffer" else None)
        )
        self._set_signature(inputs=specs)
        (ep.state_dict if kind == "parameter" or (kind == "buffer" and persistent) else ep.constants)[name] = tensor
        return node

    def add_parameter(self, name: str, value: torch.Tensor) -> Node:
        """`add_state(name, value, "parameter")`: a new weight (frozen; `distill` can train it)."""
        return self.add_state(name, value, "parameter")

    def remove_state(self, name: str) -> None:
        """Remove a state tensor nobody reads: its placeholder, signature entry and tensor.

        `prune()` does this for every unread tensor after a rewrite; a tensor some node still reads is refused.
        """
        node = self.state_placeholders().get(name)
        if node is None:
            raise SparsecError(f"the program has no state tensor named {name!r}")
        if node.users:
            raise SparsecError(
                f"cannot remove {name!r}: {[u.name for u in node.users][:5]} still read it; "
                "rewire them first (prune() removes state once nothing reads it)"
            )
        self.graph.erase_node(node)
        self._set_signature(inputs=[s for s in self.exported.graph_signature.input_specs if s.arg.name != node.name])
        self.exported.state_dict.pop(name, None)
        self.exported.constants.pop(name, None)
        self._stored.pop(name, None)

    def replace_uses(self, node: Node, replacement: Node, *, except_in: Node | None = None) -> None:
        """Make every user of `node` (but `except_in`) read `replacement`, program outputs included."""
        node.replace_all_uses_with(replacement, delete_user_cb=lambda user: user is not except_in)
        specs = []
        for spec in self.exported.graph_signature.output_specs:
            if isinstance(spec.arg, TensorArgument) and spec.arg.name == node.name:
                spec = OutputSpec(spec.kind, TensorArgument(replacement.name), spec.target)
            specs.append(spec)
        self._set_signature(outputs=specs)

    def _set_signature(self, *, inputs: list[InputSpec] | None = None, outputs: list[OutputSpec] | None = None) -> None:
        """The one place the graph signature changes: new input and/or output specs, the others kept."""
        ep = self.exported
        signature = ep.graph_signature
        ep._graph_signature = ExportGraphSignature(
            list(signature.input_specs) if inputs is None else list(inputs),
            list(signature.output_specs) if outputs is None else list(outputs),
        )

    def parameter_names(self) -> list[str]:
        return [s.target for s in self.exported.graph_signature.input_specs if s.kind == InputKind.PARAMETER]

    def num_parameters(self) -> int:
        """Number of parameter elements (buffers and constants excluded), as `sum(p.numel())` on the module."""
        return sum(self.exported.state_dict[n].numel() for n in self.parameter_names())

    def parameter_bytes(self) -> int:
        return sum(self.exported.state_dict[n].nbytes for n in self.parameter_names())

    # ----- execution -------------------------------------------------------------------------------
    def flat_args(
        self, inputs: Mapping[str, torch.Tensor], state: Callable[[str], torch.Tensor] | None = None
    ) -> list[Any]:
        """The graph module's positional arguments for user `inputs` by name: state tensors and inputs in
        signature order. `named_outputs(program.graph_module(*program.flat_args(inputs)))` is `run(inputs)`
        without `run`'s no-grad mode and hooks (for training through the graph, `sparsec.data.distill`, which
        passes `state`: the tensor to use for each state name instead of `state_tensor`'s).
        Inputs on another device than the program's weights are moved to it (calibration data stays on the CPU
        while the program runs on `cuda`)."""
        self._check_inputs(inputs)
        return self._args(inputs, state or self.state_tensor)

    def _check_inputs(self, inputs: Mapping[str, torch.Tensor]) -> None:
        names = self.input_names
        missing = [n for n in names if n not in inputs]
        extra = [n for n in inputs if n not in names]
        if missing or extra:
            raise SparsecError(
                f"program inputs are {names}; got {sorted(inputs)}"
                + (f" (missing {missing})" if missing else "")
                + (f" (unexpected {extra})" if extra else "")
            )

    def _args(self, inputs: Mapping[str, torch.Tensor], state: Callable[[str], torch.Tensor]) -> list[Any]:
        device = self.device
        user = iter(
            inputs[n].to(device) if isinstance(inputs[n], torch.Tensor) and inputs[n].device != device else inputs[n]
            for n in self.input_names
        )
        args: list[Any] = []
        for spec in self.exported.graph_signature.input_specs:
            if spec.kind == InputKind.USER_INPUT:
                args.append(next(user))
            elif spec.kind in STATE_KINDS:
                args.append(state(spec.target))
            else:
                raise SparsecError(f"unsupported program input kind {spec.kind} ({spec.arg.name})")
        return args

    def _fake_args(self, inputs: Mapping[str, torch.Tensor], mode: Any) -> list[Any]:
        """`flat_args` as fake tensors of `mode`: shapes and dtypes only, nothing read (state on the inputs' device)."""
        self._check_inputs(inputs)
        device = next((v.device for v in inputs.values()), torch.device("cpu"))

        def fake(name: str) -> Any:
            held = self._held(name)
            if held.device.type == "meta":
                return mode.fake_tensor_converter.from_meta_and_device(mode, held.detach(), device)
            return mode.from_tensor(held)

        return self._args({n: mode.from_tensor(v) for n, v in inputs.items()}, fake)

    def named_outputs(self, flat: Any) -> dict[str, torch.Tensor]:
        """The user outputs by name from the graph module's flat result (see `flat_args`)."""
        specs = self.exported.graph_signature.output_specs
        user = [v for v, s in zip(flat, specs) if s.kind == OutputKind.USER_OUTPUT]
        return dict(zip(self.output_names, user))

    @torch.no_grad()
    def run(
        self,
        inputs: Mapping[str, torch.Tensor],
        observe: Callable[[Node, Any], None] | None = None,
        nodes: set[Node] | None = None,
        rewrite: Mapping[Node, ValueRewrite] | None = None,
        shapes_only: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Run the graph on `inputs` (by name) and return the outputs by name.

        With `observe`, every node in `nodes` (all nodes if None) is reported as `observe(node, value)`
        as soon as it is computed: calibration statistics are collected this way in one pass.
        With `rewrite`, the value of each node in it is replaced by its `ValueRewrite` before any user reads
        it: a what-if run of a change without editing the graph (`sparsec.probe` masks neurons and skips
        blocks this way).
        With `shapes_only`, the graph runs on fake tensors: values carry shapes and dtypes, no weight is read or
        computed with (FLOP counting of a lazily backed program); ops whose output shape depends on values
        (`aten.nonzero`) then fail.
        """
        plain = observe is None and not rewrite
        if shapes_only:
            from torch._subclasses.fake_tensor import FakeTensorMode

            mode = FakeTensorMode()
            args = self._fake_args(inputs, mode)
        else:  # the graph module reads every weight; the interpreter onloads lazily backed ones (`_interpret`)
            mode = contextlib.nullcontext()
            args = self.flat_args(inputs) if plain else self._interpreted_args(inputs)
        with mode:
            if plain:
                return self.named_outputs(self.graph_module(*args))
            report = None if observe is None else (lambda _index, node, value: observe(node, value))
            return next(self._interpret([args], (), report, nodes, rewrite))

    @torch.no_grad()
    def run_segmented(
        self,
        batches: Sequence[Mapping[str, torch.Tensor]],
        cuts: Iterable[Node],
        observe: Callable[[int, Node, Any], None] | None = None,
        nodes: set[Node] | None = None,
        rewrite: Mapping[Node, ValueRewrite] | None = None,
        on_segment: Callable[[int, int], None] | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Run the graph over all `batches` segment by segment and yield each batch's outputs by name, in order.

        The nodes (in graph order) are split after each node of `cuts` (e.g. the last output of every block
        of a block stack). Segment k runs for every batch before segment k+1 starts, and between segments
        only the values live across the cut are kept, for every batch (the residual stream, masks, rotary
        tables): memory holds one cut's live set for all batches plus one batch's values within a segment,
        never every batch's activations of the whole graph, and each segment's weights are used for all
        batches in a row (layer-sequential calibration, llm-compressor's "sequential onloading"). A lazily backed
        program (module docstring) reads a segment's weights from their files when the segment starts and drops
        them when it ends: memory then holds one block's weights, never the model's.

        Every node computes exactly what `run` computes (the same ops on the same values), so outputs and
        observed values are equal to `run`'s bit for bit. `observe(batch_index, node, value)` is called for
        every node in `nodes` (all nodes if None) as soon as it is computed, segment by segment: batch 0..N-1
        of the first segment, then of the second, ...; `rewrite` works as in `run`. The outputs of batch i
        are yielded when the last segment finishes it; earlier segments run on the first `next()`.
        `on_segment(done, total)` is called when a segment has run for every batch (progress).

        Example::

            blocks = [block.outputs()[-1] for block in region_index(program).blocks()]
            outputs = list(program.run_segmented(list(calibration.batches()), blocks))
        """
        args = [self._interpreted_args(batch) for batch in batches]
        yield from self._interpret(args, cuts, observe, nodes, rewrite, on_segment)

    def _interpreted_args(self, inputs: Mapping[str, torch.Tensor]) -> list[Any]:
        """`flat_args` for `_interpret`: references to the held state and the inputs, no copies; None for lazily
        backed state, which `_interpret` reads segment by segment."""
        self._check_inputs(inputs)
        return self._args(inputs, lambda name: None if name in self._stored else self._held(name))

    def _interpret(
        self,
        args: list[list[Any]],
        cuts: Iterable[Node],
        observe: Callable[[int, Node, Any], None] | None,
        nodes: set[Node] | None,
        rewrite: Mapping[Node, ValueRewrite] | None,
        on_segment: Callable[[int, int], None] | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """`run_segmented` on the graph module's flat arguments of each batch (`_interpreted_args`, or fake ones):
        a state argument that is None is read when a segment needs it (`_onload`)."""
        cuts = list(cuts)
        order = list(self.graph.nodes)
        position = {n: i for i, n in enumerate(order)}
        strangers = [c for c in cuts if c not in position]
        if strangers:
            raise SparsecError(
                f"cut node(s) {[c.name for c in strangers][:5]} are not in the program's graph; "
                "compute the cuts from the program as it is now"
            )
        rewrite = rewrite or {}
        last_use = {n: max([position[n]] + [position[u] for u in n.users]) for n in order}
        for target, rw in rewrite.items():  # a value a rewrite reads stays alive until the rewrite ran
            for read in rw.reads:
                last_use[read] = max(last_use[read], position[target])
        freed_after: dict[int, list[Node]] = {}
        for n, last in last_use.items():
            freed_after.setdefault(last, []).append(n)
        ends = sorted({position[c] for c in cuts} | {len(order) - 1})
        segments = [order[start + 1 : end + 1] for start, end in zip([-1, *ends], ends)]

        interpreter = torch.fx.Interpreter(self.graph_module, garbage_collect_values=False)
        argument = {n: j for j, n in enumerate(self.graph.find_nodes(op="placeholder"))}
        lazy = {n: name for name, n in self.state_placeholders().items() if args and args[0][argument[n]] is None}
        envs: list[dict[Node, Any] | None] = [None] * len(args)
        for k, segment in enumerate(segments):
            last = k == len(segments) - 1
            onloaded = self._onload(segment, lazy)
            for i in range(len(args)):
                env = envs[i] if envs[i] is not None else {}
                interpreter.env = env
                for node, value in onloaded.items():
                    if observe is not None and (nodes is None or node in nodes):
                        observe(i, node, value)
                    env[node] = value
                for node in segment:
                    if node in lazy:
                        continue
                    value = args[i][argument[node]] if node in argument else interpreter.run_node(node)
                    if node in rewrite:
                        value = rewrite[node].fn(value, *(env[r] for r in rewrite[node].reads))
                    if observe is not None and (nodes is None or node in nodes):
                        observe(i, node, value)
                    env[node] = value
                    for dead in freed_after.get(position[node], ()):
                        if dead.op != "output":
                            env.pop(dead, None)
                for node in onloaded:
                    env.pop(node, None)
                envs[i] = None if last else env
                if last:
                    yield self.named_outputs(value)
            del onloaded
            if on_segment is not None:
                on_segment(k + 1, len(segments))

    def _onload(self, segment: Sequence[Node], lazy: Mapping[Node, str]) -> dict[Node, torch.Tensor]:
        """The lazily backed state tensors `segment` reads, each read once from its file for all batches (layer by
        layer onloading: a block's weights are in memory while that block runs, and only then)."""
        read = dict.fromkeys(p for node in segment for p in node.all_input_nodes if p in lazy)
        return {p: self.state_tensor(lazy[p]) for p in read}

    # ----- mutation support --------------------------------------------------------------------------
    def recompile(self) -> None:
        """Regenerate the graph module's code after in-place graph edits and invalidate cached views."""
        self.graph_module.recompile()
        self._version += 1

    def snapshot(self) -> ProgramSnapshot:
        """The program as it is now, for `restore` (what the `PassManager` takes before every pass).

        Cheap: the graph is copied (nodes and their metadata dicts), the tensors are shared. That is exact as
        long as state tensors are replaced (`replace_state`), never changed in place; `changed_in_place` tells.
        """
        ep = self.exported
        copies = self._on_disk
        return ProgramSnapshot(
            graph=copy.deepcopy(self.graph),
            signature=ExportGraphSignature(list(ep.graph_signature.input_specs), list(ep.graph_signature.output_specs)),
            state_dict={n: copies[n] if n in copies and copies[n].holds(t) else t for n, t in ep.state_dict.items()},
            constants=dict(ep.constants),
            family=self.family,
            tagger=copy.deepcopy(self.tagger),
            dynamic_dims=copy.deepcopy(self.dynamic_dims),
            tensor_versions=_tensor_versions(ep),
            stored=dict(self._stored),
        )

    def restore(self, snapshot: ProgramSnapshot) -> None:
        """Make the program what it was at `snapshot`: graph, signature, state, metadata. The snapshot stays
        valid (it can be restored again). Bumps `version`: the nodes are new objects, cached analyses stale.

        A tensor the snapshot knows by its stored copy is the same object if it still lives, else read back."""
        ep = self.exported
        self.graph_module.graph = copy.deepcopy(snapshot.graph)
        self._set_signature(inputs=snapshot.signature.input_specs, outputs=snapshot.signature.output_specs)
        cache: dict[tuple[Path, str], torch.Tensor] = {}
        ep.state_dict.clear()
        for name, value in snapshot.state_dict.items():
            if isinstance(value, StoredCopy):
                tensor = value.resolve(cache)
                self._on_disk[name] = dataclasses.replace(value, tensor=weakref.ref(tensor), version=tensor._version)
                value = tensor
            ep.state_dict[name] = value
        ep.constants.clear()
        ep.constants.update(snapshot.constants)
        self._stored = dict(snapshot.stored)
        self.family = snapshot.family
        self.tagger = copy.deepcopy(snapshot.tagger)
        self.dynamic_dims = copy.deepcopy(snapshot.dynamic_dims)
        self.recompile()

    def changed_in_place(self, snapshot: ProgramSnapshot) -> list[str]:
        """State tensors the program still shares with `snapshot` that were modified in place since.

        Such a change survives `restore`; a pass must `replace_state` instead. (Detected by the tensors'
        in-place version counters; writes through `.data` escape it.) A tensor the snapshot knows by its stored
        copy and that has been freed since (the pass removed it) is shared with nothing.
        """
        now = _tensor_versions(self.exported)
        shared = {
            **{n: t.tensor() if isinstance(t, StoredCopy) else t for n, t in snapshot.state_dict.items()},
            **snapshot.constants,
        }
        current = {**self.exported.state_dict, **self.exported.constants}
        return sorted(
            name
            for name, version in snapshot.tensor_versions.items()
            if shared[name] is not None and current.get(name) is shared[name] and now.get(name) != version
        )

    def prune(self) -> list[str]:
        """Dead-code-eliminate and drop state nobody uses. Returns the removed state names.

        After this, a removed weight has no placeholder, no signature entry and no tensor in the state dict.
        """
        graph = self.graph

        def is_impure(node: Node) -> bool:
            # An unused random op (SDPA carries the `nondeterministic_seeded` tag for dropout) is dead in inference.
            return (
                node.is_impure(impure_random=False)
                and not _is_dead_metadata_assert(node)
                and not _is_dead_inplace_update(node)
            )

        while graph.eliminate_dead_code(is_impure_node=is_impure):
            pass
        removed = [name for name, node in self.state_placeholders().items() if not node.users]
        for name in removed:
            self.remove_state(name)
        self.recompile()
        return removed

    def verify(self) -> None:
        """Check the invariants every pass must keep; raise `VerificationError` naming the broken one.

        Lint (well-formed graph), parameter bookkeeping (placeholders, signature and state dict agree),
        shape re-propagation with fake tensors (every node's shapes still compute, dynamic dims included)
        and torch.export's own verifier (ATen ops only, or registered custom ops).
        """
        try:
            self.graph.lint()
        except Exception as exc:
            raise VerificationError(f"graph lint failed: {exc}") from exc

        ep = self.exported
        placeholders = [n.name for n in self.graph.find_nodes(op="placeholder")]
        signature = [s.arg.name for s in ep.graph_signature.input_specs]
        if placeholders != signature:
            raise VerificationError(
                f"graph placeholders and the program signature disagree: only in graph "
                f"{sorted(set(placeholders) - set(signature))}, only in signature {sorted(set(signature) - set(placeholders))}"
            )
        state_specs = {s.target for s in ep.graph_signature.input_specs if s.kind in STATE_KINDS}
        orphans = (
            set(ep.state_dict) | {k for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}
        ) - state_specs
        if orphans:
            raise VerificationError(f"tensors kept in the program that no graph input uses: {sorted(orphans)[:8]}")

        try:
            self._infer_shapes()
        except Exception as exc:
            raise VerificationError(
                f"shape propagation failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
            ) from exc
        try:
            ep.validate()
        except Exception as exc:
            raise VerificationError(f"torch.export verifier rejected the program: {exc}") from exc

    def _infer_shapes(self) -> None:
        """Re-infer `meta["val"]` (fake tensors, symbolic dims) for nodes a rewrite touched.

        A node is re-inferred when its inputs are not the ones its value was inferred from (rewired or
        new) or an input's shape changed; the rest keep their captured metadata. Incremental, so it is
        cheap, and it never re-runs ops nobody touched (some meta kernels, e.g. masked_scatter, do not
        re-run under symbolic shapes).
        """
        placeholders = self.graph.find_nodes(op="placeholder")
        fake_mode = _fake_mode(self.graph)
        changed: set[Node] = set()
        for name, node in self.state_placeholders().items():
            if "val" not in node.meta:  # replaced by `replace_state`
                held = self._held(name)
                if held.device.type == "meta":  # spilled to a file: fake it on the device the graph was captured on
                    device = next(
                        (p.meta["val"].device for p in placeholders if isinstance(p.meta.get("val"), torch.Tensor)),
                        torch.device("cpu"),
                    )
                    node.meta["val"] = fake_mode.fake_tensor_converter.from_meta_and_device(fake_mode, held, device)
                else:
                    node.meta["val"] = fake_mode.from_tensor(held, static_shapes=True)
                changed.add(node)
        env: dict[Node, Any] = {n: n.meta.get("val") for n in placeholders}
        with fake_mode:
            for node in self.graph.nodes:
                if node.op != "call_function":
                    continue
                inputs = _input_names(node)
                clean = node.meta.get(_INPUTS_KEY) == inputs and not any(a in changed for a in node.all_input_nodes)
                if clean and "val" in node.meta:
                    env[node] = node.meta["val"]
                    continue
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: env[a])
                value = node.target(*args, **kwargs)
                if "val" not in node.meta or not same_meta(node.meta["val"], value):
                    changed.add(node)
                    node.meta["val"] = value
                env[node] = node.meta["val"]
                node.meta[_INPUTS_KEY] = inputs

    def without_runtime_asserts(self, extra_outputs: Sequence[str] = ()) -> Program:
        """A copy of this program without runtime-assert nodes, sharing the weight tensors (no copy).

        ONNX has no meaning for these checks (`aten._assert_scalar`, `aten._is_all_true` feeding them, ...),
        and some models (Janus) only lower once they are gone. The original program keeps them.
        `extra_outputs`: node names whose values the copy's graph also returns, after the user outputs (the ONNX
        export marks block boundaries this way); its `output_names` stay the program's.
        """
        ep = self.exported
        graph = Graph()
        env: dict[Node, Node] = {}
        outputs = graph.graph_copy(self.graph, env)
        signature, call_graph = ep.graph_signature, list(ep.module_call_graph)
        if extra_outputs:
            by_name = {new.name: new for old, new in env.items() if old.name in extra_outputs}
            missing = [n for n in extra_outputs if n not in by_name]
            if missing:
                raise SparsecError(f"without_runtime_asserts: the program has no nodes {missing[:5]}")
            outputs = (*outputs, *(by_name[n] for n in extra_outputs))
            extra_specs = [OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(name=n), None) for n in extra_outputs]
            signature = ExportGraphSignature(list(signature.input_specs), [*signature.output_specs, *extra_specs])
            flat = torch.utils._pytree.tree_structure(tuple(range(len(outputs))))  # the copy returns a flat tuple
            top = dataclasses.replace(
                call_graph[0], signature=dataclasses.replace(call_graph[0].signature, out_spec=flat)
            )
            call_graph = [top, *call_graph[1:]]
        graph.output(outputs)
        for node in reversed(list(graph.nodes)):
            if node.target in RUNTIME_ASSERTS:
                graph.erase_node(node)
        graph.eliminate_dead_code()
        gm = GraphModule(self.graph_module, graph)
        copy = ExportedProgram(
            root=gm,
            graph=gm.graph,
            graph_signature=signature,
            state_dict=ep.state_dict,
            range_constraints=ep.range_constraints,
            module_call_graph=call_graph,
            constants=ep.constants,
            verifiers=ep.verifiers,  # the captured IR's own verifier: it admits in-place ops such as index_put_
        )
        program = Program(
            copy, family=self.family, tagger=self.tagger, dynamic_dims=self.dynamic_dims, dim_bounds=self.dim_bounds
        )
        program._stored = dict(self._stored)
        program._on_disk = dict(self._on_disk)
        return program

    def frozen_copy(self) -> Program:
        """A copy of the program as it is now, which later rewrites of this one leave alone: its own graph, signature
        and state dicts, holding the same tensors (no copy; passes replace tensors, never edit them).

        A tensor this program holds on the CPU with an exact copy on disk (`note_stored_copies`), or reads lazily, the
        copy reads from its file when it runs: it keeps no weight that passes drop or replace in this program alive (the
        dense reference a recovery pass trains against, `PassContext.reference`).
        """
        ep = self.exported
        graph = Graph()
        graph.output(graph.graph_copy(self.graph, {}))
        gm = GraphModule(self.graph_module, graph)
        on_disk = {
            n: c.stored
            for n, c in self._on_disk.items()
            if n in ep.state_dict and c.holds(ep.state_dict[n]) and c.device.type == "cpu"  # files read onto the CPU
        }
        state = {}
        for name, tensor in ep.state_dict.items():
            if name in on_disk:
                meta = tensor.detach().to("meta")
                tensor = (
                    torch.nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else meta
                )
            state[name] = tensor
        signature = ExportGraphSignature(list(ep.graph_signature.input_specs), list(ep.graph_signature.output_specs))
        exported = ExportedProgram(
            root=gm,
            graph=gm.graph,
            graph_signature=signature,
            state_dict=state,
            range_constraints=ep.range_constraints,
            module_call_graph=list(ep.module_call_graph),
            constants=dict(ep.constants),
            verifiers=ep.verifiers,
        )
        program = Program(
            exported, family=self.family, tagger=self.tagger, dynamic_dims=self.dynamic_dims, dim_bounds=self.dim_bounds
        )
        program._stored = {**self._stored, **on_disk}
        return program

    def shares_state(self, other: Program, name: str) -> bool:
        """Whether state tensor `name` is the same in this program and `other` (a `frozen_copy` of one of them):
        the same tensor object, or the same stored tensor that both read or hold an exact copy of. False when either
        lacks it. Passes replace what they change, so a tensor shared is a tensor unchanged."""

        def identity(program: Program) -> Any:
            if name in program._stored:
                return program._stored[name]
            ep = program.exported
            held = ep.state_dict.get(name, ep.constants.get(name))
            copy = program._on_disk.get(name)
            return copy.stored if copy is not None and held is not None and copy.holds(held) else held

        mine, theirs = identity(self), identity(other)
        if mine is None or theirs is None:
            return False
        return mine is theirs or (isinstance(mine, StoredTensor) and mine == theirs)

    # ----- persistence ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write a `.pt2` file loadable with plain `torch.export.load`; sparsec metadata rides in extra files.

        The file needs only torch to load and run (its outputs are plain containers, see the class docstring), unless
        the graph holds sparsec's own operators (`torch.ops.sparsec.moe`, from `ffn_to_moe`): those are registered
        by `import sparsec`, which `sparsec.load_program` does. A lazily backed program is materialised first
        (`materialize`: its weights are read into memory). Staged beside `path` and renamed into place."""
        self.materialize()
        path = Path(path)
        meta = {
            "family": self.family,
            "tags": self.tagger.to_list(),
            "dynamic_dims": self.dynamic_dims,
            "dim_bounds": self.dim_bounds,
        }
        stage = tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)  # the archive is named after the file
        try:
            torch.export.save(
                self.exported, os.path.join(stage, path.name), extra_files={"sparsec.json": json.dumps(meta)}
            )
            os.replace(os.path.join(stage, path.name), path)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Program:
        extra = {"sparsec.json": ""}
        exported = torch.export.load(path, extra_files=extra)
        meta = json.loads(extra["sparsec.json"] or "{}")
        dims = {k: {int(a): n for a, n in v.items()} for k, v in meta.get("dynamic_dims", {}).items()}
        return cls(
            exported,
            family=meta.get("family", "unknown"),
            tagger=Tagger.from_list(meta.get("tags", [])),
            dynamic_dims=dims,
            dim_bounds=meta.get("dim_bounds", {}),
        )

    def __repr__(self) -> str:
        n_ops = sum(1 for n in self.graph.nodes if n.op == "call_function")
        return f"Program(family={self.family!r}, ops={n_ops}, parameters={self.num_parameters():,})"
