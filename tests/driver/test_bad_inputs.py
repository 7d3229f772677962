"""Bad inputs end in exit 2 with a message naming the file and the fix, checked before the model loads where the
files suffice: corrupt checkpoints (each refused by the safetensors library too, the independent reference),
calibration token ids and masks, analyze options and task files."""

import json
import shutil
import struct

import numpy as np
import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file, save_file

from sparsec.cli import main
from sparsec.data.calibration import check_inputs, embedding_sizes, load_calibration
from sparsec.errors import CalibrationError, SparsecError
from sparsec.resources import checkpoint_headers

LOADING = "[sparsec] loading"  # the line compile prints as it starts loading the model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved") / "model"
    make_model("tiny-qwen2").save_pretrained(directory)
    return directory


@pytest.fixture
def model_dir(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "model")


def _header(path):
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def _write(path, header, data):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-1000])


def _header_too_long(path):
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data)) + data[8:])


def _garbage(path):
    path.write_bytes(bytes(range(256)) * 8)


def _header_not_json(path):
    data = bytearray(path.read_bytes())
    data[8] = ord("[")
    path.write_bytes(bytes(data))


def _shape_inconsistent(path):
    header, data = _header(path)
    header["model.norm.weight"]["shape"] = [65]
    _write(path, header, data)


def _unknown_dtype(path):
    header, data = _header(path)
    header["model.norm.weight"]["dtype"] = "F31"
    _write(path, header, data)


def _overlapping(path):
    header, data = _header(path)
    entries = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    (first, _), (second, key) = entries[0], entries[1]
    size = second[1] - second[0]
    header[key]["data_offsets"] = [first[0], first[0] + size]
    _write(path, header, data)


CORRUPTIONS = [
    (_truncate, "the file is truncated"),
    (_header_too_long, "is not a safetensors file (header size"),
    (_garbage, "is not a safetensors file"),
    (_header_not_json, "its safetensors header is corrupt"),
    (_shape_inconsistent, "F32 [65] needs 260 bytes and its data_offsets"),
    (_unknown_dtype, "(dtype 'F31'; known:"),
    (_overlapping, "the header's byte ranges overlap or leave gaps"),
]


@pytest.mark.parametrize("corrupt, message", CORRUPTIONS, ids=[c.__name__ for c, _ in CORRUPTIONS])
def test_corrupt_safetensors_are_refused_when_headers_are_read(model_dir, capsys, corrupt, message):
    weights = model_dir / "model.safetensors"
    corrupt(weights)
    with pytest.raises(Exception):  # noqa: B017  the reference: the safetensors library refuses the file too
        load_file(str(weights))
    with pytest.raises(SparsecError, match="re-save it") as info:
        checkpoint_headers(model_dir)
    assert message in str(info.value) and str(weights) in str(info.value)
    for argv in (["inspect"], ["compile", "--dry-run", "--quiet"]):
        assert main([*argv, "--model", str(model_dir)]) == 2
        err = capsys.readouterr().err
        assert message in err and str(weights) in err and "Traceback" not in err, err


def test_headers_read_as_the_safetensors_library_reads_them(saved):
    (path, header), *others = checkpoint_headers(saved).items()
    assert not others and path == saved / "model.safetensors"
    tensors = load_file(str(path))
    assert {k: v["shape"] for k, v in header.items()} == {k: list(t.shape) for k, t in tensors.items()}


