"""Block-by-block parity (`export.parity.mode: blocks`) and the program released before the session opens."""

import gc
import weakref

import numpy as np
import onnx
import pytest
from conftest import make_inputs, make_model

from sparsec.capture import capture
from sparsec.data import parity as parity_module
from sparsec.data.calibration import CalibrationSet
from sparsec.data.parity import ParityOptions, ProgramReference
from sparsec.errors import QualityError
from sparsec.exporters.lowering.onnx import export_onnx
from sparsec.exporters.lowering.segments import METADATA_KEY, read_segments
from sparsec.exporters.targets import onnxruntime as ort_target

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = make_model("tiny-qwen2")
    program = capture(model, make_inputs(model, 2, 16))
    path = tmp_path_factory.mktemp("block_parity") / "model.onnx"
    export_onnx(program, path)
    return program, path, CalibrationSet(make_inputs(model, 4, 12, seed=1, pad_left=3), "test", batch_size=2)


def parity(program, path, calibration, mode, **kwargs):
    return ort_target.check_parity(
        ProgramReference(program, calibration, 4), path, options=ParityOptions(mode=mode), **kwargs
    )


def test_the_file_lists_the_segments_and_keeps_only_the_real_outputs(exported):
    program, path, _ = exported
    model = onnx.load(str(path), load_external_data=False)
    names = [s.name for s in read_segments(model)]
    assert names == ["stem", "model.layers.0", "model.layers.1", "model.layers.2", "model.layers.3", "head"]
    assert [o.name for o in model.graph.output] == program.output_names
    assert METADATA_KEY in {p.key for p in model.metadata_props}


def test_block_parity_agrees_with_whole_parity(exported):
    program, path, calibration = exported
    whole = parity(program, path, calibration, "whole")
    blocks = parity(program, path, calibration, "blocks")
    assert (whole["mode"], blocks["mode"]) == ("whole", "blocks")
    assert list(blocks["blocks"]["metrics"]) == [
        "stem:embedding",
        "stem:to_5",
        "stem:to_6",
        "model.layers.0",
        "model.layers.1",
        "model.layers.2",
        "model.layers.3",
    ]
    for name, metrics in blocks["blocks"]["metrics"].items():
        assert metrics["cosine"] > 0.99999 and metrics["rel_l2"] < 1e-5, name
    head, full = blocks["metrics"]["logits"], whole["metrics"]["logits"]
    assert head["cosine"] > 0.99999 and full["cosine"] > 0.99999
    assert head["top1"] == full["top1"] == 1.0


def test_the_head_runs_on_pieces_of_a_batch_and_measures_what_whole_batches_do(exported, monkeypatch):
    """One sample's logits per run of the head's session (batches of 2 split in two): the same metrics, and the
    rotary tables and masks crossing the boundary fed to every piece as they fit it."""
    program, path, calibration = exported
    whole = parity(program, path, calibration, "blocks")
    monkeypatch.setattr(parity_module, "BACKEND_RUN_BYTES", 12 * 256 * 4)
    runs = []
    run = ort_target.run
    monkeypatch.setattr(
        ort_target, "run", lambda sess, feed: runs.append(len(next(iter(feed.values())))) or run(sess, feed)
    )
    pieces = parity(program, path, calibration, "blocks")
    assert runs[-4:] == [1, 1, 1, 1] and runs[:-4] == [2] * (
        len(runs) - 4
    )  # the blocks' batches whole, the head's split
    assert pieces["metrics"]["logits"] == pytest.approx(whole["metrics"]["logits"], rel=1e-6)


def test_block_parity_names_a_corrupted_block(exported, tmp_path):
    program, path, calibration = exported
    model = onnx.load(str(path))
    initializers = {i.name: i for i in model.graph.initializer}
    down = next(
        n
        for n in model.graph.node
        if n.op_type == "MatMul"
        and any(
            p.key == "pkg.torch.onnx.name_scopes" and "model.layers.2.mlp.down_proj" in p.value
            for p in n.metadata_props
        )
    )
    weight = next(initializers[i] for i in down.input if i in initializers)
    assert sum(weight.name in n.input for n in model.graph.node) == 1
    values = onnx.numpy_helper.to_array(weight)
    weight.CopyFrom(onnx.numpy_helper.from_array(values * np.float32(3.0), weight.name))
    corrupted = tmp_path / "model.onnx"
    onnx.save(model, str(corrupted))
    with pytest.raises(QualityError, match=r"checked block by block: model\.layers\.2: cosine") as err:
        parity(program, corrupted, calibration, "blocks")
    assert (
        "model.layers.1" not in str(err.value)
        and "model.layers.3" not in str(err.value)
        and "head" not in str(err.value)
    )


def test_the_program_is_released_before_the_session_opens(exported):
    _, path, calibration = exported
    model = make_model("tiny-qwen2")
    program = capture(model, make_inputs(model, 2, 16))
    del model
    weight = weakref.ref(program.state_tensor("model.layers.0.mlp.down_proj.weight"))
    alive_at_open = []

    def open_session(onnx_path):
        gc.collect()
        alive_at_open.append(weight() is not None)
        return ort_target.session(onnx_path)

    reference = ProgramReference(program, calibration, 4)
    del program
    for mode in ("whole",):
        ort_target.check_parity(reference, path, options=ParityOptions(mode=mode), open_session=open_session)
    assert alive_at_open == [False]
