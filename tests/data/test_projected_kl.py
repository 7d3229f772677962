"""Distillation through logits projected a few rows at a time: the loss and its gradients equal autograd's through
whole logits (`kl_logits` on `linear(hidden, weight, bias)`), and training a tiny LM end to end or block by block
gives the weights and losses that whole logits give."""

import pytest
import torch
from conftest import compressed_llama

from sparsec.data import distill as distill_module
from sparsec.data import logits as logits_module
from sparsec.data.distill import TrainingSettings, kl_logits, train_end_to_end
from sparsec.data.logits import ProjectedLogits
from sparsec.data.projected_kl import projected_kl
from sparsec.ir.paths import glob_match


def _whole_gradients(hidden, weight, bias, teacher, mask):
    hidden, weight, bias = (t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias))
    loss = kl_logits(torch.nn.functional.linear(hidden, weight, bias), teacher, mask)
    loss.backward()
    return loss.detach(), (hidden.grad, weight.grad, bias.grad)


@pytest.mark.parametrize("projected_teacher", [False, True])
def test_loss_and_gradients_equal_autograd_through_whole_logits(monkeypatch, projected_teacher):
    monkeypatch.setattr(logits_module, "PROJECTED_BYTES", 3 * 50 * 4)  # three rows of a 50-token vocabulary
    g = torch.Generator().manual_seed(0)
    hidden, weight, bias = (
        torch.randn(2, 7, 6, generator=g),
        torch.randn(50, 6, generator=g),
        torch.randn(50, generator=g),
    )
    teacher = ProjectedLogits(torch.randn(2, 7, 6, generator=g), weight + 0.3 * torch.randn(50, 6, generator=g))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    expected, grads = _whole_gradients(hidden, weight, bias, teacher.rows(), mask)

    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    teacher_value = teacher if projected_teacher else teacher.rows()
    loss = kl_logits(ProjectedLogits(*leaves), teacher_value, mask)
    (2.0 * loss).backward()  # backward scales by the loss's own gradient
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)
    for leaf, grad in zip(leaves, grads):
        torch.testing.assert_close(leaf.grad, 2.0 * grad, rtol=1e-4, atol=1e-7)
    assert float(loss.detach()) > 0.1


def test_bfloat16_gradients_come_back_in_bfloat16_as_autograd_gives_them(monkeypatch):
    monkeypatch.setattr(logits_module, "PROJECTED_BYTES", 4 * 64 * 2)
    g = torch.Generator().manual_seed(1)
    hidden, weight, bias = (torch.randn(*s, generator=g).bfloat16() for s in ((9, 8), (64, 8), (64,)))
    teacher = torch.randn(9, 64, generator=g).bfloat16()
    expected, grads = _whole_gradients(hidden, weight, bias, teacher, None)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = projected_kl(ProjectedLogits(*leaves), teacher)
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)
    for leaf, grad in zip(leaves, grads):
        assert leaf.grad.dtype == torch.bfloat16
        torch.testing.assert_close(leaf.grad.float(), grad.float(), rtol=2e-2, atol=1e-3)


def test_only_the_inputs_that_need_gradients_get_them_and_no_grad_mode_computes_the_loss_alone():
    weight = torch.randn(12, 4, requires_grad=True)
    hidden = torch.randn(5, 4)
    teacher = torch.randn(5, 12)
    loss = projected_kl(ProjectedLogits(hidden, weight), teacher)
    loss.backward()
    assert weight.grad is not None and weight.grad.shape == weight.shape
    with torch.no_grad():
        again = projected_kl(ProjectedLogits(hidden, weight), teacher)
    assert not again.requires_grad and float(again) == pytest.approx(float(loss), rel=1e-6)
    with pytest.raises(ValueError, match="token rows of equal shape"):
        projected_kl(ProjectedLogits(hidden, weight), teacher[:4])


@pytest.fixture(scope="module")
def sliced():
    """(teacher, student: a tiny Llama with a block dropped and half its FFN neurons sliced, calibration set with
    left padding)."""
    return compressed_llama(samples=6)


@pytest.mark.parametrize("trained", ["**.mlp.down_proj.weight", "lm_head.weight"])
def test_training_through_projected_logits_gives_the_weights_whole_logits_give(sliced, monkeypatch, trained):
    teacher, student, calibration = sliced
    monkeypatch.setattr(logits_module, "PROJECTED_BYTES", 5 * 256 * 4)
    names = [n for n in student.parameter_names() if glob_match(n, trained)]
    settings = TrainingSettings(steps=6, lr=1e-3, schedule="constant")
    untrained = student.snapshot()
    results = []
    for head in (True, False):
        if not head:  # the reference: logits computed whole, autograd through them
            monkeypatch.setattr(distill_module, "find_logits_head", lambda program, output="logits": None)
            monkeypatch.setattr(distill_module, "logits_run", lambda program: logits_module.LogitsRun(None, dict))
        student.restore(untrained)
        report = train_end_to_end(student, teacher, names, calibration, settings)
        results.append((report, [student.state_tensor(n) for n in names]))
    student.restore(untrained)
    (projected, p_weights), (whole, w_weights) = results
    assert projected.loss_after < projected.loss_before, (projected.loss_before, projected.loss_after)
    assert projected.loss_before == pytest.approx(whole.loss_before, rel=1e-5)
    assert projected.loss_after == pytest.approx(whole.loss_after, rel=1e-4)
    for got, expected in zip(p_weights, w_weights):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
