"""drop_layers against references built by hand on the Hugging Face models."""

import copy
import json
import zipfile

import pytest
import torch
from conftest import make_inputs, make_model

import sparsec
from sparsec import testing
from sparsec.analysis.regions import region_index
from sparsec.data.calibration import CalibrationSet
from sparsec.errors import PassError, RecipeError
from sparsec.exporters.lowering.onnx import export_onnx
from sparsec.passes.drop_layers import DropLayers
from sparsec.recipe import Recipe

STACKS = {"tiny-qwen2": "model.layers", "tiny-llama": "model.layers", "tiny-janus": "model.language_model.layers"}


def _weight_bytes(pt2) -> int:
    """Bytes of the weight entries in a .pt2 archive (the rest is the serialized graph)."""
    with zipfile.ZipFile(pt2) as z:
        return sum(i.file_size for i in z.infolist() if "/data/weights/weight_" in i.filename)


def _layers(model, name):
    return model.get_submodule(STACKS[name])


class ZeroAttention(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class ZeroMlp(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def _capture(name, seed=0):
    model = make_model(name, seed=seed)
    return model, sparsec.capture(model, make_inputs(model, 2, 16))


def _calibration(model, n=8, seq=12):
    return CalibrationSet(make_inputs(model, n, seq, seed=4, pad_left=3), source="test", batch_size=4)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STACKS))
def test_explicit_drop_equals_hf_model_without_those_layers(tmp_path, name):
    model, program = _capture(name)
    before = testing.parameter_names(program)
    size_before = _weight_bytes(program.save(tmp_path / "dense.pt2"))
    stack = STACKS[name]
    dropped = [1, 3]
    record = testing.apply_pass(program, "drop_layers", layers=dropped, where=f"{stack}.*")
    assert record.decisions["dropped"] == [f"{stack}.{i}" for i in dropped]

    reference = copy.deepcopy(model)
    layers = _layers(reference, name)
    removed_params = sum(p.numel() for i in dropped for p in layers[i].parameters())
    for i in sorted(dropped, reverse=True):
        del layers[i]
    testing.assert_parameters_removed(before, program, [f"{stack}.{i}.**" for i in dropped])
    for i in dropped:  # every node of a dropped block is gone, not just its weights
        assert f"{stack}.{i}" not in region_index(program)
    assert [b.index for b in region_index(program).blocks(f"{stack}.*")] == [0, 2]
    assert record.parameters_before - record.parameters_after == removed_params
    assert size_before - _weight_bytes(program.save(tmp_path / "dropped.pt2")) == 4 * removed_params

    inputs = make_inputs(model, 3, 11, seed=8, pad_left=4)  # not the capture shape
    testing.assert_equivalent(program, reference, inputs, rtol=1e-5, atol=1e-5)

    export_onnx(program, tmp_path / "m.onnx")
    testing.assert_onnx_equivalent(tmp_path / "m.onnx", reference, inputs, output="logits")


