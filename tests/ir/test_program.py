"""The Program API on a small graph: state added and removed with the signature in step, the flat call,
versions and cached analyses, snapshot / restore, in-place changes detected."""

import pytest
import torch
from conftest import small_program
from torch.export.graph_signature import InputKind

from sparsec.errors import SparsecError
from sparsec.ir.program import Program, ValueRewrite

aten = torch.ops.aten


def _x(batch=3, seed=0):
    return {"x": torch.randn(batch, 3, 8, generator=torch.Generator().manual_seed(seed))}


def _scale_output(program, node):
    """Multiply the program's output by `node` (a new state placeholder): y' = y * node."""
    (output,) = program.graph.find_nodes(op="output")
    y = output.args[0][0]
    with program.graph.inserting_before(output):
        scaled = program.graph.call_function(aten.mul.Tensor, (y, node))
    program.replace_uses(y, scaled, except_in=scaled)
    program.recompile()


def _kinds(program):
    return {
        s.target: (s.kind, s.persistent)
        for s in program.exported.graph_signature.input_specs
        if s.kind != InputKind.USER_INPUT
    }


@pytest.mark.parametrize(
    "kind, stored_in, spec",
    [
        ("parameter", "state_dict", (InputKind.PARAMETER, None)),
        ("buffer", "state_dict", (InputKind.BUFFER, True)),
        ("constant", "constants", (InputKind.CONSTANT_TENSOR, None)),
    ],
)
def test_add_state_wires_placeholder_signature_and_tensor(tmp_path, kind, stored_in, spec):
    _, program = small_program()
    inputs = _x()
    expected = program.run(inputs)["y"] * 3.0
    node = program.add_state("extra.gain", torch.full((4,), 3.0), kind)
    assert node.meta["val"].shape == (4,)  # shape metadata at once, for nodes added next
    _scale_output(program, node)

    program.verify()
    assert _kinds(program)["extra.gain"] == spec
    assert "extra.gain" in getattr(program.exported, stored_in)
    torch.testing.assert_close(program.run(inputs)["y"], expected)
    program.save(tmp_path / "p.pt2")
    loaded = Program.load(tmp_path / "p.pt2")
    torch.testing.assert_close(loaded.run(inputs)["y"], expected)
    torch.testing.assert_close(torch.export.load(tmp_path / "p.pt2").module()(**inputs)["y"], expected)


def test_non_persistent_buffer_lives_with_the_constants():
    _, program = small_program()
    program.add_state("extra.table", torch.ones(4), "buffer", persistent=False)
    assert _kinds(program)["extra.table"] == (InputKind.BUFFER, False)
    assert "extra.table" in program.exported.constants and "extra.table" not in program.exported.state_dict
    program.verify()


def test_add_state_refuses_a_taken_name_and_an_unknown_kind():
    _, program = small_program()
    with pytest.raises(SparsecError, match="already has a tensor named 'blocks.0.up.weight'"):
        program.add_parameter("blocks.0.up.weight", torch.zeros(1))
    with pytest.raises(SparsecError, match="unknown state kind 'weight'"):
        program.add_state("extra.w", torch.zeros(1), "weight")


def test_remove_state_only_what_nobody_reads():
    _, program = small_program()
    with pytest.raises(SparsecError, match=r"cannot remove 'scale': \['mul'\] still read it"):
        program.remove_state("scale")
    program.add_state("extra.unused", torch.zeros(2), "buffer")
    program.remove_state("extra.unused")
    assert "extra.unused" not in _kinds(program) and "extra.unused" not in program.exported.state_dict
    program.verify()
    with pytest.raises(SparsecError, match="no state tensor named 'extra.unused'"):
        program.remove_state("extra.unused")


def test_prune_removes_unread_state_through_the_signature():
    _, program = small_program()
    (mul,) = program.graph.find_nodes(op="call_function", target=aten.mul.Tensor)
    program.replace_uses(mul, mul.args[0])  # the scale buffer is no longer read
    program.recompile()
    assert program.prune() == ["scale"]
    program.verify()
    assert "scale" not in _kinds(program) and "scale" not in program.exported.state_dict


def test_flat_call_equals_run():
    _, program = small_program()
    inputs = _x(batch=4, seed=1)
    flat = program.graph_module(*program.flat_args(inputs))
    assert program.named_outputs(flat).keys() == {"y"}
    torch.testing.assert_close(program.named_outputs(flat)["y"], program.run(inputs)["y"], rtol=0, atol=0)
    with pytest.raises(SparsecError, match=r"program inputs are \['x'\]; got \['z'\] \(missing \['x'\]\)"):
        program.flat_args({"z": torch.zeros(1)})


