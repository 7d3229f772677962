"""Compile targets: onnxruntime (CPU), onnxruntime-cuda, tensorrt. Here (no GPU, no tensorrt, the CPU onnxruntime)
the GPU targets must fail before any work with what is missing and how to install it; the TensorRT profile
derivation is pure and tested here; the engine build and run are `gpu` tests, skipped without a GPU."""

import importlib.util

import onnxruntime
import pytest
import torch
from conftest import make_inputs, make_model

from sparsec.cli import main
from sparsec.compiler import check_target
from sparsec.errors import SparsecError
from sparsec.exporters.targets import onnxruntime as ort_backend
from sparsec.exporters.targets.tensorrt import derive_profiles, require_tensorrt
from sparsec.recipe import Recipe

NO_TENSORRT = importlib.util.find_spec("tensorrt") is None
NO_CUDA_PROVIDER = "CUDAExecutionProvider" not in onnxruntime.get_available_providers()


@pytest.mark.skipif(not NO_TENSORRT, reason="tensorrt is installed here")
def test_tensorrt_missing_names_the_module_and_the_gpu_extra():
    with pytest.raises(SparsecError) as info:
        require_tensorrt()
    message = str(info.value)
    assert "the Python module `tensorrt` is not installed" in message and 'pip install -e ".[gpu]"' in message
    if not torch.cuda.is_available():
        assert f"torch {torch.__version__} has no usable CUDA device" in message


@pytest.mark.skipif(not NO_CUDA_PROVIDER, reason="onnxruntime here has the CUDA provider")
def test_cuda_provider_missing_names_the_providers_and_onnxruntime_gpu():
    with pytest.raises(SparsecError) as info:
        ort_backend.require_onnxruntime("onnxruntime-cuda")
    message = str(info.value)
    assert "needs ONNX Runtime's CUDAExecutionProvider" in message
    assert str(onnxruntime.get_available_providers()) in message and "onnxruntime-gpu" in message
    assert f'pip uninstall -y {ort_backend.installed_builds()[0]} && pip install -e ".[gpu]"' in message


def test_two_onnxruntime_builds_in_one_site_fail_the_cuda_target_and_not_the_cpu_one(tmp_path, monkeypatch):
    """Both builds' metadata in one site directory, as `pip install onnxruntime onnxruntime-gpu` leaves it (done for
    real once: the CPU build's files won and the CUDA provider was gone). A build in another directory is shadowed."""
    for name in ("onnxruntime", "onnxruntime-gpu"):
        info = tmp_path / "site" / f"{name.replace('-', '_')}-1.31.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.31.1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert len(ort_backend.installed_builds()) == 1  # the module's own site; the two on the path before it don't count
    assert ort_backend.installed_builds(tmp_path / "site") == ["onnxruntime", "onnxruntime-gpu"]
    assert ort_backend.installed_builds(tmp_path) == []

    in_site = ort_backend.installed_builds
    monkeypatch.setattr(
        ort_backend, "installed_builds", lambda: in_site(tmp_path / "site")
    )  # as if the module were there
    ort_backend.require_onnxruntime("onnxruntime")  # either build runs the CPU target
    with pytest.raises(SparsecError) as raised:
        ort_backend.require_onnxruntime("onnxruntime-cuda")
    message = str(raised.value)
    assert "onnxruntime and onnxruntime-gpu are both installed" in message
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'onnxruntime-gpu>=1.28'" in message


@pytest.mark.skipif(
    NO_CUDA_PROVIDER or torch.cuda.is_available(), reason="needs onnxruntime-gpu on a machine without a GPU"
)
def test_onnxruntime_gpu_without_a_device_says_so():
    with pytest.raises(SparsecError) as info:
        ort_backend.require_onnxruntime("onnxruntime-cuda")
    message = str(info.value)
    assert f"onnxruntime-gpu {onnxruntime.__version__} is installed but no CUDA device is usable" in message
    assert "got ['CPUExecutionProvider']" in message or "got []" in message


