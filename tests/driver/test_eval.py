"""`sparsec eval`: perplexity of artifacts and models on a text against a hand computation on the Hugging Face
model, agreement with a baseline, lm-eval task accuracy through the artifact against lm-eval's own `hf` backend,
and bad input refused with exit 2."""

import hashlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model

from sparsec.cli import main
from sparsec.compiler import compile_model
from sparsec.recipe import Recipe
from sparsec.testing import save_word_tokenizer

pytestmark = pytest.mark.slow  # compiles (ONNX export) once per module

ROOT = Path(__file__).resolve().parents[2]
TASKS_DIR = ROOT / "examples" / "eval_tasks"
WORDS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", *"abcdefghijklmnopqrstuvwxyz", "the", "cat", "sat", "on", "mat", "dog"]
WORDS += ["ran", "far", "and", "a", "home", "then", "end", "blue", "sky", "sun", "is", "what", "question", "answer"]
# Lines of 3 to 14 words: with --seq-len 12 the longest are truncated; with --batch-size 2 the rest are padded.
TEXT = [
    "the cat sat on the mat",
    "the dog ran far and the cat sat on the mat then the dog ran home",
    "",
    "a blue sky",
    "what is the sun then the end",
    "the cat and the dog and the mat and the sky is blue",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen2 `save_pretrained` directory with a word-level tokenizer that adds BOS, saved beside it."""
    directory = tmp_path_factory.mktemp("eval") / "model"
    make_model("tiny-qwen2", seed=3).save_pretrained(directory)
    save_word_tokenizer(directory, WORDS, bos="[BOS]", eos="[EOS]")
    (directory.parent / "text.txt").write_text("\n".join(TEXT) + "\n")
    return directory


@pytest.fixture(scope="module")
def dense(model_dir):
    out = model_dir.parent / "dense"
    compile_model(model_dir, Recipe(), out, calib=model_dir.parent / "text.txt", progress=False)
    return out


@pytest.fixture(scope="module")
def sliced(model_dir):
    out = model_dir.parent / "sliced"
    recipe = {"passes": [{"slice_neurons": {"keep_ratio": 0.5}}], "quality": {"gates": False}}
    compile_model(model_dir, Recipe.from_dict(recipe), out, progress=False)
    return out


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def hand_nll(model_dir, samples: list[list[int]]) -> tuple[float, int]:
    """(summed negative log-likelihood, predicted tokens) of the Hugging Face model: each sample alone, unpadded,
    log-softmax in float64 at every position but the last, gathered at the next token."""
    model = make_model("tiny-qwen2", seed=3).eval()
    nll, tokens = 0.0, 0
    for sample in samples:
        ids = torch.tensor([sample])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        nll -= float(logp[torch.arange(len(sample) - 1), ids[0, 1:]].sum())
        tokens += len(sample) - 1
    return nll, tokens


def _eval(capsys, *argv) -> dict:
    assert main(["eval", *argv, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def test_perplexity_equals_a_hand_computation_on_every_runtime(model_dir, dense, capsys):
    text = model_dir.parent / "text.txt"
    tok = _tokenizer(model_dir)
    lines = [line for line in TEXT if line.strip()]
    samples = [tok(line, truncation=True, max_length=12)["input_ids"] for line in lines]
    assert all(s[0] == tok.bos_token_id for s in samples) and max(len(s) for s in samples) == 12  # truncated
    nll, tokens = hand_nll(model_dir, samples)
    expected = math.exp(nll / tokens)

    common = ["--text", str(text), "--seq-len", "12", "--batch-size", "2"]
    runs = {
        "onnxruntime": _eval(capsys, "--artifact", str(dense), *common),
        "pytorch": _eval(capsys, "--artifact", str(dense), "--target", "pytorch", *common),
        "hf": _eval(capsys, "--model", str(model_dir), *common),
    }
    for name, result in runs.items():
        assert result["tokens"] == tokens, name
        assert result["loss"] == pytest.approx(nll / tokens, rel=1e-5), name
        assert result["perplexity"] == pytest.approx(expected, rel=1e-5), name
    protocol = runs["onnxruntime"]["protocol"]
    assert protocol["protocol"] == "lines" and protocol["adds_bos"] is True and protocol["seq_len"] == 12
    assert protocol["samples"] == len(lines) and protocol["predicted_tokens"] == tokens
    assert protocol["text_sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert protocol["tokenizer"] == str(dense / "tokenizer")  # the artifact's own copy
    assert runs["onnxruntime"]["model"]["target"] == "onnxruntime" and runs["pytorch"]["model"]["target"] == "pytorch"
    assert runs["hf"]["perplexity"] == pytest.approx(runs["pytorch"]["perplexity"], rel=1e-6)

    again = _eval(capsys, "--artifact", str(dense), *common)  # the same protocol: the same number, exactly
    assert again["perplexity"] == runs["onnxruntime"]["perplexity"] and again["protocol"] == protocol
    assert {"tokenize_s", "load_s", "perplexity_s", "tokens_per_second"} <= set(again["timings"])


def test_windows_protocol_cuts_the_whole_text_with_a_bos_per_window(model_dir, dense, capsys):
    text = model_dir.parent / "text.txt"
    tok = _tokenizer(model_dir)
    flat = tok(text.read_text(), add_special_tokens=False)["input_ids"]
    windows = [[tok.bos_token_id, *flat[i : i + 7]] for i in range(0, len(flat), 7)]  # seq-len 8 with BOS first
    nll, tokens = hand_nll(model_dir, windows)
    result = _eval(capsys, "--artifact", str(dense), "--text", str(text), "--protocol", "windows", "--seq-len", "8")
    assert result["protocol"]["samples"] == len(windows) > 3 and result["tokens"] == tokens
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_baseline_agreement(model_dir, dense, sliced, capsys):
    text = str(model_dir.parent / "text.txt")
    same = _eval(capsys, "--artifact", str(dense), "--baseline", str(dense), "--text", text, "--seq-len", "12")
    logits = same["baseline"]["outputs"]["logits"]
    assert logits["kl"] == pytest.approx(0.0, abs=1e-12) and logits["top1"] == 1.0 and logits["cosine"] == 1.0
    assert same["baseline"]["perplexity_ratio"] == 1.0 and same["perplexity"] == same["baseline"]["perplexity"]

    apart = _eval(capsys, "--artifact", str(sliced), "--baseline", str(dense), "--text", text, "--seq-len", "12")
    alone = [_eval(capsys, "--artifact", str(d), "--text", text, "--seq-len", "12") for d in (sliced, dense)]
    assert apart["perplexity"] == pytest.approx(alone[0]["perplexity"], rel=1e-6)
    assert apart["baseline"]["perplexity"] == pytest.approx(alone[1]["perplexity"], rel=1e-6)
    assert apart["baseline"]["perplexity_ratio"] == pytest.approx(alone[0]["perplexity"] / alone[1]["perplexity"])
    sliced_logits = apart["baseline"]["outputs"]["logits"]
    assert sliced_logits["kl"] > 1e-4 and sliced_logits["cosine"] < 1.0
    assert sliced_logits["tokens"] == alone[0]["protocol"]["predicted_tokens"] + alone[0]["protocol"]["samples"]

    assert main(["eval", "--artifact", str(sliced), "--baseline", str(dense), "--text", text, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "protocol   lines: one sample per non-empty line, truncated to 512 tokens" in printed
    assert "agreement  logits: kl" in printed and "artifact / baseline" in printed


def _bad(capsys, *argv) -> str:
    assert main(["eval", *argv]) == 2
    return capsys.readouterr().err


def test_bad_inputs_exit_2_before_work(model_dir, dense, tmp_path, capsys, monkeypatch):
    text = str(model_dir.parent / "text.txt")
    err = _bad(capsys, "--artifact", str(dense), "--text", str(tmp_path / "absent.txt"))
    assert "--text" in err and "absent.txt does not exist" in err
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert "holds no text" in _bad(capsys, "--artifact", str(dense), "--text", str(tmp_path / "empty.txt"))
    err = _bad(capsys, "--model", "builtin:tiny-qwen2", "--text", text)
    assert "has no tokenizer" in err and "--tokenizer DIR" in err
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.onnx", "report.json"):
        (bare / name).write_bytes((dense / name).read_bytes())
    err = _bad(capsys, "--artifact", str(bare), "--text", text)
    assert f"the artifact {bare} has no tokenizer" in err and "--tokenizer DIR" in err
    assert "nothing to evaluate" in _bad(capsys, "--artifact", str(dense))
    err = _bad(capsys, "--artifact", str(tmp_path / "nope"), "--text", text)
    assert "is not a directory" in err

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` fails as where it is not installed
    err = _bad(capsys, "--artifact", str(dense), "--tasks", "sparsec_tiny_mc")
    assert 'which is not installed: pip install -e ".[eval]"' in err


def test_a_multi_program_output_needs_an_entry(tmp_path, capsys):
    out = tmp_path / "multi"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"entry_points": {"understanding": {}, "generation_step": {}}}))
    err = _bad(capsys, "--artifact", str(out), "--text", __file__)
    assert "one program per entry point (understanding, generation_step)" in err
    assert "choose one with --entry NAME (e.g. --entry understanding)" in err
    assert "--entry 'other'" in _bad(capsys, "--artifact", str(out), "--entry", "other", "--text", __file__)


def test_unknown_task_lists_the_local_ones(dense, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")
    err = _bad(capsys, "--artifact", str(dense), "--tasks", "no_such_task", "--tasks-dir", str(TASKS_DIR))
    assert "unknown task(s) ['no_such_task']" in err and "defines ['sparsec_tiny_mc']" in err


def test_lm_eval_backend_matches_the_hf_backend(model_dir, dense, capsys):
    """The same local multiple-choice task through the artifact (ONNX Runtime) and through lm-eval's own `hf`
    backend on the model directory: the same accuracy and the same per-item loglikelihoods."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")
    from lm_eval import simple_evaluate

    from sparsec.evaluation import load_artifact_lm, load_tokenizer
    from sparsec.harness import make_lm, run_tasks, task_manager

    pytest.importorskip("accelerate", reason="lm-eval's hf backend, the reference here, needs accelerate")
    manager = task_manager(["sparsec_tiny_mc"], TASKS_DIR)
    lm = make_lm(
        load_artifact_lm(dense, "onnxruntime", ("input_ids", "attention_mask")),
        load_tokenizer(dense / "tokenizer"),
        max_length=64,
        batch_size=3,
    )
    ours = run_tasks(lm, ["sparsec_tiny_mc"], manager, limit=12)
    theirs = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "device": "cpu", "dtype": "float32"},
        tasks=["sparsec_tiny_mc"],
        task_manager=manager,
        limit=12,
        bootstrap_iters=0,
    )
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["sparsec_tiny_mc"][metric] == theirs["results"]["sparsec_tiny_mc"][metric]
    mine = [[r[0][0] for r in s["resps"]] for s in ours["samples"]["sparsec_tiny_mc"]]
    reference = [[r[0][0] for r in s["resps"]] for s in theirs["samples"]["sparsec_tiny_mc"]]
    assert len(mine) == 12 and all(len(item) == 4 for item in mine)
    assert len({round(v, 3) for item in mine for v in item}) > 12  # distinct scores: a real comparison
    torch.testing.assert_close(torch.tensor(mine), torch.tensor(reference), rtol=1e-4, atol=1e-4)

    result = _eval(
        capsys, "--artifact", str(dense), "--tasks", "sparsec_tiny_mc", "--tasks-dir", str(TASKS_DIR), "--limit", "12"
    )
    assert result["tasks"]["results"]["sparsec_tiny_mc"]["acc,none"] == ours["results"]["sparsec_tiny_mc"]["acc,none"]


