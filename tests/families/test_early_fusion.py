"""Early-fusion models (Chameleon, Emu3): one decoder over text and VQ image tokens. Capture, tags and every
pass against the same change made by hand on the Hugging Face model; ONNX Runtime at another shape."""

import copy

import pytest
import torch
from conftest import make_inputs, make_model, slice_by_hand

import sparsec
from sparsec import testing
from sparsec.analysis.regions import region_index
from sparsec.data.calibration import CalibrationSet
from sparsec.data.quality import compare_outputs
from sparsec.exporters.lowering.onnx import export_onnx

NAMES = ("tiny-chameleon", "tiny-emu3")
STACKS = {"tiny-chameleon": "model.layers", "tiny-emu3": "model.text_model.layers"}
# VQ model module paths -> default tag. Chameleon's VQ model in transformers has no decoder (post_quant_conv has
# no consumer); Emu3's codebook (quantize) serves both encode and decode.
VQ_TAGS = {
    "tiny-chameleon": {
        "model.vqmodel.encoder": "understanding",
        "model.vqmodel.quant_conv": "understanding",
        "model.vqmodel.quantize": "understanding",
        "model.vqmodel.post_quant_conv": "generation",
    },
    "tiny-emu3": {
        "model.vqmodel.encoder": "understanding",
        "model.vqmodel.quant_conv": "understanding",
        "model.vqmodel.quantize": "shared",
        "model.vqmodel.decoder": "generation",
        "model.vqmodel.post_quant_conv": "generation",
    },
}
LOWEST = torch.finfo(torch.float32).min


def _capture(name):
    model = make_model(name)
    return model, sparsec.capture(model, make_inputs(model, 2, 16))


def _calibration(model):
    return CalibrationSet(make_inputs(model, 8, 12, seed=4, pad_left=3), source="test", batch_size=4)


def _image_codes(model):
    return set(model.model.vocabulary_mapping.image_tokens)


@pytest.mark.parametrize("name", NAMES)
def test_capture_is_exact_at_other_shapes(captured, name):
    model, program = captured(name)
    assert program.family == name.removeprefix("tiny-")
    assert program.dynamic_dims["input_ids"] == {0: "batch", 1: "seq"}
    for batch, seq in [(3, 9), (1, 23)]:
        inputs = make_inputs(model, batch, seq, seed=batch, pad_left=2)
        ids = inputs["input_ids"]
        assert 0 <= int(ids.min()) and int(ids.max()) < model.config.get_text_config().vocab_size
        assert set(ids[0].tolist()) & _image_codes(model), "the example inputs hold an image span"
        testing.assert_equivalent(program, model, inputs, rtol=1e-5, atol=1e-5)
    banned = program.run(inputs)["logits"][..., sorted(_image_codes(model))]
    assert bool((banned == LOWEST).all()) == (name == "tiny-chameleon")  # Chameleon bans image tokens in its logits


@pytest.mark.parametrize("name", NAMES)
def test_tags(captured, name):
    """The token program is the decoder (all shared); the VQ model is not in it, its paths carry the family tags."""
    model, program = captured(name)
    tags = region_index(program).tags()
    assert f"{STACKS[name]}.3.mlp" in tags and not any(p.startswith("model.vqmodel") for p in tags)
    assert set(tags.values()) == {"shared"}
    modules = dict(model.named_modules())
    for path, tag in VQ_TAGS[name].items():
        assert path in modules, path
        assert program.tagger.tag(path) == tag and program.tagger.tag(f"{path}.x.weight") == tag
    assert ("model.vqmodel.decoder" in modules) == (name == "tiny-emu3")