@pytest.mark.skipif(not (NO_TENSORRT and NO_CUDA_PROVIDER), reason="a GPU stack is installed here")
@pytest.mark.parametrize(
    "target, message",
    [
        ("tensorrt", "--target tensorrt needs TensorRT and an NVIDIA GPU"),
        ("onnxruntime-cuda", "--target onnxruntime-cuda needs ONNX Runtime's CUDAExecutionProvider"),
    ],
)
def test_gpu_targets_fail_before_the_model_is_loaded(tmp_path, capsys, target, message):
    # the model path does not exist: the error is the target's, so nothing was loaded or captured
    code = main(["compile", "--model", str(tmp_path / "no-model"), "--target", target, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and 'pip install -e ".[gpu]"' in err, err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


@pytest.mark.parametrize(
    "recipe, target, message",
    [
        ({"export": {"precision": "bf16"}}, "onnxruntime", "bf16 does not run on ONNX Runtime's CPU provider"),
        ({"export": {"onnx": False}}, "tensorrt", "--target tensorrt lowers the ONNX file; the recipe turns it off"),
        ({"export": {"moe_lowering": "contrib"}}, "tensorrt", "com.microsoft::MoE, which TensorRT does not parse"),
    ],
)
def test_targets_that_do_not_fit_the_recipe(recipe, target, message):
    with pytest.raises(SparsecError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        check_target(target, Recipe.from_dict(recipe))
    check_target("onnxruntime", Recipe())  # the default target runs anywhere
    with pytest.raises(
        SparsecError,
        match=r"unknown target 'tpu'; registered targets: \['aotinductor', 'hf', 'onnxruntime', 'onnxruntime-cuda', 'pytorch', 'tensorrt'\]",
    ):
        check_target("tpu", Recipe())


def test_profiles_default_to_the_shapes_parity_feeds():
    dims = {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]}
    observed = {"input_ids": [(8, 24), (3, 24)], "attention_mask": [(8, 24), (3, 24)]}
    assert derive_profiles(dims, None, observed) == {
        "input_ids": ((1, 1), (8, 24), (8, 24)),
        "attention_mask": ((1, 1), (8, 24), (8, 24)),
    }


def test_profiles_from_the_recipe_static_and_unnamed_dims():
    dims = {"input_ids": ["batch", "seq"], "pixel_values": ["batch", 3, 16, 16], "image_ids": ["batch", None]}
    observed = {"input_ids": [(4, 20)], "pixel_values": [(4, 3, 16, 16)], "image_ids": [(4, 0), (4, 6)]}
    got = derive_profiles(dims, {"batch": [1, 4, 16], "seq": [1, 128, 512]}, observed)
    assert got == {
        "input_ids": ((1, 1), (4, 128), (16, 512)),
        "pixel_values": ((1, 3, 16, 16), (4, 3, 16, 16), (16, 3, 16, 16)),
        "image_ids": ((1, 0), (4, 6), (16, 6)),
    }  # a fed 0 (no image tokens yet) lowers the min


@pytest.mark.parametrize(
    "ranges, observed, message",
    [
        (
            {"sequence": [1, 2, 3]},
            {"input_ids": [(2, 8)]},
            r"\['sequence'\] name no dynamic dim of the model; its dynamic dims are \['batch', 'seq'\]",
        ),
        (
            {"seq": [8, 4, 16]},
            {"input_ids": [(2, 8)]},
            r"profiles.seq: expected \[min, opt, max\] with 0 <= min <= opt <= max",
        ),
        (
            {"seq": [1, 8, 16]},
            {"input_ids": [(2, 24)]},
            r"profiles.seq: \[1, ..., 16\] does not hold the calibration shapes parity runs \(24 to 24\)",
        ),
        ({"seq": [9, 9, 16]}, {"input_ids": [(2, 8)]}, r"profiles.seq: \[9, ..., 16\] does not hold .* \(8 to 8\)"),
        ({}, {"input_ids": [(2,)]}, r"input 'input_ids' has rank 2, fed shape \[2\]"),
        ({}, {}, r"no shape observed for input 'input_ids'"),
    ],
)
def test_profile_errors(ranges, observed, message):
    with pytest.raises(SparsecError, match=message):
        derive_profiles({"input_ids": ["batch", "seq"]}, ranges, observed)
    with pytest.raises(SparsecError, match="axis 1 is static 3, fed 4"):
        derive_profiles({"x": ["batch", 3]}, None, {"x": [(2, 4)]})


def test_recipe_tensorrt_section():
    recipe = Recipe.from_dict(
        {
            "export": {
                "tensorrt": {
                    "profiles": {"seq": [1, 64, 256]},
                    "workspace_mib": 1024,
                    "timing_cache": "/tmp/trt.cache",
                    "typing": "flags",
                }
            }
        }
    )
    assert recipe.export.tensorrt.profiles == {"seq": [1, 64, 256]} and recipe.export.tensorrt.typing == "flags"
    with pytest.raises(SparsecError, match=r"export.tensorrt.profiles.seq: expected \[min, opt, max\]"):
        Recipe.from_dict({"export": {"tensorrt": {"profiles": {"seq": [64, 1, 256]}}}})
    with pytest.raises(SparsecError, match=r"export.tensorrt.typing: 'weak' is not allowed"):
        Recipe.from_dict({"export": {"tensorrt": {"typing": "weak"}}})


# ----- GPU: run where TensorRT / onnxruntime-gpu and a CUDA device are present (skipped here, reason printed) ----
@pytest.mark.gpu("tensorrt")
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_tensorrt_engine_compiles_and_passes_parity(tmp_path, precision):
    from sparsec.compiler import compile_model
    from sparsec.exporters.targets.tensorrt import Engine

    recipe = Recipe.from_dict(
        {
            "export": {
                "precision": precision,
                "tensorrt": {
                    "profiles": {"batch": [1, 8, 8], "seq": [1, 24, 64]},
                    "timing_cache": str(tmp_path / "trt.cache"),
                },
            }
        }
    )
    report = compile_model("builtin:tiny-qwen2", recipe, tmp_path / "out", progress=False, target="tensorrt")
    assert (tmp_path / "out" / "model.engine").stat().st_size > 0 and (tmp_path / "trt.cache").exists()
    assert report["parity"]["precision"] == precision and report["engine"]["profiles"]["input_ids"][2] == [8, 64]
    model = make_model("tiny-qwen2")
    inputs = make_inputs(model, 3, 41, seed=5, pad_left=3)  # another shape inside the profile
    got = Engine(tmp_path / "out" / "model.engine").run(inputs)["logits"]
    with torch.no_grad():
        expected = model(**inputs).logits
    mask = inputs["attention_mask"].bool()
    tolerance = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 2e-1}[precision]
    torch.testing.assert_close(got.float()[mask], expected[mask], rtol=tolerance, atol=tolerance)


@pytest.mark.gpu("tensorrt")
@pytest.mark.slow
def test_tensorrt_parses_the_standard_moe_lowering(tmp_path):
    from sparsec.compiler import compile_model

    recipe = Recipe.from_dict(
        {
            "passes": [{"ffn_to_moe": {"experts": 4, "top_k": 2, "router": "similarity"}}],
            "quality": {"min_cosine": 0.5},
            "export": {"precision": "fp16"},
        }
    )
    report = compile_model("builtin:tiny-qwen2", recipe, tmp_path / "out", progress=False, target="tensorrt")
    assert report["parity"]["metrics"]["logits"]["cosine"] > 0.999


@pytest.mark.gpu("onnxruntime-cuda")
@pytest.mark.slow
@pytest.mark.parametrize("moe_lowering", ["standard", "contrib"])
def test_onnxruntime_cuda_runs_both_moe_lowerings(tmp_path, moe_lowering):
    from sparsec.compiler import compile_model

    recipe = Recipe.from_dict(
        {
            "passes": [{"ffn_to_moe": {"experts": 4, "top_k": 2, "router": "similarity"}}],
            "quality": {"min_cosine": 0.5},
            "export": {"moe_lowering": moe_lowering, "precision": "fp16"},
        }
    )
    report = compile_model("builtin:tiny-qwen2", recipe, tmp_path / "out", progress=False, target="onnxruntime-cuda")
    assert report["parity"]["provider"] == "CUDAExecutionProvider"


@pytest.mark.slow
def test_the_tensorrt_moe_lowering_avoids_scatter_reductions_and_matches_pytorch(tmp_path):
    """`--target tensorrt` lowers MoE without ScatterND(reduction=add) and with a float NonZero mask (what TensorRT's
    operator list documents); checked in ONNX Runtime against the program at another shape, FP32 and FP16."""
    import onnx

    import sparsec
    from sparsec import testing
    from sparsec.data.calibration import CalibrationSet
    from sparsec.data.parity import ParityOptions, check_parity
    from sparsec.exporters.lowering.onnx import export_onnx
    from sparsec.exporters.lowering.precision import convert_precision

    model = make_model("tiny-qwen2")
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    testing.apply_pass(
        program,
        "ffn_to_moe",
        experts=4,
        top_k=2,
        gating="softmax",
        calibration=CalibrationSet(make_inputs(model, 16, 16, seed=3), source="test"),
    )
    export_onnx(program, tmp_path / "moe.onnx", scatter_reduction=False)
    graph = onnx.load(str(tmp_path / "moe.onnx")).graph
    scatters = [n for n in graph.node if n.op_type == "ScatterND"]
    assert len(scatters) == 16 and all(
        a.s in (b"", b"none") for n in scatters for a in n.attribute if a.name == "reduction"
    )
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "moe.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    nonzeros = [n for n in graph.node if n.op_type == "NonZero"]
    assert len(nonzeros) == 16 and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in nonzeros)
    inputs = make_inputs(model, 3, 21, seed=7, pad_left=4)
    testing.assert_onnx_equivalent(tmp_path / "moe.onnx", program, inputs, output="logits")
    convert_precision(tmp_path / "moe.onnx", tmp_path / "moe16.onnx", "fp16")
    got = ort_backend.run(ort_backend.session(tmp_path / "moe16.onnx"), inputs)
    check_parity(
        [(program.run(inputs), got, inputs["attention_mask"].bool())],
        backend="ORT",
        precision="fp16",
        options=ParityOptions(),
    )


@pytest.mark.slow
def test_profiles_from_a_real_export_and_calibration(tmp_path):
    """The CPU half of the TensorRT path as the compiler runs it: the exported ONNX's named dims, the parity batches."""
    import sparsec
    from sparsec.data.calibration import CalibrationSet
    from sparsec.exporters.lowering.onnx import export_onnx
    from sparsec.exporters.targets.tensorrt import engine_profiles, onnx_input_dims

    model = make_model("tiny-qwen2")
    export_onnx(sparsec.capture(model, make_inputs(model, 2, 16)), tmp_path / "m.onnx")
    assert onnx_input_dims(tmp_path / "m.onnx") == {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]}
    calibration = CalibrationSet(make_inputs(model, 16, 24, seed=1), source="test", batch_size=6)
    profile = engine_profiles(tmp_path / "m.onnx", {"seq": [1, 64, 512]}, calibration.head(8).batches())  # 6 + 2
    assert profile["input_ids"] == ((1, 1), (6, 64), (6, 512)) == profile["attention_mask"]
    with pytest.raises(SparsecError, match="does not hold the calibration shapes parity runs"):
        engine_profiles(tmp_path / "m.onnx", {"seq": [1, 8, 16]}, calibration.head(8).batches())