def test_version_bumps_on_recompile_and_invalidates_analyses():
    _, program = small_program()
    calls = []

    def count_linears(p):
        calls.append(p.version)
        return len(p.graph.find_nodes(op="call_function", target=aten.linear.default))

    version = program.version
    assert program.analysis(count_linears) == 5 and program.analysis(count_linears) == 5
    assert calls == [version]  # cached within one version
    program.recompile()
    assert program.version == version + 1
    assert program.analysis(count_linears) == 5 and calls == [version, version + 1]


def test_replace_state_keeps_shape_metadata_only_when_the_shape_holds():
    _, program = small_program()
    program.replace_state("scale", torch.full((8,), 2.0))
    assert "val" in program.state_placeholders()["scale"].meta
    program.replace_state("blocks.0.up.weight", torch.zeros(16, 8, dtype=torch.float64))
    assert "val" not in program.state_placeholders()["blocks.0.up.weight"].meta
    assert isinstance(program.state_tensor("blocks.0.up.weight"), torch.nn.Parameter)


def _state(program):
    ep = program.exported
    return {**ep.state_dict, **ep.constants}


def test_restore_undoes_graph_signature_and_state_edits():
    _, program = small_program()
    inputs = _x()
    code, signature = program.graph_module.code, str(program.exported.graph_signature)
    state, parameters, expected = _state(program), program.num_parameters(), program.run(inputs)["y"]
    snapshot = program.snapshot()

    program.replace_state("blocks.0.up.weight", torch.zeros(16, 8))
    _scale_output(program, program.add_parameter("extra.gain", torch.full((4,), 2.0)))
    program.family = "edited"
    assert program.graph_module.code != code and program.num_parameters() != parameters

    version = program.version
    for _ in range(2):  # a snapshot can be restored more than once
        program.restore(snapshot)
        assert program.graph_module.code == code and str(program.exported.graph_signature) == signature
        assert _state(program).keys() == state.keys()
        assert all(_state(program)[k] is v for k, v in state.items())  # the very tensors: shared, not copied
        assert program.num_parameters() == parameters and program.family == "unknown"
        program.verify()
        torch.testing.assert_close(program.run(inputs)["y"], expected, rtol=0, atol=0)
        _scale_output(program, program.add_parameter("extra.gain", torch.full((4,), 2.0)))
    assert program.version > version


def test_changed_in_place_names_tensors_modified_in_place():
    _, program = small_program()
    snapshot = program.snapshot()
    program.replace_state("blocks.0.up.weight", torch.zeros(16, 8))  # replaced: fine
    assert program.changed_in_place(snapshot) == []
    with torch.no_grad():
        program.state_tensor("blocks.1.down.bias").add_(1.0)
    assert program.changed_in_place(snapshot) == ["blocks.1.down.bias"]


def test_a_removed_weight_known_by_its_stored_copy_is_not_taken_for_changed_in_place(tmp_path):
    """A model read from a checkpoint: its snapshot refers to a weight's file copy by a weak reference, so once a
    pass removes the weight and it is freed, neither the program nor the snapshot holds it: that is no change."""
    import gc

    from safetensors.torch import save_file

    from sparsec.ir.stored import StoredTensor

    program = small_program()[1]  # not the model, which would keep its tensors alive
    name = "blocks.1.down.bias"
    save_file({name: program.state_tensor(name).detach().clone()}, str(tmp_path / "w.safetensors"))
    tensor = program.state_tensor(name)
    program.note_stored_copies(
        {name: StoredTensor(tmp_path / "w.safetensors", name, tuple(tensor.shape), tensor.dtype)}
    )
    del tensor
    snapshot = program.snapshot()
    replacement = program.add_parameter("blocks.1.down.new_bias", torch.zeros_like(program.state_tensor(name)))
    program.replace_uses(program.state_placeholders()[name], replacement)
    program.remove_state(name)
    gc.collect()
    assert program.changed_in_place(snapshot) == []
    program.restore(snapshot)  # read back from the file
    again = program.snapshot()
    with torch.no_grad():
        program.state_tensor(name).add_(1.0)  # a living tensor changed in place is still found
    assert program.changed_in_place(again) == [name]


def _in_block(node, path):
    stack = node.meta.get("nn_module_stack")
    return bool(stack) and list(stack.values())[-1][0] == path


def _block_output(program, path):
    """The residual add `x + down(relu(up(x)))` of block `path`: where a layer-sequential run cuts."""
    (add,) = [n for n in program.graph.nodes if n.target is aten.add.Tensor and _in_block(n, path)]
    return add