def test_missing_shard_bad_config_and_renamed_tensor(model_dir, capsys):
    index = model_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    assert main(["inspect", "--model", str(model_dir)]) == 2
    assert f"{index} names shard(s) that are not in {model_dir}: ['model-00002-of-00002.safetensors']" in (
        capsys.readouterr().err
    )
    index.unlink()
    config = (model_dir / "config.json").read_text()
    (model_dir / "config.json").write_text(config[:-20])
    assert main(["compile", "--model", str(model_dir), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{model_dir}/config.json is not valid JSON" in err and LOADING not in err
    (model_dir / "config.json").write_text(config)
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()  # a bit flip in a tensor's name: the header is valid, the tensor gone
    at = data.index(b"model.norm.weight")
    weights.write_bytes(data[:at] + b"model.norx.weight" + data[at + 17 :])
    for argv in (["inspect"], ["compile", "--dry-run", "--quiet"]):
        assert main([*argv, "--model", str(model_dir)]) == 2
        err = capsys.readouterr().err
        assert "the checkpoint has no tensor for 1 parameter(s)" in err
        assert "'model.norm.weight' (closest unused stored tensor: 'model.norx.weight')" in err


# ----- calibration ---------------------------------------------------------------------------------------
def _ids(n=4, s=6, high=256):
    return torch.randint(0, high, (n, s), generator=torch.Generator().manual_seed(0))


def test_a_quantized_checkpoint_is_refused_naming_its_method(model_dir, capsys):
    """sparsec reads tensors as stored and does not dequantize: a quantization_config is refused before anything is
    read (exit 2), naming the method and the fix."""
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (model_dir / "config.json").write_text(json.dumps(config))
    for argv in (["inspect"], ["compile", "--dry-run", "--quiet"]):
        assert main([*argv, "--model", str(model_dir)]) == 2
        err = capsys.readouterr().err
        assert "has a quantization_config (quant_method: fp8)" in err and "save_pretrained" in err, err
        assert "Traceback" not in err


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"input_ids": _ids().float()}, "input_ids has dtype float32; token ids must be integers"),
        (
            {"input_ids": torch.where(torch.arange(6) == 4, 300, _ids())},
            "sample 0 of input_ids holds token id 300 at position [4], outside the model's vocabulary [0, 256) "
            "(4 such id(s) in the file); tokenize with this model's tokenizer",
        ),
        ({"input_ids": -_ids(high=2) - 1}, "sample 0 of input_ids holds token id -"),
        (
            {"input_ids": _ids(), "attention_mask": torch.ones(4, 5, dtype=torch.long)},
            "attention_mask has shape [4, 5] and input_ids [4, 6]",
        ),
        (
            {
                "input_ids": _ids(),
                "attention_mask": torch.ones(4, 6).index_put_((torch.tensor(2), torch.tensor(3)), torch.tensor(2.0)),
            },
            "sample 2 of attention_mask holds 2.0 at position 3; a mask is 1 for a real token and 0 for padding",
        ),
        (
            {
                "input_ids": _ids(),
                "attention_mask": torch.ones(4, 6, dtype=torch.long).index_fill_(0, torch.tensor([1, 3]), 0),
            },
            "sample(s) [1, 3] of attention_mask have no valid token (all 0); remove those samples or fix their masks",
        ),
    ],
    ids=["float-ids", "id-too-large", "negative-id", "mask-shape", "mask-value", "empty-row"],
)
def test_calibration_inputs_are_checked(tmp_path, inputs, message):
    path = tmp_path / "c.safetensors"
    save_file(inputs, str(path))
    with pytest.raises(CalibrationError) as info:
        load_calibration(path, input_names=["input_ids", "attention_mask"], vocab={"input_ids": 256})
    assert str(info.value).startswith(f"calibration file {path}: ") and message in str(info.value), str(info.value)


def test_valid_inputs_pass_and_the_bound_is_the_embedding_table(captured):
    check_inputs({"input_ids": _ids(), "attention_mask": torch.ones(4, 6, dtype=torch.bool)}, "ok", {"input_ids": 256})
    check_inputs({"input_ids": torch.full((1, 3), 255)}, "ok", {"input_ids": 256})
    for name in ("tiny-qwen2", "tiny-janus"):
        model, program = captured(name)
        assert embedding_sizes(program) == {"input_ids": model.get_input_embeddings().weight.shape[0]}


