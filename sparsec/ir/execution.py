"""Execution: running a program's graph on named inputs, whole or segment by segment, observed or rewritten.

Contract: inputs go in and outputs come back by name (`input_names`, `output_names`). A plain run calls the graph module with every
weight read at once; an observed or rewritten run goes through an FX interpreter, which reads lazily backed
weights segment by segment (a segment's weights once for all batches, dropped after it: layer by layer onloading,
so a model larger than memory runs in it). Every node computes the same ops on the same values either way, so
outputs and observed values agree bit for bit. A shapes-only run uses fake tensors and reads no weight. The
functions take the `ExportedProgram`, its `WeightStore` and `read`, how a state tensor is read (`Program.state_tensor`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx import Node

from sparsec.errors import SparsecError
from sparsec.ir.editing import STATE_KINDS, state_placeholders
from sparsec.ir.weights import WeightStore

Read = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class ValueRewrite:
    """For `Program.run(rewrite=...)`: the node's value becomes `fn(value, *values of reads)`.

    Example::

        skip = ValueRewrite(lambda out, inp: inp, reads=(block.input,))   # the block passes its input on
        program.run(batch, rewrite={block.output: skip})
    """

    fn: Callable[..., Any]
    reads: tuple[Node, ...] = ()


def input_names(exported: ExportedProgram) -> list[str]:
    """The user inputs, in call order (all captured as keyword arguments)."""
    return [str(k) for k in exported.call_spec.in_spec.child(1).context]


def output_names(exported: ExportedProgram) -> list[str]:
    """The user outputs' names: `logits` for a ModelOutput, `0`, `1` for a tuple."""
    return _leaf_names(exported.call_spec.out_spec)


def _leaf_names(spec: Any, prefix: str = "") -> list[str]:
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


def flat_args(
    exported: ExportedProgram, weights: WeightStore, inputs: Mapping[str, torch.Tensor], state: Read
) -> list[Any]:
    """`Program.flat_args`: the graph module's positional arguments for user `inputs` by name, state tensors and
    inputs in signature order. `program.named_outputs(program.graph_module(*program.flat_args(inputs)))` is
    `run(inputs)` without `run`'s no-grad mode and hooks (for training through the graph, `sparsec.data.distill`,
    which passes `state`: the tensor to use for each state name instead of `Program.state_tensor`'s). Inputs on
    another device than the program's weights are moved to it (calibration data stays on the CPU while the program
    runs on `cuda`)."""
    _check_inputs(exported, inputs)
    return _args(exported, weights.device, inputs, state)


def named_outputs(exported: ExportedProgram, flat: Any) -> dict[str, torch.Tensor]:
    """The user outputs by name from the graph module's flat result (see `flat_args`)."""
    specs = exported.graph_signature.output_specs
    user = [v for v, s in zip(flat, specs) if s.kind == OutputKind.USER_OUTPUT]
    return dict(zip(output_names(exported), user))


def _check_inputs(exported: ExportedProgram, inputs: Mapping[str, torch.Tensor]) -> None:
    names = input_names(exported)
    missing = [n for n in names if n not in inputs]
    extra = [n for n in inputs if n not in names]
    if missing or extra:
        raise SparsecError(
            f"program inputs are {names}; got {sorted(inputs)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unexpected {extra})" if extra else "")
        )


def _args(
    exported: ExportedProgram, device: torch.device, inputs: Mapping[str, torch.Tensor], state: Callable[[str], Any]
) -> list[Any]:
    user = iter(
        inputs[n].to(device) if isinstance(inputs[n], torch.Tensor) and inputs[n].device != device else inputs[n]
        for n in input_names(exported)
    )
    args: list[Any] = []
    for spec in exported.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            args.append(next(user))
        elif spec.kind in STATE_KINDS:
            args.append(state(spec.target))
        else:
            raise SparsecError(f"unsupported program input kind {spec.kind} ({spec.arg.name})")
    return args


def _fake_args(
    exported: ExportedProgram, weights: WeightStore, inputs: Mapping[str, torch.Tensor], mode: Any
) -> list[Any]:
    """`flat_args` as fake tensors of `mode`: shapes and dtypes only, nothing read (state on the inputs' device)."""
    _check_inputs(exported, inputs)
    device = next((v.device for v in inputs.values()), torch.device("cpu"))

    def fake(name: str) -> Any:
        held = weights.held(name)
        if held.device.type == "meta":
            return mode.fake_tensor_converter.from_meta_and_device(mode, held.detach(), device)
        return mode.from_tensor(held)

    return _args(exported, weights.device, {n: mode.from_tensor(v) for n, v in inputs.items()}, fake)


