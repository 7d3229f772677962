"""`load_model` on the CPU reads each parameter into memory of its own (`sparsec.models._read_parameters`).

The reference is `from_pretrained` itself: same values bit for bit, same dtypes, same tying. What differs is
where the bytes live: no parameter is a view of a memory-mapped file, so a weight a pass drops is freed.
"""

import pytest
import torch
from safetensors.torch import save_file

from sparsec.models import build_model, builtin_config, load_model

FAMILIES = ["tiny-qwen2", "tiny-llama", "tiny-janus", "tiny-mot", "tiny-chameleon", "tiny-emu3"]


def _saved(tmp_path, name: str, dtype: torch.dtype):
    model = build_model(builtin_config(name), seed=0).to(dtype)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_reads_equal_from_pretrained(tmp_path, name, dtype):
    directory = _saved(tmp_path, name, dtype)
    loaded = load_model(directory).model
    reference = type(loaded).from_pretrained(directory, local_files_only=True, use_safetensors=True, dtype="auto")
    ours, theirs = dict(loaded.named_parameters()), dict(reference.named_parameters())
    assert ours.keys() == theirs.keys()
    for key, param in ours.items():
        assert param.dtype == theirs[key].dtype == dtype, key
        torch.testing.assert_close(param, theirs[key], rtol=0, atol=0, msg=key)
        assert param.untyped_storage().nbytes() == param.nbytes, f"{key} is a view of a larger (mapped) storage"
    tied = {n for n, _ in loaded.named_parameters(remove_duplicate=False)} - ours.keys()
    assert tied == {n for n, _ in reference.named_parameters(remove_duplicate=False)} - theirs.keys()
    for key, buffer in dict(reference.named_buffers()).items():
        torch.testing.assert_close(dict(loaded.named_buffers())[key], buffer, rtol=0, atol=0, msg=key)


def test_a_checkpoint_without_a_parameter_is_refused(tmp_path):
    """A checkpoint whose names do not all map onto the model's parameters goes to from_pretrained, which would
    initialise the missing ones at random: refused instead, naming them and the closest tensor left unused."""
    from safetensors.torch import load_file

    from sparsec.errors import SparsecError

    directory = _saved(tmp_path, "tiny-qwen2", torch.float32)
    file = next(directory.glob("*.safetensors"))
    tensors = load_file(file)
    renamed = "model.layers.0.mlp.up_proj.weight"
    tensors["model.renamed.up_proj.weight"] = tensors.pop(renamed)
    save_file(tensors, file, metadata={"format": "pt"})
    message = rf"has no tensor for 1 parameter\(s\).*: '{renamed}' \(closest unused stored tensor: 'model\.renamed\."
    with pytest.raises(SparsecError, match=message):
        load_model(directory)


def _captured(directory):
    from sparsec import capture

    loaded = load_model(directory)
    example = loaded.family.example_inputs(loaded.model, 2, 8)
    program = capture(loaded.model, example, family=loaded.family)
    loaded.attach_weights(program)
    return program, example


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "tiny-emu3"])  # Emu3: from_pretrained (below)
def test_snapshots_refer_to_the_checkpoint_so_a_replaced_weight_is_freed(tmp_path, family):
    """A snapshot of a program read from its checkpoint does not keep a weight alive: replaced, it is freed at once,
    and `restore` reads it back (equal bit for bit, outputs unchanged); a weight that still lives is the same
    object after `restore`, and one changed in place is held by the snapshot, never taken for its file's copy."""
    import gc
    import weakref

    program, example = _captured(_saved(tmp_path, family, torch.bfloat16))
    before = program.run(example)
    name, kept = [n for n in program.parameter_names() if n.endswith("up_proj.weight")][:2]
    original = program.state_tensor(name).detach().clone()
    snapshot = program.snapshot()
    freed, alive = weakref.ref(program.state_tensor(name)), program.state_tensor(kept)
    program.replace_state(name, original * 2)
    gc.collect()
    assert freed() is None  # neither the program nor its snapshot holds the replaced weight
    program.restore(snapshot)
    torch.testing.assert_close(program.state_tensor(name), original, rtol=0, atol=0)
    assert isinstance(program.exported.state_dict[name], torch.nn.Parameter)
    assert program.state_tensor(kept) is alive
    after = program.run(example)
    torch.testing.assert_close(after, before, rtol=0, atol=0)

    with torch.no_grad():
        program.state_tensor(kept).mul_(2)
    changed = program.snapshot()
    held = weakref.ref(program.state_tensor(kept))
    program.replace_state(kept, original)
    gc.collect()
    assert held() is not None and changed.state_dict[kept] is held()


def test_a_checkpoint_loaded_by_from_pretrained_notes_no_copies(tmp_path):
    """Emu3's checkpoint stores persistent buffers (its VQ model's BatchNorm statistics), so it loads through
    from_pretrained (`_read_parameters` returns None): no stored copies are known, and its snapshots hold every
    tensor as before."""
    import weakref

    program, _ = _captured(_saved(tmp_path, "tiny-emu3", torch.bfloat16))
    name = next(n for n in program.parameter_names() if n.endswith("up_proj.weight"))
    snapshot = program.snapshot()
    held = weakref.ref(program.state_tensor(name))
    program.replace_state(name, program.state_tensor(name).detach() * 2)
    assert held() is not None and snapshot.state_dict[name] is held()


def test_programs_without_a_checkpoint_keep_every_tensor_in_their_snapshots():
    import weakref

    from conftest import make_inputs, make_model

    import sparsec

    model = make_model("tiny-qwen2")
    program = sparsec.capture(model, make_inputs(model, 2, 8))
    name = "model.layers.0.mlp.up_proj.weight"
    snapshot = program.snapshot()
    held = weakref.ref(program.state_tensor(name))
    del model
    program.replace_state(name, program.state_tensor(name) * 2)
    assert held() is not None and snapshot.state_dict[name] is held()
