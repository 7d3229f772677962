"""Regions, boundaries, blocks, FFNs and component tags, checked against the Hugging Face module tree."""

import copy
import logging
import warnings

import pytest
import torch
from conftest import make_inputs, make_model

import sparsec
from sparsec.analysis.regions import RegionIndex, region_index
from sparsec.errors import SparsecError
from sparsec.ir.paths import glob_match
from sparsec.ir.tags import TagRule

aten = torch.ops.aten


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_layer_region_matches_module(captured, name):
    model, program = captured(name)
    region = region_index(program).region("model.layers.1")
    expected = {f"model.layers.1.{k}" for k in model.model.layers[1].state_dict()}
    assert set(region.parameters) == expected
    assert region.num_parameters() == sum(p.numel() for p in model.model.layers[1].parameters())
    assert region.type_name.endswith("DecoderLayer") and region.index == 1
    linears = [n for n in region.nodes if n.target is aten.linear.default]
    assert len(linears) == 7  # q, k, v, o, gate, up, down


def test_layer_boundary_is_the_residual_stream(captured):
    _, program = captured("tiny-qwen2")
    layer0, layer1 = region_index(program).region("model.layers.0"), region_index(program).region("model.layers.1")
    (out0,) = layer0.outputs()  # a decoder layer hands exactly one value on: the residual stream
    assert out0.target is aten.add.Tensor
    assert out0 in layer1.inputs()
    # everything else layer 1 reads is shared by all layers (rotary cos/sin, mask, sizes), not layer 0's work
    assert not set(layer1.inputs()) & (set(layer0.nodes) - {out0})
    embed = region_index(program).region("model.embed_tokens").outputs()
    assert set(embed) <= set(layer0.inputs())


def test_globs_and_blocks(captured):
    _, program = captured("tiny-qwen2")
    regions = region_index(program)
    assert [r.path for r in regions.match("model.layers.*")] == [f"model.layers.{i}" for i in range(4)]
    assert [r.path for r in regions.match("**.mlp")] == [f"model.layers.{i}.mlp" for i in range(4)]
    assert [b.path for b in regions.blocks()] == [f"model.layers.{i}" for i in range(4)]
    assert [b.path for b in regions.blocks("model.layers.[13]")] == ["model.layers.1", "model.layers.3"]
    assert [f.path for f in regions.ffns("model.layers.{1-2}.mlp")] == ["model.layers.1.mlp", "model.layers.2.mlp"]
    assert glob_match("model.layers.26.mlp", "model.layers.{1-26}.mlp")
    assert not any(glob_match(f"model.layers.{i}.mlp", "model.layers.{1-26}.mlp") for i in (0, 27, 260))
    with pytest.raises(ValueError, match="range of whole numbers"):
        glob_match("model.layers.1", "model.layers.{3-1}")
    with pytest.raises(SparsecError, match="did you mean model.layers.1"):
        regions.region("model.layer.1")


def test_ffns_found_structurally(captured):
    model, program = captured("tiny-janus")
    ffns = {f.path: f for f in region_index(program).ffns()}
    lm = ffns["model.language_model.layers.0.mlp"]
    assert lm.kind == "gated" and lm.intermediate_size == 128
    assert program.state_name(lm.gate.args[1]) == "model.language_model.layers.0.mlp.gate_proj.weight"
    assert program.state_name(lm.down.args[1]) == "model.language_model.layers.0.mlp.down_proj.weight"
    vit = ffns["model.vision_model.encoder.layers.0.mlp"]
    assert vit.kind == "plain" and vit.gate is None
    assert program.state_name(vit.up.args[1]) == "model.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert vit.intermediate_size == model.model.vision_model.encoder.layers[0].mlp.fc1.out_features
    assert all(not f.escaping_nodes() for f in ffns.values())
    # attention projections never look like FFNs
    assert not any("self_attn" in p for p in ffns)


def test_regions_are_independent_of_which_levels_the_stack_kept():
    """Stacks that skip levels (seen on QwenImage) give the same regions: ancestors are regions too."""
    model = make_model("tiny-qwen2")
    program = sparsec.capture(model, make_inputs(model, 2, 8))
    full = {p: {n.name for n in region_index(program).region(p).nodes} for p in region_index(program).paths}
    for node in program.graph.nodes:  # drop every other level from every stack
        stack = node.meta.get("nn_module_stack")
        if stack:
            keys = list(stack)
            node.meta["nn_module_stack"] = {k: stack[k] for i, k in enumerate(keys) if i % 2 == 1 or k == keys[-1]}
    thinned = RegionIndex(program)
    assert {p: {n.name for n in thinned.region(p).nodes} for p in full} == full


def test_component_tags_janus_defaults_and_overrides(captured):
    _, program = captured("tiny-janus")
    tags = region_index(program).tags()
    assert tags["model.vision_model.encoder.layers.1.mlp"] == "understanding"
    assert tags["model.aligner"] == "understanding"
    assert tags["model.language_model.layers.0"] == "shared"
    tagger = program.tagger.with_overrides([TagRule("model.language_model.layers.1", "generation")])
    assert tagger.tag("model.language_model.layers.1.mlp") == "generation"
    assert tagger.tag("model.language_model.layers.0.mlp") == "shared"


def test_unknown_family_is_all_shared(caplog):
    """An unknown family is all `shared`, said in one logged line (no Python warning, so no quoted source line)."""
    model = make_model("tiny-qwen2")
    model.config = copy.copy(model.config)
    model.config.model_type = "something_new"
    with warnings.catch_warnings(record=True) as raised, caplog.at_level(logging.WARNING, logger="sparsec.capture"):
        warnings.simplefilter("always")
        program = sparsec.capture(model, make_inputs(model, 2, 8))
    (record,) = [r for r in caplog.records if r.name == "sparsec.capture"]
    message = record.getMessage()
    assert "\n" not in message and "model_type 'something_new'" in message and "tagged 'shared'" in message
    assert "`tags:`" in message and "capture(tags=" in message
    assert not [w for w in raised if "sparsec" in str(w.filename) or "family" in str(w.message)]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sparsec.capture"):
        sparsec.capture(model, make_inputs(model, 2, 8), tags=[TagRule("model.layers.*", "generation")])
    assert not caplog.records  # tagged by the user: nothing to say
    assert program.family == "unknown"
    assert set(region_index(program).tags().values()) == {"shared"}
