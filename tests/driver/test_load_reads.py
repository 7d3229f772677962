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


def test_names_that_do_not_map_go_through_from_pretrained(tmp_path):
    """A checkpoint whose names do not all map onto the model's parameters is left to from_pretrained, which loads
    what maps and initialises the rest (reading by name would have had nothing to put there)."""
    from safetensors.torch import load_file

    directory = _saved(tmp_path, "tiny-qwen2", torch.float32)
    file = next(directory.glob("*.safetensors"))
    tensors = load_file(file)
    renamed = "model.layers.0.mlp.up_proj.weight"
    tensors["model.renamed.up_proj.weight"] = tensors.pop(renamed)
    save_file(tensors, file, metadata={"format": "pt"})
    params = dict(load_model(directory).model.named_parameters())
    for key, tensor in tensors.items():
        if key in params:
            torch.testing.assert_close(params[key], tensor, rtol=0, atol=0, msg=key)
    assert not torch.equal(params[renamed], tensors["model.renamed.up_proj.weight"])
