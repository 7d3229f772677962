"""Logits held as hidden states and projected when read: the quality a compile measures equals the one measured
on whole logits (to float rounding, 1e-5 relative: a product over fewer rows may round differently), for kept and recomputed
references, with left padding and projections split into many chunks."""

import pytest
import torch
from conftest import compressed_llama

from sparsec.data import logits as logits_module
from sparsec.data import parity as parity_module
from sparsec.data.calibration import CalibrationSet
from sparsec.data.language_model import next_token_loss
from sparsec.data.logits import ProjectedLogits, logit_rows
from sparsec.data.parity import ParityOptions, ProgramReference, backend_parity
from sparsec.data.quality import compare_outputs, compare_programs
from sparsec.data.reference import ReferenceOutputs


def _close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for output, metrics in expected.items():
        assert got[output].keys() == metrics.keys()
        for name, value in metrics.items():
            assert got[output][name] == pytest.approx(value, rel=1e-5, abs=1e-9), f"{output}.{name}"


@pytest.fixture(scope="module")
def changed():
    """(dense program, the same model with a block dropped and half its neurons sliced, calibration set)."""
    return compressed_llama(samples=7)


@pytest.mark.parametrize("keep_bytes", [None, 0])
def test_quality_from_projected_logits_equals_quality_from_whole_logits(changed, monkeypatch, keep_bytes):
    dense, program, calibration = changed
    monkeypatch.setattr(logits_module, "PROJECTED_BYTES", 3 * 256 * 4)  # three rows of the 256-token vocabulary
    projected = compare_programs(program, calibration, ReferenceOutputs(dense, calibration, keep_bytes=keep_bytes))
    monkeypatch.setattr(logits_module, "find_logits_head", lambda program, output="logits": None)
    reference = ReferenceOutputs(dense, calibration, keep_bytes=keep_bytes)
    assert all(isinstance(outputs["logits"], torch.Tensor) for outputs in reference)
    whole = compare_programs(program, calibration, reference)
    assert projected["logits"]["cosine"] < 0.999 and projected["logits"]["ppl_ratio"] != 1.0
    _close(projected, whole)


def test_projected_and_whole_logits_compare_alike_on_either_side(changed, monkeypatch):
    """The probe compares projected reference logits with a candidate's whole ones."""
    dense, program, calibration = changed
    monkeypatch.setattr(logits_module, "PROJECTED_BYTES", 5 * 256 * 4)
    batch = next(calibration.batches())
    mask = CalibrationSet.valid_mask(batch)
    ref = ReferenceOutputs(dense, calibration)
    (projected, *_) = list(ref)
    whole_ref = {"logits": logit_rows(projected["logits"])}
    cand = program.run(batch)
    expected = compare_outputs([(whole_ref, cand, mask)], percentiles=[50, 99])
    _close(compare_outputs([(projected, cand, mask)], percentiles=[50, 99]), expected)
    loss = next_token_loss(projected["logits"], batch["input_ids"], mask)
    whole = next_token_loss(whole_ref["logits"], batch["input_ids"], mask)
    assert loss.tokens == whole.tokens > 0 and loss.nll == pytest.approx(whole.nll, rel=1e-6)


def test_projected_logits_keep_the_vocabulary_as_their_last_dimension():
    logits = ProjectedLogits(torch.randn(2, 5, 4), torch.randn(9, 4), torch.randn(9))
    assert logits.shape == (2, 5, 9) and logits[:, :-1].reshape(-1, 9).shape == (8, 9)
    torch.testing.assert_close(logit_rows(logits[1]), logits.hidden[1] @ logits.weight.T + logits.bias)
    with pytest.raises(ValueError, match="vocabulary"):
        logits.reshape(-1, 4)


def test_the_parity_reference_holds_hidden_states_and_measures_what_whole_logits_do(changed, monkeypatch):
    dense, program, calibration = changed
    options = ParityOptions(samples=6, tolerances={"logits": {"cosine": None, "rel_l2": None, "top1": None}})
    backend = lambda batch: program.run(batch)  # noqa: E731  (a "backend" that differs from the dense program)

    def parity():
        reference = ProgramReference(dense, calibration, samples=options.samples).compute()
        report = backend_parity(reference, backend, backend="test", precision="fp32", options=options)
        return reference, {"logits": report["metrics"]["logits"]}

    monkeypatch.setattr(logits_module, "PROJECTED_BYTES", 4 * 256 * 4)
    reference, projected = parity()
    assert all(isinstance(outputs["logits"], ProjectedLogits) for outputs in reference.outputs)
    assert all(outputs["logits"].hidden.shape[-1] == 64 for outputs in reference.outputs)
    monkeypatch.setattr(logits_module, "find_logits_head", lambda program, output="logits": None)
    reference, whole = parity()
    assert all(isinstance(outputs["logits"], torch.Tensor) for outputs in reference.outputs)
    assert projected["logits"]["cosine"] < 0.999
    _close(projected, whole)


def test_the_backend_runs_on_pieces_of_a_batch_whose_outputs_fit_its_budget(changed, monkeypatch):
    """Two samples' logits per backend run (12 tokens x 256 x 4 bytes each): the batches of 3 are split 2 + 1, and
    the metrics are those of whole batches."""
    dense, program, calibration = changed
    options = ParityOptions(samples=6, tolerances={"logits": {"cosine": None, "rel_l2": None, "top1": None}})
    reference = ProgramReference(dense, calibration, samples=options.samples).compute()
    runs = []

    def backend(batch):
        runs.append(batch["input_ids"].shape[0])
        return program.run(batch)

    whole = backend_parity(reference, backend, backend="test", precision="fp32", options=options)["metrics"]
    assert runs == [3, 3]
    monkeypatch.setattr(parity_module, "BACKEND_RUN_BYTES", 2 * 12 * 256 * 4)
    runs.clear()
    pieces = backend_parity(reference, backend, backend="test", precision="fp32", options=options)["metrics"]
    assert runs == [2, 1, 2, 1]
    _close(pieces, whole)
