"""The family registry: built-in families found by module, third-party ones by entry point or `register_family`,
detection precedence, built-in models, and a new family that is one file."""

import importlib.util
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

import sparsec
from sparsec.errors import FamilyError, SparsecError
from sparsec.families import (
    FAMILY_REGISTRY,
    GENERIC,
    Family,
    available_families,
    builtin_names,
    detect_family,
    entry_points,
    family_by_name,
    register_family,
)
from sparsec.models import build_model, builtin_config, load_model

# A whole family plugin: what a third-party package (or a new built-in module) writes.
GPT2_FAMILY_MODULE = """
import transformers

from sparsec.families.base import Family
from sparsec.ir.tags import TagRule


def tiny_gpt2_config():
    return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64)


FAMILY = Family(
    name="gpt2",
    model_types=("gpt2",),
    tags=(TagRule("transformer.h.*.mlp", "understanding"), TagRule("lm_head", "generation")),
    architecture="GPT2LMHeadModel",
    builtin_configs={"tiny-gpt2": tiny_gpt2_config},
)
"""


@pytest.fixture
def registry():
    """The registry with the built-in families loaded; what the test registers is gone after it (entry points on
    a path the test adds are found on the next lookup)."""
    with FAMILY_REGISTRY.temporarily():
        yield


def _write_plugin(directory, module: str, entry_point: str = "gpt2") -> None:
    """`module.py` holding the gpt2 family, and a dist-info declaring it in the `sparsec.families` group."""
    (directory / f"{module}.py").write_text(GPT2_FAMILY_MODULE)
    dist = directory / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[sparsec.families]\n{entry_point} = {module}:FAMILY\n")