def test_compile_checks_calibration_before_loading(model_dir, tmp_path, capsys):
    save_file({"input_ids": _ids(2, 5, high=1000).clamp(min=256)}, str(tmp_path / "high.safetensors"))
    assert main(["compile", "--model", str(model_dir), "--dry-run", "--calib", str(tmp_path / "high.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "high.safetensors: sample 0 of input_ids holds token id" in err and "[0, 256)" in err
    assert LOADING not in err  # config.json's vocab_size bounds the ids before the model loads
    (tmp_path / "c.txt").write_text("hello world\n")
    assert main(["compile", "--model", str(model_dir), "--dry-run", "--calib", str(tmp_path / "c.txt")]) == 2
    err = capsys.readouterr().err
    assert f"c.txt needs the model's tokenizer, and the model directory {model_dir} has none" in err
    assert LOADING not in err
    assert main(["compile", "--dry-run", "--calib", str(tmp_path / "nope.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "nope.safetensors does not exist" in err and LOADING not in err


def test_compile_bounds_ids_by_the_captured_embedding(tmp_path, capsys):
    """A built-in model has no config.json to read first: the captured program's embedding table bounds the ids."""
    save_file({"input_ids": torch.full((2, 5), 256)}, str(tmp_path / "c.safetensors"))
    assert main(["compile", "--dry-run", "--quiet", "--calib", str(tmp_path / "c.safetensors")]) == 2
    assert "sample 0 of input_ids holds token id 256 at position [0], outside the model's vocabulary [0, 256)" in (
        capsys.readouterr().err
    )
    np.savez(tmp_path / "m.npz", input_ids=_ids(2, 5).numpy(), attention_mask=np.zeros((2, 5), np.int64))
    assert main(["compile", "--dry-run", "--quiet", "--calib", str(tmp_path / "m.npz")]) == 2
    assert "sample(s) [0, 1] of attention_mask have no valid token" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ratios", "0.5,1.5"], r"ratios must lie in (0, 1) (the fraction removed), got [0.5, 1.5]"),
        (["--components", "understanding,vision"], "unknown component(s) ['vision']; choose from"),
        (["--kinds", "depth,height"], "unknown kind(s) ['height']"),
        (
            ["--task", "und=/nonexistent/und.safetensors"],
            "calibration file /nonexistent/und.safetensors does not exist",
        ),
    ],
)
def test_analyze_checks_options_and_task_files_before_loading(tmp_path, capsys, argv, message):
    # the model does not exist: any check made after loading it would report that instead
    assert main(["analyze", "--model", "/nonexistent/model", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "no config.json" not in err, err
    assert not (tmp_path / "o").exists()


def test_analyze_text_task_needs_a_tokenizer(model_dir, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("a b c\n")
    assert (
        main(["analyze", "--model", str(model_dir), "--out", str(tmp_path / "o"), "--task", f"t={tmp_path}/t.txt"]) == 2
    )
    assert "needs the model's tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["inspect"], ["compile", "--dry-run"], ["eval", "--text", "held_out.txt"]])
def test_a_hub_id_gets_the_local_directory_hint(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)  # no Qwen/ directory here
    (tmp_path / "held_out.txt").write_text("some text\n")
    assert main([*command, "--model", "Qwen/Qwen2.5-0.5B"]) == 2
    err = capsys.readouterr().err
    assert "looks like a Hugging Face Hub id, and sparsec reads local directories only" in err, err
    assert "hf download Qwen/Qwen2.5-0.5B --local-dir Qwen2.5-0.5B" in err and "Traceback" not in err


def test_an_existing_owner_name_directory_is_not_taken_for_a_hub_id(saved, tmp_path, monkeypatch, capsys):
    (tmp_path / "Qwen").mkdir()
    shutil.copytree(saved, tmp_path / "Qwen" / "tiny")
    (tmp_path / "Qwen" / "tiny" / "config.json").unlink()
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "--model", "Qwen/tiny"]) == 2
    err = capsys.readouterr().err
    assert "Qwen/tiny is not a Hugging Face model directory (no config.json)" in err and "Hub" not in err


def test_ctrl_c_while_the_parser_is_built_is_a_plain_interrupted(monkeypatch, capsys):
    import os
    import signal

    import sparsec.cli

    builtin_names = sparsec.cli.builtin_names

    def interrupted():  # a real SIGINT, delivered while the families are listed for --model's help
        os.kill(os.getpid(), signal.SIGINT)
        return builtin_names()

    monkeypatch.setattr(sparsec.cli, "builtin_names", interrupted)
    # Python's own SIGINT handler, as in a terminal (a background job may have inherited SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(["passes"]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert err.strip() == "interrupted", err
