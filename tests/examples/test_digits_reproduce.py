"""examples/digits/reproduce.py --quick: the files, their structure, the dense row and the sweep against the eager model."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "digits"))

import reproduce  # noqa: E402
import testbed as tb  # noqa: E402

from sparsec.models import load_model  # noqa: E402
from sparsec.ops.moe import moe_forward  # noqa: E402, F401  (registers torch.ops.sparsec.moe)

EXPECTED = [
    "dense",
    "gen slice 0.5",
    "gen slice 0.5 + fine-tune",
    "gen MoE 8/16",
    "gen MoE 8/16 + router adapt",
    "gen MoE 8/16 + full adapt",
    "gen MoE shared + 4/12 + full adapt",
    "und slice 0.5",
    "gen slice 0.25 + fine-tune",
    "gen MoE 4/16 + full adapt",
]
SWEEP = [(c, k) for c in ("understanding", "generation") for k in ("depth", "width")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_reproduce")
    summary = reproduce.main(["--quick", "--out", str(out)])
    return out, summary


@pytest.fixture(scope="module")
def loaded():
    return load_model(tb.WEIGHTS / "mot")


def _rows(table: str, header: str) -> list[list[str]]:
    section = table.split(header, 1)[1].split("\n## ", 1)[0]
    return [
        line.strip("| ").split(" | ")
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith(("| variant", "| compress"))
    ]


def test_writes_the_four_files_and_nothing_else(run):
    out, summary = run
    assert sorted(p.name for p in out.iterdir()) == sorted(reproduce.OUTPUT_FILES)  # the staging dir is gone
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(summary))
    for png in ("sweep.png", "variants.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert [row[0] for row in _rows(table, "## Variants")] == EXPECTED
    assert [tuple(row[:2]) for row in _rows(table, "## Sweep")] == [("-", "-"), *SWEEP]


def test_variants_structure_and_widths(run):
    _, summary = run
    assert (
        summary["settings"]["quick"] and summary["settings"]["per_label"] == 5 and summary["settings"]["seeds"] == [0]
    )
    results = {r["name"]: r for r in summary["variants"]}
    assert list(results) == EXPECTED
    width = summary["settings"]["dense_ffn_width"]
    assert {n: (r["gen_ffn_active_width"], r["und_ffn_width"]) for n, r in results.items()} == {
        "dense": (width, width),
        "gen slice 0.5": (width // 2, width),
        "gen slice 0.5 + fine-tune": (width // 2, width),
        "gen MoE 8/16": (width // 2, width),
        "gen MoE 8/16 + router adapt": (width // 2, width),
        "gen MoE 8/16 + full adapt": (width // 2, width),
        "gen MoE shared + 4/12 + full adapt": (width // 2, width),
        "und slice 0.5": (width, width // 2),
        "gen slice 0.25 + fine-tune": (width // 4, width),
        "gen MoE 4/16 + full adapt": (width // 4, width),
    }
    for r in results.values():
        assert 0 <= r["understanding_accuracy"] <= 1 and 0 <= r["judge_accuracy"] <= 1 and r["frechet_distance"] > 0
        [seed] = r["per_seed"]
        assert seed["seed"] == 0 and len(seed["per_label_accuracy"]) == tb.NUM_LABELS
        assert r["judge_accuracy"] == seed["judge_accuracy"] and r["frechet_distance"] == seed["frechet_distance"]
        assert r["retained_generation"] == pytest.approx(r["judge_accuracy"] / results["dense"]["judge_accuracy"])
    for name in (
        "gen MoE 8/16",
        "gen MoE 8/16 + router adapt",
        "gen MoE 8/16 + full adapt",
        "gen MoE shared + 4/12 + full adapt",
    ):
        assert results[name]["stats"]["active_fraction"] == 0.5 and len(results[name]["routers"]) == 4
    assert results["gen MoE 8/16"].get("adaptation") is None
    assert results["gen MoE 4/16 + full adapt"]["stats"]["active_fraction"] == 0.25
    for name in (
        "gen MoE 8/16 + full adapt",
        "gen MoE shared + 4/12 + full adapt",
        "gen slice 0.5 + fine-tune",
        "gen slice 0.25 + fine-tune",
        "gen MoE 4/16 + full adapt",
    ):
        assert results[name]["adaptation"]["steps"] == summary["settings"]["adapt_steps"]
    tuned = results["gen slice 0.5 + fine-tune"]["adaptation"]
    assert tuned["loss_after"] < tuned["loss_before"]  # the distillation trained the sliced FFNs


def test_dense_row_equals_the_eager_model(run, loaded):
    _, summary = run
    dense = summary["variants"][0]
    assert dense["per_seed"] == summary["dense"]["per_seed"]
    quality = tb.generation_quality(loaded.model, tb.load_judge(), per_label=5, seed=0)
    [seed] = dense["per_seed"]
    assert seed["judge_accuracy"] == quality["judge_accuracy"]
    assert seed["per_label_accuracy"] == quality["per_label_accuracy"]
    assert seed["frechet_distance"] == pytest.approx(quality["frechet_distance"], rel=1e-6)
    assert dense["understanding_accuracy"] == tb.understanding_accuracy(loaded.model)


def test_sweep_points_are_the_probe_compressions(run, loaded):
    """Each sweep point scores the model the probe describes: depth points skip the named layers for that
    component's tokens only; width points keep the reported number of neurons; understanding scores are those
    of the eager model with the same layers skipped by hand."""
    _, summary = run
    rows = {(r["component"], r["kind"]): r for r in summary["sweep"]}
    assert list(rows) == SWEEP
    layers = loaded.model.config.num_hidden_layers
    for component in ("understanding", "generation"):
        skipped = rows[(component, "depth")]["skipped_blocks"]
        assert len(skipped) == round(0.5 * layers) and rows[(component, "depth")]["actual_ratio"] == 0.5
        widths = rows[(component, "width")]["kept_width"]
        suffix = "mlp" if component == "understanding" else "mlp_moe_gen"
        assert sorted(widths) == [f"model.layers.{i}.{suffix}" for i in range(layers)]
        assert set(widths.values()) == {loaded.model.config.intermediate_size // 2}
    # the probe's sparsity overlap: generation FFNs run on generation tokens only
    sparsity = {e["ffn"]: e for e in summary["sparsity"]}
    assert len(sparsity) == 2 * layers
    for i in range(layers):
        gen = sparsity[f"model.layers.{i}.mlp_moe_gen"]
        assert gen["component"] == "generation" and "understanding" not in gen["within"]
        assert 0 < gen["within"]["generation"] <= 1
    # compressing one component leaves the other task's tokens alone: generation width and depth do not touch
    # understanding sequences (all understanding tokens), so their accuracy is the dense one exactly
    dense = summary["dense"]["understanding_accuracy"]
    assert rows[("generation", "depth")]["understanding_accuracy"] == dense
    assert rows[("generation", "width")]["understanding_accuracy"] == dense
    # an understanding sequence skips the same layers in the eager model by hand
    skipped = {int(p.split(".")[2]) for p in rows[("understanding", "depth")]["skipped_blocks"]}
    model = loaded.model
    kept_layers = torch.nn.ModuleList(layer for i, layer in enumerate(model.model.layers) if i not in skipped)
    full_layers, model.model.layers = model.model.layers, kept_layers
    try:
        by_hand = tb.understanding_accuracy(model)
    finally:
        model.model.layers = full_layers
    assert rows[("understanding", "depth")]["understanding_accuracy"] == pytest.approx(by_hand, abs=1e-9)


def test_moe_backward_with_no_tokens_routed():
    """A MoT batch without generation tokens gives the generation MoE zero tokens: backward must still run."""
    torch.manual_seed(0)
    experts, size, hidden = 4, 3, 5
    params = [
        torch.randn(experts, hidden, requires_grad=True),
        torch.randn(experts, size, hidden, requires_grad=True),
        torch.randn(experts, size, hidden, requires_grad=True),
        torch.randn(experts, hidden, size, requires_grad=True),
    ]
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
