"""`--target hf`: a bf16 Llama with its tokenizer, compiled with a block dropped, FFNs sliced and KV groups pruned,
is written as a checkpoint transformers loads without remote code (bf16 in, bf16 out, the tokenizer beside it)
that computes what program.pt2 computes at another shape with left padding, and whose `generate()` with its KV
cache gives the tokens greedy decoding by full recompute through the program gives. What a config cannot state is
refused with exit 2, nothing written."""

import json

import pytest
import torch
from conftest import make_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparsec.cli import main
from sparsec.ir.program import Program
from sparsec.testing import save_word_tokenizer

pytestmark = pytest.mark.slow

WORDS = ["[PAD]", "[UNK]", "<s>", *"abcdefghijklmnopqrstuvwxyz", "the", "cat", "sat", "on", "mat", "dog", "ran"]
TEXT = ["the cat sat on a mat", "the dog ran far", "a cat and a dog ran home", "then the mat sat", "the end"]
RECIPE = """passes:
  - drop_layers: {count: 1}
  - slice_neurons: {keep_ratio: 0.5}
  - prune_heads: {keep_ratio: 0.5, unit: kv_group}
calibration: {samples: 8, seq_len: 16}
quality: {gates: off}
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    make_model("tiny-llama", seed=2).to(torch.bfloat16).save_pretrained(directory)
    save_word_tokenizer(directory, WORDS, bos="<s>")
    return directory


@pytest.fixture(scope="module")
def checkpoint(model_dir):
    (model_dir.parent / "recipe.yaml").write_text(RECIPE)
    out = model_dir.parent / "hf"
    argv = ["compile", "--model", str(model_dir), "--recipe", str(model_dir.parent / "recipe.yaml"), "--quiet"]
    assert main([*argv, "--target", "hf", "--out", str(out)]) == 0
    return out


def _inputs(vocab: int):
    ids = torch.randint(3, vocab, (3, 11), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


def test_the_checkpoint_states_the_compressed_model_and_computes_the_program(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    stated = {k: config[k] for k in ("num_hidden_layers", "intermediate_size", "num_attention_heads")}
    assert stated == {"num_hidden_layers": 3, "intermediate_size": 64, "num_attention_heads": 2}
    assert (config["num_key_value_heads"], config["head_dim"], config["dtype"]) == (1, 16, "bfloat16")
    report = json.loads((checkpoint / "report.json").read_text())
    assert report["architecture"]["blocks"] == 3 and report["checkpoint"]["model_class"] == "LlamaForCausalLM"
    assert report["parity"]["metrics"]["logits"]["cosine"] > 0.9999
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}

    model = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True).eval()
    assert model.dtype == torch.bfloat16 and len(model.model.layers) == 3
    inputs = _inputs(config["vocab_size"])
    with torch.no_grad():
        got = model(**inputs).logits
    expected = Program.load(checkpoint / "program.pt2").run(inputs)["logits"]
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid].float(), expected[valid].float(), rtol=2e-2, atol=2e-2)
    assert float((got[valid].argmax(-1) == expected[valid].argmax(-1)).float().mean()) > 0.95


def test_generate_with_the_cache_gives_the_tokens_of_full_recompute_through_the_program(checkpoint, model_dir):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)  # the copy beside the weights
    assert tokenizer("the cat").input_ids == AutoTokenizer.from_pretrained(model_dir)("the cat").input_ids
    tokenizer.padding_side = "left"
    batch = tokenizer(["the cat sat", "a dog ran far on the mat"], return_tensors="pt", padding=True)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True).eval()
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    program = Program.load(checkpoint / "program.pt2")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for _ in range(8):  # greedy decoding, the whole sequence recomputed each step
        logits = program.run({"input_ids": ids, "attention_mask": mask})["logits"]
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert generated.tolist() == ids.tolist()


def test_what_a_config_cannot_state_is_refused_with_exit_2_and_nothing_written(model_dir, tmp_path, capsys):
    cases = {
        "passes:\n  - slice_neurons: {keep_ratio: 0.5, scope: global}\ncalibration: {samples: 8, seq_len: 16}\n": (
            "the blocks have different ffn"
        ),
        "passes:\n  - ffn_to_moe: {experts: 4, top_k: 2}\n": "does not write MoE programs yet",
        "passes:\n  - drop_layers: {layers: [1], kind: attn}\n": "a sublayer was dropped",
    }
    for i, (recipe, says) in enumerate(cases.items()):
        (tmp_path / "recipe.yaml").write_text(recipe + "quality: {gates: off}\n")
        out = tmp_path / f"out{i}"
        argv = ["compile", "--model", str(model_dir), "--recipe", str(tmp_path / "recipe.yaml"), "--quiet"]
        assert main([*argv, "--target", "hf", "--out", str(out)]) == 2
        assert says in capsys.readouterr().err
        assert not out.exists()
