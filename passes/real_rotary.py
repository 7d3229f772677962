"""`real_rotary`: rewrite complex-valued rotary embeddings into real arithmetic, so the program lowers to ONNX.

Some models rotate queries and keys with complex numbers. Qwen-Image's MMDiT (diffusers) keeps its
frequency table as a complex64 constant `e^(i*theta)`, cuts it up with `split_with_sizes` / `slice` / `cat`
/ `expand`, and applies it as `view_as_real(view_as_complex(x) * freqs)`. ONNX has no complex types, so
such a program does not export. This pass carries every complex value as a pair of real tensors (real
part, imaginary part):

- a complex constant or buffer becomes two real ones, `<name>_cos` and `<name>_sin` for a rotary table
  (every entry of modulus 1: real part cos(theta), imaginary part sin(theta)), `<name>_real` / `<name>_imag`
  otherwise; `polar(r, theta)` computed in the graph becomes `r*cos(theta)`, `r*sin(theta)`;
- `view_as_complex(x)` becomes the (even, odd) pair `x[..., 0]`, `x[..., 1]`;
- ops that only move, select or cast elements (`split_with_sizes`, `slice`, `cat`, `view`, `expand`, `to`,
  ...) and `add` / `sub` / `neg` run on both parts alike;
- the rotation `x * freqs` becomes `out_even = x_e*cos - x_o*sin`, `out_odd = x_e*sin + x_o*cos`;
- `view_as_real(z)` becomes `stack([out_even, out_odd], -1)`, which is what the following `flatten`
  expects (pairs interleaved, as before).

Afterwards no node produces or consumes a complex dtype (checked). Complex ops outside these rules
(`abs`, `exp`, FFTs, division, ...), complex parameters, and complex program inputs or outputs are
refused before anything changes, with the ops named. The rewrite is exact up to float rounding (the
same four products and two sums as the complex multiply).

Stage `lowering`: in a recipe it runs after every `transform` pass, whatever its position.

Recipe:
    passes:
      - slice_neurons: {keep_ratio: 0.5, where: "**.img_mlp", importance: magnitude}
      - real_rotary: {}
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch.export.graph_signature import InputKind
from torch.fx import Graph, Node

from sparsec.analysis.vocabulary import describe, module_path
from sparsec.errors import PassError
from sparsec.ir.program import RUNTIME_ASSERTS, Program
from sparsec.transform.pass_manager import Pass, PassContext, PassResult

aten = torch.ops.aten

REAL_DTYPE = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}

# Complex in, complex out, applied to the real and imaginary parts alike (they move, select or cast elements,
# or are linear with real coefficients).
PARTWISE = frozenset(
    {
        aten.view.default,
        aten.reshape.default,
        aten._unsafe_view.default,
        aten.expand.default,
        aten.unsqueeze.default,
        aten.squeeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.permute.default,
        aten.transpose.int,
        aten.t.default,
        aten.slice.Tensor,
        aten.select.int,
        aten.narrow.default,
        aten.index_select.default,
        aten.index.Tensor,
        aten.split.Tensor,
        aten.split_with_sizes.default,
        aten.chunk.default,
        aten.unbind.int,
        aten.cat.default,
        aten.stack.default,
        aten.flatten.using_ints,
        aten.unflatten.int,
        aten.repeat.default,
        aten.flip.default,
        aten.roll.default,
        aten.clone.default,
        aten.contiguous.default,
        aten.alias.default,
        aten.detach.default,
        aten.lift_fresh_copy.default,
        aten.resolve_conj.default,
        aten.resolve_neg.default,
        aten.to.dtype,
        aten.to.dtype_layout,
        aten.to.device,
        aten._to_copy.default,
        aten.neg.default,
        aten.add.Tensor,
        aten.sub.Tensor,
        operator.getitem,
    }
)
CONJUGATE = frozenset({aten._conj.default, aten.conj_physical.default})
MULTIPLY = frozenset({aten.mul.Tensor, aten.mul.Scalar})
ENTRY = frozenset({aten.view_as_complex.default, aten.polar.default, aten.complex.default})  # real in, complex out
EXIT = frozenset({aten.view_as_real.default, aten.real.default, aten.imag.default})  # complex in, real out


def _is_complex(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype.is_complex
    if isinstance(value, (list, tuple)):
        return any(_is_complex(v) for v in value)
    return False


def is_complex_node(node: Node) -> bool:
    """Whether the node's value (`meta["val"]`, or any tensor of a list value) has a complex dtype."""
    return _is_complex(node.meta.get("val"))