@pytest.mark.parametrize("name, dtype", [("tiny-qwen2", torch.bfloat16), ("tiny-mot", torch.float32)])
def test_consecutive_blocks_drop_like_the_hf_model_without_them(name, dtype):
    """Dropping neighbours: the second block's stream input is the first one's output, gone by then (a bug:
    'used before it has been defined'). In the checkpoint's bf16 too, where RMSNorm casts the stream."""
    model = make_model(name).to(dtype)
    family = sparsec.families.detect_family(model)
    program = sparsec.capture(model, family.example_inputs(model, 2, 16))
    testing.apply_pass(program, "drop_layers", layers=[1, 2, 3], where="model.layers.*")
    reference = copy.deepcopy(model)
    for i in (3, 2, 1):
        del reference.model.layers[i]
    assert [b.index for b in region_index(program).blocks("model.layers.*")] == [0]
    inputs = family.example_inputs(model, 3, 11, seed=8)
    testing.assert_equivalent(program, reference, inputs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, replacement", [("attn", ZeroAttention), ("mlp", ZeroMlp)])
def test_sublayer_drop_equals_zeroed_sublayer(kind, replacement):
    model, program = _capture("tiny-llama")
    before = testing.parameter_names(program)
    testing.apply_pass(program, "drop_layers", layers=[0, 2], kind=kind)
    attr, norm = ("self_attn", "input_layernorm") if kind == "attn" else ("mlp", "post_attention_layernorm")
    testing.assert_parameters_removed(
        before, program, [f"model.layers.{i}.{m}.**" for i in (0, 2) for m in (attr, norm)]
    )
    for i in (0, 2):
        setattr(model.model.layers[i], attr, replacement())
    testing.assert_equivalent(program, model, make_inputs(model, 2, 9, seed=1, pad_left=2), rtol=1e-5, atol=1e-5)


def _make_block_identity(model, i):
    layer = model.model.layers[i]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def test_cosine_ranks_an_identity_block_first():
    model = make_model("tiny-qwen2")
    _make_block_identity(model, 2)
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    record = testing.apply_pass(program, "drop_layers", count=1, calibration=_calibration(model))
    scores = record.decisions["scores"]
    assert record.decisions["ranking"][0] == "model.layers.2" and scores["model.layers.2"] == pytest.approx(1.0)
    assert all(v < 1.0 - 1e-4 for k, v in scores.items() if k != "model.layers.2")
    assert record.decisions["dropped"] == ["model.layers.2"]
    # the block was an identity: the compressed program equals the original model
    testing.assert_equivalent(program, model, make_inputs(model, 2, 7, seed=3), rtol=1e-5, atol=1e-5)


def test_cosine_scores_match_hooks_on_the_hf_model():
    model, program = _capture("tiny-qwen2")
    calib = _calibration(model)
    record = testing.apply_pass(program, "drop_layers", count=1, kind="mlp", calibration=calib)
    ins, outs = {}, {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(
            layer.post_attention_layernorm.register_forward_hook(
                lambda m, a, o, i=i: ins.setdefault(i, []).append(a[0])
            )
        )
        hooks.append(
            layer.register_forward_hook(
                lambda m, a, o, i=i: outs.setdefault(i, []).append(o[0] if isinstance(o, tuple) else o)
            )
        )
    with torch.no_grad():
        for batch in calib.batches():
            model(**batch)
    for h in hooks:
        h.remove()
    mask = calib.inputs["attention_mask"].bool()
    for i in range(4):
        x_mid, x_out = torch.cat(ins[i])[mask], torch.cat(outs[i])[mask]
        expected = torch.nn.functional.cosine_similarity(x_mid, x_out, dim=-1).mean()
        assert record.decisions["scores"][f"model.layers.{i}:mlp"] == pytest.approx(float(expected), abs=1e-5)


def test_iterative_joint_rescores_and_matches_reference():
    model, program = _capture("tiny-qwen2", seed=2)
    calib = _calibration(model)
    record = testing.apply_pass(program, "drop_layers", count=3, kind="joint", iterative=True, calibration=calib)
    rounds = record.decisions["rounds"]
    assert len(rounds) == 3 and len(rounds[0]["scores"]) == 8 and len(rounds[1]["scores"]) == 7
    for r in rounds:
        assert r["dropped"] == max(r["scores"], key=r["scores"].get)
    # round 2 scores the changed model: the same as scoring a model where round 1's drop was made explicitly
    path, kind = rounds[0]["dropped"].split(":")
    _, fresh = _capture("tiny-qwen2", seed=2)
    testing.apply_pass(fresh, "drop_layers", layers=[int(path.rsplit(".", 1)[1])], kind=kind)
    rescored = testing.apply_pass(fresh, "drop_layers", count=1, kind="joint", calibration=calib).decisions["scores"]
    assert rescored == pytest.approx(rounds[1]["scores"], abs=1e-5)
    for label in record.decisions["dropped"]:
        path, kind = label.split(":")
        layer = model.get_submodule(path)
        if kind == "attn":
            layer.self_attn = ZeroAttention()
        else:
            layer.mlp = ZeroMlp()
    testing.assert_equivalent(program, model, make_inputs(model, 2, 10, seed=6, pad_left=1), rtol=1e-5, atol=1e-5)


def test_ratio_rounds_to_units():
    model, program = _capture("tiny-qwen2")
    record = testing.apply_pass(program, "drop_layers", ratio=0.5, kind="attn", calibration=_calibration(model))
    assert len(record.decisions["dropped"]) == 2 and all(d.endswith(":attn") for d in record.decisions["dropped"])


class _NoResidual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8)) for _ in range(3)
        )

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize(
    "options, message",
    [
        ({"layers": [1, 4]}, "layers [4] out of range; the selected blocks of model.layers are 0..3"),
        ({"layers": [0, 1, 2, 3]}, "would drop all 4 block units of model.layers"),
        ({"count": 4}, "would drop all 4 block units"),
        ({"count": 9, "where": "model.layers.[01]"}, "count 9 exceeds the 2 block units selected"),
        (
            {"layers": [1], "where": "model.decoder.*"},
            "where='model.decoder.*' matches no block; block stacks in this model: ['model.layers.*']",
        ),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_program_untouched(options, message):
    model, program = _capture("tiny-qwen2")
    nodes = [n.name for n in program.graph.nodes]
    with pytest.raises(PassError) as info:
        testing.apply_pass(program, "drop_layers", calibration=_calibration(model), **options)
    assert message in str(info.value)
    assert [n.name for n in program.graph.nodes] == nodes


def test_missing_residual_structure_and_ambiguous_stacks():
    program = sparsec.capture(_NoResidual(), {"x": torch.randn(2, 5, 8)})
    with pytest.raises(PassError, match="cannot find the residual structure of layers.0"):
        testing.apply_pass(program, "drop_layers", layers=[1])
    model, janus = _capture("tiny-janus")
    with pytest.raises(PassError, match=r"spans 2 block stacks .*choose one with `where:`"):
        testing.apply_pass(janus, "drop_layers", layers=[1])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"layers": [1], "count": 2}, "give exactly one of layers, count, ratio (got ['layers', 'count'])"),
        ({"ratio": 1.0}, "drop_layers.ratio: must be in (0, 1), got 1.0"),
        ({"layers": [1, 1]}, "drop_layers.layers: duplicate indices"),
        (
            {"count": 2, "kind": "heads"},
            "drop_layers.kind: 'heads' is not allowed; choose one of ['block', 'attn', 'mlp', 'joint']",
        ),
        ({"layers": [1], "kind": "joint"}, "use count or ratio with it"),
    ],
)
def test_bad_options_fail_when_the_recipe_is_read(options, message):
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict({"passes": [{"drop_layers": options}]})
    assert message in str(info.value)


