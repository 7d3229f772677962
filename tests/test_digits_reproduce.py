"""examples/digits/reproduce.py --quick: the files, their structure, and the dense row against the eager model."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "digits"))

import reproduce  # noqa: E402
import testbed as tb  # noqa: E402

from sparsec.models import load_model  # noqa: E402
from sparsec.moe import moe_forward  # noqa: E402, F401  (registers torch.ops.sparsec.moe)

EXPECTED = ["dense", "gen slice 0.5", "gen MoE 8/16", "gen MoE 8/16 + router adapt", "gen MoE 8/16 + full adapt",
            "und slice 0.5"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_reproduce")
    summary = reproduce.main(["--quick", "--out", str(out)])
    return out, summary


def test_writes_the_three_files_and_nothing_else(run):
    out, summary = run
    assert sorted(p.name for p in out.iterdir()) == sorted(reproduce.OUTPUT_FILES)  # the staging dir is gone
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(summary))
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == EXPECTED


def test_results_structure_and_widths(run):
    _, summary = run
    assert summary["settings"]["quick"] and summary["settings"]["per_label"] == 5
    results = {r["name"]: r for r in summary["variants"]}
    assert list(results) == EXPECTED
    width = summary["settings"]["dense_ffn_width"]
    assert {n: (r["gen_ffn_active_width"], r["und_ffn_width"]) for n, r in results.items()} == {
        "dense": (width, width),
        "gen slice 0.5": (width // 2, width),
        "gen MoE 8/16": (width // 2, width),
        "gen MoE 8/16 + router adapt": (width // 2, width),
        "gen MoE 8/16 + full adapt": (width // 2, width),
        "und slice 0.5": (width, width // 2),
    }
    for r in results.values():
        assert 0 <= r["understanding_accuracy"] <= 1 and 0 <= r["judge_accuracy"] <= 1
        assert len(r["per_label_accuracy"]) == tb.NUM_LABELS and r["frechet_distance"] > 0 and r["seconds"] > 0
        assert r["retained_generation"] == pytest.approx(r["judge_accuracy"] / results["dense"]["judge_accuracy"])
    for name in EXPECTED[2:5]:
        assert results[name]["stats"]["active_fraction"] == 0.5 and len(results[name]["routers"]) == 4
    assert results["gen MoE 8/16"].get("adaptation") is None
    assert results["gen MoE 8/16 + full adapt"]["adaptation"]


def test_dense_row_equals_the_eager_model(run):
    _, summary = run
    dense = summary["variants"][0]
    loaded = load_model(tb.WEIGHTS / "mot")
    quality = tb.generation_quality(loaded.model, tb.load_judge(), per_label=5, seed=0)
    assert dense["judge_accuracy"] == quality["judge_accuracy"]
    assert dense["per_label_accuracy"] == quality["per_label_accuracy"]
    assert dense["frechet_distance"] == pytest.approx(quality["frechet_distance"], rel=1e-6)
    assert dense["understanding_accuracy"] == tb.understanding_accuracy(loaded.model)


def test_moe_backward_with_no_tokens_routed():
    """A MoT batch without generation tokens gives the generation MoE zero tokens: backward must still run."""
    torch.manual_seed(0)
    experts, size, hidden = 4, 3, 5
    params = [torch.randn(experts, hidden, requires_grad=True), torch.randn(experts, size, hidden, requires_grad=True),
              torch.randn(experts, size, hidden, requires_grad=True), torch.randn(experts, hidden, size, requires_grad=True)]
    router, fc1, fc3, fc2 = params
    for tokens in (0, 2):
        x = torch.randn(tokens, hidden, requires_grad=True)
        out = torch.ops.sparsec.moe(x, router, None, fc1, None, fc3, None, fc2, 2, "silu", "softmax")
        (out.sum() + sum(p.sum() * 0 for p in params)).backward()
        reference = [p.grad.clone() for p in params]
        if tokens == 0:
            assert all(torch.count_nonzero(g) == 0 for g in reference)
        else:
            for p in params:
                p.grad = None
            moe_forward(x.detach(), router, None, fc1, None, fc3, None, fc2, 2, "silu", "softmax").sum().backward()
            for p, expected in zip(params, reference):
                torch.testing.assert_close(p.grad, expected)
        for p in params:
            p.grad = None