def test_segmented_run_equals_run_with_observers_segment_by_segment():
    _, program = small_program()
    batches = [_x(batch=b, seed=b) for b in (3, 1, 2)]
    cut = _block_output(program, "blocks.0")
    seen = []
    outputs = list(program.run_segmented(batches, [cut], observe=lambda i, n, v: seen.append((i, n, v))))
    assert len(outputs) == 3
    for batch, got in zip(batches, outputs):
        torch.testing.assert_close(got["y"], program.run(batch)["y"], rtol=0, atol=0)
    order = list(program.graph.nodes)
    split = order.index(cut) + 1
    # every node of the first segment for batches 0, 1, 2, then the rest for batches 0, 1, 2
    assert [(i, n) for i, n, _ in seen] == [(i, n) for i in range(3) for n in order[:split]] + [
        (i, n) for i in range(3) for n in order[split:]
    ]
    for index, batch in enumerate(batches):
        whole = {}
        program.run(batch, observe=whole.setdefault)
        for i, node, value in seen:
            if i == index and isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, whole[node], rtol=0, atol=0)


def test_segmented_run_keeps_only_values_live_across_the_cut():
    import weakref

    _, program = small_program()
    cut = _block_output(program, "blocks.0")
    inside = {n for n in program.graph.nodes if _in_block(n, "blocks.0") and n is not cut}
    order = list(program.graph.nodes)
    hidden, alive_after_cut = [], []

    def observe(index, node, value):
        if node in inside:
            hidden.append(weakref.ref(value))
        elif order.index(node) > order.index(cut) and not alive_after_cut:  # the first node past the cut
            alive_after_cut.append(sum(ref() is not None for ref in hidden))

    list(program.run_segmented([_x(seed=s) for s in range(3)], [cut], observe=observe))
    assert len(hidden) == 3 * len(inside) and alive_after_cut == [0]  # block 0's insides of no batch survive


def test_segmented_run_rewrites_and_observes_chosen_nodes_only():
    _, program = small_program()
    batches = [_x(batch=2, seed=s) for s in (0, 1)]
    out_0, out_1 = _block_output(program, "blocks.0"), _block_output(program, "blocks.1")
    skip_block_1 = {out_1: ValueRewrite(lambda out, stream: stream, reads=(out_0,))}
    seen = []
    got = list(
        program.run_segmented(
            batches, [out_0], observe=lambda i, n, v: seen.append((i, n.name)), nodes={out_1}, rewrite=skip_block_1
        )
    )
    assert seen == [(0, out_1.name), (1, out_1.name)]
    for batch, outputs in zip(batches, got):
        torch.testing.assert_close(outputs["y"], program.run(batch, rewrite=skip_block_1)["y"], rtol=0, atol=0)
        assert not torch.equal(outputs["y"], program.run(batch)["y"])


def test_segmented_run_refuses_a_cut_from_another_graph():
    _, program = small_program()
    _, other = small_program()
    with pytest.raises(SparsecError, match=r"cut node\(s\) \['add'\] are not in the program's graph"):
        next(program.run_segmented([_x()], [_block_output(other, "blocks.0")]))


def test_segmented_run_cuts_anywhere_even_between_placeholders():
    _, program = small_program()
    batches = [_x(batch=2, seed=s) for s in (0, 1)]
    order = list(program.graph.nodes)
    for cuts in ([order[1]], [order[1], order[-2]], [order[-1]], order[:-1]):
        for batch, got in zip(batches, program.run_segmented(batches, cuts)):
            torch.testing.assert_close(got["y"], program.run(batch)["y"], rtol=0, atol=0)


class _WritesIntoViews(torch.nn.Module):
    """`out[:, :2] = x` on a fresh tensor (the write goes through a view), then `y /= y.sum()` left unused."""

    def forward(self, x):
        out = x.new_empty(x.shape[0], 4)
        out[:, :2] = x
        out[:, 2:] = 2 * x
        y = x.exp()
        unused = y.sum(-1, keepdim=True)
        y /= unused
        return out


def test_prune_keeps_writes_into_views_and_drops_dead_inplace_updates():
    x = torch.randn(3, 2)
    exported = torch.export.export(_WritesIntoViews(), (x,), strict=False)
    program = Program(exported)
    program.prune()
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.copy_.default in targets and torch.ops.aten.exp.default not in targets
    torch.testing.assert_close(program.graph_module(x)[0], torch.cat([x, 2 * x], 1))
