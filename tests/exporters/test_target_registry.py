"""The target registry: built-ins found by scanning exporters/targets/, third-party targets by `register_target` or
the `sparsec.targets` entry-point group, and a toy third-party target compiled and run end to end."""

import hashlib
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch
from conftest import make_inputs, make_model

from sparsec.cli import build_parser
from sparsec.compiler import check_target, compile_model
from sparsec.errors import SparsecError
from sparsec.exporters.targets import (
    TARGET_REGISTRY,
    Target,
    available_targets,
    get_target,
    onnxruntime,
    register_target,
    unregister_target,
)
from sparsec.recipe import Recipe
from sparsec.runner import load_artifact


@dataclass
class DigestOptions:
    digest: Literal["sha256", "md5"] = "sha256"


class OnnxFile(Target):
    """A third-party target as a package would write it: the ONNX file plus a digest of it, checked on load, run by
    ONNX Runtime on CPU."""

    name = "toy"
    description = "the ONNX file and its digest, run by ONNX Runtime on CPU"
    section = "toy"
    options = DigestOptions
    artifacts = ("model.digest",)

    def build(self, program, onnx_path, directory, recipe, calibration, log):
        algorithm = self.recipe_options(recipe).digest
        log(f"writing the {algorithm} digest")
        digest = f"{algorithm}:{hashlib.new(algorithm, onnx_path.read_bytes()).hexdigest()}"
        (directory / "model.digest").write_text(digest)
        return {"toy": {"digest": digest}}

    def load(self, directory):
        algorithm, _, expected = (directory / "model.digest").read_text().partition(":")
        if hashlib.new(algorithm, (directory / "model.onnx").read_bytes()).hexdigest() != expected:
            raise SparsecError(f"{directory}/model.onnx does not match model.digest; recompile it")
        session = onnxruntime.session(directory / "model.onnx")
        return lambda inputs: onnxruntime.run(session, inputs)

    def parity(self, reference, directory, options, precision):
        return onnxruntime.check_parity(reference, directory / "model.onnx", options=options, precision=precision)


@pytest.fixture
def restored():
    """The target registry as it was, after the test: other tests see the built-ins only."""
    with TARGET_REGISTRY.temporarily():
        yield


@pytest.fixture
def toy(restored):
    register_target(OnnxFile)
    return get_target(OnnxFile.name)


def test_builtins_are_found_by_scanning_the_package():
    targets = available_targets()
    assert list(targets) == ["aotinductor", "hf", "onnxruntime", "onnxruntime-cuda", "pytorch", "tensorrt"]
    assert targets["onnxruntime-cuda"].providers == ("CUDAExecutionProvider",)
    assert targets["tensorrt"].section == "tensorrt" and targets["tensorrt"].artifacts == ("model.engine",)
    assert not targets["onnxruntime"].needs_onnx and targets["tensorrt"].needs_onnx


def test_unknown_target_names_the_registered_ones(tmp_path):
    message = r"unknown target 'tpu'; registered targets: \['aotinductor', 'hf', 'onnxruntime', 'onnxruntime-cuda', 'pytorch', 'tensorrt'\]"
    with pytest.raises(SparsecError, match=message):
        get_target("tpu")
    with pytest.raises(SparsecError, match=message):
        load_artifact(tmp_path, "tpu")
    with pytest.raises(SparsecError, match=r"no target 'tpu' is registered"):
        unregister_target("tpu")


def test_a_registered_target_is_a_choice_with_its_recipe_section(toy):
    assert isinstance(toy, OnnxFile) and "toy" in available_targets()
    args = build_parser().parse_args(["run", "--artifact", "out", "--target", "toy"])
    assert args.target == "toy"
    assert Recipe().export.toy == DigestOptions()  # the section's defaults where the recipe has none
    assert Recipe.from_dict({"export": {"toy": {"digest": "md5"}}}).export.toy.digest == "md5"
    with pytest.raises(SparsecError, match=r"export.toy: unknown option\(s\) \['colour'\]; allowed: \['digest'\]"):
        Recipe.from_dict({"export": {"toy": {"colour": "red"}}})
    with pytest.raises(SparsecError, match=r"export.toy.digest: 'crc' is not allowed"):
        Recipe.from_dict({"export": {"toy": {"digest": "crc"}}})
    with pytest.raises(SparsecError, match=r"--target toy lowers the ONNX file; the recipe turns it off"):
        check_target("toy", Recipe.from_dict({"export": {"onnx": False}}))
    check_target("toy", Recipe())


def test_an_unregistered_section_is_an_unknown_export_option(capsys):
    with pytest.raises(SparsecError, match=r"export: unknown option\(s\) \['toy'\]; allowed: \[.*'tensorrt'\]"):
        Recipe.from_dict({"export": {"toy": {}}})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--artifact", "out", "--target", "toy"])
    assert "invalid choice: 'toy'" in capsys.readouterr().err


