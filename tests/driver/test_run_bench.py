"""`sparsec run` / `sparsec bench` on a compiled artifact, in ONNX Runtime CPU: outputs from real runs (checked
against the PyTorch program), timing structure (no timing thresholds), errors."""

import importlib.util
import json

import pytest
import torch
from conftest import make_inputs, make_model
from safetensors.torch import save_file

from sparsec.cli import main
from sparsec.exporters.targets.base import onnx_embedding_sizes
from sparsec.ir.program import Program
from sparsec.runner import artifact_inputs, synthetic_inputs

pytestmark = pytest.mark.slow


@pytest.fixture
def artifact(default_artifact):
    return default_artifact[0]


def test_run_on_a_calibration_file_gives_the_programs_outputs(tmp_path, artifact, capsys):
    model = make_model("tiny-qwen2")
    inputs = make_inputs(model, 5, 11, seed=3)  # no padding: the summary covers every position
    save_file(inputs, str(tmp_path / "calib.safetensors"))
    assert (
        main(
            [
                "run",
                "--artifact",
                str(artifact),
                "--calib",
                str(tmp_path / "calib.safetensors"),
                "--batch-size",
                "2",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["batches"] == 3 and result["outputs"]["logits"]["shape"] == [5, 11, 256]
    with torch.no_grad():
        expected = model(**inputs).logits
    assert result["outputs"]["logits"]["mean"] == pytest.approx(float(expected.double().mean()), abs=1e-6)
    assert result["outputs"]["logits"]["std"] == pytest.approx(float(expected.double().std()), rel=1e-5)
    assert result["outputs"]["logits"]["finite"] == 1.0


def test_synthetic_inputs_follow_the_onnx_inputs(artifact):
    inputs = synthetic_inputs(artifact_inputs(artifact), {"batch": 3, "seq": 7})
    assert inputs["input_ids"].shape == (3, 7) and inputs["input_ids"].dtype == torch.int64
    assert 0 <= int(inputs["input_ids"].min()) and int(inputs["input_ids"].max()) < 256  # the embedding's rows
    assert len(set(inputs["input_ids"].flatten().tolist())) > 2
    assert torch.equal(inputs["attention_mask"], torch.ones(3, 7, dtype=torch.int64))


def test_dims_are_merged_over_the_defaults(artifact, capsys):
    assert main(["run", "--artifact", str(artifact), "--dims", "batch=3", "--json"]) == 0  # seq stays 128
    result = json.loads(capsys.readouterr().out)
    assert result["inputs"] == "synthetic inputs (batch=3,seq=128)"
    assert result["outputs"]["logits"]["shape"] == [3, 128, 256]
    with torch.no_grad():
        expected = make_model("tiny-qwen2")(**synthetic_inputs(artifact_inputs(artifact), {"batch": 3, "seq": 128}))
    assert result["outputs"]["logits"]["mean"] == pytest.approx(float(expected.logits.double().mean()), abs=1e-6)


@pytest.fixture(scope="module")
def multi_program(tmp_path_factory):
    """A compile output of one entry point (Janus's VQ decoder), in OUT/vq_decode/."""
    from sparsec.compiler import compile_model
    from sparsec.recipe import Recipe

    out = tmp_path_factory.mktemp("multi") / "out"
    compile_model("builtin:tiny-janus", Recipe.from_dict({"entry_points": ["vq_decode"]}), out, progress=False)
    return out


def test_a_multi_program_output_lists_its_programs_and_runs_one_by_entry(multi_program, capsys):
    for command in ("run", "bench"):
        assert main([command, "--artifact", str(multi_program)]) == 2
        err = capsys.readouterr().err
        assert f"{multi_program} holds one program per entry point (vq_decode)" in err
        assert "choose one with --entry NAME (e.g. --entry vq_decode)" in err and "model.onnx" not in err
    assert main(["run", "--artifact", str(multi_program), "--entry", "other"]) == 2
    assert "--entry 'other': " in capsys.readouterr().err

    assert main(["run", "--artifact", str(multi_program), "--entry", "vq_decode", "--dims", "batch=3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == "onnxruntime" and result["artifact"] == str(multi_program / "vq_decode")
    program = Program.load(multi_program / "vq_decode" / "program.pt2")
    inputs = synthetic_inputs(artifact_inputs(multi_program / "vq_decode"), {"batch": 3, "seq": 128})
    expected = program.run(inputs)["pixel_values"]
    assert result["outputs"]["pixel_values"]["shape"] == list(expected.shape) and expected.shape[0] == 3
    assert result["outputs"]["pixel_values"]["mean"] == pytest.approx(float(expected.double().mean()), abs=1e-5)


def test_bench_reports_percentiles_of_real_runs(artifact, capsys):
    assert (
        main(
            ["bench", "--artifact", str(artifact), "--dims", "batch=2,seq=32", "--warmup", "1", "--runs", "7", "--json"]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["input_shapes"] == {"input_ids": [2, 32], "attention_mask": [2, 32]}
    assert result["warmup"] == 1 and result["runs"] == 7 and len(result["runs_ms"]) == 7
    assert 0 < result["min_ms"] <= result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert result["mean_ms"] == pytest.approx(sum(result["runs_ms"]) / 7)
    assert main(["bench", "--artifact", str(artifact), "--runs", "2", "--warmup", "0"]) == 0
    text = capsys.readouterr().out
    assert "2 timed runs" in text and "p99" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--dims", "batch:2"], "--dims 'batch:2': expected NAME=N"),
        (["bench", "--runs", "0"], "--runs >= 1"),
        pytest.param(
            ["run", "--target", "tensorrt"],
            "--target tensorrt needs TensorRT",
            marks=pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt installed"),
        ),
    ],
)
def test_errors(artifact, capsys, argv, message):
    assert main([argv[0], "--artifact", str(artifact), *argv[1:]]) == 2
    assert message in capsys.readouterr().err


def test_text_inputs_need_a_tokenizer_which_built_in_models_lack(tmp_path, artifact, capsys):
    (tmp_path / "text.txt").write_text("some text\n")
    assert main(["run", "--artifact", str(artifact), "--calib", str(tmp_path / "text.txt")]) == 2
    assert (
        f"needs the model's tokenizer, and the artifact {artifact} holds none in tokenizer/ "
        "(builtin:tiny-qwen2 is a built-in model, which has none); or pass tokenized inputs as .safetensors"
    ) in capsys.readouterr().err
    assert main(["compile", "--calib", str(tmp_path / "text.txt"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "needs the model's tokenizer, and a built-in model has none; or pass" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bench_baseline_must_take_the_same_inputs(tmp_path, artifact, capsys):
    import shutil

    import onnx

    other = tmp_path / "other"
    shutil.copytree(artifact, other)
    model = onnx.load(str(other / "model.onnx"))
    model.graph.input[1].name = "mask"
    onnx.save(model, str(other / "model.onnx"))
    assert main(["bench", "--artifact", str(artifact), "--baseline", str(other)]) == 2
    assert (
        f"--artifact {artifact} takes inputs ['input_ids', 'attention_mask'], --baseline {other} takes "
        "['input_ids', 'mask'] (only in the artifact: ['attention_mask'], only in the baseline: ['mask'])"
    ) in capsys.readouterr().err
    assert main(["bench", "--artifact", str(artifact), "--baseline", str(tmp_path)]) == 2
    assert f"--baseline {tmp_path} has no model.onnx" in capsys.readouterr().err


def test_run_checks_calibration_ids_against_the_onnx_embedding(tmp_path, artifact, capsys):
    import onnx

    assert onnx_embedding_sizes(onnx.load(str(artifact / "model.onnx"), load_external_data=False)) == {"input_ids": 256}
    ids = torch.zeros(3, 5, dtype=torch.long)
    ids[2, 3] = 256
    save_file({"input_ids": ids}, str(tmp_path / "high.safetensors"))
    save_file({"input_ids": ids.float().clamp(max=1)}, str(tmp_path / "float.safetensors"))
    assert main(["run", "--artifact", str(artifact), "--calib", str(tmp_path / "high.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "high.safetensors: sample 2 of input_ids holds token id 256 at position [3], outside the model's " in err
    assert "vocabulary [0, 256)" in err and "Traceback" not in err
    assert main(["bench", "--artifact", str(artifact), "--calib", str(tmp_path / "float.safetensors")]) == 2
    assert "input_ids has dtype float32; token ids must be integers" in capsys.readouterr().err


def test_missing_artifact(tmp_path, capsys):
    assert main(["run", "--artifact", str(tmp_path)]) == 2
    assert "has no model.onnx" in capsys.readouterr().err


@pytest.mark.slow
def test_the_gpu_check_runs_on_the_cpu(tmp_path):
    """bench/gpu_check.sh --quick: every step of the GPU check (gpu tests, bench/engines.py's whole-model
    benchmark, here for aotinductor and onnxruntime, the MoE layer benchmark) at tiny size on the CPU, so a GPU
    session does not find it broken. Figures: structure only."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).parents[2] / "bench" / "gpu_check.sh"
    done = subprocess.run(
        ["bash", str(script), "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {name: step["exit"] for name, step in report["steps"].items()} == {"tests": 0, "engines": 0, "layer": 0}
    assert "skipped" in report["tests"] and report["machine"]["quick"] is True
    for target in ("aotinductor", "onnxruntime"):
        engines = report["engines"][target]
        assert engines["dense"]["parity"]["cosine"] > 0.9999 and engines["moe-16top8"]["parity"]["cosine"] > 0.9999
        assert engines["moe-16top8"]["parameters"] > engines["dense"]["parameters"]  # + routers: same neurons
        for shape in ("1x64", "2x32"):
            cell = engines["moe-16top8"]["shapes"][shape]
            assert 1.2 < cell["ideal_speedup"] < 2.0 and cell["calls"] == 4 and 0 < cell["p50_ms"] <= cell["p90_ms"]
    layer = report["layer"]
    assert {"PyTorch MoE 16/8", "AOTInductor MoE 16/8", "AOTInductor dense"} <= set(layer)
    assert layer["AOTInductor MoE 16/8"]["ideal"] == 2.0 and layer["AOTInductor MoE 16/8"]["tflops"] > 0
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "## Whole model, compiled artifacts" in markdown and "| aotinductor | 2x32 | moe-16top8 |" in markdown
    assert "| onnxruntime | 1x64 | dense |" in markdown
    assert "## MoE layer" in markdown and "| AOTInductor MoE 16/8 |" in markdown
