"""Capture without weights: weights read lazily from the checkpoint's safetensors files (issue 16).

Meta capture equals real capture; a lazily backed program's weight-only passes decide, count and compute as the
eager program does; `inspect` works on a config-only directory; the compiler refuses lazy reading where the
model must run.
"""

import json
import shutil
import weakref

import pytest
import torch
from conftest import mot_inputs

from sparsec import resources
from sparsec.analysis.regions import block_boundaries
from sparsec.capture import capture
from sparsec.cli import main
from sparsec.compiler import compile_model
from sparsec.compiler.memory import lazy_blocker, memory_estimate
from sparsec.errors import SparsecError
from sparsec.exporters.targets.onnxruntime import run, session
from sparsec.families.mot import MOT_PRESETS, MoTConfig, MoTForCausalLM
from sparsec.ir.program import Program
from sparsec.models import build_model, builtin_config, load_model
from sparsec.recipe import Recipe
from sparsec.resources import LAZY_ABOVE

WEIGHT_ONLY = {
    "passes": [{"drop_layers": {"layers": [2]}}, {"slice_neurons": {"keep_ratio": 0.5, "importance": "magnitude"}}]
}


def _checkpoint(tmp_path, kind: str, dtype=torch.bfloat16):
    """A save_pretrained directory (bf16 unless `dtype`) of a tiny model: untied or tied Qwen2, Llama, or the MoT."""
    if kind == "mot":
        model = MoTForCausalLM(MoTConfig(**MOT_PRESETS["tiny"]))
    elif kind == "llama":
        model = build_model(builtin_config("tiny-llama"))
    else:
        config = builtin_config("tiny-qwen2")
        config.tie_word_embeddings = kind == "qwen2-tied"
        model = build_model(config)
    directory = tmp_path / kind
    model.to(dtype).eval().save_pretrained(directory)
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
    info = json.loads(capsys.readouterr().out)
    assert info["flops"] > 0 and info["flops_absent"] is None and info["weights"].startswith("not in memory")


def _left_padded_batches(vocab: int, sizes=((3, 11), (2, 13), (3, 11))):
    gen = torch.Generator().manual_seed(1)
    batches = []
    for batch, seq in sizes:
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, :4] = 0
        batches.append({"input_ids": torch.randint(0, vocab, (batch, seq), generator=gen), "attention_mask": mask})
    return batches


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_segmented_run_onloads_one_block_at_a_time(tmp_path, monkeypatch, kind):
    """Layer by layer onloading: each lazily backed weight is read once for all batches, when its segment starts,
    and dropped when it ends; the outputs equal the materialised program's `run`, bit for bit (fp32)."""

    directory = _checkpoint(tmp_path, kind, torch.float32)
    lazy = load_model(directory, weights="lazy")
    program = capture(lazy.model, lazy.family.example_inputs(lazy.model, 2, 16), family=lazy.family)
    lazy.attach_weights(program)
    batches = _left_padded_batches(lazy.model.config.vocab_size)

    def block(name: str) -> str:
        parts = name.split(".")
        return parts[2] if parts[1] == "layers" else "0" if "embed_tokens" in name else "head"

    reads: list[tuple[str, weakref.ref]] = []
    alive_at_read: dict[str, set[str]] = {}
    state_tensor = Program.state_tensor

    def recording(self, name):
        tensor = state_tensor(self, name)
        alive_at_read[name] = {n for n, ref in reads if ref() is not None}
        reads.append((name, weakref.ref(tensor)))
        return tensor

    monkeypatch.setattr(Program, "state_tensor", recording)
    outputs = list(program.run_segmented(batches, block_boundaries(program)))
    monkeypatch.undo()

    assert sorted(n for n, _ in reads) == program.lazy_state()  # every weight read, each once for all batches
    for name, alive in alive_at_read.items():
        assert {block(n) for n in alive} <= {block(name)}, f"{name} read while {sorted(alive)} were held"
    assert {block(n) for n in program.lazy_state()} == {"head", *map(str, range(lazy.model.config.num_hidden_layers))}
    program.materialize()
    for batch, got in zip(batches, outputs):
        assert torch.equal(got["logits"], program.run(batch)["logits"])


