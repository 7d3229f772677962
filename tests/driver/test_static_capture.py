"""`capture: {dynamic: false}` compiles a fixed-shape program: its calibration runs at the capture shape, a partial
last batch is left out, and calibration that cannot fit is refused with exit 2 before any pass runs."""

import json

import torch
from conftest import make_inputs, make_model
from safetensors.torch import save_file

from sparsec.cli import main
from sparsec.exporters.targets.onnxruntime import run, session


def _recipe(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_static_capture_compiles_at_the_capture_shape_and_matches_hand_dropped_model(tmp_path):
    # 16 samples, a fifth held out: 13 / 3, neither a whole number of batches of 2 (the IndexError this fixes)
    recipe = _recipe(
        tmp_path,
        "capture: {dynamic: false, batch: 2, seq: 12}\npasses:\n  - drop_layers: {layers: [1]}\n"
        "quality: {gates: off}\n",
    )
    out = tmp_path / "out"
    assert main(["compile", "--model", "builtin:tiny-qwen2", "--recipe", recipe, "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    split = report["calibration"]["split"]
    assert (split["decision"]["samples"], split["held_out"]["samples"]) == (12, 2)
    assert report["calibration"]["batch_size"] == 2 and report["calibration"]["shapes"]["input_ids"] == [16, 12]

    sess = session(out / "model.onnx")
    assert [i.shape for i in sess.get_inputs()] == [[2, 12], [2, 12]]
    model = make_model("tiny-qwen2")
    inputs = make_inputs(model, 2, 12, seed=5, pad_left=3)
    model.model.layers = torch.nn.ModuleList(m for i, m in enumerate(model.model.layers) if i != 1)
    with torch.no_grad():
        expected = model(**inputs, use_cache=False).logits
    got = run(sess, inputs)["logits"]
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-4, rtol=1e-4)


def test_static_capture_refuses_calibration_of_another_shape(tmp_path, capsys):
    common = ["compile", "--model", "builtin:tiny-qwen2", "--out", str(tmp_path / "out")]
    recipe = _recipe(tmp_path, "capture: {dynamic: false}\ncalibration: {seq_len: 32}\n")
    assert main([*common, "--recipe", recipe]) == 2
    err = capsys.readouterr().err
    assert "calibration.seq_len: 32" in err and "capture shape [2, 16]" in err and "Traceback" not in err

    calib = tmp_path / "calib.safetensors"
    save_file(
        {"input_ids": torch.randint(0, 100, (8, 20)), "attention_mask": torch.ones(8, 20, dtype=torch.long)}, calib
    )
    recipe = _recipe(tmp_path, "capture: {dynamic: false}\n")
    assert main([*common, "--recipe", recipe, "--calib", str(calib)]) == 2
    err = capsys.readouterr().err
    assert "input 'input_ids' has samples of shape [20]" in err and "takes only [2, 16]" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