def test_greedy_generation_and_rolling_loglikelihood(model_dir, dense):
    """`generate_until` (greedy by full recompute) equals the Hugging Face model's own greedy `generate`;
    `loglikelihood_rolling` over one window equals the hand computation: every token of the encoded text (BOS
    included, as lm-eval's `hf` backend scores it) predicted after lm-eval's prefix token."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")
    from lm_eval.api.instance import Instance

    from sparsec.evaluation import load_artifact_lm, load_tokenizer
    from sparsec.harness import make_lm

    tok = load_tokenizer(dense / "tokenizer")
    lm = make_lm(
        load_artifact_lm(dense, "onnxruntime", ("input_ids", "attention_mask")), tok, max_length=64, batch_size=2
    )
    context = "the cat sat on"
    request = Instance("generate_until", {}, (context, {"until": ["[EOS]"], "max_gen_toks": 6}), 0)
    [text] = lm.generate_until([request])
    ids = tok(context, return_tensors="pt")["input_ids"]
    model = make_model("tiny-qwen2", seed=3).eval()
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert text == tok.decode(greedy[0, ids.shape[1] :].tolist())

    line = "the dog ran far and the cat sat"
    [rolling] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (line,), 0)])
    encoded = tok(line)["input_ids"]  # BOS first: the tokenizer adds it
    nll, tokens = hand_nll(model_dir, [[tok.bos_token_id, *encoded]])  # lm-eval's prefix token, then all predicted
    assert tokens == len(encoded) and rolling == pytest.approx(-nll, rel=1e-5)


def test_perplexity_of_an_aotinductor_artifact(model_dir, capsys):
    """AOTInductor (about 40 s to build on CPU): the same hand computation."""
    out = model_dir.parent / "aoti"
    compile_model(model_dir, Recipe(), out, target="aotinductor", progress=False)
    tok = _tokenizer(model_dir)
    samples = [tok(line, truncation=True, max_length=12)["input_ids"] for line in TEXT if line.strip()]
    nll, tokens = hand_nll(model_dir, samples)
    result = _eval(capsys, "--artifact", str(out), "--text", str(model_dir.parent / "text.txt"), "--seq-len", "12")
    assert result["model"]["target"] == "aotinductor" and result["tokens"] == tokens
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_the_pytorch_target_compiles_to_program_pt2_alone(model_dir, tmp_path, capsys):
    """`--target pytorch`: program.pt2 and no ONNX file; parity: the saved file loaded back against the program."""
    out = tmp_path / "pt"
    report = compile_model(model_dir, Recipe(), out, target="pytorch", progress=False)
    assert report["target"] == "pytorch" and not (out / "model.onnx").exists() and (out / "program.pt2").is_file()
    assert report["parity"]["runtime"].endswith("(program.pt2)")
    assert report["parity"]["metrics"]["logits"]["cosine"] == pytest.approx(1.0, abs=1e-9)
    result = _eval(capsys, "--artifact", str(out), "--text", str(model_dir.parent / "text.txt"), "--seq-len", "12")
    assert result["model"]["target"] == "pytorch"

    recipe = tmp_path / "no_pt2.yaml"
    recipe.write_text("export: {pt2: false}\n")
    argv = ["compile", "--model", str(model_dir), "--recipe", str(recipe), "--target", "pytorch", "--out", str(out)]
    assert main(argv) == 2
    assert "--target pytorch runs program.pt2: leave export.pt2 on" in capsys.readouterr().err
