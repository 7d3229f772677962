"""Encoders from a `save_pretrained` directory: a BERT sentence encoder captures (its `seq` bounded by the
position table), compiles and lowers with a symbolic sequence dim; the families are found by config."""

import json

import onnx
import pytest
import torch
import transformers

import sparsec
from sparsec.cli import main
from sparsec.errors import CaptureError
from sparsec.families import detect_family
from sparsec.ir.capture import capture_program


def _bert(layers=2):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    return transformers.BertModel(config).eval()


def test_bert_captures_with_seq_bounded_by_max_position_embeddings():
    """Unbounded, torch.export refuses BERT's seq ('Constraints violated (seq)': its position_ids buffer has 64
    rows); the family bounds it from the config and the program records the bound."""
    model = _bert()
    family = detect_family(model)
    assert family.name == "text_encoder"
    inputs = family.example_inputs(model, 2, 16)
    assert sorted(inputs) == ["attention_mask", "input_ids", "token_type_ids"]
    with pytest.raises(CaptureError, match=r"Constraints violated \(seq\)"):
        capture_program(model, inputs, family.dynamic_dims(inputs))
    program = sparsec.capture(model, inputs)
    assert program.dim_bounds == {"seq": 64} and program.dynamic_dims["input_ids"] == {0: "batch", 1: "seq"}
    with pytest.raises(CaptureError, match="dim 'seq' is at most 64 for this model"):
        sparsec.capture(model, family.example_inputs(model, 2, 65))


def test_vision_tower_is_found_by_its_config():
    config = transformers.ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8
    )
    model = transformers.ViTModel(config).eval()
    family = detect_family(model)
    assert family.name == "vision_tower"
    inputs = family.example_inputs(model, 2, 16)
    assert list(inputs) == ["pixel_values"] and inputs["pixel_values"].shape == (2, 3, 16, 16)
    assert family.dynamic_dims(inputs) == {"pixel_values": {0: "batch"}} and family.dim_bounds(model) == {}


@pytest.mark.slow
def test_bert_directory_compiles_with_drop_layers_and_a_symbolic_seq(tmp_path):
    """The reported failure: a BertModel directory (post-LN) now compiles; the bound is in the report and the
    ONNX sequence dim stays symbolic."""
    _bert(layers=3).save_pretrained(tmp_path / "bert")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("passes:\n  - drop_layers: {layers: [1]}\nquality: {gates: off}\n")
    out = tmp_path / "out"
    assert (
        main(["compile", "--model", str(tmp_path / "bert"), "--recipe", str(recipe), "--out", str(out), "--quiet"]) == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["capture"]["dim_bounds"] == {"seq": 64}
    assert report["passes"][0]["decisions"] == "decisions.json#/passes/0"
    assert json.loads((out / "decisions.json").read_text())["passes"][0]["dropped"] == ["encoder.layer.1"]
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["input_ids"] == ["batch", "seq"] and dims["token_type_ids"] == ["batch", "seq"]
