"""The architecture matrix in PyTorch: every pass on every transformer shape (the families of
tests/families/matrix.py) equals the same change made by hand on the Hugging Face model at a shape other than the
capture shape, with left padding where the model takes a mask; `inspect` reads every block and FFN; a sublayer
drop in a parallel block is refused; a causal LM's logits come from its hidden states projected when read; the
architecture read from the graph is what the config states; each causal LM's result, written as a Hugging Face
checkpoint, loads in transformers and computes the change made by hand. The ONNX export of every family:
tests/families/test_matrix_onnx.py.
"""

import pytest
import torch
from matrix import ARCHS, PASSES, check_structure, family_cache
from transformers import AutoModelForCausalLM

from sparsec import testing
from sparsec.analysis.architecture import architecture
from sparsec.analysis.inspection import inspect_program
from sparsec.data.logits import logit_rows, logits_run
from sparsec.errors import PassError
from sparsec.exporters.lowering.hf_checkpoint import CheckpointRefused, plan_checkpoint, write_checkpoint


@pytest.fixture(scope="module")
def families():
    return family_cache()


CASES = [(arch, name) for arch in ARCHS for name in PASSES]


@pytest.mark.parametrize("arch, pass_name", CASES)
def test_pass_equals_the_change_made_by_hand(families, arch, pass_name):
    family = families(arch)
    program, reference, record = family.transformed(pass_name)
    check_structure(family, pass_name, program, record)
    testing.assert_equivalent(program, reference, family.inputs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", [a for a, spec in ARCHS.items() if spec.parallel])
def test_sublayer_drop_in_a_parallel_block_is_refused_naming_the_block(families, arch):
    family = families(arch)
    program = family.capture()
    before = program.graph_module.code
    with pytest.raises(PassError, match=rf"block {family.arch.stack}\.0 is a parallel-residual block.*kind: block"):
        testing.apply_pass(program, "drop_layers", layers=[1], kind="attn")
    assert program.graph_module.code == before


@pytest.mark.parametrize("arch", list(ARCHS))
def test_inspect_reads_every_block_and_ffn(families, arch):
    """Each block is a residual block read as its shape is (attention then MLP, post-norm, or one parallel
    branch), and nothing is left unclassified."""
    family = families(arch)
    info = inspect_program(family.program, family.inputs)
    spec = family.arch
    expected = "parallel" if spec.parallel else "attn + mlp" + (" (post-norm)" if spec.post_norm else "")
    (stack,) = [s for s in info["block_stacks"] if s["path"] == spec.stack]
    assert stack["structure"] == expected and stack["blocks"] == 4
    assert info["unclassified_blocks"] == [] and info["unclassified_sublayers"] == []
    assert len(info["ffns"]) >= 4


LOGITS_AFTER_THE_PROJECTION = {  # compared as whole logits: something follows the projection
    "chameleon": "image-token logits masked",
    "gemma2 (GeGLU tanh, sandwich norms, softcap, sliding window, tied)": "soft-capped",
    "cohere (parallel as a chain, tied)": "scaled by logit_scale",
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_projected_from_the_hidden_states_equal_the_models(families, arch):
    """Where the logits are a plain projection, the program runs up to the hidden states (the projection is never
    computed) and their projection is the Hugging Face model's logits; elsewhere the program runs as it is."""
    family = families(arch)
    program = family.program
    run = logits_run(program)
    if "logits" not in program.output_names or arch in LOGITS_AFTER_THE_PROJECTION:
        assert run.outputs_from is None
        return
    ((projection, hidden),) = run.outputs_from.items()
    seen = set()
    outputs = program.run(family.inputs, observe=lambda node, _: seen.add(node), outputs_from=run.outputs_from)
    assert hidden in seen and projection not in seen
    expected = family.model(**family.inputs).logits
    torch.testing.assert_close(logit_rows(run.logits(outputs)["logits"]), expected, rtol=1e-5, atol=1e-5)


def _config_value(config, *names, default=None):
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), default)


HEADS_UNREAD = {"bloom (ALiBi, fused QKV, embedding norm, tied)": "eager attention in 3D"}  # batch x heads as one axis


@pytest.mark.parametrize("arch", list(ARCHS))
def test_the_architecture_read_from_the_graph_is_what_the_config_states(families, arch):
    family = families(arch)
    config = family.model.config
    config = getattr(config, "text_config", None) or getattr(config, "vision_config", None) or config
    heads = config.num_attention_heads
    hidden = config.hidden_size
    expected = {
        "stack": family.arch.stack,
        "blocks": config.num_hidden_layers,
        "hidden": hidden,
        "heads": heads,
        "kv_heads": _config_value(config, "num_key_value_heads", default=heads),
        "head_dim": _config_value(config, "head_dim", default=hidden // heads),
        "ffn": _config_value(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
    }
    if arch in HEADS_UNREAD:
        expected.update(heads=None, kv_heads=None, head_dim=None)
    got = architecture(family.program).to_dict()
    assert {k: got[k] for k in expected} == expected
    assert got["experts"] is None
    unread = got.get("unread", [])
    assert len(unread) == (4 if arch in HEADS_UNREAD else 0)
    assert all(HEADS_UNREAD[arch] in line for line in unread)


CHECKPOINT_REFUSED = {
    "chameleon": "captured from ChameleonForConditionalGeneration",
    "bloom (ALiBi, fused QKV, embedding norm, tied)": "attention heads not read",
    **dict.fromkeys(
        [
            "bert (post-norm encoder, pooled)",
            "roberta (post-norm, padding-offset positions)",
            "xlm_roberta",
            "vit (vision tower)",
            "siglip (vision tower, attention-pooling head)",
        ],
        "writes causal language models",
    ),
}


@pytest.mark.parametrize("arch, pass_name", [(a, p) for a in ARCHS for p in ("drop_layers", "slice_neurons")])
def test_a_hf_checkpoint_loads_in_transformers_and_equals_the_change_made_by_hand(families, arch, pass_name, tmp_path):
    """`--target hf`'s checkpoint of each pass's result, loaded by `AutoModelForCausalLM.from_pretrained`, computes
    what the Hugging Face model changed by hand does (blocks deleted, FFNs sliced with the reported indices) at
    another shape with left padding; what a config cannot state is refused, naming why."""
    family = families(arch)
    program, reference, _ = family.transformed(pass_name)
    if arch in CHECKPOINT_REFUSED:
        with pytest.raises(CheckpointRefused, match=CHECKPOINT_REFUSED[arch]):
            plan_checkpoint(program)
        return
    write_checkpoint(program, plan_checkpoint(program), tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    with torch.no_grad():
        got, expected = (m(**family.inputs).logits for m in (loaded, reference))
    valid = family.inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-4, atol=1e-5)
