"""Memory estimates from checkpoint headers, and the refusal before heavy work."""

import json

import pytest
import torch
import yaml
from conftest import make_model

from sparsec import resources
from sparsec.cli import main
from sparsec.compiler.memory import memory_estimate
from sparsec.data import reference
from sparsec.errors import SparsecError
from sparsec.recipe import Recipe


def test_checkpoint_facts_read_the_headers_only(tmp_path):
    model = make_model("tiny-qwen2").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    elements, by_dtype = resources.checkpoint_facts(tmp_path)
    assert elements == sum(
        p.numel()
        for p in model.state_dict().values()
        if p is not model.lm_head.weight or not model.config.tie_word_embeddings
    )
    assert by_dtype == {"BF16": 2 * elements}


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(SparsecError, match="safetensors header is corrupt"):
        resources.checkpoint_facts(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SparsecError, match="is not a safetensors file"):
        resources.checkpoint_facts(tmp_path)


def test_estimate_adds_weights_session_and_calibration():
    estimate = resources.estimate_compile(
        1000,
        2,
        parity_session=4000,
        kept_outputs=300,
        batch_tokens=5,
        sequential_tokens=40,
        output_width=7,
        hidden=3,
        layers=2,
    )
    assert estimate.weights == 2000 and estimate.parity_session == 4000
    assert estimate.calibration == 300 + 5 * (5 * 7 + 4 * 3 * 10) * 4  # kept outputs, one batch's forward
    assert estimate.total == 6000 + estimate.calibration  # whole-model: nothing kept between blocks
    assert estimate.block_weights == 2000 // 2 + 7 * 3 * 2
    lazy = estimate.lazy()  # block by block: one block's weights, and every sample's hidden states between blocks
    assert (
        lazy.weights == estimate.block_weights and lazy.total == lazy.weights + estimate.calibration + 40 * 3 * 8 + 4000
    )


def test_refuses_what_cannot_fit_naming_the_options(monkeypatch):
    estimate = resources.MemoryEstimate(
        weights=6 * resources.GiB,
        calibration=2 * resources.GiB,
        parity_session=12 * resources.GiB,
        block_weights=resources.GiB,
        between_blocks=14 * resources.GiB,
    )
    monkeypatch.setattr(resources, "available_memory", lambda: 20 * resources.GiB)
    resources.check_fits(estimate, "compiling M")
    monkeypatch.setattr(resources, "available_memory", lambda: 19 * resources.GiB)
    message = (
        r"compiling M needs about 20.0 GiB \(weights 6.0 GiB, calibration 2.0 GiB, .* session of the parity check "
        r"12.0 GiB\) and 19.0 GiB are available: load in bfloat16 .* \(calibration.batch_size\) or fewer parity "
        r"samples \(export.parity.samples\), or compile"
    )
    with pytest.raises(SparsecError, match=message):
        resources.check_fits(estimate, "compiling M")
    with pytest.raises(
        SparsecError, match=r"calibration 16.0 GiB, .*fewer calibration samples \(calibration.samples\)"
    ):
        resources.check_fits(estimate.lazy(), "compiling M")


def _recipe_dict(**calibration) -> dict:
    return {"passes": [{"drop_layers": {"count": 1}}], "calibration": calibration}


def _recipe(**calibration) -> Recipe:
    return Recipe.from_dict(_recipe_dict(**calibration))


def test_the_calibration_estimate_does_not_grow_with_the_samples(tmp_path):
    make_model("tiny-qwen2").save_pretrained(tmp_path)
    estimate = lambda samples, **more: memory_estimate(  # noqa: E731
        tmp_path, _recipe(samples=samples, seq_len=64, batch_size=8, **more), "auto", None
    )
    hidden = json.loads((tmp_path / "config.json").read_text())["hidden_size"]
    kept = estimate(64)  # the gates' reference, kept: 13 held-out samples' hidden states (64 tokens each), 2 of 8
    assert kept.calibration - estimate(8).calibration == (13 - 2) * 64 * hidden * 4
    recomputed = estimate(100_000)  # 20,000 held out: recomputed batch by batch
    assert recomputed.calibration == estimate(400_000).calibration < kept.calibration < reference.KEEP_BYTES
    assert estimate(400_000, sequential=True).total > recomputed.total  # hidden states kept between blocks


def test_the_estimate_counts_whole_logits_only_where_they_are_compared_or_trained_through_whole(tmp_path):
    """Logits projected from hidden states when read, by the checks and by training: one batch-wide copy; a parity
    check adds the backend's outputs of one run twice. Where the head soft-caps its logits they are held whole: five
    copies, eight where a pass trains through them against the dense program."""
    make_model("tiny-qwen2").save_pretrained(tmp_path)
    calibration = {"samples": 8, "seq_len": 64, "batch_size": 8}
    adapt = {"ffn_to_moe": {"experts": 4, "top_k": 2, "adapt": "router"}}

    def estimates(target=None):
        return (
            memory_estimate(tmp_path, Recipe.from_dict({"passes": passes, "calibration": calibration}), "auto", target)
            for passes in ([{"drop_layers": {"count": 1}}], [adapt])
        )

    plain, trained = estimates()
    batch_logits = 8 * 64 * 256 * 4
    assert trained.calibration == plain.calibration
    config = json.loads((tmp_path / "config.json").read_text())
    with_parity, _ = estimates("onnxruntime")
    parity_reference = 8 * 64 * config["hidden_size"] * 4  # the parity check's 8 samples, as hidden states
    backend_outputs = 2 * batch_logits  # one run of the backend on the 8 samples: its buffer and the array returned
    assert with_parity.calibration - plain.calibration == backend_outputs + parity_reference
    (tmp_path / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 30.0}))
    capped, capped_trained = estimates()
    capped_parity, _ = estimates("onnxruntime")
    held_out = 2 * 64  # the gates' reference: the held-out fifth's logits, kept whole instead of hidden states
    kept_logits = held_out * (256 - config["hidden_size"]) * 4
    assert capped.calibration - plain.calibration == 4 * batch_logits + kept_logits
    assert capped_trained.calibration - plain.calibration == 7 * batch_logits + kept_logits
    assert capped_parity.calibration - capped.calibration == batch_logits + backend_outputs  # 8 samples, whole


def test_a_compile_that_cannot_fit_is_refused_before_loading_naming_the_batch_size(tmp_path, monkeypatch, capsys):
    make_model("tiny-qwen2").save_pretrained(tmp_path / "model")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(_recipe_dict(batch_size=256, seq_len=512)))
    estimate = memory_estimate(tmp_path / "model", _recipe(batch_size=256, seq_len=512), "auto", "onnxruntime")
    monkeypatch.setattr(resources, "available_memory", lambda: estimate.weights + estimate.parity_session + 1)
    argv = ["compile", "--model", str(tmp_path / "model"), "--recipe", str(tmp_path / "recipe.yaml")]
    assert main([*argv, "--out", str(tmp_path / "out"), "--weights", "memory"]) == 2
    assert "use smaller calibration batches (calibration.batch_size)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_available_memory_is_positive():
    assert resources.available_memory() > 0
