"""A Program backed by tensors in safetensors files: read on demand, replaced, pruned, restored, materialised."""

import pytest
import torch
from conftest import small_program
from safetensors.torch import save_file

from sparsec.errors import SparsecError
from sparsec.ir.stored import StoredTensor


def _lazy(tmp_path):
    """(model, program) of `small_program` with every parameter backed by a file holding the model's weights."""
    model, program = small_program()
    names = program.parameter_names()
    weights = {n: program.state_tensor(n).detach().clone() for n in names}
    save_file(weights, str(tmp_path / "w.safetensors"))
    program.attach_weights(
        {n: StoredTensor(tmp_path / "w.safetensors", n, tuple(w.shape), w.dtype) for n, w in weights.items()}
    )
    return model, program, weights


def test_state_is_read_on_demand_and_counted_from_shapes(tmp_path):
    _, program, weights = _lazy(tmp_path)
    name = next(iter(weights))
    assert program.lazy_state() == sorted(weights)
    assert all(program.exported.state_dict[n].device.type == "meta" for n in weights)
    assert program.num_parameters() == sum(w.numel() for w in weights.values())
    assert program.parameter_bytes() == sum(w.nbytes for w in weights.values())
    assert program.state_shape(name) == weights[name].shape
    first, second = program.state_tensor(name), program.state_tensor(name)
    assert torch.equal(first, weights[name]) and first is not second  # read each time, not cached


def test_replace_prune_snapshot_restore_and_materialize(tmp_path):
    model, program, weights = _lazy(tmp_path)
    x = {"x": torch.randn(3, 3, 8)}
    expected = model(**x)["y"]
    name = program.parameter_names()[0]
    snapshot = program.snapshot()
    program.replace_state(name, torch.zeros_like(weights[name]))
    assert name not in program.lazy_state() and not program.state_tensor(name).any()
    program.restore(snapshot)
    assert name in program.lazy_state() and torch.equal(program.state_tensor(name), weights[name])
    program.verify()
    assert torch.allclose(program.run(x)["y"], expected)  # runs, reading every weight for the call
    program.materialize()
    assert program.lazy_state() == [] and program.exported.state_dict[name].device.type == "cpu"
    assert isinstance(program.exported.state_dict[name], torch.nn.Parameter)
    assert torch.allclose(program.run(x)["y"], expected)


def test_shapes_only_run_reads_nothing(tmp_path):
    _, program, weights = _lazy(tmp_path)
    (tmp_path / "w.safetensors").unlink()  # nothing may be read
    out = program.run({"x": torch.randn(5, 3, 8)}, shapes_only=True)["y"]
    assert out.shape[0] == 5
    with pytest.raises(SparsecError, match="cannot read"):
        program.state_tensor(next(iter(weights)))


def test_weights_without_a_file_and_mismatched_files_are_refused(tmp_path):
    _, program = small_program()
    name = program.parameter_names()[0]
    shape = tuple(program.state_shape(name))
    with pytest.raises(SparsecError, match="does not fit the config"):
        program.attach_weights({name: StoredTensor(tmp_path / "w.safetensors", name, (1, *shape), torch.float32)})
    with pytest.raises(SparsecError, match="no state tensor named"):
        program.attach_weights({"nope": None})
    program.attach_weights({name: None})
    with pytest.raises(SparsecError, match="has no weights"):
        program.state_tensor(name)
    with pytest.raises(SparsecError, match="captured from a config"):
        program.save(tmp_path / "p.pt2")
    assert program.num_parameters() > 0


def test_replaced_lazy_tensors_spill_to_files(tmp_path):
    model, program, weights = _lazy(tmp_path)
    spill = tmp_path / "spill"
    spill.mkdir()
    program.spill_to(spill)
    name = program.parameter_names()[0]
    sliced = weights[name][:, :4].contiguous() if weights[name].dim() == 2 else weights[name][:4].contiguous()
    program.replace_state(name, sliced)
    assert name in program.lazy_state() and len(list(spill.iterdir())) == 1
    assert program.exported.state_dict[name].device.type == "meta"
    assert torch.equal(program.state_tensor(name), sliced) and program.state_shape(name) == sliced.shape
    program.replace_state(name, weights[name])  # back to the original shape: spilled again, shapes re-inferred
    program.verify()
    x = {"x": torch.randn(2, 3, 8)}
    assert torch.allclose(program.run(x)["y"], model(**x)["y"])


def test_a_stacked_tensor_reads_its_parts_in_order_in_its_dtype(tmp_path):
    """Experts stored one by one (the paper's MoE checkpoints) read as the [E, ...] stack `sparsec::moe` takes."""
    parts = {f"experts.{e}.w": torch.randn(3, 4) for e in range(3)}
    save_file(parts, str(tmp_path / "m.safetensors"))
    order = ("experts.2.w", "experts.0.w", "experts.1.w")
    stacked = StoredTensor(tmp_path / "m.safetensors", "experts (stacked)", (3, 3, 4), torch.bfloat16, parts=order)
    read = stacked.read()
    assert read.dtype == torch.bfloat16 and read.shape == (3, 3, 4)
    for i, key in enumerate(order):
        assert torch.equal(read[i], parts[key].to(torch.bfloat16))
    wrong = StoredTensor(tmp_path / "m.safetensors", "experts (stacked)", (2, 3, 4), torch.float32, parts=order)
    with pytest.raises(SparsecError, match=r"'experts \(stacked\)' has shape \(3, 3, 4\), the program expects"):
        wrong.read()
