"""`distill` on a small graph: it trains copies of the named parameters (a snapshot keeps the old ones) and
trains parameters only."""

import pytest
import torch
from conftest import small_program

from sparsec.data.calibration import CalibrationSet
from sparsec.data.distill import distill
from sparsec.errors import SparsecError


def _calibration():
    return CalibrationSet(
        {"x": torch.randn(8, 3, 8, generator=torch.Generator().manual_seed(2))}, source="test", batch_size=4
    )


def test_distill_recovers_a_shifted_bias_on_copies_of_the_weights():
    _, program = small_program()
    calibration = _calibration()
    bias = program.state_tensor("head.bias")
    program.replace_state("head.bias", bias + 0.5)
    teacher = calibration.reference_outputs(program)  # the outputs of the shifted bias
    program.replace_state("head.bias", bias)
    snapshot = program.snapshot()

    flags = {n: program.state_tensor(n).requires_grad for n in program.parameter_names()}
    history = distill(program, ["head.bias"], calibration, teacher, steps=150, lr=0.05)

    assert history["loss_after"] < 0.01 * history["loss_before"]
    torch.testing.assert_close(program.state_tensor("head.bias"), bias + 0.5, rtol=0, atol=0.05)
    assert program.state_tensor("head.bias") is not snapshot.state_dict["head.bias"]
    assert program.changed_in_place(snapshot) == []  # the tensor before training is as it was
    torch.testing.assert_close(snapshot.state_dict["head.bias"], bias, rtol=0, atol=0)
    assert {n: program.state_tensor(n).requires_grad for n in program.parameter_names()} == flags  # as before


def test_distill_trains_parameters_only():
    _, program = small_program()
    calibration = _calibration()
    teacher = calibration.reference_outputs(program)
    with pytest.raises(SparsecError, match=r"distill trains parameters only; \['scale'\] are not parameters"):
        distill(program, ["scale"], calibration, teacher, steps=1, lr=0.1)
