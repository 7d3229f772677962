"""Calibration inputs and statistics, quality metrics, checked against direct computation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs
from safetensors.torch import save_file

from sparsec.analysis.regions import region_index
from sparsec.data.calibration import CalibrationSet, StatisticsCache, load_calibration
from sparsec.data.quality import Bounds, QualityGates, compare_outputs
from sparsec.errors import CalibrationError, SparsecError
from sparsec.testing import save_word_tokenizer


def test_files_load_and_are_checked(tmp_path):
    ids = torch.randint(0, 100, (5, 7))
    save_file({"input_ids": ids}, str(tmp_path / "c.safetensors"))
    calib = load_calibration(tmp_path / "c.safetensors", input_names=["input_ids", "attention_mask"], batch_size=2)
    assert torch.equal(calib.inputs["input_ids"], ids) and calib.inputs["attention_mask"].sum() == 35
    assert [len(b["input_ids"]) for b in calib.batches()] == [2, 2, 1]
    np.savez(tmp_path / "c.npz", input_ids=ids.numpy().astype(np.int32))
    assert load_calibration(tmp_path / "c.npz", input_names=["input_ids"]).inputs["input_ids"].dtype == torch.long
    with pytest.raises(CalibrationError, match=r"lacks model input\(s\) \['pixel_values'\]"):
        load_calibration(tmp_path / "c.npz", input_names=["input_ids", "pixel_values"])
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration(tmp_path / "nope.safetensors", input_names=["input_ids"])
    with pytest.raises(CalibrationError, match="needs the model's tokenizer"):
        (tmp_path / "t.txt").write_text("hello\n")
        load_calibration(tmp_path / "t.txt", input_names=["input_ids"], tokenizer_dir=tmp_path)
    with pytest.raises(CalibrationError, match="zero samples"):
        CalibrationSet({"input_ids": ids[:0]}, source="empty")


def test_statistics_match_direct_computation_on_valid_tokens(captured):
    model, program = captured("tiny-qwen2")
    inputs = make_inputs(model, 6, 10, seed=7, pad_left=4)
    calib = CalibrationSet(inputs, source="test", batch_size=4)
    ffn = region_index(program).ffns()[1]
    hidden = ffn.down.args[0]  # the FFN's intermediate activation h (one value per neuron)
    cache = StatisticsCache(program, calib)
    stats = cache.get([hidden])[hidden.name]

    captured_h = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, o: captured_h.append(a[0]))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    h = captured_h[0][inputs["attention_mask"].bool()]
    assert stats.tokens == int(inputs["attention_mask"].sum())
    torch.testing.assert_close(stats.mean_abs, h.abs().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.max_abs, h.abs().amax(0), rtol=1e-5, atol=1e-6)
    # cached: asking again (or for a subset) runs no extra forward pass; a graph change invalidates
    cache.get([hidden])
    assert cache.passes_run == 1
    program.recompile()
    cache.get([hidden])
    assert cache.passes_run == 2


def test_metrics_against_hand_computation():
    torch.manual_seed(0)
    ref = torch.randn(2, 5, 11)
    cand = ref + 0.1 * torch.randn(2, 5, 11)
    cand[1, 0] = ref[1, 0] * -1  # a valid token pointing the other way
    cand[0, 0] = 1e3  # a padded position: must not count
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 0] = False
    m = compare_outputs([({"logits": ref}, {"logits": cand}, mask)])["logits"]
    r, c = ref[mask].double(), cand[mask].double()
    assert m["tokens"] == 9
    assert m["cosine"] == pytest.approx(float(F.cosine_similarity(r, c, dim=-1).mean()), rel=1e-9)
    assert m["rel_l2"] == pytest.approx(float((c - r).norm() / r.norm()), rel=1e-9)
    assert m["top1"] == pytest.approx(float((r.argmax(-1) == c.argmax(-1)).double().mean()))
    kl = F.kl_div(F.log_softmax(c, -1), F.log_softmax(r, -1), log_target=True, reduction="sum") / 9
    assert m["kl"] == pytest.approx(float(kl), rel=1e-9)
    assert m["max_abs"] < 1e2


def test_gates():
    metrics = {"logits": {"cosine": 0.95, "top1": 0.97, "rel_l2": 0.2, "kl": 0.01}}
    assert QualityGates(min_cosine=0.9, min_top1=0.9, max_kl=0.1).failures(metrics) == []
    failures = QualityGates(min_cosine=0.99, max_rel_l2=0.1).failures(metrics)
    assert failures == ["logits: cosine 0.95 < 0.99", "logits: rel_l2 0.2 > 0.1"]


def test_gates_per_output_are_bounds_over_the_global_gates():
    metrics = {
        "logits": {"cosine": 0.95, "top1": 0.97, "rel_l2": 0.2, "kl": 0.01},
        "hidden": {"cosine": 0.9, "rel_l2": 0.3},
    }
    gates = QualityGates(min_cosine=0.99, outputs={"hidden": {"cosine": None, "rel_l2": 0.5}, "logits": {"top1": 0.98}})
    assert gates.bounds().resolve(list(metrics)) == {
        "logits": {"cosine": 0.99, "top1": 0.98},
        "hidden": {"rel_l2": 0.5},
    }
    assert gates.failures(metrics) == ["logits: cosine 0.95 < 0.99", "logits: top1 0.97 < 0.98"]
    assert QualityGates(min_cosine=0.99, outputs={"*": {"cosine": 0.9}}).failures(metrics) == []
    with pytest.raises(
        SparsecError, match=r"quality.outputs.logitz: matches no output of the program \['logits', 'hidden'\]"
    ):
        QualityGates(outputs={"logitz": {"top1": 0.9}}).failures(metrics)


def test_text_calibration_uses_the_model_directory_tokenizer(tmp_path):
    save_word_tokenizer(tmp_path, ["[PAD]", "[UNK]", "the", "cat", "sat", "down"])
    (tmp_path / "c.jsonl").write_text('{"text": "the cat sat"}\n{"text": "the dog sat down now"}\n{"text": "x"}\n')
    calib = load_calibration(
        tmp_path / "c.jsonl", input_names=["input_ids", "attention_mask"], tokenizer_dir=tmp_path, samples=2, seq_len=4
    )
    assert calib.inputs["input_ids"].tolist() == [[2, 3, 4, 0], [2, 1, 4, 5]]
    assert calib.inputs["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl:1: expected a JSON object with a 'text' field"):
        load_calibration(tmp_path / "bad.jsonl", input_names=["input_ids"], tokenizer_dir=tmp_path)


def test_metrics_do_not_depend_on_the_chunking(monkeypatch):
    """Outputs are compared a few tokens at a time (bounded memory): the result equals the one-chunk result."""
    from sparsec.data import quality

    torch.manual_seed(1)
    ref = torch.randn(3, 7, 13)
    cand = ref + 0.05 * torch.randn(3, 7, 13)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, :2] = False
    whole = compare_outputs([({"logits": ref}, {"logits": cand}, mask)], percentiles=[50, 99])["logits"]
    monkeypatch.setattr(quality, "CHUNK_ENTRIES", 13 * 2)  # two tokens per chunk
    chunked = compare_outputs([({"logits": ref}, {"logits": cand}, mask)], percentiles=[50, 99])["logits"]
    assert chunked.keys() == whole.keys()
    for key, value in whole.items():
        assert chunked[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def test_bounds_select_outputs_with_the_module_path_glob_dialect():
    bounds = Bounds({"*": {"cosine": 0.9}, "vision.**": {"rel_l2": 0.1}})
    assert bounds.resolve(["logits", "vision.hidden"]) == {"logits": {"cosine": 0.9}, "vision.hidden": {"rel_l2": 0.1}}
    with pytest.raises(ValueError, match=r"bounds.\*.cosin: unknown metric"):
        Bounds({"*": {"cosin": 0.9}})


def test_one_rule_says_whether_a_directory_holds_a_tokenizer(tmp_path):
    """The compile's tokenizer copy and the text-calibration check ask the same question: config.json alone is no
    tokenizer; a slow BPE tokenizer's vocab.json + merges.txt is one, as is a tokenizer.json."""
    from sparsec.data.calibration import tokenizer_files

    assert tokenizer_files(None) == [] and tokenizer_files(tmp_path) == []
    (tmp_path / "config.json").write_text("{}")
    assert tokenizer_files(tmp_path) == []
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("")
    assert tokenizer_files(tmp_path) == ["config.json", "vocab.json", "merges.txt"]


