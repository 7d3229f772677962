"""Backend parity (sparsec.data.parity): metric values computed by hand on small tensors, tolerance defaults and
overrides, failure messages, the recipe's export.parity section."""

import math

import numpy as np
import pytest
import torch

from sparsec.data import quality
from sparsec.data.parity import DEFAULT_TOLERANCES, ParityOptions, check_parity, resolve_tolerances
from sparsec.data.quality import Bounds, bound_failures, compare_outputs
from sparsec.errors import QualityError, RecipeError, SparsecError
from sparsec.recipe import Recipe


def test_error_distribution_by_hand():
    # token 0 is valid, token 1 is padding (its huge error must not count)
    ref = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]])
    cand = torch.tensor([[[1.0, 2.5, 3.0, 3.0], [9.0, 9.0, 9.0, 9.0]]])
    mask = torch.tensor([[1, 0]]).bool()
    m = compare_outputs([({"y": ref}, {"y": cand}, mask)], percentiles=[50, 75, 100])["y"]
    # abs errors 0, 0.5, 0, 1; rel errors (|ref| far above the 1e-3 * rms floor) 0, 0.25, 0, 0.25
    assert m["tokens"] == 1 and m["percentile_entries"] == 4
    assert m["max_abs"] == 1.0 and m["mean_abs"] == pytest.approx(0.375)
    assert m["p50_abs"] == pytest.approx(0.25) and m["p75_abs"] == pytest.approx(0.625) and m["p100_abs"] == 1.0
    assert m["max_rel"] == pytest.approx(0.25) and m["mean_rel"] == pytest.approx(0.125)
    assert m["p50_rel"] == pytest.approx(0.125) and m["p100_rel"] == pytest.approx(0.25)
    assert m["rel_l2"] == pytest.approx(math.sqrt(1.25) / math.sqrt(30))
    cos = (1 + 5 + 9 + 12) / (math.sqrt(30) * math.sqrt(1 + 6.25 + 9 + 9))
    assert m["cosine"] == pytest.approx(cos)


def test_relative_error_floor_where_the_reference_crosses_zero():
    ref = torch.tensor([[3.0, -4.0, 0.0, 0.0]])  # rms 2.5: floor 2.5e-3
    cand = torch.tensor([[3.0, -4.0, 5e-3, 0.0]])
    m = compare_outputs([({"y": ref}, {"y": cand}, None)], percentiles=[50])["y"]
    assert m["max_rel"] == pytest.approx(5e-3 / 2.5e-3)  # 2.0, not infinite
    assert m["mean_rel"] == pytest.approx(0.5)


def test_masked_out_logits_leave_the_distribution_and_top1_is_counted():
    low = torch.finfo(torch.float32).min
    ref = torch.tensor([[[1.0, 3.0, low], [2.0, 1.0, low]]])
    cand = torch.tensor([[[1.5, 3.0, low], [2.0, 2.5, low]]])  # token 1's argmax flips
    m = compare_outputs([({"logits": ref}, {"logits": cand}, None)], percentiles=[50])["logits"]
    assert m["percentile_entries"] == 4 and m["max_abs"] == 1.5 and m["top1"] == 0.5
    assert m["p50_abs"] == pytest.approx(0.25)


def test_percentiles_of_a_large_output_come_from_a_uniform_sample(monkeypatch):
    monkeypatch.setattr(quality, "PERCENTILE_SAMPLES", 2000)
    generator = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(5):  # 5 batches of 4000 entries, errors uniform in [0, 1)
        ref = torch.ones(1, 1000, 4)
        pairs.append(({"y": ref}, {"y": ref + torch.rand(1, 1000, 4, generator=generator)}, None))
    m = compare_outputs(pairs, percentiles=[50, 90])["y"]
    assert m["percentile_entries"] == 2000
    assert m["p50_abs"] == pytest.approx(0.5, abs=0.04) and m["p90_abs"] == pytest.approx(0.9, abs=0.03)
    assert m["max_abs"] > 0.999  # exact, not sampled
    assert m["mean_abs"] == pytest.approx(0.5, abs=0.01)


def test_default_tolerances_follow_precision_and_recipe_entries_override_in_order():
    assert resolve_tolerances("fp32", Bounds(), ["logits"]) == {"logits": DEFAULT_TOLERANCES["fp32"]}
    fp16, bf16 = DEFAULT_TOLERANCES["fp16"], DEFAULT_TOLERANCES["bf16"]
    assert DEFAULT_TOLERANCES["fp32"]["rel_l2"] < fp16["rel_l2"] < bf16["rel_l2"]
    assert DEFAULT_TOLERANCES["fp32"]["cosine"] > fp16["cosine"] > bf16["cosine"]
    options = ParityOptions(
        tolerances={"*": {"cosine": 0.9995, "p99_abs": 0.1}, "logits": {"p99_abs": 0.01, "top1": None}}
    )
    got = resolve_tolerances("fp16", options.bounds(), ["logits", "hidden"])
    assert got["logits"] == {"cosine": 0.9995, "rel_l2": 1e-2, "p99_abs": 0.01}
    assert got["hidden"] == {"cosine": 0.9995, "rel_l2": 1e-2, "top1": 0.95, "p99_abs": 0.1}
    with pytest.raises(SparsecError, match=r"tolerances.logitz: matches no output of the program \['logits'\]"):
        resolve_tolerances("fp32", ParityOptions(tolerances={"logitz": {"max_abs": 1.0}}).bounds(), ["logits"])