def _interpreted_args(exported: ExportedProgram, weights: WeightStore, inputs: Mapping[str, torch.Tensor]) -> list[Any]:
    """`flat_args` for `_interpret`: references to the held state and the inputs, no copies; None for lazily
    backed state, which `_interpret` reads segment by segment."""
    _check_inputs(exported, inputs)
    return _args(exported, weights.device, inputs, lambda name: None if weights.is_lazy(name) else weights.held(name))


@torch.no_grad()
def run(
    exported: ExportedProgram,
    weights: WeightStore,
    read: Read,
    inputs: Mapping[str, torch.Tensor],
    observe: Callable[[Node, Any], None] | None,
    nodes: set[Node] | None,
    rewrite: Mapping[Node, ValueRewrite] | None,
    shapes_only: bool,
    outputs_from: Mapping[Node, Node] | None = None,
) -> dict[str, torch.Tensor]:
    """`Program.run`: run the graph on `inputs` (by name) and return the outputs by name.

    With `observe`, every node in `nodes` (all nodes if None) is reported as `observe(node, value)`
    as soon as it is computed: calibration statistics are collected this way in one pass.
    With `rewrite`, the value of each node in it is replaced by its `ValueRewrite` before any user reads
    it: a what-if run of a change without editing the graph (`sparsec.probe` masks neurons and skips
    blocks this way).
    With `outputs_from`, an output node's value is taken from another node, and what only the replaced node
    needs is not computed: `{projection: hidden}` returns a language model's hidden states in place of its
    logits without ever computing the logits (`sparsec.data.logits`).
    With `shapes_only`, the graph runs on fake tensors: values carry shapes and dtypes, no weight is read or
    computed with (FLOP counting of a lazily backed program); ops whose output shape depends on values
    (`aten.nonzero`) then fail.
    """
    plain = observe is None and not rewrite and not outputs_from
    if shapes_only:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode()
        args = _fake_args(exported, weights, inputs, mode)
    else:  # the graph module reads every weight; the interpreter onloads lazily backed ones (`_interpret`)
        mode = contextlib.nullcontext()
        args = flat_args(exported, weights, inputs, read) if plain else _interpreted_args(exported, weights, inputs)
    with mode:
        if plain:
            return named_outputs(exported, exported.graph_module(*args))
        report = None if observe is None else (lambda _index, node, value: observe(node, value))
        return next(_interpret(exported, read, [args], (), report, nodes, rewrite, outputs_from=outputs_from))


