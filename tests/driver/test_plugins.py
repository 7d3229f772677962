"""`--plugin MODULE_OR_FILE`: a pass or target in a local file or module reaches every subcommand without being
installed; a plugin that is missing or fails to import is exit 2, naming it."""

import json
from pathlib import Path

import pytest
import skip_ffn
import torch
from conftest import make_inputs, make_model

from sparsec.cli import main
from sparsec.exporters.targets import unregister_target
from sparsec.ir.program import Program

REGISTER_PASS = """

from sparsec.transform.pass_manager import register_pass


@register_pass
class PluginSkipFfn(SkipFfn):
    name = "plugin_skip_ffn"
"""

REGISTER_TARGET = """
from sparsec.exporters.targets import register_target
from sparsec.exporters.targets.pytorch import PyTorchProgram


@register_target
class PluginPyTorch(PyTorchProgram):
    name = "plugin_pytorch"
    description = "program.pt2 again, registered by a plugin"
"""


@pytest.fixture
def pass_file(tmp_path):
    """The example pass's source, plus its registration under a name nothing else registers."""
    path = tmp_path / "my_passes.py"
    path.write_text(Path(skip_ffn.__file__).read_text() + REGISTER_PASS)
    return path


def test_a_pass_in_a_local_file_compiles_through_the_cli(tmp_path, pass_file, capsys):
    assert main(["passes", "--plugin", str(pass_file)]) == 0
    assert "plugin_skip_ffn  [transform]" in capsys.readouterr().out
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("passes:\n  - plugin_skip_ffn: {where: model.layers.3.mlp}\nquality: {gates: off}\n")
    out = tmp_path / "out"
    argv = ["compile", "--plugin", str(pass_file), "--recipe", str(recipe), "--out", str(out), "--target", "pytorch"]
    assert main([*argv, "--quiet"]) == 0
    assert [p["name"] for p in json.loads((out / "report.json").read_text())["passes"]] == ["plugin_skip_ffn"]

    model = make_model("tiny-qwen2")  # the reference: the same FFN taken out of the residual stream by hand
    model.model.layers[3].mlp.forward = lambda x: torch.zeros_like(x)
    inputs = make_inputs(model, 3, 9, seed=4, pad_left=2)
    with torch.no_grad():
        expected = model(**inputs, use_cache=False).logits
    got = Program.load(out / "program.pt2").run(inputs)["logits"]
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-4, atol=1e-5)


def test_a_module_plugin_registers_a_target_the_parser_accepts(tmp_path, monkeypatch, default_artifact, capsys):
    (tmp_path / "my_targets.py").write_text(REGISTER_TARGET)
    monkeypatch.syspath_prepend(str(tmp_path))
    artifact = default_artifact[0]
    argv = ["run", "--artifact", str(artifact), "--dims", "batch=2,seq=6", "--json"]
    try:
        assert main([*argv, "--plugin", "my_targets", "--target", "plugin_pytorch"]) == 0
    finally:
        unregister_target("plugin_pytorch")  # the registry is the process's: other tests list the targets
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == "plugin_pytorch" and result["outputs"]["logits"]["shape"] == [2, 6, 256]
    assert main([*argv, "--target", "pytorch"]) == 0  # the built-in target on the same program: the same outputs
    assert json.loads(capsys.readouterr().out)["outputs"] == result["outputs"]


@pytest.mark.parametrize(
    "plugin, message",
    [
        ("/nonexistent/my_pass.py", "--plugin /nonexistent/my_pass.py: no such file"),
        ("no_such_plugin_module", "--plugin no_such_plugin_module: no module named 'no_such_plugin_module'"),
    ],
)
def test_a_missing_plugin_is_exit_2(capsys, plugin, message):
    assert main(["passes", "--plugin", plugin]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_plugin_that_fails_to_import_names_where(tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("import os\n\nraise ValueError('bad option table')\n")
    assert main(["compile", "--plugin", str(broken), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"--plugin {broken} failed to import: ValueError: bad option table at {broken}:3" in err
    assert "Traceback" not in err