def _rule(node: Node) -> str | None:
    """How a call node that touches complex values is rewritten, or None if it cannot be."""
    produces = is_complex_node(node)
    consumes = any(is_complex_node(a) for a in node.all_input_nodes)
    target = node.target
    if produces and not consumes:
        return "entry" if target in ENTRY else None
    if consumes and not produces:
        if target in RUNTIME_ASSERTS:  # e.g. the metadata check of a `.to()` on a complex table: it goes with the table
            return "drop"
        return "exit" if target in EXIT else None
    if target in MULTIPLY:
        return "multiply"
    if target in CONJUGATE:
        return "conjugate"
    if target in (aten.add.Tensor, aten.sub.Tensor):  # partwise only between two complex tensors
        both = all(isinstance(a, Node) and is_complex_node(a) for a in node.args[:2])
        return "partwise" if both and not isinstance(node.kwargs.get("alpha"), complex) else None
    if target in (aten.cat.default, aten.stack.default):
        return "partwise" if all(isinstance(a, Node) and is_complex_node(a) for a in node.args[0]) else None
    return "partwise" if target in PARTWISE else None


@dataclass(frozen=True, kw_only=True)
class RotaryDecisions:
    """What `real_rotary` rewrote (decisions.json holds these fields): each complex table split into its real
    and imaginary tensors (name -> the two new names), and the module paths of the complex multiplies."""

    tables: dict[str, list[str]]
    complex_multiplies: list[str]


