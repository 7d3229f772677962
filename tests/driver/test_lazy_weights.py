"""Capture without weights: weights read lazily from the checkpoint's safetensors files (issue 16).

Meta capture equals real capture; a lazily backed program's weight-only passes decide, count and compute as the
eager program does; `inspect` works on a config-only directory; the compiler refuses lazy reading where the
model must run.
"""

import shutil

import pytest
import torch
from conftest import mot_inputs

from sparsec.capture import capture
from sparsec.cli import main
from sparsec.compiler import compile_model
from sparsec.errors import SparsecError
from sparsec.families.mot import MOT_PRESETS, MoTConfig, MoTForCausalLM
from sparsec.models import build_model, builtin_config, load_model
from sparsec.recipe import Recipe

WEIGHT_ONLY = {
    "passes": [{"drop_layers": {"layers": [2]}}, {"slice_neurons": {"keep_ratio": 0.5, "importance": "magnitude"}}]
}


def _checkpoint(tmp_path, kind: str):
    """A bf16 save_pretrained directory of a tiny model: untied or tied Qwen2, or the MoT."""
    if kind == "mot":
        model = MoTForCausalLM(MoTConfig(**MOT_PRESETS["tiny"]))
    else:
        config = builtin_config("tiny-qwen2")
        config.tie_word_embeddings = kind == "qwen2-tied"
        model = build_model(config)
    directory = tmp_path / kind
    model.to(torch.bfloat16).eval().save_pretrained(directory)
    return directory


def _structure(program):
    ep = program.exported
    return (
        [str(n.target) for n in program.graph.nodes],
        str(ep.graph_signature),
        {k: (tuple(v.shape), v.dtype) for k, v in {**ep.state_dict, **ep.constants}.items()},
    )


@pytest.mark.parametrize("kind", ["qwen2", "qwen2-tied", "mot"])
def test_capture_without_weights_equals_capture_with_them(tmp_path, kind):
    directory = _checkpoint(tmp_path, kind)
    real, lazy = load_model(directory), load_model(directory, weights="lazy")
    example = real.family.example_inputs(real.model, 2, 16)
    eager = capture(real.model, example, family=real.family)
    program = capture(lazy.model, example, family=lazy.family)
    lazy.attach_weights(program)
    assert _structure(program) == _structure(eager)
    assert program.lazy_state() == sorted(eager.parameter_names())  # buffers (rotary) are computed, not stored
    if kind == "qwen2-tied":
        assert lazy.stored["lm_head.weight"].key == "model.embed_tokens.weight"
    program.materialize()
    assert torch.equal(program.run(example)["logits"], eager.run(example)["logits"])


def test_weight_only_passes_decide_and_compute_the_same_on_a_lazy_program(tmp_path):
    """The recipe sets no gates: the default ones do not keep the dry run from reading lazily, and are reported
    unchecked (the eager run, on random weights, is run ungated: pruning them fails the default gates)."""
    directory = _checkpoint(tmp_path, "qwen2")
    ungated = Recipe.from_dict({**WEIGHT_ONLY, "quality": {"gates": False}})
    eager = compile_model(str(directory), ungated, None, dry_run=True, progress=False, lazy=False)
    lazy = compile_model(str(directory), Recipe.from_dict(WEIGHT_ONLY), None, dry_run=True, progress=False, lazy=True)
    for e, z in zip(eager["passes"], lazy["passes"]):
        assert z["decisions"] == e["decisions"]
        assert (z["parameters_before"], z["parameters_after"]) == (e["parameters_before"], e["parameters_after"])
        assert z["quality"] is None and e["quality"] is not None
    assert lazy["parameters"] == eager["parameters"]
    assert "skipped" in lazy["calibration"]
    assert lazy["quality_gates"]["source"] == "default" and lazy["quality_gates"]["checked"] is False
    assert "could not be checked" in lazy["quality_gates"]["unchecked"]


def test_lazily_backed_passes_give_the_eager_outputs_after_materialising(tmp_path):
    from sparsec.transform.pass_manager import PassManager

    directory = _checkpoint(tmp_path, "mot")
    real, lazy = load_model(directory), load_model(directory, weights="lazy")
    example = mot_inputs(2, 16, gen_from=8)
    programs = [capture(real.model, example, family=real.family), capture(lazy.model, example, family=lazy.family)]
    lazy.attach_weights(programs[1])
    records = [PassManager(Recipe.from_dict(WEIGHT_ONLY).passes).run(p) for p in programs]
    assert [r.decisions for r in records[0]] == [r.decisions for r in records[1]]
    assert programs[1].lazy_state() and programs[1].num_parameters() == programs[0].num_parameters()
    programs[1].materialize()
    assert torch.equal(programs[1].run(example)["logits"], programs[0].run(example)["logits"])


def test_inspect_of_a_config_only_directory(tmp_path, capsys):
    directory = _checkpoint(tmp_path, "mot")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(directory / "config.json", config_only / "config.json")
    assert main(["inspect", "--model", str(config_only)]) == 0
    out = capsys.readouterr().out
    assert "weights: not in memory" in out and "FLOPs absent:" in out  # the MoT routes tokens with aten.nonzero
    assert main(["inspect", "--model", str(_checkpoint(tmp_path, "qwen2")), "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["flops"] > 0 and info["flops_absent"] is None and info["weights"].startswith("not in memory")


@pytest.mark.parametrize(
    "recipe, dry_run, message",
    [
        ({"passes": [{"slice_neurons": {"keep_ratio": 0.5}}]}, True, "decide from calibration data"),
        ({**WEIGHT_ONLY, "quality": {"min_cosine": 0.9}}, True, "quality: gates run the model"),
        (WEIGHT_ONLY, False, "only --dry-run reads lazily"),
    ],
)
def test_lazy_reading_is_refused_where_the_model_must_run(tmp_path, recipe, dry_run, message):
    with pytest.raises(SparsecError, match=message):
        compile_model(str(tmp_path), Recipe.from_dict(recipe), tmp_path / "out", dry_run=dry_run, lazy=True)


def test_lazy_loading_needs_a_checkpoint_directory():
    with pytest.raises(SparsecError, match="no checkpoint to read lazily"):
        load_model("builtin:tiny-qwen2", weights="lazy")
