"""Checkpoints whose tensor names transformers converts while loading (`sparsec.conversion`).

`save_pretrained` writes GPT-NeoX's `lm_head` as `embed_out`, LLaVA's `model.language_model.*` as
`language_model.model.*`, and a MoE's fused expert tensors one expert at a time (Mixtral's as
`block_sparse_moe.experts.{i}.w1 / w2 / w3`, Qwen2-MoE's as `experts.{i}.gate_proj / up_proj / down_proj`);
`from_pretrained` converts them back. Each tiny random model is saved two ways: by
`save_pretrained` (checked here to be that legacy layout, against names and tensors split by hand) and under the
model's own names (written by hand; `from_pretrained` loads it too). The references are the model that was saved
and `from_pretrained` of the directory: sparsec's load, and its lazy load with each parameter read from its stored
tensor, give the same outputs, bit for bit (FP32). `sparsec inspect` (lazy) reads the language models.
"""

import re

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from sparsec.cli import main
from sparsec.errors import SparsecError
from sparsec.models import load_model

TEXT = dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64)


def _gpt_neox():
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**TEXT, intermediate_size=64))


def _llava():
    config = transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(**TEXT, intermediate_size=64, num_key_value_heads=2),
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        image_token_id=127,
    )
    return transformers.LlavaForConditionalGeneration(config)


def _mixtral():
    config = transformers.MixtralConfig(
        **TEXT, intermediate_size=16, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2
    )
    return transformers.MixtralForCausalLM(config)