def test_a_lazily_read_compile_equals_the_in_memory_compile(tmp_path):
    """The same recipe (activation statistics, the recipe's gates, ONNX and parity) read lazily and in memory:
    the same decisions and quality metrics (fp32: exactly), the same ONNX file outputs."""

    directory = _checkpoint(tmp_path, "qwen2", torch.float32)
    recipe = Recipe.from_dict(
        {
            "passes": [
                {"drop_layers": {"layers": [1]}},
                {"slice_neurons": {"keep_ratio": 0.5, "importance": "activation"}},
            ],
            "calibration": {"samples": 6, "seq_len": 12, "batch_size": 2},
            "quality": {"min_cosine": 0.0},
            "export": {"pt2": False, "parity": {"samples": 4}},
        }
    )
    reports = {
        mode: compile_model(str(directory), recipe, tmp_path / mode, progress=False, lazy=mode == "lazy")
        for mode in ("lazy", "memory")
    }
    lazy, memory = reports["lazy"], reports["memory"]
    assert lazy["model"]["weights"] == "lazy" and memory["model"]["weights"] == "memory"
    assert lazy["calibration"]["sequential"] and not memory["calibration"]["sequential"]
    for z, m in zip(lazy["passes"], memory["passes"], strict=True):
        assert z["decisions"] == m["decisions"] and z["quality"] == m["quality"]
        assert z["parameters_after"] == m["parameters_after"]
    assert lazy["parity"]["metrics"] == memory["parity"]["metrics"]
    (batch,) = _left_padded_batches(builtin_config("tiny-qwen2").vocab_size, ((2, 9),))
    got = {mode: run(session(tmp_path / mode / "model.onnx"), batch)["logits"] for mode in reports}
    torch.testing.assert_close(got["lazy"], got["memory"], rtol=0, atol=0)


def test_lazy_reading_is_refused_where_it_cannot_serve(tmp_path):
    with pytest.raises(SparsecError, match="several entry points, which share weights"):
        compile_model(
            str(tmp_path),
            Recipe.from_dict({**WEIGHT_ONLY, "entry_points": ["understanding"]}),
            None,
            dry_run=True,
            lazy=True,
        )
    with pytest.raises(SparsecError, match="a built-in model has no checkpoint files"):
        compile_model("builtin:tiny-qwen2", Recipe.from_dict(WEIGHT_ONLY), None, dry_run=True, lazy=True)
    assert "--device is cuda" in lazy_blocker(Recipe.from_dict(WEIGHT_ONLY), torch.device("cuda"))
    assert lazy_blocker(Recipe.from_dict(WEIGHT_ONLY), torch.device("cpu")) is None


def test_writing_a_lazily_read_program_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """One block's weights fit, the transformed program's do not: refused after the passes, nothing written."""

    directory = _checkpoint(tmp_path, "qwen2")
    recipe = Recipe.from_dict(
        {
            **WEIGHT_ONLY,
            "quality": {"gates": False},
            "export": {"onnx": False},
            "calibration": {"samples": 2, "seq_len": 4, "batch_size": 1},  # calibration's share: less than a block's
        }
    )
    available = memory_estimate(directory, recipe, "auto", None).lazy().total + 1_000
    monkeypatch.setattr(resources, "available_memory", lambda: available)
    with pytest.raises(SparsecError, match="writing the transformed program needs about"):
        compile_model(str(directory), recipe, tmp_path / "out", progress=False, lazy=True)
    assert not (tmp_path / "out").exists()


def test_lazy_loading_needs_a_checkpoint_directory():
    with pytest.raises(SparsecError, match="no checkpoint to read lazily"):
        load_model("builtin:tiny-qwen2", weights="lazy")


@pytest.mark.parametrize("headroom, weights", [(1.5, "lazy"), (2.5, "memory")])
def test_auto_reads_lazily_above_half_the_available_memory(tmp_path, monkeypatch, headroom, weights):

    directory = _checkpoint(tmp_path, "qwen2")
    recipe = Recipe.from_dict({**WEIGHT_ONLY, "quality": {"gates": False}})
    total = memory_estimate(directory, recipe, "auto", None).total
    monkeypatch.setattr(resources, "available_memory", lambda: int(headroom * total))
    assert (LAZY_ABOVE * headroom < 1) == (weights == "lazy")
    report = compile_model(str(directory), recipe, None, dry_run=True, progress=False)
    assert report["model"]["weights"] == weights
