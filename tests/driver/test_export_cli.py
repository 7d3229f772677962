"""End to end: compile -> program.pt2 + model.onnx + report.json, ONNX Runtime checked against the Hugging Face
model at shapes other than the capture shape; CLI errors and exit codes."""

import json

import pytest
import torch
from conftest import make_inputs, make_model
from safetensors.torch import save_file
from skip_ffn import SkipFfn

from sparsec import testing
from sparsec.cli import main
from sparsec.ir.program import Program
from sparsec.models import builtin_config
from sparsec.transform.pass_manager import PASS_REGISTRY

pytestmark = pytest.mark.slow


def test_empty_pipeline_exports_and_matches_hf_model(default_artifact):
    """End to end on one family. ONNX Runtime against the Hugging Face model on every family is the architecture
    matrix (tests/families/test_matrix_onnx.py, Llama among them); Janus compiled to ONNX with parity is
    tests/examples/test_examples.py, its programs against the model tests/families/test_janus_entrypoints.py."""
    out, report = default_artifact
    name = "tiny-qwen2"
    assert sorted(p.name for p in out.iterdir()) == ["decisions.json", "model.onnx", "program.pt2", "report.json"]
    assert report["export"]["dynamic_dims"]["input_ids"] == {"0": "batch", "1": "seq"}  # by input and axis
    assert report["parity"]["metrics"]["logits"]["cosine"] > 0.9999
    assert report["parity"]["precision"] == "fp32" and report["parity"]["metrics"]["logits"]["p99_abs"] < 1e-5

    model = make_model(name)  # the same seeded weights as the built-in model
    for batch, seq in [(3, 7), (1, 21)]:
        inputs = make_inputs(model, batch, seq, seed=11, pad_left=2)
        testing.assert_onnx_equivalent(out / "model.onnx", model, inputs, output="logits")
    with pytest.raises(AssertionError, match="output 'logits'"):  # the check can fail: other weights differ
        testing.assert_onnx_equivalent(out / "model.onnx", make_model(name, seed=1), inputs, output="logits")


@pytest.fixture
def skip_ffn():
    """The example pass registered for the test."""
    with PASS_REGISTRY.temporarily(SkipFfn):
        yield


@pytest.fixture
def model_dir(tmp_path):
    model = make_model("tiny-qwen2", seed=1)
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model", model