def test_failures_name_output_metric_value_and_bound():
    metrics = {
        "logits": {"cosine": 0.998, "rel_l2": 0.02, "top1": 1.0, "p99_abs": 0.5},
        "hidden": {"cosine": 0.99999, "rel_l2": float("nan")},
    }
    tolerances = {
        "logits": {"cosine": 0.999, "rel_l2": 0.01, "top1": 0.95, "p99_abs": 0.1},
        "hidden": {"cosine": 0.999, "rel_l2": 0.01, "top1": 0.95},
    }
    assert bound_failures(metrics, tolerances) == [
        "logits: cosine 0.998 < 0.999",
        "logits: rel_l2 0.02 > 0.01",
        "logits: p99_abs 0.5 > 0.1",
        "hidden: rel_l2 nan > 0.01",
    ]  # top1 skipped on hidden


def test_check_parity_passes_within_and_raises_beyond_the_tolerances():
    ref = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 5, dtype=torch.bool)
    near = ref + 1e-4 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    report = check_parity(
        [({"logits": ref}, {"logits": near}, mask)],
        backend="test",
        precision="fp16",
        options=ParityOptions(percentiles=[99]),
    )
    assert report["tolerances"]["logits"] == DEFAULT_TOLERANCES["fp16"] and report["precision"] == "fp16"
    assert 1e-5 < report["metrics"]["logits"]["rel_l2"] < 1e-3 and "p99_rel" in report["metrics"]["logits"]
    with pytest.raises(QualityError, match=r"test \(fp32\) differs .*logits: p99_abs [0-9.e-]+ > 1e-06"):
        check_parity(
            [({"logits": ref}, {"logits": near}, mask)],
            backend="test",
            precision="fp32",
            options=ParityOptions(percentiles=[99], tolerances={"logits": {"p99_abs": 1e-6}}),
        )


@pytest.mark.parametrize(
    "parity, message",
    [
        ({"min_cosine": 0.9}, "export.parity: unknown option(s) ['min_cosine']"),
        (
            {"tolerances": {"logits": {"p95_abs": 1.0}}},
            "export.parity.tolerances.logits.p95_abs: unknown metric; bounds name one of",
        ),
        ({"tolerances": {"logits": {"min_cosine": 1.0}}}, "export.parity.tolerances.logits.min_cosine: unknown metric"),
        ({"tolerances": {"logits": {"max_abs": -1.0}}}, "export.parity.tolerances.logits.max_abs: must be >= 0"),
        ({"percentiles": [50, 101]}, "export.parity.percentiles: each must be in [0, 100], got [101.0]"),
        (
            {"tolerances": {"logits": {"max_abs": "tight"}}},
            "export.parity.tolerances.logits.max_abs: expected float | null",
        ),
    ],
)
def test_recipe_parity_section_is_validated(parity, message):
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict({"export": {"parity": parity}})
    assert message in str(info.value)


def test_recipe_parity_section_parses():
    recipe = Recipe.from_dict(
        {
            "export": {
                "precision": "bf16",
                "parity": {
                    "samples": 4,
                    "percentiles": [50, 99.9],
                    "tolerances": {"logits": {"p99.9_rel": 0.5, "top1": None}},
                },
            }
        }
    )
    assert recipe.export.precision == "bf16" and recipe.export.parity.percentiles == [50.0, 99.9]
    assert recipe.export.parity.tolerances == {"logits": {"p99.9_rel": 0.5, "top1": None}}
    with pytest.raises(
        RecipeError, match=r"export.precision: 'fp8' is not allowed; choose one of \['fp32', 'fp16', 'bf16'\]"
    ):
        Recipe.from_dict({"export": {"precision": "fp8"}})


def test_percentile_names_match_numpy():
    values = np.array([0.0, 1.0, 2.0, 10.0])
    ref = torch.zeros(1, 4) + 100.0
    m = compare_outputs(
        [({"y": ref}, {"y": ref + torch.tensor(values, dtype=torch.float32)}, None)], percentiles=[99.9]
    )["y"]
    assert m["p99.9_abs"] == pytest.approx(float(np.percentile(values, 99.9)))


def test_an_fp16_backends_clamped_mask_counts_as_masked_and_equal_zero_vectors_as_identical():
    low = torch.finfo(torch.float32).min
    ref = torch.tensor([[[1.0, 3.0, low], [0.0, 0.0, 0.0]]])
    fp16_backend = torch.tensor([[[1.0, 3.0, -65504.0], [0.0, 0.0, 0.0]]])
    m = compare_outputs([({"logits": ref}, {"logits": fp16_backend}, None)])["logits"]
    assert m["cosine"] == 1.0 and m["max_abs"] == 0.0 and m["rel_l2"] == 0.0
    unmasked = torch.tensor([[[1.0, 3.0, -65504.0], [0.0, 0.0, 0.0]]])
    m = compare_outputs([({"logits": torch.tensor([[[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]]])}, {"logits": unmasked}, None)])
    assert m["logits"]["max_abs"] == 65504.0  # where the reference does not mask, -65504 is an error