def _qwen2_moe():
    config = transformers.Qwen2MoeConfig(
        **TEXT,
        intermediate_size=64,
        num_key_value_heads=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return transformers.Qwen2MoeForCausalLM(config)


def _experts(names: tuple[str, str, str]):
    """Split each layer's fused expert tensors (`PREFIX.gate_up_proj` [E, 2I, H], `PREFIX.down_proj` [E, H, I]) into
    one tensor per expert: `PREFIX.{e}.{names[0]}.weight` its gate rows, `names[1]` its up rows, `names[2]` down."""

    def split(state: dict) -> dict:
        out = {}
        for key in [k for k in state if k.endswith(".experts.gate_up_proj")]:
            prefix = key.removesuffix(".gate_up_proj")
            gate_up, down = state.pop(key), state.pop(prefix + ".down_proj")
            width = gate_up.shape[1] // 2
            for e in range(gate_up.shape[0]):
                out[f"{prefix}.{e}.{names[0]}.weight"] = gate_up[e, :width].contiguous()
                out[f"{prefix}.{e}.{names[1]}.weight"] = gate_up[e, width:].contiguous()
                out[f"{prefix}.{e}.{names[2]}.weight"] = down[e].contiguous()
        return {**state, **out}

    return split


def _renamed(*pairs: tuple[str, str]):
    def rename(state: dict) -> dict:
        for pattern, replacement in pairs:
            state = {re.sub(pattern, replacement, k): v for k, v in state.items()}
        return state

    return rename


# family -> (the model, seeded before; its state dict -> the legacy layout, by hand)
FAMILIES = {
    "gpt_neox": (_gpt_neox, _renamed((r"^lm_head\.", "embed_out."))),
    "llava": (
        _llava,
        _renamed(
            (r"^lm_head\.", "language_model.lm_head."),
            (r"^model\.language_model\.", "language_model.model."),
            (r"^model\.vision_tower\.", "vision_tower."),
            (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
        ),
    ),
    "mixtral": (
        _mixtral,
        lambda state: _renamed((r"\.mlp\.", ".block_sparse_moe."))(_experts(("w1", "w3", "w2"))(state)),
    ),
    "qwen2_moe": (_qwen2_moe, _experts(("gate_proj", "up_proj", "down_proj"))),
}


def _inputs(model) -> dict:
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 100, (2, 9), generator=gen)
    if not isinstance(model, transformers.LlavaForConditionalGeneration):
        return {"input_ids": input_ids}
    input_ids[:, 1:5] = model.config.image_token_id  # 4 patches of 8x8 in a 16x16 image: 4 image features
    return {"input_ids": input_ids, "pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}


def _saved(tmp_path, family: str, layout: str):
    """The model of `family` (seeded) and its directory in `layout`: "save_pretrained" (asserted to be the legacy
    layout; the MoEs in shards of a few experts each) or "own-names" (the model's state dict as it is)."""
    build, legacy = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    directory = tmp_path / f"{family}-{layout}"
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if layout == "save_pretrained":
        model.save_pretrained(directory, max_shard_size="24KB" if family in ("mixtral", "qwen2_moe") else "1GB")
        stored = {}
        for file in directory.glob("*.safetensors"):
            with safe_open(str(file), "pt") as f:
                stored |= {k: f.get_tensor(k) for k in f.keys()}
        expected = legacy(dict(state))
        assert stored.keys() == expected.keys()
        for key, tensor in stored.items():
            torch.testing.assert_close(tensor, expected[key], rtol=0, atol=0, msg=key)
    else:
        model.config.architectures = [type(model).__name__]  # as save_pretrained writes it
        model.config.save_pretrained(directory)
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return model, directory


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("layout", ["save_pretrained", "own-names"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_loads_equal_the_saved_model_and_from_pretrained(tmp_path, family, layout):
    model, directory = _saved(tmp_path, family, layout)
    inputs = _inputs(model)
    expected = _logits(model, inputs)
    reference, info = type(model).from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(_logits(reference.eval(), inputs), expected, rtol=0, atol=0)

    loaded = load_model(directory)
    assert loaded.stored, "read by sparsec, not by from_pretrained"
    torch.testing.assert_close(_logits(loaded.model, inputs), expected, rtol=0, atol=0)

    lazy = load_model(directory, weights="lazy")
    parameters = dict(lazy.model.named_parameters(remove_duplicate=False))
    assert lazy.stored.keys() == parameters.keys()
    if layout == "save_pretrained" and family in ("mixtral", "qwen2_moe"):  # experts of one layer in several shards
        assert len({file for file, _ in lazy.stored["model.layers.0.mlp.experts.gate_up_proj"].sources}) > 1
    read = {}
    for name, param in parameters.items():  # what a lazily backed program reads, one tensor at a time
        stored = lazy.stored[name]
        param.data = read.setdefault(stored.key, stored.read())
    torch.testing.assert_close(_logits(lazy.model, inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gpt_neox", "mixtral", "qwen2_moe"])
def test_inspect_reads_a_save_pretrained_checkpoint(tmp_path, family, capsys):
    _, directory = _saved(tmp_path, family, "save_pretrained")
    assert main(["inspect", "--model", str(directory)]) == 0
    assert "weights: not in memory" in capsys.readouterr().out


def test_a_tensor_missing_after_conversion_is_named_with_the_closest_stored_one(tmp_path, capsys):
    _, directory = _saved(tmp_path, "gpt_neox", "save_pretrained")
    file = directory / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    tensors[name.replace("dense_h_to_4h", "dense_h_to_4h_old")] = tensors.pop(name)
    save_file(tensors, file, metadata={"format": "pt"})
    message = (
        rf"has no tensor for 1 parameter\(s\), under its name or one transformers converts from: '{name}' "
        rf"\(closest unused stored tensor: '{name.replace('dense_h_to_4h', 'dense_h_to_4h_old')}'\)"
    )
    with pytest.raises(SparsecError, match=message):
        load_model(directory)
    assert main(["inspect", "--model", str(directory)]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_conversion_that_cannot_be_planned_refuses_lazy_loading(tmp_path, monkeypatch):
    """An op that needs real values (here: Mixtral's expert stacking, made to refuse meta tensors) cannot give a
    fused tensor's shape without reading: lazy loading is refused, naming it; loaded into memory, the checkpoint
    goes to from_pretrained, whose conversion runs on the tensors."""
    from transformers.core_model_loading import MergeModulelist

    model, directory = _saved(tmp_path, "mixtral", "save_pretrained")
    convert = MergeModulelist.convert

    def needs_values(self, input_dict, *args, **kwargs):
        if any(t.device.type == "meta" for tensors in input_dict.values() for t in tensors):
            raise NotImplementedError("needs values")
        return convert(self, input_dict, *args, **kwargs)

    monkeypatch.setattr(MergeModulelist, "convert", needs_values)
    with pytest.raises(SparsecError, match=r"cannot plan without reading them .*MergeModulelist.*needs values"):
        load_model(directory, weights="lazy")
    loaded = load_model(directory)
    assert not loaded.stored  # from_pretrained's load
    inputs = _inputs(model)
    torch.testing.assert_close(_logits(loaded.model, inputs), _logits(model, inputs), rtol=0, atol=0)


def test_an_expert_missing_from_a_fused_tensor_is_refused_naming_the_shapes(tmp_path, capsys):
    """Mixtral's experts stored one by one, the last one's missing: the fused tensor has an expert too few, refused
    with the shapes (loaded: as sparsec reads it; lazily: when `inspect` backs its program by the files)."""
    model, directory = _saved(tmp_path, "mixtral", "own-names")
    tensors = FAMILIES["mixtral"][1](dict(model.state_dict()))
    save_file({k: v for k, v in tensors.items() if ".experts.3." not in k}, directory / "model.safetensors")
    fused = r"model\.layers\.0\.mlp\.experts\.gate_up_proj \(converted from .* and 5 more\)"
    with pytest.raises(SparsecError, match=rf"{fused}' has shape \[3, 32, 32\], the model's .* is \[4, 32, 32\]"):
        load_model(directory)
    assert main(["inspect", "--model", str(directory)]) == 2
    assert re.search(rf"{fused}' is \[3, 32, 32\] torch.float32, the program's", capsys.readouterr().err)