def _import_file(path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_gpt2_family_used(caplog) -> None:
    """`builtin:tiny-gpt2` loads with the plugin's family, and capture applies its tags (no unknown-family note)."""
    loaded = load_model("builtin:tiny-gpt2")
    assert loaded.family is family_by_name("gpt2")
    assert type(loaded.model) is transformers.GPT2LMHeadModel
    assert "tiny-gpt2" in builtin_names()
    inputs = loaded.family.example_inputs(loaded.model, 2, 8)
    with caplog.at_level(logging.INFO, logger="sparsec.capture"):
        program = sparsec.capture(loaded.model, inputs)
    assert not [r for r in caplog.records if r.name == "sparsec.capture"]
    assert program.family == "gpt2"
    assert program.tagger.tag("transformer.h.1.mlp.c_fc") == "understanding"
    assert program.tagger.tag("lm_head") == "generation"
    assert program.tagger.tag("transformer.h.1.attn") == "shared"
    sparsec.testing.assert_equivalent(program, loaded.model, loaded.family.example_inputs(loaded.model, 3, 5, seed=1))


def test_new_family_through_an_entry_point_is_one_file(tmp_path, monkeypatch, registry, caplog):
    _write_plugin(tmp_path, "sparsec_gpt2_plugin_ep")
    monkeypatch.syspath_prepend(str(tmp_path))
    names = list(available_families())
    assert names[-1] == "gpt2" and {"qwen2", "janus", "chameleon", "qwenimage"} <= set(names)  # after the built-ins
    _assert_gpt2_family_used(caplog)
    assert FAMILY_REGISTRY.source("gpt2").startswith("entry point gpt2 = sparsec_gpt2_plugin_ep:FAMILY")


def test_new_family_through_register_family(tmp_path, registry, caplog):
    (tmp_path / "gpt2_family.py").write_text(GPT2_FAMILY_MODULE)
    assert "gpt2" not in available_families()
    with pytest.raises(SparsecError, match="unknown built-in model 'tiny-gpt2'"):
        load_model("builtin:tiny-gpt2")
    family = register_family(_import_file(tmp_path / "gpt2_family.py", "sparsec_gpt2_plugin_register").FAMILY)
    assert available_families()["gpt2"] is family
    _assert_gpt2_family_used(caplog)


def test_entry_point_must_be_named_after_its_family(tmp_path, monkeypatch, registry):
    _write_plugin(tmp_path, "sparsec_gpt2_plugin_misnamed", entry_point="gpt-2")
    monkeypatch.syspath_prepend(str(tmp_path))
    message = r"entry point gpt-2 = sparsec_gpt2_plugin_misnamed:FAMILY .* loads no model family named 'gpt-2'"
    with pytest.raises(FamilyError, match=message):
        available_families()
    with pytest.raises(FamilyError, match=message):  # on every lookup while the package is there
        family_by_name("qwen2")
    monkeypatch.undo()
    assert "gpt2" not in available_families() and "qwen2" in available_families()


def test_register_rejects_taken_names_model_types_and_non_families(registry):
    with pytest.raises(
        FamilyError,
        match=r"a model family named 'qwen2' is registered already, from built-in module sparsec.families.decoders; "
        r"sparsec.families.base.Family 'qwen2' registers another: give it another name, or pass replace=True",
    ):
        register_family(Family(name="qwen2"))
    with pytest.raises(FamilyError, match="named 'unknown' is registered already"):
        register_family(Family(name=GENERIC.name))
    with pytest.raises(FamilyError, match="model_type 'llama' of family 'my_llama' is claimed by family 'llama'"):
        register_family(Family(name="my_llama", model_types=("llama",)))
    with pytest.raises(FamilyError, match="built-in model 'tiny-qwen2' of family 'other' exists already"):
        register_family(Family(name="other", builtin_configs={"tiny-qwen2": transformers.Qwen2Config}))
    with pytest.raises(FamilyError, match="is not a sparsec.families.base.Family"):
        register_family("qwen2")
    assert "my_llama" not in available_families() and "other" not in available_families()
    with pytest.raises(FamilyError, match="unknown model family 'nope'"):
        family_by_name("nope")


class Block(torch.nn.Module):
    def forward(self, x):
        return x


class OtherBlock(torch.nn.Module):
    def forward(self, x):
        return x


def _holding(*children, model_type=None):
    model = torch.nn.Sequential(*children)
    if model_type is not None:
        model.config = transformers.PretrainedConfig()
        model.config.model_type = model_type
    return model


def test_detection_model_type_first_then_module_classes_in_registration_order(registry):
    first = register_family(Family(name="blocks", module_classes=("Block",)))
    register_family(Family(name="blocks_too", module_classes=("Block", "OtherBlock")))
    assert detect_family(_holding(torch.nn.Linear(2, 2), Block())) is first  # both match: the first registered wins
    assert detect_family(_holding(OtherBlock())).name == "blocks_too"
    assert detect_family(_holding(Block(), model_type="qwen2")).name == "qwen2"  # model_type before module classes
    assert detect_family(_holding(torch.nn.Linear(2, 2))) is GENERIC
    assert detect_family(_holding(torch.nn.Linear(2, 2), model_type="no_such_type")) is GENERIC


def test_qwenimage_is_detected_by_class_name_alone():
    QwenImageTransformer2DModel = type("QwenImageTransformer2DModel", (torch.nn.Module,), {})
    assert detect_family(_holding(QwenImageTransformer2DModel())).name == "qwenimage"
    assert detect_family(_holding(QwenImageTransformer2DModel(), model_type="llama")).name == "llama"


@pytest.mark.parametrize(
    "name", ["tiny-qwen2", "tiny-llama", "tiny-janus", "tiny-mot", "tiny-qwenimage", "tiny-chameleon", "tiny-emu3"]
)
def test_every_builtin_is_detected_as_its_family(name):
    assert name in builtin_names()
    loaded = load_model(f"builtin:{name}")
    assert name in loaded.family.builtin_names()
    assert detect_family(loaded.model) is loaded.family is available_families()[loaded.family.name]
    entries = entry_points(loaded.model)
    assert list(entries) == (["understanding", "generation_step", "vq_decode"] if name == "tiny-janus" else ["forward"])
    assert all(e.family is loaded.family for e in entries.values())


def test_builtin_configs_and_model_classes_come_from_the_families():
    assert type(build_model(builtin_config("tiny-mot"))).__name__ == "MoTForCausalLM"  # the family's own class
    qwen2 = builtin_config("tiny-qwen2")
    assert not qwen2.architectures and type(build_model(qwen2)) is transformers.Qwen2ForCausalLM  # family default
    gpt2 = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)
    with pytest.raises(SparsecError, match="cannot tell which model class to build for model_type 'gpt2'"):
        build_model(gpt2)
    gpt2.architectures = ["GPT2LMHeadModel"]
    assert type(build_model(gpt2)) is transformers.GPT2LMHeadModel
    with pytest.raises(SparsecError, match="tiny-qwenimage has no transformers config"):
        builtin_config("tiny-qwenimage")
    with pytest.raises(FamilyError, match=r"unknown built-in model 'tiny-gpt5'; choose one of \[.*'tiny-qwen2'"):
        builtin_config("tiny-gpt5")


def test_importing_sparsec_and_detecting_families_does_not_import_diffusers():
    code = textwrap.dedent("""
        import sys
        import torch
        import sparsec, sparsec.cli
        from sparsec.families import available_families, detect_family
        from sparsec.models import load_model
        assert "qwenimage" in available_families()
        assert detect_family(load_model("builtin:tiny-qwen2").model).name == "qwen2"
        assert detect_family(type("QwenImageTransformer2DModel", (torch.nn.Module,), {})()).name == "qwenimage"
        print("diffusers" in sys.modules)
    """)
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
