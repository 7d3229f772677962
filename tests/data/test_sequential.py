"""Layer-sequential calibration (`CalibrationSet.cuts`): statistics, block cosines, samples, reference outputs,
quality metrics and the parity reference equal the whole-model results exactly (fp32, same arithmetic)."""

import dataclasses

import pytest
import torch
from conftest import make_inputs

from sparsec.analysis.regions import block_boundaries, region_index
from sparsec.data.calibration import CalibrationSet, StatisticsCache
from sparsec.data.logits import logit_rows
from sparsec.data.parity import ParityOptions, ProgramReference, backend_parity
from sparsec.data.quality import compare_programs
from sparsec.data.reference import ReferenceOutputs

EXACT = {"rtol": 0, "atol": 0}


def _sets(model, batch_size=2):
    inputs = make_inputs(model, 5, 12, seed=3, pad_left=4)
    whole = CalibrationSet(inputs, source="test", batch_size=batch_size)
    return whole, dataclasses.replace(whole, cuts=block_boundaries)


def _watched(program):
    """FFN hidden activations and block outputs, and cosine pairs within a block (FFN in and out, where the
    widths agree: not Janus' aligner) and across cuts (the outputs of consecutive blocks: the first value waits
    for the second over a segment boundary)."""
    index = region_index(program)
    ffns = index.ffns()
    stacks = [[block.outputs()[-1] for block in stack.blocks] for stack in index.block_stacks()]
    same_width = [f for f in ffns if f.up.args[0].meta["val"].shape[-1] == f.down.meta["val"].shape[-1]]
    pairs = [(f.up.args[0], f.down) for f in same_width] + [pair for ends in stacks for pair in zip(ends, ends[1:])]
    return [f.down.args[0] for f in ffns] + [end for ends in stacks for end in ends], pairs


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-mot", "tiny-janus"])
def test_sequential_statistics_equal_whole_model(captured, name):
    model, program = captured(name)
    whole, sequential = _sets(model)
    assert len(block_boundaries(program)) >= 4
    nodes, pairs = _watched(program)
    expected, got = StatisticsCache(program, whole), StatisticsCache(program, sequential)
    stats, seq_stats = expected.get(nodes), got.get(nodes)
    assert stats.keys() == seq_stats.keys() == {n.name for n in nodes}
    for key, value in stats.items():
        assert seq_stats[key].tokens == value.tokens > 0
        for field in ("mean_abs", "mean_sq", "max_abs"):
            torch.testing.assert_close(getattr(seq_stats[key], field), getattr(value, field), **EXACT)
    cosines = expected.cosine(pairs)
    assert got.cosine(pairs) == cosines and len(set(cosines.values())) == len(pairs)
    samples, seq_samples = expected.samples(nodes[-2:], 30), got.samples(nodes[-2:], 30)
    assert [v.shape[0] for v in samples.values()] == [30, 30]
    for key, value in samples.items():
        torch.testing.assert_close(seq_samples[key], value, **EXACT)


def _materialized(reference: ReferenceOutputs) -> list[dict]:
    return [{name: logit_rows(value) for name, value in outputs.items()} for outputs in reference]


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-janus"])
def test_sequential_reference_quality_and_parity_equal_whole_model(captured, name):
    model, program = captured(name)
    whole, sequential = _sets(model)
    reference = _materialized(ReferenceOutputs(program, whole))
    seq_reference = _materialized(ReferenceOutputs(program, sequential, keep_bytes=0))  # recomputed, layer by layer
    assert len(seq_reference) == whole.num_batches == 3
    for expected, got in zip(reference, seq_reference):
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], **EXACT)
    # against a perturbed reference, so the metrics are not trivially perfect
    noisy = [
        {
            k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
            for k, v in ref.items()
            if v.is_floating_point()
        }
        for i, ref in enumerate(reference)
    ]
    quality = compare_programs(program, whole, noisy)
    assert quality["logits"]["cosine"] < 1 and compare_programs(program, sequential, noisy) == quality
    options = ParityOptions(samples=4)
    backend = lambda batch: {k: v * 1.0001 for k, v in program.run(batch).items()}  # noqa: E731

    def parity_on(calibration):
        reference = ProgramReference(program, calibration, samples=options.samples).compute()
        return backend_parity(reference, backend, backend="test", precision="fp32", options=options)

    parity = parity_on(whole)
    assert parity["metrics"]["logits"]["max_abs"] > 0
    assert parity == parity_on(sequential)


def test_cuts_follow_the_program_and_are_reported(captured):
    model, program = captured("tiny-qwen2")
    whole, sequential = _sets(model)
    assert whole.describe()["sequential"] is False and sequential.describe()["sequential"] is True
    assert sequential.head(2).cuts is block_boundaries
    ends = block_boundaries(program)
    assert [n.meta["nn_module_stack"][next(reversed(n.meta["nn_module_stack"]))][0] for n in ends] == [
        f"model.layers.{i}" for i in range(len(ends))
    ]


def test_a_sequential_run_reports_progress_segment_by_segment(captured, monkeypatch, capsys):
    """All segments run before the first output, so progress counts segments (the cuts plus the head)."""
    model, program = captured("tiny-qwen2")
    _, sequential = _sets(model)
    monkeypatch.setattr("sparsec.progress.LOG_EVERY_S", 0.0)
    outputs = list(ReferenceOutputs(program, sequential, progress=True))
    segments = len(block_boundaries(program)) + 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[:segments] == [
        f"[sparsec]     reference outputs, segments: {k}/{segments}" for k in range(1, segments + 1)
    ]
    assert lines[segments].startswith(f"{lines[segments - 1]} done in") and len(outputs) == 3
