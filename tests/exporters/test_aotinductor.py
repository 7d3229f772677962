"""`--target aotinductor` and the MoE's ATen decomposition.

References: the Hugging Face model with the same change made by hand, run eagerly, against the compiled package
at a shape other than the capture and calibration shapes, with left padding; the op's own eager kernel for the
decomposition. One compile (module fixture) serves the end-to-end assertions; the error cases stop before any.
"""

import json
import warnings
import zipfile

import pytest
import torch
from conftest import MoeOpModule, make_inputs, make_model, random_moe_weights
from safetensors.torch import save_file

import sparsec
from sparsec.cli import main
from sparsec.compiler import compile_model
from sparsec.errors import SparsecError
from sparsec.exporters.targets.aotinductor import _check_python_free
from sparsec.ops.moe import DECOMPOSITIONS, moe_forward
from sparsec.recipe import Recipe

GATINGS = ("unit", "softmax", "renormalized", "one_plus_logit")


def _reference_without_layer_1():
    model = make_model("tiny-qwen2")
    del model.model.layers[1]
    model.config.num_hidden_layers = 3
    model.config.layer_types = model.config.layer_types[:3]
    return model


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """tiny-qwen2 with block 1 dropped and every FFN an MoE of 4 experts, all 4 active (exactly the dense FFN), for
    --target aotinductor on calibration data with left padding."""
    tmp = tmp_path_factory.mktemp("aoti")
    calib = make_inputs(make_model("tiny-qwen2"), 6, 20, seed=3, pad_left=5)
    save_file(calib, str(tmp / "calib.safetensors"))
    recipe = Recipe.from_dict(
        {
            "passes": [
                {"drop_layers": {"layers": [1]}},
                {"ffn_to_moe": {"experts": 4, "top_k": 4, "router": "similarity"}},
            ],
            "quality": {"gates": False},  # random weights: dropping a block is far from the dense model
            "export": {"parity": {"samples": 6}},
        }
    )
    out = tmp / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = compile_model("builtin:tiny-qwen2", recipe, out, calib=tmp / "calib.safetensors", target="aotinductor")
    report["test_warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
    return out, report, tmp / "calib.safetensors"


@pytest.mark.slow
def test_the_package_equals_the_hf_model_changed_by_hand(compiled):
    out, report, _ = compiled
    assert report["target"] == "aotinductor"
    assert report["aotinductor"]["moe_decomposed"] == 3 and report["aotinductor"]["device"] == "cpu"
    assert not (out / "model.onnx").exists() and (out / "model.aoti.pt2").is_file()
    # torch's own FutureWarnings while it decomposes and compiles reach no user's terminal
    assert not [w for w in report["test_warnings"] if w.startswith("FutureWarning")], report["test_warnings"]
    # the program beside the package is torch.export's, the package AOTInductor's: each name says its loader
    exported = sparsec.load_program(out / "program.pt2")
    assert isinstance(exported, torch.export.ExportedProgram)
    assert report["parity"]["metrics"]["logits"]["cosine"] > 0.99999
    assert report["parity"]["input_shapes"] == {"input_ids": [6, 20], "attention_mask": [6, 20]}

    package = torch._inductor.aoti_load_package(str(out / "model.aoti.pt2"))
    reference = _reference_without_layer_1()
    inputs = make_inputs(reference, 3, 11, seed=8, pad_left=4)  # neither the capture nor the calibration shape
    got = package(**inputs)["logits"]
    with torch.no_grad():
        expected = reference(**inputs, use_cache=False).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_the_package_calls_no_python(compiled):
    """Every op of the package is compiled code or a C shim: no call goes through the proxy executor, which is
    how AOTInductor runs an op it has no C++ for (a Python custom op such as an undecomposed sparsec::moe)."""
    out, _, _ = compiled
    with zipfile.ZipFile(out / "model.aoti.pt2") as archive:
        wrappers = [n for n in archive.namelist() if n.endswith(".wrapper.cpp")]
        assert wrappers
        code = "".join(archive.read(n).decode() for n in wrappers)
    assert "proxy_executor_call_function" not in code
    assert "aten.mm" in code or "mm(" in code  # the experts' matmuls are in it


@pytest.mark.slow
def test_run_and_bench_load_the_package_by_its_report(compiled, capsys):
    out, _, calib = compiled
    assert main(["run", "--artifact", str(out), "--calib", str(calib), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == "aotinductor" and result["outputs"]["logits"]["shape"] == [6, 20, 256]
    from safetensors.torch import load_file

    inputs = load_file(str(calib))
    with torch.no_grad():
        expected = _reference_without_layer_1()(**inputs, use_cache=False).logits
    assert result["outputs"]["logits"]["mean"] == pytest.approx(float(expected.double().mean()), abs=1e-5)

    assert main(["bench", "--artifact", str(out), "--dims", "batch=2,seq=24", "--runs", "3", "--json"]) == 0
    timing = json.loads(capsys.readouterr().out)
    assert timing["input_shapes"] == {"input_ids": [2, 24], "attention_mask": [2, 24]} and len(timing["runs_ms"]) == 3


@pytest.mark.parametrize(
    "export, message",
    [
        ({"precision": "fp16"}, "export.precision: fp16 converts the ONNX file; --target aotinductor compiles"),
        ({"aotinductor": {"cuda_graphs": True}}, "export.aotinductor.cuda_graphs needs --device cuda"),
    ],
)
def test_requests_it_cannot_serve_stop_before_loading(tmp_path, capsys, export, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"export": export}))
    argv = ["compile", "--model", str(tmp_path / "absent"), "--recipe", str(recipe), "--target", "aotinductor"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_inductor_settings_are_refused_when_the_recipe_is_read():
    with pytest.raises(SparsecError, match=r"inductor_configs: \['no_such_setting'\] are not torch._inductor.config"):
        Recipe.from_dict({"export": {"aotinductor": {"inductor_configs": {"no_such_setting": 1}}}})
    with pytest.raises(SparsecError, match="max_autotune: use the option of that name"):
        Recipe.from_dict({"export": {"aotinductor": {"inductor_configs": {"max_autotune": True}}}})


def test_a_directory_without_a_package_is_a_clear_error(tmp_path, capsys):
    assert main(["run", "--artifact", str(tmp_path), "--target", "aotinductor", "--dims", "batch=1,seq=4"]) == 2
    assert f"--artifact {tmp_path} has no model.aoti.pt2" in capsys.readouterr().err
    (tmp_path / "model.aoti.pt2").write_bytes(b"not a zip")
    assert main(["run", "--artifact", str(tmp_path), "--target", "aotinductor", "--dims", "batch=1,seq=4"]) == 2
    assert "model.aoti.pt2 is not an AOTInductor package (BadZipFile" in capsys.readouterr().err


@torch.library.custom_op("sparsec_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


def test_an_op_only_python_runs_is_refused_by_name():
    class Twice(torch.nn.Module):
        def forward(self, x):
            return torch.ops.sparsec_test.twice(x) + 1

    exported = torch.export.export(Twice(), (torch.randn(2, 3),))
    with pytest.raises(SparsecError, match=r"holds \['sparsec_test.twice.default'\], which AOTInductor cannot run"):
        _check_python_free(exported.run_decompositions(DECOMPOSITIONS))


def _decomposed(weights, top_k, gating, x):
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    exported = torch.export.export(
        MoeOpModule(weights, top_k, "silu", gating), (x,), dynamic_shapes=({0: batch, 1: seq},)
    )
    return exported.run_decompositions(DECOMPOSITIONS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gating", GATINGS)
def test_the_decomposition_is_the_op_in_aten(gating, dtype):
    weights = [None if w is None else w.to(dtype) for w in random_moe_weights(experts=6, width=8, hidden=16)]
    decomposed = _decomposed(weights, 2, gating, torch.randn(2, 5, 16, dtype=dtype))
    targets = {str(n.target) for n in decomposed.graph.nodes if n.op == "call_function"}
    assert not any(t.startswith("sparsec.") for t in targets)
    assert "aten.split_with_sizes.default" in targets  # the per-expert rows, sized from the routing
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1)).to(dtype)  # another shape
    expected = torch.ops.sparsec.moe(x, *weights, 2, "silu", gating)
    torch.testing.assert_close(decomposed.module()(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemms_pad_unaligned_widths_exactly(dtype):
    """`_grouped_mm` needs 16-byte strides: hidden 20, expert width 6 and output 20 are padded with zeros."""
    weights = [None if w is None else w.to(dtype) for w in random_moe_weights(experts=5, width=6, hidden=20)]
    x = torch.randn(4, 9, 20).to(dtype)
    loop = moe_forward(x, *weights, 2, "silu", "softmax", grouped=False)
    grouped = moe_forward(x, *weights, 2, "silu", "softmax", grouped=True)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(grouped, loop, **tolerance)


@pytest.mark.slow
def test_aotinductor_compiles_the_decomposed_moe_in_bfloat16_with_biases(tmp_path):
    weights = [None if w is None else w.bfloat16() for w in random_moe_weights(experts=6, width=8, hidden=16)]
    decomposed = _decomposed(weights, 3, "renormalized", torch.randn(2, 5, 16, dtype=torch.bfloat16))
    path = torch._inductor.aoti_compile_and_package(decomposed, package_path=str(tmp_path / "moe.pt2"))
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(2)).bfloat16()
    got = torch._inductor.aoti_load_package(path)(x)
    expected = torch.ops.sparsec.moe(x, *weights, 3, "silu", "renormalized")
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


# ----- GPU: run where torch sees a CUDA device and Triton is installed (skipped here, reason printed) ----------
@pytest.mark.gpu("triton")
def test_on_cuda_the_eager_op_runs_grouped_gemms_equal_to_the_loop():
    weights = [None if w is None else w.cuda().bfloat16() for w in random_moe_weights(experts=8, width=32, hidden=64)]
    x = torch.randn(3, 50, 64, device="cuda").bfloat16()
    grouped = torch.ops.sparsec.moe(x, *weights, 2, "silu", "softmax")  # CUDA bfloat16: grouped by default
    loop = moe_forward(x.float(), *[None if w is None else w.float() for w in weights], 2, "silu", "softmax")
    torch.testing.assert_close(grouped.float(), loop, rtol=3e-2, atol=3e-2)


@pytest.mark.gpu("triton")
@pytest.mark.slow
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_a_cuda_bfloat16_package_runs_grouped_gemms_and_equals_the_model(tmp_path, cuda_graphs):
    """Every FFN an MoE of 4 experts, all active (the dense FFN exactly, whatever the routing), compiled for CUDA in
    bfloat16: the package holds grouped GEMMs and no Python call, and equals the float32 Hugging Face model within
    bfloat16's error at another shape with left padding, on the first call and on replays."""
    recipe = Recipe.from_dict(
        {
            "passes": [{"ffn_to_moe": {"experts": 4, "top_k": 4, "router": "similarity"}}],
            "quality": {"gates": False},
            "export": {"aotinductor": {"cuda_graphs": cuda_graphs}},
        }
    )
    out = tmp_path / "out"
    report = compile_model(
        "builtin:tiny-qwen2", recipe, out, target="aotinductor", device="cuda", dtype="bfloat16", progress=False
    )
    assert report["aotinductor"]["device"].startswith("cuda") and report["aotinductor"]["dtype"] == "bfloat16"
    assert report["parity"]["metrics"]["logits"]["cosine"] > 0.999
    with zipfile.ZipFile(out / "model.aoti.pt2") as archive:
        code = "".join(archive.read(n).decode() for n in archive.namelist() if n.endswith(".wrapper.cpp"))
    assert "grouped_mm" in code and "proxy_executor_call_function" not in code

    from sparsec.runner import load_artifact

    run = load_artifact(out, "aotinductor")
    model = make_model("tiny-qwen2")
    inputs = make_inputs(model, 3, 11, seed=8, pad_left=4)
    with torch.no_grad():
        expected = model(**inputs, use_cache=False).logits
    valid = inputs["attention_mask"].bool()
    for _ in range(3):  # with cuda_graphs: capture, then replays
        got = run(inputs)["logits"].float()
        torch.testing.assert_close(got[valid], expected[valid], rtol=5e-2, atol=5e-2)
