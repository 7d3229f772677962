"""Self-contained artifacts: `program.pt2` loads in a fresh interpreter with torch alone (with `sparsec.load_program`
once it holds sparsec's MoE op), the model directory's tokenizer travels with the compile output so `sparsec run`
tokenizes text, and `sparsec bench --baseline` times two artifacts side by side."""

import json

import pytest
import torch
from conftest import load_in_fresh_process, make_inputs, make_model

from sparsec.cli import main
from sparsec.compiler import compile_model
from sparsec.compiler.checks import check_out_dir
from sparsec.ir.program import Program
from sparsec.recipe import Recipe
from sparsec.testing import save_word_tokenizer

pytestmark = pytest.mark.slow

WORDS = ["[PAD]", "[UNK]", *"abcdefghijklmnopqrstuvwxyz", "the", "cat", "sat", "on", "mat", "dog", "ran", "far"]
TEXT = ["the cat sat on a mat", "the dog ran far", "a cat and a dog ran home", "then the mat sat", "the end"]
MOE = {"passes": [{"ffn_to_moe": {"experts": 4, "top_k": 2, "router": "similarity"}}], "quality": {"gates": False}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen2 `save_pretrained` directory with a real (word-level) tokenizer saved beside it."""
    directory = tmp_path_factory.mktemp("model")
    make_model("tiny-qwen2", seed=1).save_pretrained(directory)
    save_word_tokenizer(directory, WORDS)
    (directory.parent / "text.txt").write_text("\n".join(TEXT) + "\n")
    return directory


@pytest.fixture(scope="module")
def dense(model_dir):
    """The default recipe, calibrated on text tokenized with the model directory's tokenizer."""
    out = model_dir.parent / "dense"
    compile_model(model_dir, Recipe(), out, calib=model_dir.parent / "text.txt", progress=False)
    return out


@pytest.fixture(scope="module")
def moe(model_dir):
    out = model_dir.parent / "moe"
    compile_model(model_dir, Recipe.from_dict(MOE), out, progress=False)
    return out


def test_programs_load_and_run_in_a_fresh_interpreter(tmp_path, dense, moe):
    inputs = make_inputs(make_model("tiny-qwen2"), 3, 7, seed=4)  # not the capture shape (2 x 16)
    loaded = load_in_fresh_process(
        tmp_path,
        {"dense": inputs, "moe": inputs},
        plain={"dense": dense / "program.pt2"},
        custom={"moe": moe / "program.pt2"},
    )
    assert loaded["imported"] == []  # neither transformers nor sparsec: torch alone loaded and ran it
    with torch.no_grad():
        expected = make_model("tiny-qwen2", seed=1)(**inputs).logits  # the Hugging Face model the directory holds
    assert list(loaded["outputs"]["dense"]) == ["logits"]
    torch.testing.assert_close(loaded["outputs"]["dense"]["logits"], expected)

    assert "error when deserializing" in loaded["errors"]["moe"]  # plain torch.export.load, without sparsec:
    assert "We failed to resolve torch.ops.sparsec.moe.default" in loaded["stderr"]  # the cause, logged by torch
    torch.testing.assert_close(loaded["outputs"]["moe"], Program.load(moe / "program.pt2").run(inputs))


def test_the_tokenizer_travels_with_the_artifact_without_the_models_config(dense, model_dir, capsys):
    """config.json describes the model before compression: not copied. The copy names the tokenizer class the model
    directory's tokenizer loads as (there, config.json's model_type picks it)."""
    assert (dense / "tokenizer" / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    settings = json.loads((dense / "tokenizer" / "tokenizer_config.json").read_text())
    original = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert settings == {**original, "tokenizer_class": "Qwen2Tokenizer"} != original
    report = json.loads((dense / "report.json").read_text())
    assert {"tokenizer/tokenizer.json", "program.pt2"} <= set(report["artifacts"])
    assert not (dense / "tokenizer" / "config.json").exists()
    assert report["calibration"]["source"].endswith("text.txt")
    check_out_dir(dense)  # a later compile into it replaces it: the tokenizer directory counts as sparsec's

    text = model_dir.parent / "text.txt"
    assert main(["run", "--artifact", str(dense), "--calib", str(text), "--samples", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["outputs"]["logits"]
    from transformers import AutoTokenizer

    # The reference: the model directory's tokenizer. Its config.json makes transformers load it as a Qwen2Tokenizer
    # (one token per letter here); without config.json the same files load as a word-level tokenizer.
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    enc = tok(TEXT[:4], padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    assert len(set(enc["input_ids"][enc["attention_mask"] == 1].tolist())) > 8
    with torch.no_grad():
        expected = make_model("tiny-qwen2", seed=1)(**enc).logits.double()
    assert result["shape"] == [4, 32, 256]
    assert result["mean"] == pytest.approx(float(expected.mean()), abs=1e-6)
    assert result["std"] == pytest.approx(float(expected.std()), rel=1e-5)


def test_bench_times_an_artifact_against_a_baseline(dense, moe, tmp_path, capsys):
    argv = ["bench", "--artifact", str(moe), "--baseline", str(dense), "--dims", "batch=1,seq=16", "--warmup", "1"]
    assert main([*argv, "--runs", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["artifact"] == str(moe) and result["baseline"]["artifact"] == str(dense)
    assert len(result["runs_ms"]) == len(result["baseline"]["runs_ms"]) == 5
    assert result["speedup"] == pytest.approx(result["baseline"]["p50_ms"] / result["p50_ms"])
    params = [json.loads((d / "report.json").read_text())["parameters"]["after"] for d in (moe, dense)]
    assert params[0] > params[1]  # the MoE adds routers
    assert result["ideal_speedup"] == pytest.approx(params[1] / params[0])
    assert "parameter ratio" in result["ideal_from"]

    assert main([*argv, "--runs", "2"]) == 0
    text = capsys.readouterr().out
    assert "interleaved with" in text and "baseline mean" in text and "speedup" in text and "ideal" in text