def test_scored_drop_needs_calibration():
    _, program = _capture("tiny-qwen2")
    with pytest.raises(PassError, match="needs calibration data"):
        testing.apply_pass(program, "drop_layers", count=1)


@pytest.mark.slow
def test_compile_reports_scores_and_dry_run_writes_nothing(tmp_path, capsys):
    from sparsec.cli import main

    (tmp_path / "r.yaml").write_text(
        "passes:\n  - drop_layers: {ratio: 0.5, kind: block}\nquality: {min_cosine: 0.5}\n"
    )
    argv = ["compile", "--model", "builtin:tiny-llama", "--recipe", str(tmp_path / "r.yaml")]
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "rank      score  unit" in out and out.count("<- dropped") == 2
    assert list(tmp_path.iterdir()) == [tmp_path / "r.yaml"]

    assert main([*argv, "--out", str(tmp_path / "out"), "--quiet"]) == 0
    (record,) = json.loads((tmp_path / "out" / "report.json").read_text())["passes"]
    (decisions,) = json.loads((tmp_path / "out" / "decisions.json").read_text())["passes"]
    assert len(decisions["scores"]) == 4 and decisions["ranking"][:2] == decisions["dropped"]
    assert decisions["reason"].startswith("highest cosine similarity")
    dropped_params = {name for names in decisions["parameters"].values() for name in names}
    assert set(record["removed_state"]) == dropped_params
    assert all(any(n.startswith(d + ".") for d in decisions["dropped"]) for n in dropped_params)


def test_describe_decisions_ranks_units_and_marks_the_dropped():
    decisions = {
        "stack": "model.layers",
        "kind": "block",
        "units": 2,
        "scores": {"model.layers.0": 0.5, "model.layers.1": 0.9},
        "ranking": ["model.layers.1", "model.layers.0"],
        "parameters": {"model.layers.1": ["w"]},
        "dropped": ["model.layers.1"],
    }
    assert DropLayers.describe_decisions(decisions) == [
        "  rank      score  unit",
        "     1   0.900000  model.layers.1  <- dropped",
        "     2   0.500000  model.layers.0",
        "  stack: model.layers",
        "  kind: block",
        "  units: 2",
        "  dropped: ['model.layers.1']",
    ]
