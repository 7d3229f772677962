"""The checkpoint's dtype kept end to end, the device checked up front, the memory estimate's refusal."""

import json

import onnx
import pytest
import torch
from conftest import make_model

from sparsec import resources
from sparsec.cli import main
from sparsec.compiler import compile_model
from sparsec.errors import SparsecError
from sparsec.ir.program import Program
from sparsec.recipe import Recipe

RECIPE = {
    "passes": [{"drop_layers": {"layers": [3]}}, {"slice_neurons": {"keep_ratio": 0.5, "importance": "magnitude"}}],
    "calibration": {"samples": 4, "seq_len": 12},
    "quality": {"gates": False},  # random weights: this is about dtypes, not what pruning costs
}


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bf16")
    make_model("tiny-qwen2").to(torch.bfloat16).save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_bf16_checkpoint_stays_bf16_and_lowers_to_fp32_onnx(tmp_path, bf16_checkpoint):
    report = compile_model(bf16_checkpoint, Recipe.from_dict(RECIPE), tmp_path / "out", progress=False)
    assert report["model"]["dtype"] == "bfloat16" and report["model"]["device"] == "cpu"
    program = Program.load(tmp_path / "out" / "program.pt2")
    assert {program.state_tensor(n).dtype for n in program.parameter_names()} == {torch.bfloat16}
    assert report["export"]["upcast_from"] == "bf16"
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert {i.data_type for i in model.graph.initializer if i.dims} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    assert report["parity"]["precision"] == "bf16"  # judged at the program's precision, the coarser one


def test_dtype_option_converts_and_dry_run_reports_it(bf16_checkpoint):
    report = compile_model(
        bf16_checkpoint, Recipe.from_dict(RECIPE), None, dry_run=True, progress=False, dtype="float32"
    )
    assert report["model"]["dtype"] == "float32"
    recipe = Recipe.from_dict({**RECIPE, "model": {"dtype": "float16"}})
    assert compile_model(bf16_checkpoint, recipe, None, dry_run=True, progress=False)["model"]["dtype"] == "float16"


def test_bad_device_and_dtype_are_exit_2_before_loading(tmp_path, capsys):
    missing = tmp_path / "nothing-here"  # never read: the options are refused first
    assert main(["compile", "--model", str(missing), "--device", "tpu", "--dry-run"]) == 2
    assert "not a device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["compile", "--model", str(missing), "--device", "cuda:0", "--dry-run"]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err
    with pytest.raises(SparsecError, match="--dtype 'int4'"):
        compile_model("builtin:tiny-qwen2", Recipe(), None, dry_run=True, dtype="int4")


def test_compile_that_cannot_fit_is_refused_before_loading(tmp_path, bf16_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(resources, "available_memory", lambda: 1024)
    out = tmp_path / "out"
    code = main(["compile", "--model", str(bf16_checkpoint), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "needs about" in err and "are available" in err and "--weights lazy" not in err  # tried
    code = main(["compile", "--model", str(bf16_checkpoint), "--out", str(out), "--quiet", "--weights", "memory"])
    assert code == 2 and "read the weights lazily (--weights lazy)" in capsys.readouterr().err
    assert not out.exists()


def test_memory_estimate_is_printed(tmp_path, bf16_checkpoint, capsys):
    compile_model(bf16_checkpoint, Recipe.from_dict(RECIPE), None, dry_run=True, log=print, progress=False)
    assert "estimated peak" in capsys.readouterr().out


def test_report_json_records_dtype(tmp_path, bf16_checkpoint):
    recipe = Recipe.from_dict({**RECIPE, "export": {"onnx": False}})
    compile_model(bf16_checkpoint, recipe, tmp_path / "out", progress=False)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["model"]["dtype"] == "bfloat16"


# ----- GPU: every PyTorch step on CUDA (skipped here, reason printed) ---------------------------------------------
@pytest.mark.gpu
@pytest.mark.slow
def test_every_pytorch_step_runs_on_cuda_and_decides_as_on_the_cpu(tmp_path):
    """Capture, statistics, quality checks, block scores, activation importance, a learned router and its
    adaptation, and the parity reference on `--device cuda`, against the same compile on the CPU: the same
    decisions (up to float rounding at the boundary of a neuron ranking) and an artifact that matches."""
    recipe = Recipe.from_dict(
        {
            "passes": [
                {"drop_layers": {"count": 1}},
                {"slice_neurons": {"keep_ratio": 0.75}},
                {"prune_heads": {"keep": 2, "unit": "query"}},
                {"ffn_to_moe": {"experts": 4, "top_k": 2, "router": "learned", "adapt": "router", "adapt_steps": 5}},
            ],
            "calibration": {"samples": 8, "seq_len": 16},
            "quality": {"gates": False},
        }
    )
    reports = {
        device: compile_model("builtin:tiny-qwen2", recipe, tmp_path / device, progress=False, device=device)
        for device in ("cpu", "cuda")
    }
    assert reports["cuda"]["model"]["device"].startswith("cuda")
    cpu, cuda = (r["passes"] for r in (reports["cpu"], reports["cuda"]))
    assert cuda[0]["decisions"]["dropped"] == cpu[0]["decisions"]["dropped"]
    for on_cpu, on_cuda in zip(cpu[1]["decisions"]["ffns"], cuda[1]["decisions"]["ffns"]):
        kept_cpu, kept_cuda = set(on_cpu["kept_indices"]), set(on_cuda["kept_indices"])
        assert len(kept_cpu & kept_cuda) >= 0.9 * len(kept_cpu)
    assert reports["cuda"]["parity"]["metrics"]["logits"]["cosine"] > 0.9999
    assert all(d["router"]["kind"] == "learned" for d in cuda[3]["decisions"]["ffns"])