def test_chameleon_pixel_path_captures_the_vq_encoder():
    """Chameleon's forward with pixel_values (VQ-tokenize the image, embed, decode) is one program too."""
    model = make_model("tiny-chameleon")
    vq = model.config.vq_config
    n_codes = (vq.resolution // 2 ** (len(vq.channel_multiplier) - 1)) ** 2
    placeholder = model.config.vocabulary_map["<image>"]

    def inputs(batch, text, seed):
        gen = torch.Generator().manual_seed(seed)
        ids = make_inputs(model, batch, text, seed=seed)["input_ids"]
        ids = torch.cat([ids[:, :1], torch.full((batch, n_codes), placeholder), ids[:, 1:]], dim=1)
        pixels = torch.randn(batch, 3, vq.resolution, vq.resolution, generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}

    with torch.no_grad():  # fills the vocabulary mapping's cached tensors; under capture they would be fake tensors
        model(**inputs(1, 4, 2))
    program = sparsec.capture(model, inputs(2, 8, 0))
    testing.assert_equivalent(program, model, inputs(3, 5, 1), rtol=1e-5, atol=1e-5)
    tags = region_index(program).tags()
    assert tags["model.vqmodel.encoder.mid"] == tags["model.vqmodel.quantize"] == "understanding"
    assert tags["model.layers.0.mlp"] == "shared"
    assert "aten.argmin.default" in testing.op_counts(program, "model.vqmodel.quantize")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_drop_layers_equals_hf_model_without_those_layers(tmp_path, name):
    model, program = _capture(name)
    stack = STACKS[name]
    before = testing.parameter_names(program)
    record = testing.apply_pass(program, "drop_layers", layers=[1, 3])
    assert record.decisions["dropped"] == [f"{stack}.1", f"{stack}.3"]
    testing.assert_parameters_removed(before, program, [f"{stack}.1.**", f"{stack}.3.**"])

    reference = copy.deepcopy(model)
    layers = reference.get_submodule(stack)
    kept = torch.nn.ModuleList([layers[0], layers[2]])
    for index, layer in enumerate(kept):  # KV-cache slots follow the new numbering
        layer.self_attn.layer_idx = index
    assert record.parameters_before - record.parameters_after == sum(
        p.numel() for i in (1, 3) for p in layers[i].parameters()
    )
    parent, _, attr = stack.rpartition(".")
    setattr(reference.get_submodule(parent), attr, kept)
    reference.get_submodule(parent).config.num_hidden_layers = 2  # Emu3 runs layers[:num_hidden_layers]

    inputs = make_inputs(model, 3, 11, seed=8, pad_left=4)  # not the capture shape
    testing.assert_equivalent(program, reference, inputs, rtol=1e-5, atol=1e-5)
    export_onnx(program, tmp_path / "m.onnx")
    testing.assert_onnx_equivalent(tmp_path / "m.onnx", reference, inputs, output="logits")


class ZeroAttention(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


@pytest.mark.parametrize("name", NAMES)
def test_drop_attention_sublayers_takes_the_qk_norms(name):
    """Residual structure holds with Chameleon's per-head q/k LayerNorms and Emu3's (inactive) residual dropout."""
    model, program = _capture(name)
    stack = STACKS[name]
    before = testing.parameter_names(program)
    testing.apply_pass(program, "drop_layers", layers=[0, 2], kind="attn")
    testing.assert_parameters_removed(
        before, program, [f"{stack}.{i}.{m}.**" for i in (0, 2) for m in ("self_attn", "input_layernorm")]
    )
    if name == "tiny-chameleon":
        assert (
            f"{stack}.0.self_attn.q_norm.weight" in before
            and f"{stack}.1.self_attn.k_norm.bias" in program.parameter_names()
        )
    for i in (0, 2):
        model.get_submodule(stack)[i].self_attn = ZeroAttention()
    testing.assert_equivalent(program, model, make_inputs(model, 2, 9, seed=1, pad_left=2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_slice_neurons_equals_hand_sliced_hf_model(name):
    model, program = _capture(name)
    record = testing.apply_pass(program, "slice_neurons", keep_ratio=0.5, calibration=_calibration(model))
    ffns = record.decisions["ffns"]
    assert [d["path"] for d in ffns] == [f"{STACKS[name]}.{i}.mlp" for i in range(4)]
    assert {d["kind"] for d in ffns} == {"gated"} and all(d["width_after"] == 64 for d in ffns)
    reference = slice_by_hand(model, record.decisions)
    removed = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in reference.parameters())
    assert record.parameters_before - record.parameters_after == removed
    testing.assert_equivalent(program, reference, make_inputs(model, 3, 9, seed=7, pad_left=2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_ffn_to_moe_with_every_expert_active_equals_dense(name):
    model, program = _capture(name)
    record = testing.apply_pass(
        program,
        "ffn_to_moe",
        experts=4,
        top_k=4,
        router="similarity",  # no fitting: k == E
        calibration=_calibration(model),
    )
    ffns = record.decisions["ffns"]
    assert len(ffns) == 4 and all(d["exactness_rel_l2"] < 1e-5 for d in ffns)
    assert len(program.graph.find_nodes(op="call_function", target=torch.ops.sparsec.moe.default)) == 4
    testing.assert_equivalent(
        program, model, make_inputs(model, 3, 11, seed=4, pad_left=2), output="logits", rtol=1e-4, atol=1e-5
    )


def test_quality_metrics_leave_out_banned_logits(captured):
    """Chameleon's finfo.min image-token logits would swamp cosine and rel_l2; they count as equal and stay out."""
    model, program = captured("tiny-chameleon")
    inputs = make_inputs(model, 2, 10, seed=3)
    ref = program.run(inputs)["logits"]
    allowed = ref != LOWEST
    cand = torch.where(allowed, ref + 0.1 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(0)), ref)
    metrics = compare_outputs([({"logits": ref}, {"logits": cand}, inputs["attention_mask"].bool())])["logits"]
    r, c = ref[..., allowed[0, 0]].double(), cand[..., allowed[0, 0]].double()
    assert metrics["rel_l2"] == pytest.approx(float((c - r).norm() / r.norm()), rel=1e-6)
    assert metrics["cosine"] == pytest.approx(float(torch.cosine_similarity(r, c, dim=-1).mean()), rel=1e-6)
    assert 0.01 < metrics["rel_l2"] < 1 and metrics["kl"] > 0
    broken = cand.clone()
    broken[..., ~allowed[0, 0]] = 0.0  # a rewrite that lost the ban is caught, not hidden
    assert compare_outputs([({"logits": ref}, {"logits": broken}, None)])["logits"]["max_abs"] > 1e38