@pytest.mark.usefixtures("skip_ffn")
def test_cli_compile_with_custom_pass_and_calibration_file(tmp_path, model_dir, capsys):
    directory, model = model_dir
    calib = make_inputs(model, 6, 20, seed=2, pad_left=5)
    save_file(calib, str(tmp_path / "calib.safetensors"))
    (tmp_path / "recipe.yaml").write_text(
        "passes:\n  - skip_ffn: {where: model.layers.3.mlp}\n"
        "calibration: {file: calib.safetensors, batch_size: 4}\nquality: {min_cosine: 0.5}\n"
        "export: {external_data: true}\n"
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "compile",
                "--model",
                str(directory),
                "--recipe",
                str(tmp_path / "recipe.yaml"),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    (record,) = report["passes"]
    assert record["name"] == "skip_ffn" and record["options"] == {"where": "model.layers.3.mlp"}
    mlp = sum(p.numel() for p in model.model.layers[3].mlp.parameters()) + model.config.hidden_size
    assert record["parameters_before"] - record["parameters_after"] == mlp
    assert report["parameters"]["after"] == record["parameters_after"]
    assert report["calibration"]["source"].endswith("calib.safetensors") and report["calibration"]["tokens"] == 115
    assert 0.5 < record["quality"]["logits"]["cosine"] < 1.0
    assert report["parity"]["input_shapes"]["input_ids"] == [6, 20]
    assert (
        report["export"]["external_data"] == "model.onnx.data"
        and (out / "model.onnx.data").stat().st_size > 0.95 * 4 * report["parameters"]["after"]
    )

    # program.pt2 is a plain torch.export artifact with the rewrite in it
    exported = torch.export.load(out / "program.pt2")
    assert not any(k.startswith("model.layers.3.mlp") for k in exported.state_dict)
    program = Program.load(out / "program.pt2")
    assert program.family == "qwen2" and program.dynamic_dims["input_ids"] == {0: "batch", 1: "seq"}

    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    model.model.layers[3].mlp = Zero()
    inputs = make_inputs(model, 2, 13, seed=9, pad_left=1)
    testing.assert_equivalent(program, model, inputs, rtol=1e-5, atol=1e-5)
    testing.assert_onnx_equivalent(out / "model.onnx", model, inputs, output="logits")


@pytest.mark.usefixtures("skip_ffn")
def test_failing_quality_gate_leaves_no_artifact(tmp_path, model_dir, capsys):
    directory, _ = model_dir
    out = tmp_path / "out"
    (tmp_path / "ok.yaml").write_text("export: {onnx: false}\n")
    assert (
        main(
            ["compile", "--model", str(directory), "--recipe", str(tmp_path / "ok.yaml"), "--out", str(out), "--quiet"]
        )
        == 0
    )
    earlier = (out / "report.json").read_text()
    (tmp_path / "strict.yaml").write_text(
        "passes: [{skip_ffn: {where: 'model.layers.*.mlp'}}]\nquality: {min_cosine: 0.999}\n"
    )
    code = main(
        ["compile", "--model", str(directory), "--recipe", str(tmp_path / "strict.yaml"), "--out", str(out), "--quiet"]
    )
    err = capsys.readouterr().err
    assert code == 1 and "after pass 'skip_ffn' (the first pass): quality gate failed" in err
    assert (out / "report.json").read_text() == earlier  # the earlier output is untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left
    code = main(
        [
            "compile",
            "--model",
            str(directory),
            "--recipe",
            str(tmp_path / "strict.yaml"),
            "--out",
            str(tmp_path / "new"),
            "--quiet",
        ]
    )
    assert code == 1 and not (tmp_path / "new").exists()


def test_fp16_compile_and_a_failing_parity_check_leaves_nothing_behind(tmp_path, model_dir, capsys):
    directory, model = model_dir
    out = tmp_path / "out"
    (tmp_path / "fp16.yaml").write_text("export: {precision: fp16, parity: {percentiles: [50, 99]}}\n")
    assert (
        main(
            [
                "compile",
                "--model",
                str(directory),
                "--recipe",
                str(tmp_path / "fp16.yaml"),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    parity = report["parity"]
    assert parity["precision"] == "fp16" and parity["tolerances"]["logits"] == {
        "cosine": 0.999,
        "rel_l2": 0.01,
        "top1": 0.95,
    }
    logits = parity["metrics"]["logits"]
    assert 1e-5 < logits["rel_l2"] < 1e-2 and logits["p50_abs"] <= logits["p99_abs"] <= logits["max_abs"]
    assert report["export"]["precision"]["kept_fp32"]["Softmax"] == 4
    assert report["export"]["path"] == "model.onnx" and report["export"]["bytes"] == (out / "model.onnx").stat().st_size
    assert sorted(p.name for p in out.iterdir()) == [
        "decisions.json",
        "model.onnx",
        "program.pt2",
        "report.json",
    ]  # no fp32 copy left
    inputs = make_inputs(model, 3, 9, seed=4, pad_left=2)
    testing.assert_onnx_equivalent(out / "model.onnx", model, inputs, output="logits", rtol=0.05, atol=0.01)
    earlier = (out / "report.json").read_text()

    (tmp_path / "strict.yaml").write_text(
        "export: {precision: fp16, parity: {tolerances: {logits: {rel_l2: 1.0e-6}}}}\n"
    )
    for target in (out, tmp_path / "new"):
        code = main(
            [
                "compile",
                "--model",
                str(directory),
                "--recipe",
                str(tmp_path / "strict.yaml"),
                "--out",
                str(target),
                "--quiet",
            ]
        )
        err = capsys.readouterr().err
        assert code == 1, err
        assert (
            "ONNX Runtime (CPUExecutionProvider) (fp16) differs from the PyTorch program beyond the parity tolerances: "
            "logits: rel_l2 "
            in err
            and "> 1e-06" in err
        )
    assert (out / "report.json").read_text() == earlier and not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging directory left


@pytest.mark.parametrize(
    "recipe, message",
    [
        ("passes: [{no_such_pass: {}}]", "unknown pass 'no_such_pass'; registered passes:"),
        ("passes: [{skip_ffn: {where: 3}}]", "passes[0].skip_ffn.where: expected str, got 3"),
        ("quality: {min_cosine: 1.5}", "quality.min_cosine: must be in [-1, 1], got 1.5"),
        ("quality: {outputs: {logits: {cos: 0.9}}}", "quality.outputs.logits.cos: unknown metric; bounds name one of"),
        ("quality: {outputs: {logits: {kl: -1}}}", "quality.outputs.logits.kl: must be >= 0, got -1"),
        ("capture: {batch: 1}", "capture.batch: must be >= 2"),
        ("export: {opset: 9}", "export.opset: must be in [17, 23]"),
        ("export: {parity: {tolerance: 1}}", "export.parity: unknown option(s) ['tolerance']; allowed:"),
        ("export: {parity: {tolerances: {logits: {cos: 1}}}}", "export.parity.tolerances.logits.cos: unknown metric"),
        (
            "export: {precision: int8}",
            "export.precision: 'int8' is not allowed; choose one of ['fp32', 'fp16', 'bf16']",
        ),
        ("calibrate: {}", "unknown section(s) ['calibrate']"),
        ("tags: [{glob: 'x', tag: vision}]", "tags[0].tag: must be one of ['understanding', 'generation', 'shared']"),
        ("passes: [", "is not valid YAML"),
    ],
)
@pytest.mark.usefixtures("skip_ffn")
def test_bad_recipes_fail_before_any_work(tmp_path, capsys, recipe, message):
    (tmp_path / "r.yaml").write_text(recipe)
    code = main(
        ["compile", "--model", "/nonexistent/model", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "o").exists()


def test_bad_model_inputs(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"pickle")
    assert main(["compile", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")]) == 2
    assert "only pickled ['pytorch_model.bin'], which sparsec does not unpickle" in capsys.readouterr().err
    assert main(["compile", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["compile", "--out", str(tmp_path / "busy")]) == 2
    assert "holds files sparsec did not write" in capsys.readouterr().err


def test_inspect_shows_components_and_tags(capsys):
    assert main(["inspect", "--model", "builtin:tiny-janus", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["components"]["understanding"]["parameters"] > 0 and info["components"]["shared"]["flops"] > 0
    tags = {r["path"]: r["tag"] for r in info["regions"]}
    assert tags["model.vision_model"] == "understanding" and tags["model.language_model"] == "shared"
    assert {s["path"] for s in info["block_stacks"]} == {
        "model.language_model.layers",
        "model.vision_model.encoder.layers",
    }
    assert info["unclassified_blocks"] == [] and all(m["reason"] and m["node"] for m in info["not_ffns"])
    total = sum(c["parameters"] for c in info["components"].values())
    assert total == info["parameters"]
    assert main(["inspect", "--model", "builtin:tiny-qwen2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    config = builtin_config("tiny-qwen2")  # the reference: the heads the Hugging Face config declares
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    assert info["attentions"] == [
        {
            "path": f"model.layers.{i}.self_attn",
            "heads": heads,
            "kv_heads": kv_heads,
            "head_dim": config.hidden_size // heads,
            "tag": "shared",
        }
        for i in range(config.num_hidden_layers)
    ]
    assert info["not_attentions"] == [] and [m["path"] for m in info["not_ffns"]] == ["lm_head"]
    assert main(["inspect", "--model", "builtin:tiny-qwen2"]) == 0
    text = capsys.readouterr().out
    assert "model.layers.[0-3]" in text and "model.layers.0.mlp  gated  width 128" in text
    assert (
        f"  model.layers.0.self_attn  {heads} query heads, {kv_heads} KV heads ({kv_heads} group(s) of "
        f"{heads // kv_heads}), head dim {config.hidden_size // heads}  (shared)"
    ) in text
    # the attentions' projections are listed with their attention, not as linears that are no FFN
    assert "linears no part of an FFN or attention (1; why one is not: sparsec inspect --why PATH):" in text
    assert "self_attn.o_proj" not in text and "  lm_head: the input of " in text


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["compile", "--help"],
        ["inspect", "--help"],
        ["passes", "--help"],
        ["run", "--help"],
        ["bench", "--help"],
    ],
)
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0 and "usage: sparsec" in capsys.readouterr().out


def test_inspect_why_names_the_rule_a_module_breaks(capsys):
    assert main(["inspect", "--model", "builtin:tiny-qwen2", "--why", "model.layers.0.self_attn"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "model.layers.0.self_attn: no FFN" and len(out) == 7
    assert out[4].startswith("model.layers.0.self_attn.o_proj: not an FFN: the input of ") and "reshape" in out[4]
    assert out[5] == "model.layers.0.self_attn: an attention, 4 heads / 2 KV heads of 16 (prune_heads)"
    assert out[6].startswith("model.layers.0.self_attn: not a residual block: its output linear_3 ")
    assert main(["inspect", "--model", "builtin:tiny-qwen2", "--why", "model.layers.0", "--json"]) == 0
    why = json.loads(capsys.readouterr().out)["why"]
    assert why[0] == "model.layers.0: no FFN" and len(why) == 7
    assert why[6] == "model.layers.0: a residual block, stream embedding -> add_9: attn (add_7), mlp (add_9)"