@torch.no_grad()
def run_segmented(
    exported: ExportedProgram,
    weights: WeightStore,
    read: Read,
    batches: Sequence[Mapping[str, torch.Tensor]],
    cuts: Iterable[Node],
    observe: Callable[[int, Node, Any], None] | None,
    nodes: set[Node] | None,
    rewrite: Mapping[Node, ValueRewrite] | None,
    on_segment: Callable[[int, int], None] | None,
    outputs_from: Mapping[Node, Node] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """`Program.run_segmented`: run the graph over all `batches` segment by segment and yield each batch's outputs
    by name, in order.

    The nodes (in graph order) are split after each node of `cuts` (e.g. the last output of every block
    of a block stack). Segment k runs for every batch before segment k+1 starts, and between segments
    only the values live across the cut are kept, for every batch (the residual stream, masks, rotary
    tables): memory holds one cut's live set for all batches plus one batch's values within a segment,
    never every batch's activations of the whole graph, and each segment's weights are used for all
    batches in a row (layer-sequential calibration, llm-compressor's "sequential onloading"). A lazily backed
    program reads a segment's weights from their files when the segment starts and drops them when it ends:
    memory then holds one block's weights, never the model's.

    Every node computes exactly what `run` computes (the same ops on the same values), so outputs and
    observed values are equal to `run`'s bit for bit. `observe(batch_index, node, value)` is called for
    every node in `nodes` (all nodes if None) as soon as it is computed, segment by segment: batch 0..N-1
    of the first segment, then of the second, ...; `rewrite` and `outputs_from` work as in `run`. The outputs of batch i
    are yielded when the last segment finishes it; earlier segments run on the first `next()`.
    `on_segment(done, total)` is called when a segment has run for every batch (progress).
    """
    args = [_interpreted_args(exported, weights, batch) for batch in batches]
    yield from _interpret(exported, read, args, cuts, observe, nodes, rewrite, on_segment, outputs_from)


def _interpret(
    exported: ExportedProgram,
    read: Read,
    args: list[list[Any]],
    cuts: Iterable[Node],
    observe: Callable[[int, Node, Any], None] | None,
    nodes: set[Node] | None,
    rewrite: Mapping[Node, ValueRewrite] | None,
    on_segment: Callable[[int, int], None] | None = None,
    outputs_from: Mapping[Node, Node] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """`run_segmented` on the graph module's flat arguments of each batch (`_interpreted_args`, or fake ones):
    a state argument that is None is read when a segment needs it (`_onload`); only the nodes the outputs need
    (`_needed`, after `outputs_from`) run."""
    cuts = list(cuts)
    graph = exported.graph_module.graph
    order = list(graph.nodes)
    position = {n: i for i, n in enumerate(order)}
    strangers = [c for c in cuts if c not in position]
    if strangers:
        raise SparsecError(
            f"cut node(s) {[c.name for c in strangers][:5]} are not in the program's graph; "
            "compute the cuts from the program as it is now"
        )
    rewrite, outputs_from = rewrite or {}, outputs_from or {}
    output = order[-1]
    needed = _needed(order, rewrite, outputs_from)
    last_use = {n: max([position[n]] + [position[u] for u in n.users if u in needed]) for n in order}
    for target, rw in rewrite.items():  # a value a rewrite reads stays alive until the rewrite ran
        for read in rw.reads:
            last_use[read] = max(last_use[read], position[target])
    for source in outputs_from.values():
        last_use[source] = position[output]
    freed_after: dict[int, list[Node]] = {}
    for n, last in last_use.items():
        freed_after.setdefault(last, []).append(n)
    ends = sorted({position[c] for c in cuts} | {len(order) - 1})
    segments = [order[start + 1 : end + 1] for start, end in zip([-1, *ends], ends)]

    interpreter = torch.fx.Interpreter(exported.graph_module, garbage_collect_values=False)
    argument = {n: j for j, n in enumerate(graph.find_nodes(op="placeholder"))}
    lazy = {n: name for name, n in state_placeholders(exported).items() if args and args[0][argument[n]] is None}
    envs: list[dict[Node, Any] | None] = [None] * len(args)
    for k, segment in enumerate(segments):
        last = k == len(segments) - 1
        onloaded = _onload(segment, lazy, read, needed)
        for i in range(len(args)):
            env = envs[i] if envs[i] is not None else {}
            interpreter.env = env
            for node, value in onloaded.items():
                if observe is not None and (nodes is None or node in nodes):
                    observe(i, node, value)
                env[node] = value
            for node in segment:
                if node in lazy or node not in needed:
                    continue
                if node is output:
                    value = torch.fx.node.map_arg(node.args[0], lambda n, env=env: env[outputs_from.get(n, n)])
                else:
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
                yield named_outputs(exported, value)
        del onloaded
        if on_segment is not None:
            on_segment(k + 1, len(segments))


def _needed(
    order: Sequence[Node], rewrite: Mapping[Node, ValueRewrite], outputs_from: Mapping[Node, Node]
) -> set[Node]:
    """The nodes of `order` (the graph's) a run computes: all but those used only where `outputs_from` replaces
    them (the output) or by nodes dropped so; nodes without users (runtime asserts among them) always run."""
    kept = set(outputs_from.values()) | {r for rw in rewrite.values() for r in rw.reads}
    dropped: set[Node] = set()
    for node in reversed(order):
        replaced = node in outputs_from
        if node.users and node not in kept and all(u in dropped or (replaced and u.op == "output") for u in node.users):
            dropped.add(node)
    return {n for n in order if n not in dropped}


def _onload(
    segment: Sequence[Node], lazy: Mapping[Node, str], read: Read, needed: set[Node]
) -> dict[Node, torch.Tensor]:
    """The lazily backed state tensors the `needed` nodes of `segment` read, each read once from its file for all
    batches (layer by layer onloading: a block's weights are in memory while that block runs, and only then)."""
    reads = dict.fromkeys(p for node in segment if node in needed for p in node.all_input_nodes if p in lazy)
    return {p: read(lazy[p]) for p in reads}
