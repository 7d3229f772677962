"""The training behind `distill` on a small graph: it trains float32 copies of the named parameters against a
frozen copy of the program (a snapshot keeps the old tensors), trains parameters only, and the learning-rate
schedule is what it says."""

import math

import pytest
import torch
from conftest import small_program

from sparsec.data.calibration import CalibrationSet
from sparsec.data.distill import TrainingSettings, kl_logits, train_end_to_end
from sparsec.errors import SparsecError


def _calibration():
    return CalibrationSet(
        {"x": torch.randn(8, 3, 8, generator=torch.Generator().manual_seed(2))}, source="test", batch_size=4
    )


def test_training_recovers_a_shifted_bias_on_copies_of_the_weights():
    program = small_program()[1]
    bias = program.state_tensor("head.bias")
    program.replace_state("head.bias", bias + 0.5)
    teacher = program.frozen_copy()  # computes with the shifted bias
    program.replace_state("head.bias", bias)
    assert not program.shares_state(teacher, "head.bias") and program.shares_state(teacher, "head.weight")
    snapshot = program.snapshot()

    flags = {n: program.state_tensor(n).requires_grad for n in program.parameter_names()}
    settings = TrainingSettings(steps=150, lr=0.05, schedule="constant", clip=0.0)
    report = train_end_to_end(program, teacher, ["head.bias"], _calibration(), settings)

    assert report.loss_after < 0.01 * report.loss_before
    torch.testing.assert_close(program.state_tensor("head.bias"), bias + 0.5, rtol=0, atol=0.05)
    assert program.state_tensor("head.bias") is not snapshot.state_dict["head.bias"]
    assert program.changed_in_place(snapshot) == []  # the tensor before training is as it was
    torch.testing.assert_close(snapshot.state_dict["head.bias"], bias, rtol=0, atol=0)
    assert {n: program.state_tensor(n).requires_grad for n in program.parameter_names()} == flags  # as before
    torch.testing.assert_close(teacher.state_tensor("head.bias"), bias + 0.5, rtol=0, atol=0)  # the teacher kept


def test_training_trains_parameters_only():
    program = small_program()[1]
    with pytest.raises(SparsecError, match=r"distill trains parameters only; \['scale'\] are not parameters"):
        train_end_to_end(program, program.frozen_copy(), ["scale"], _calibration(), TrainingSettings(steps=1))


def test_kl_of_logits_equals_a_hand_computation_on_valid_tokens():
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    p, q = teacher.softmax(-1), student.softmax(-1)
    by_hand = sum(float((p[b, t] * (p[b, t] / q[b, t]).log()).sum()) for b in range(2) for t in range(3) if mask[b, t])
    assert math.isclose(float(kl_logits(student, teacher, mask.bool())), by_hand / 5, rel_tol=1e-5)


def test_schedule_warms_up_then_decays_to_zero():
    settings = TrainingSettings(steps=10, lr=1.0, warmup=2, schedule="cosine")
    rates = [settings.rate(s) for s in range(10)]
    assert rates[:3] == [1 / 3, 2 / 3, 1.0] and rates[-1] < 0.05
    assert all(a >= b for a, b in zip(rates[2:], rates[3:]))  # cosine: down from the peak
    assert [TrainingSettings(steps=4, lr=0.5, schedule="constant").rate(s) for s in range(4)] == [0.5] * 4
