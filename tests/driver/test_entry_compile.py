"""Several entry points compiled from one recipe: shared weights changed the same way in every program."""

import copy

import pytest
import torch
import yaml
from conftest import load_in_fresh_process

from sparsec.compiler import compile_model
from sparsec.errors import RecipeError, SparsecError
from sparsec.families import entry_points
from sparsec.families.janus import JanusGenerationStep
from sparsec.ir.program import Program
from sparsec.models import build_model, builtin_config
from sparsec.recipe import Recipe

LLM = "model.language_model"
RECIPE = {
    "entry_points": ["understanding", "generation_step", "vq_decode"],
    "passes": [
        {"slice_neurons": {"keep_ratio": 0.5, "where": f"{LLM}.layers.*.mlp"}},
        {"drop_layers": {"count": 1, "where": f"{LLM}.layers.*"}},
        {"slice_neurons": {"keep_ratio": 0.5, "where": "model.generation_aligner"}},
    ],
    "quality": {"gates": False},
    "export": {"onnx": False},
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("janus") / "out"
    report = compile_model("builtin:tiny-janus", Recipe.from_dict(RECIPE), out, progress=False)
    return out, report


def test_each_entry_points_program_loads_and_runs_with_torch_alone(compiled, tmp_path):
    out, _ = compiled
    entries = entry_points(build_model(builtin_config("tiny-janus")))
    inputs = {name: entries[name].example_inputs(3, 16, seed=3) for name in RECIPE["entry_points"]}  # capture: 2
    loaded = load_in_fresh_process(tmp_path, inputs, plain={name: out / name / "program.pt2" for name in inputs})
    assert loaded["imported"] == []
    for name, batch in inputs.items():
        torch.testing.assert_close(loaded["outputs"][name], Program.load(out / name / "program.pt2").run(batch))


def test_layout_and_skipped_passes(compiled):
    out, report = compiled
    assert sorted(p.name for p in out.iterdir()) == [
        "decisions.json",
        "generation_step",
        "report.json",
        "understanding",
        "vq_decode",
    ]
    entries = report["entry_points"]
    assert [p["name"] for p in entries["understanding"]["passes"]] == ["slice_neurons", "drop_layers"]
    assert [p["name"] for p in entries["generation_step"]["passes"]] == [
        "slice_neurons",
        "drop_layers",
        "slice_neurons",
    ]
    # the VQ decoder holds none of the targets: every pass skipped, weights untouched
    assert entries["vq_decode"]["passes"] == [] and set(entries["vq_decode"]["passes_skipped"]) == {
        "slice_neurons",
        "drop_layers",
    }
    assert entries["vq_decode"]["parameters"]["before"] == entries["vq_decode"]["parameters"]["after"]


def test_shared_weights_are_identical_in_both_programs(compiled):
    out, report = compiled
    und = Program.load(out / "understanding" / "program.pt2")
    step = Program.load(out / "generation_step" / "program.pt2")
    shared = sorted(n for n in und.parameter_names() if n.startswith(f"{LLM}.layers."))
    assert (
        shared == sorted(n for n in step.parameter_names() if n.startswith(f"{LLM}.layers.")) and len(shared) == 3 * 9
    )
    for name in shared:
        torch.testing.assert_close(und.state_tensor(name), step.state_tensor(name), rtol=0, atol=0)
    und_slice, step_slice = (
        report["entry_points"][e]["passes"][0]["decisions"]["ffns"] for e in ("understanding", "generation_step")
    )
    assert [d["kept_indices"] for d in und_slice] == [d["kept_indices"] for d in step_slice]
    und_drop, step_drop = (
        report["entry_points"][e]["passes"][1]["decisions"]["dropped"] for e in ("understanding", "generation_step")
    )
    assert und_drop == step_drop and len(und_drop) == 1


def test_generation_step_equals_the_same_edits_by_hand(compiled):
    """The understanding program's decisions applied by hand to the HF model: its generation step equals ours."""
    out, report = compiled
    model = copy.deepcopy(build_model(builtin_config("tiny-janus")))
    decisions = report["entry_points"]["understanding"]["passes"]
    for ffn in decisions[0]["decisions"]["ffns"]:
        mlp, kept = model.get_submodule(ffn["path"]), torch.tensor(ffn["kept_indices"])
        for name in ("gate_proj", "up_proj"):
            getattr(mlp, name).weight.data = getattr(mlp, name).weight.data[kept]
        mlp.down_proj.weight.data = mlp.down_proj.weight.data[:, kept]
    dropped = {int(label.rsplit(".", 1)[1]) for label in decisions[1]["decisions"]["dropped"]}
    layers = model.model.language_model.layers
    model.model.language_model.layers = torch.nn.ModuleList(m for i, m in enumerate(layers) if i not in dropped)
    aligner = report["entry_points"]["generation_step"]["passes"][2]["decisions"]["ffns"][0]
    assert aligner["path"] == "model.generation_aligner"
    kept = torch.tensor(aligner["kept_indices"])
    fc1, fc2 = model.model.generation_aligner.fc1, model.model.generation_aligner.hidden_layers[0]
    fc1.weight.data, fc1.bias.data, fc2.weight.data = (
        fc1.weight.data[kept],
        fc1.bias.data[kept],
        fc2.weight.data[:, kept],
    )
    step = Program.load(out / "generation_step" / "program.pt2")
    inputs = entry_points(model)["generation_step"].example_inputs(batch=3, seq=5, seed=9)
    with torch.no_grad():
        want = JanusGenerationStep(model)(**inputs)["logits"]
    torch.testing.assert_close(step.run(inputs)["logits"], want, rtol=1e-5, atol=1e-5)


def test_unshareable_pass_on_shared_weights_is_refused(tmp_path):
    recipe = Recipe.from_dict(
        {
            "entry_points": ["understanding", "generation_step"],
            "quality": {"gates": False},
            "passes": [
                {"ffn_to_moe": {"experts": 2, "top_k": 2, "router": "similarity", "where": f"{LLM}.layers.0.mlp"}}
            ],
        }
    )
    with pytest.raises(SparsecError, match=r"ffn_to_moe: cannot repeat its decisions in another entry point.*restrict"):
        compile_model("builtin:tiny-janus", recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_entry_points_fail_before_work(tmp_path):
    with pytest.raises(SparsecError, match=r"\['decode'\] are not entry points of this janus model"):
        compile_model(
            "builtin:tiny-janus", Recipe.from_dict({"entry_points": ["understanding", "decode"]}), tmp_path / "o"
        )
    with pytest.raises(SparsecError, match=r"are not entry points of this qwen2 model; it has \['forward'\]"):
        compile_model("builtin:tiny-qwen2", Recipe.from_dict({"entry_points": ["generation_step"]}), tmp_path / "o")
    with pytest.raises(
        RecipeError, match=r"calibration.files: entry point\(s\) \['vq_decode'\] are not in entry_points"
    ):
        Recipe.from_dict(yaml.safe_load("entry_points: [understanding]\ncalibration: {files: {vq_decode: x.npz}}"))
    with pytest.raises(RecipeError, match="entry_points: expected a list of distinct"):
        Recipe.from_dict({"entry_points": ["understanding", "understanding"]})