class RealRotary(Pass):
    """Carry complex values as (real, imaginary) pairs of real tensors: complex rotary -> cos/sin rotation."""

    name = "real_rotary"
    stage = "lowering"

    # ----- analysis ---------------------------------------------------------------------------------------
    def requires(self, program: Program, ctx: PassContext) -> None:
        problems = []
        signature = program.exported.graph_signature
        kinds = {s.arg.name: s for s in signature.input_specs}
        for node in program.graph.find_nodes(op="placeholder"):
            spec = kinds.get(node.name)
            if not is_complex_node(node) or spec is None:
                continue
            if spec.kind == InputKind.USER_INPUT:
                problems.append(f"program input {node.name!r} is complex (the program's inputs cannot change)")
            elif spec.kind == InputKind.PARAMETER:
                problems.append(f"parameter {spec.target!r} is complex (only constant tables and buffers are split)")
        (output,) = program.graph.find_nodes(op="output")
        for value in output.all_input_nodes:
            if is_complex_node(value):
                problems.append(f"program output {value.name!r} is complex (the program's outputs cannot change)")
        unsupported = [
            describe(n, where=True)
            for n in program.graph.nodes
            if n.op == "call_function"
            and (is_complex_node(n) or any(is_complex_node(a) for a in n.all_input_nodes))
            and _rule(n) is None
        ]
        if unsupported:
            problems.append(
                "complex op(s) it cannot rewrite: "
                + ", ".join(unsupported[:12])
                + (f" and {len(unsupported) - 12} more" if len(unsupported) > 12 else "")
            )
        if problems:
            raise PassError(
                f"{self.name}: " + "; ".join(problems) + ". It rewrites complex rotary embeddings "
                "(view_as_complex, complex multiply, view_as_real, and the layout ops between them)."
            )

    # ----- rewrite ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, program: Program, ctx: PassContext, plan: None) -> PassResult:
        graph = program.graph
        self._fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.find_nodes(op="placeholder")])
        if self._fake_mode is None:
            raise PassError(
                f"{self.name}: the program's placeholders carry no shape metadata (meta['val']); "
                "capture it with sparsec.capture"
            )
        parts: dict[Node, tuple[Any, Any]] = {}  # complex node -> (real part, imaginary part)
        tables: dict[str, list[str]] = {}
        multiplies: list[str] = []  # module paths of the complex multiplies (the rotations)
        rewritten: list[Node] = []
        for node in list(graph.nodes):
            if node.op == "placeholder":
                if is_complex_node(node):
                    parts[node] = self._split_state(program, node, tables)
                continue
            if node.op != "call_function":
                continue
            if not (is_complex_node(node) or any(is_complex_node(a) for a in node.all_input_nodes)):
                continue
            rule = _rule(node)
            if rule == "drop":
                graph.erase_node(node)
                continue
            with graph.inserting_before(node):
                if rule == "exit":
                    program.replace_uses(node, self._exit(graph, node, parts))
                elif rule == "entry":
                    parts[node] = self._entry(graph, node)
                elif rule == "multiply":
                    parts[node] = self._multiply(graph, node, parts)
                    multiplies.append(module_path(node))
                elif rule == "conjugate":
                    real, imag = parts[node.args[0]]
                    parts[node] = (real, self._emit(graph, node, aten.neg.default, (imag,)))
                elif rule == "partwise":
                    parts[node] = tuple(
                        self._emit(graph, node, node.target, *self._on_part(node, parts, i)) for i in (0, 1)
                    )
                else:  # requires() refuses these; reaching here means the graph changed in between
                    raise PassError(f"{self.name}: cannot rewrite complex op {describe(node, where=True)}")
            rewritten.append(node)
        for node in reversed(rewritten):
            if not node.users:
                graph.erase_node(node)
        stats = {"complex_ops_rewritten": len(rewritten), "complex_multiplies": len(multiplies), "tables": len(tables)}
        return PassResult(
            modified=bool(rewritten) or bool(tables),
            stats=stats,
            decisions=RotaryDecisions(tables=tables, complex_multiplies=multiplies),
        )

    def ensures(self, program: Program, ctx: PassContext, result: PassResult) -> None:
        left = [
            describe(n, where=True)
            for n in program.graph.nodes
            if is_complex_node(n) or n.target in (aten.view_as_complex.default, aten.view_as_real.default)
        ]
        if left:
            raise PassError(f"{self.name}: complex values remain after the rewrite: {', '.join(left[:12])}")

    # ----- helpers ----------------------------------------------------------------------------------------
    def _emit(self, graph: Graph, like: Node, target: Any, args: Sequence[Any], kwargs: dict | None = None) -> Node:
        """A new call node with `like`'s module stack and its value inferred with fake tensors."""
        kwargs = dict(kwargs or {})
        node = graph.call_function(target, tuple(args), kwargs)
        for key in ("nn_module_stack", "stack_trace"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
        fake_args, fake_kwargs = torch.fx.node.map_arg((tuple(args), kwargs), lambda a: a.meta["val"])
        with self._fake_mode:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
        return node

    def _on_part(self, node: Node, parts: dict[Node, tuple[Any, Any]], index: int) -> tuple[tuple, dict]:
        """`node`'s arguments with complex nodes replaced by their real (0) or imaginary (1) part, complex
        dtypes by the matching real dtype."""

        def convert(arg: Any) -> Any:
            if isinstance(arg, Node) and arg in parts:
                return parts[arg][index]
            if isinstance(arg, torch.dtype) and arg.is_complex:
                return REAL_DTYPE[arg]
            if isinstance(arg, (list, tuple)):
                return type(arg)(convert(a) for a in arg)
            return arg

        return convert(node.args), {k: convert(v) for k, v in node.kwargs.items()}

    def _entry(self, graph: Graph, node: Node) -> tuple[Any, Any]:
        if node.target == aten.view_as_complex.default:  # x[..., 2] -> (x[..., 0], x[..., 1]): the (even, odd) pairs
            (x,) = node.args
            return tuple(self._emit(graph, node, aten.select.int, (x, -1, i)) for i in (0, 1))
        if node.target == aten.polar.default:
            modulus, angle = node.args
            cos = self._emit(graph, node, aten.cos.default, (angle,))
            sin = self._emit(graph, node, aten.sin.default, (angle,))
            return (
                self._emit(graph, node, aten.mul.Tensor, (modulus, cos)),
                self._emit(graph, node, aten.mul.Tensor, (modulus, sin)),
            )
        real, imag = node.args  # aten.complex
        return real, imag

    def _exit(self, graph: Graph, node: Node, parts: dict[Node, tuple[Any, Any]]) -> Node:
        real, imag = parts[node.args[0]]
        if node.target == aten.view_as_real.default:
            return self._emit(graph, node, aten.stack.default, ([real, imag], -1))
        return real if node.target == aten.real.default else imag

    def _multiply(self, graph: Graph, node: Node, parts: dict[Node, tuple[Any, Any]]) -> tuple[Node, Node]:
        """(a + ib)(c + id) = (ac - bd) + i(ad + bc); with a real factor c: ac + i(bc)."""
        a, b = (
            parts[x]
            if isinstance(x, Node) and x in parts
            else (x.real, x.imag)
            if isinstance(x, complex)
            else (x, None)
            for x in node.args[:2]
        )
        (x_re, x_im), (y_re, y_im) = (a, b) if a[1] is not None else (b, a)

        def mul(p: Any, q: Any) -> Any:
            return self._emit(graph, node, aten.mul.Tensor, (p, q))

        if y_im is None:
            return mul(x_re, y_re), mul(x_im, y_re)
        real = self._emit(graph, node, aten.sub.Tensor, (mul(x_re, y_re), mul(x_im, y_im)))
        imag = self._emit(graph, node, aten.add.Tensor, (mul(x_re, y_im), mul(x_im, y_re)))
        return real, imag

    def _split_state(self, program: Program, node: Node, tables: dict[str, list[str]]) -> tuple[Node, Node]:
        """Replace a complex constant or buffer by two real ones of the same kind (its placeholder dies in the
        manager's prune)."""
        spec = next(s for s in program.exported.graph_signature.input_specs if s.arg.name == node.name)
        value = program.state_tensor(spec.target)
        unit = value.numel() > 0 and bool(torch.allclose(value.abs(), torch.ones_like(value.real), atol=1e-6))
        suffixes = ("cos", "sin") if unit else ("real", "imag")
        kind = "buffer" if spec.kind == InputKind.BUFFER else "constant"
        new_nodes = []
        for suffix, part in zip(suffixes, (value.real, value.imag)):
            new_nodes.append(
                program.add_state(f"{spec.target}_{suffix}", part.contiguous(), kind, persistent=bool(spec.persistent))
            )
        tables[spec.target] = [f"{spec.target}_{s}" for s in suffixes]
        return new_nodes[0], new_nodes[1]