def test_register_target_rejects_incomplete_targets():
    class Abstract(Target):
        name = "abstract"

    class SectionWithoutOptions(OnnxFile):
        name = "no-options"
        options = None

    with pytest.raises(TypeError, match="abstract"):
        register_target(Abstract)  # load and parity not implemented
    with pytest.raises(TypeError, match="`section` and `options` go together"):
        register_target(SectionWithoutOptions)
    with pytest.raises(TypeError, match="non-empty `name`"):
        register_target(type("Nameless", (OnnxFile,), {"name": ""}))
    assert set(available_targets()) == {"aotinductor", "hf", "onnxruntime", "onnxruntime-cuda", "pytorch", "tensorrt"}


def _installed_package(site: Path, module: str, entry_points: str) -> None:
    """A package as pip leaves it in a site directory: its module and a dist-info with entry points."""
    site.mkdir()
    (site / f"{module}.py").write_text(
        textwrap.dedent("""
        from sparsec.exporters.targets import Target, onnxruntime


        class OnnxFile(Target):
            name = "onnx-file"
            description = "the ONNX file, run by ONNX Runtime on CPU; from an entry point"

            def load(self, directory):
                session = onnxruntime.session(directory / "model.onnx")
                return lambda inputs: onnxruntime.run(session, inputs)

            def parity(self, reference, directory, options, precision):
                return onnxruntime.check_parity(reference, directory / "model.onnx", options=options,
                                                precision=precision)
    """)
    )
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[sparsec.targets]\n{entry_points}\n")


def test_entry_point_targets_are_discovered(tmp_path, monkeypatch, restored):
    _installed_package(tmp_path / "site", "sparsec_ep_target", "onnx-file = sparsec_ep_target:OnnxFile")
    assert "onnx-file" not in available_targets()
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    target = get_target("onnx-file")  # the entry point names a class: registered as its instance
    assert type(target).__module__ == "sparsec_ep_target" and target.description.endswith("from an entry point")
    assert TARGET_REGISTRY.source("onnx-file").startswith(
        "entry point onnx-file = sparsec_ep_target:OnnxFile (group sparsec.targets, package sparsec_ep_target)"
    )
    with pytest.raises(SparsecError, match="--target onnx-file lowers the ONNX file"):
        check_target("onnx-file", Recipe.from_dict({"export": {"onnx": False}}))


def test_an_entry_point_must_be_named_like_its_target(tmp_path, monkeypatch):
    _installed_package(tmp_path / "site", "sparsec_misnamed_target", "other-name = sparsec_misnamed_target:OnnxFile")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(
        SparsecError,
        match=r"entry point other-name = .* loads no target named 'other-name' \(it loads \['onnx-file'\]\)",
    ):
        available_targets()
    with pytest.raises(SparsecError, match="loads no target named 'other-name'"):  # every lookup, not once
        get_target("onnxruntime")


@pytest.mark.slow
def test_a_third_party_target_compiles_and_runs_end_to_end(tmp_path, toy):
    out = tmp_path / "out"
    recipe = Recipe.from_dict({"export": {"toy": {"digest": "md5"}}})
    log: list[str] = []
    report = compile_model("builtin:tiny-qwen2", recipe, out, progress=False, log=log.append, target="toy")
    digest = (out / "model.digest").read_text()
    assert report["toy"]["digest"] == digest and digest.startswith("md5:")
    assert "[sparsec] writing the md5 digest" in log and "model.digest" in report["artifacts"]
    assert report["parity"]["metrics"]["logits"]["cosine"] > 0.9999

    model = make_model("tiny-qwen2")
    inputs = make_inputs(model, 3, 19, seed=4, pad_left=2)
    got = load_artifact(out, "toy")(inputs)["logits"]
    with torch.no_grad():
        expected = model(**inputs).logits
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-4, atol=1e-4)

    compile_model("builtin:tiny-qwen2", recipe, out, progress=False, target="toy")  # its artifact is sparsec's own
    (out / "model.digest").write_text("md5:0")
    with pytest.raises(SparsecError, match="model.onnx does not match model.digest"):
        load_artifact(out, "toy")


def test_path_options_of_a_target_section_are_relative_to_the_recipe(tmp_path):
    (tmp_path / "recipe.yaml").write_text("export: {tensorrt: {timing_cache: caches/trt.cache, workspace_mib: 512}}\n")
    options = Recipe.load(tmp_path / "recipe.yaml").export.tensorrt
    assert options.timing_cache == str(tmp_path / "caches" / "trt.cache") and options.workspace_mib == 512
    (tmp_path / "absolute.yaml").write_text("export: {tensorrt: {timing_cache: /var/cache/trt.cache}}\n")
    assert Recipe.load(tmp_path / "absolute.yaml").export.tensorrt.timing_cache == "/var/cache/trt.cache"
    assert (
        Recipe.from_dict({"export": {"tensorrt": {"timing_cache": "trt.cache"}}}).export.tensorrt.timing_cache
        == "trt.cache"
    )
