"""The `distill` pass on a tiny *trained* language model read from a checkpoint directory: it lowers the held-out
next-token loss that slicing, dropping blocks and MoE conversion raised (end to end and block-local), trains
nothing on an unchanged program, keeps bf16 weights bf16 (trained through float32 masters), and its result lowers
to ONNX with parity. Also `ffn_to_moe`'s `adapt` on a directory-loaded model (it used to fail the in-place check).

The model: a 4-block Llama trained for a few seconds on sequences that follow one of three modular rules chosen by
the first token (90 %) or a random token (10 %), so it has something real to lose and to recover."""

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from sparsec.capture import capture
from sparsec.data.calibration import CalibrationSet
from sparsec.data.language_model import next_token_loss
from sparsec.errors import PassError
from sparsec.models import load_model
from sparsec.pipeline import pass_context
from sparsec.transform.pass_manager import PassManager, get_pass

VOCAB, SEQ = 48, 24


def _sequences(n: int, seed: int, pad_left: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rules = torch.tensor([[5, 1], [7, 3], [11, 2]])
    ids = torch.empty(n, SEQ, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    a, b = rules[ids[:, 0] % 3].T
    for t in range(1, SEQ):
        noise = torch.rand(n, generator=g) < 0.1
        ids[:, t] = torch.where(noise, torch.randint(0, VOCAB, (n,), generator=g), (a * ids[:, t - 1] + b) % VOCAB)
    mask = torch.ones_like(ids)
    if pad_left:  # the first sample left-padded
        ids[0] = torch.cat([torch.zeros(pad_left, dtype=torch.long), ids[0, : SEQ - pad_left]])
        mask[0, :pad_left] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A save_pretrained directory of the trained tiny Llama (float32)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = _sequences(1920, seed=0)["input_ids"]
    with torch.enable_grad():
        for step in range(120):
            batch = data[(step * 32) % len(data) :][:32]
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    directory = tmp_path_factory.mktemp("trained") / "llama"
    model.eval().save_pretrained(directory)
    return directory


def _program(directory, dtype="auto"):
    """The model read from `directory` (weights in memory, known by their stored copies) and captured."""
    loaded = load_model(directory, dtype=dtype)
    program = capture(loaded.model, _sequences(2, seed=5), family=loaded.family)
    loaded.attach_weights(program)
    return program


@pytest.fixture(scope="module")
def dense(checkpoint):
    """The captured model; tests rewrite `_fresh(dense)`, never this one."""
    return _program(checkpoint)


def _fresh(program):
    """A program of its own with the same weights (read back into memory), for a test to rewrite."""
    copy = program.frozen_copy()
    copy.materialize()
    return copy


def _calibration():
    return CalibrationSet(_sequences(128, seed=1, pad_left=5), source="rules", batch_size=16)


def _held_out_loss(program) -> float:
    inputs = _sequences(48, seed=2, pad_left=7)
    logits = program.run(inputs)["logits"]
    return next_token_loss(logits, inputs["input_ids"], inputs["attention_mask"]).mean


def _compress_then_distill(program, compress: tuple[str, dict], distill: dict):
    """Run the pass `compress`, then `distill` on `program`; return (held-out loss before the pass, after it, after
    distill) and the distill record."""
    name, options = compress
    ctx = pass_context(program, _calibration(), progress=False)
    dense = _held_out_loss(program)
    reference = program.frozen_copy()
    PassManager([get_pass(name)(**options)]).run(program, ctx)
    assert ctx.reference is None  # no pass of that run needs it
    ctx.reference = reference  # what one PassManager running both passes sets: the program before the first
    compressed = _held_out_loss(program)
    (record,) = PassManager([get_pass("distill")(**distill)]).run(program, ctx)  # ctx.reference: the dense program
    return (dense, compressed, _held_out_loss(program)), record


@pytest.mark.parametrize("mode, recovered", [("end_to_end", 0.6), ("block_local", 0.3)])
def test_distill_recovers_a_sliced_model(dense, mode, recovered):
    program = _fresh(dense)
    (before, sliced, distilled), record = _compress_then_distill(
        program, ("slice_neurons", {"keep_ratio": 0.25}), {"mode": mode, "steps": 60, "lr": 1e-3}
    )
    assert before < sliced - 0.2  # the slice costs something to recover
    assert distilled < sliced - recovered * (sliced - before), (before, sliced, distilled)
    assert record.stats["loss_after"] < 0.5 * record.stats["loss_before"]
    decisions = record.decisions
    assert decisions["trainable_from"] == "changed_blocks"
    assert [b["path"] for b in decisions["blocks"]] == [f"model.layers.{i}" for i in range(4)]
    trained = set(decisions["training"]["trained"])
    assert "model.layers.0.mlp.up_proj.weight" in trained and "model.layers.0.self_attn.q_proj.weight" in trained
    assert not any(n.startswith(("model.embed_tokens", "lm_head", "model.norm")) for n in trained)
    if mode == "block_local":
        blocks = decisions["training"]["blocks"]
        assert [b["block"] for b in blocks] == [f"model.layers.{i}" for i in range(4)]
        assert all(b["loss_after"] < b["loss_before"] for b in blocks)


def test_distill_with_defaults_lowers_the_loss(dense):
    (before, sliced, distilled), record = _compress_then_distill(
        _fresh(dense), ("slice_neurons", {"keep_ratio": 0.5}), {}
    )
    assert record.stats["steps"] == 100 and record.stats["loss_after"] < 0.5 * record.stats["loss_before"]
    assert distilled < sliced - 0.3 * (sliced - before), (before, sliced, distilled)


@pytest.mark.parametrize("mode", ["end_to_end", "block_local"])
def test_distill_after_drop_layers_trains_the_block_after_the_dropped_one(dense, mode):
    (before, dropped, distilled), record = _compress_then_distill(
        _fresh(dense), ("drop_layers", {"layers": [1]}), {"mode": mode, "steps": 60, "lr": 1e-3}
    )
    assert record.decisions["blocks"] == [
        {"path": "model.layers.2", "reason": "after_dropped", "dropped": ["model.layers.1"]}
    ]
    assert {n.split(".")[2] for n in record.decisions["training"]["trained"]} == {"2"}
    assert distilled < dropped - 0.3 * (dropped - before), (before, dropped, distilled)


def test_distill_after_ffn_to_moe_trains_experts_and_routers(dense):
    (before, moe, distilled), record = _compress_then_distill(
        _fresh(dense), ("ffn_to_moe", {"experts": 8, "top_k": 2}), {"steps": 60, "lr": 1e-3, "hidden_mse": 0.5}
    )
    trained = set(record.decisions["training"]["trained"])
    assert "model.layers.0.mlp.moe.router_weight" in trained and "model.layers.0.mlp.moe.fc1_weight" in trained
    assert distilled < moe - 0.5 * (moe - before), (before, moe, distilled)


def test_distill_on_the_dense_program_changes_nothing(dense):
    program = _fresh(dense)
    before = {n: program.state_tensor(n) for n in program.parameter_names()}
    (record,) = PassManager([get_pass("distill")()]).run(program, pass_context(program, _calibration(), progress=False))
    assert not record.modified and record.decisions["blocks"] == [] and record.decisions["training"] is None
    assert all(program.state_tensor(n) is t for n, t in before.items())


def test_distill_trains_bf16_weights_through_float32_masters(checkpoint):
    program = _program(checkpoint, dtype="bfloat16")
    (before, sliced, distilled), record = _compress_then_distill(
        program, ("slice_neurons", {"keep_ratio": 0.25}), {"steps": 30, "lr": 1e-3}
    )
    assert program.state_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16
    assert record.stats["loss_after"] < 0.5 * record.stats["loss_before"]
    assert distilled < sliced - 0.3 * (sliced - before), (before, sliced, distilled)


def test_trainable_globs_must_match_a_parameter(dense):
    with pytest.raises(PassError, match=r"trainable globs \['model.blocks.\*\*'\] match no parameter"):
        program = _fresh(dense)
        PassManager([get_pass("distill")(trainable=["model.blocks.**"])]).run(
            program, pass_context(program, _calibration(), progress=False)
        )


def test_trainable_globs_train_what_they_name(dense):
    (before, sliced, distilled), record = _compress_then_distill(
        _fresh(dense), ("slice_neurons", {"keep_ratio": 0.25}), {"trainable": ["**.mlp.down_proj.*"], "steps": 20}
    )
    assert record.decisions["trainable_from"] == "globs"
    assert record.decisions["training"]["trained"] == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(4)]


def test_ffn_to_moe_adapt_on_a_directory_loaded_model(checkpoint):
    """It failed: the pass prunes the dense FFN weights, which the snapshot knew by their stored copies."""
    program = _program(checkpoint)
    moe = get_pass("ffn_to_moe")(
        experts=4, top_k=2, shared=0, partition="balanced", router="learned", adapt="router", adapt_steps=12, lr=1e-2
    )
    (record,) = PassManager([moe]).run(program, pass_context(program, _calibration(), progress=False))
    adapt = record.decisions["adapt"]
    assert adapt["steps"] == 12 and adapt["loss_after"] < adapt["loss_before"]
    assert set(adapt["trained"]) == {
        f"model.layers.{i}.mlp.moe.router_{k}" for i in range(4) for k in ("weight", "bias")
    }


@pytest.mark.slow
def test_compile_with_distill_lowers_to_onnx_with_parity(checkpoint, tmp_path):
    from sparsec.compiler import compile_model
    from sparsec.recipe import Recipe

    save_file(_sequences(16, seed=3, pad_left=4), str(tmp_path / "calib.safetensors"))
    recipe = Recipe.from_dict(
        {
            "passes": [{"slice_neurons": {"keep_ratio": 0.5}}, {"distill": {"steps": 10, "lr": 3e-3}}],
            "calibration": {"file": str(tmp_path / "calib.safetensors"), "batch_size": 8},
            "quality": {"gates": False},
        }
    )
    report = compile_model(checkpoint, recipe, tmp_path / "out", progress=False)
    distill = report["passes"][1]
    assert distill["name"] == "distill" and distill["stats"]["loss_after"] < distill["stats"]["loss_before"]
    assert report["parity"]["metrics"]["logits"]["cosine"] > 0.9999  # compile refuses a failed parity check


def test_a_lazily_read_compile_distills_as_the_in_memory_one(checkpoint, tmp_path):
    """Weights read from the checkpoint when needed (the teacher's too, block by block in block-local mode): the
    same training as with the weights in memory."""
    from sparsec.compiler import compile_model
    from sparsec.recipe import Recipe

    save_file(_sequences(16, seed=3, pad_left=4), str(tmp_path / "calib.safetensors"))
    recipe = Recipe.from_dict(
        {
            "passes": [
                {"slice_neurons": {"keep_ratio": 0.5}},
                {"distill": {"steps": 5, "lr": 1e-3}},
                {"distill": {"steps": 5, "lr": 1e-3, "mode": "block_local"}},
            ],
            "calibration": {"file": str(tmp_path / "calib.safetensors"), "batch_size": 8},
            "quality": {"gates": False},
        }
    )
    reports = {
        mode: compile_model(checkpoint, recipe, None, dry_run=True, progress=False, lazy=mode == "lazy")
        for mode in ("lazy", "memory")
    }
    assert reports["lazy"]["model"]["weights"] == "lazy" and reports["memory"]["model"]["weights"] == "memory"
    for lazy, memory in zip(reports["lazy"]["passes"][1:], reports["memory"]["passes"][1:], strict=True):
        assert lazy["decisions"]["blocks"] == memory["decisions"]["blocks"]
        assert lazy["stats"]["loss_after"] < lazy["stats"]["loss_before"]
        for key in ("loss_before", "loss_after"):
            assert abs(lazy["stats"][key] - memory["stats"][key]) < 1e-5 * memory["stats"][key]
        assert lazy["quality"]["logits"] == pytest.approx(memory["quality"]["logits"], rel=1e-5)