def test_max_ppl_ratio_is_a_bound_on_the_logits_ppl_ratio_beside_the_agreement_gates():
    gates = QualityGates(min_cosine=0.99, max_ppl_ratio=1.1, outputs={"logits": {"kl": 0.5}})
    assert gates.describe()["bounds"] == {"*": {"cosine": 0.99}, "logits": {"kl": 0.5, "ppl_ratio": 1.1}}
    metrics = {"logits": {"cosine": 0.995, "kl": 0.1, "ppl_ratio": 1.2}, "hidden": {"cosine": 0.999}}
    assert gates.failures(metrics) == ["logits: ppl_ratio 1.2 > 1.1"]
    assert gates.failures({**metrics, "logits": {**metrics["logits"], "ppl_ratio": 1.1}}) == []
    assert gates.failures({**metrics, "logits": {**metrics["logits"], "ppl_ratio": float("nan")}}) == [
        "logits: ppl_ratio nan > 1.1"
    ]
    assert QualityGates(max_ppl_ratio=1.05).bounds_set()
    with pytest.raises(ValueError, match="max_ppl_ratio: must be >= 1"):
        QualityGates(max_ppl_ratio=0.95)
    with pytest.raises(ValueError, match="gates: off, yet bounds are set"):
        QualityGates(gates=False, max_ppl_ratio=1.1)
