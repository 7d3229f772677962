"""Memory estimates from checkpoint headers, and the refusal before heavy work."""

import pytest
import torch
from conftest import make_model

from sparsec import resources
from sparsec.errors import SparsecError


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
        1000, 2, parity_session=4000, calibration_tokens=10, batch_tokens=5, output_width=7, hidden=3, layers=2
    )
    assert estimate.weights == 2000 and estimate.parity_session == 4000
    assert estimate.calibration == 10 * 7 * 4 + 5 * (4 * 7 + 4 * 3 * 10) * 4
    assert estimate.required == 6000 and estimate.total == 6000 + estimate.calibration
    assert estimate.block_weights == 2000 // 2 + 7 * 3 * 2 and estimate.lazy().weights == estimate.block_weights


def test_refuses_only_what_cannot_fit(monkeypatch):
    estimate = resources.MemoryEstimate(
        weights=6 * resources.GiB, calibration=50 * resources.GiB, parity_session=12 * resources.GiB
    )
    monkeypatch.setattr(resources, "available_memory", lambda: 20 * resources.GiB)
    resources.check_fits(estimate, "compiling M")  # the calibration part is an estimate: not refused for it
    monkeypatch.setattr(resources, "available_memory", lambda: 16 * resources.GiB)
    with pytest.raises(SparsecError, match=r"compiling M needs at least 18.0 GiB .* 16.0 GiB are available"):
        resources.check_fits(estimate, "compiling M")


def test_available_memory_is_positive():
    assert resources.available_memory() > 0
