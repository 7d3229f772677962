"""slice_hidden against Hugging Face models whose hidden-width modules were sliced by hand with the reported
channels (`slice_hidden_by_hand`), at batch 3 x seq 11 with left padding; one capture per family (module-scoped)."""

import copy

import pytest
import torch
import transformers as T
from conftest import hf_builder, make_inputs, make_model, mot_inputs, slice_by_hand, slice_hidden_by_hand

import sparsec
from sparsec import testing
from sparsec.analysis.hidden import hidden_channel_group
from sparsec.data.calibration import CalibrationSet
from sparsec.errors import PassError, RecipeError, SparsecError
from sparsec.exporters.lowering.onnx import export_onnx
from sparsec.models import build_model, builtin_config
from sparsec.pipeline import run_passes
from sparsec.recipe import Recipe
from sparsec.transform.pass_manager import PassContext, PassManager, get_pass

DECODER = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
LLAMA_WRITERS = ("o_proj", "down_proj")


# name: (build, the Linear modules writing the stream, by path suffix)
FAMILIES = {
    "qwen2": (lambda: make_model("tiny-qwen2"), LLAMA_WRITERS),
    "llama": (lambda: make_model("tiny-llama"), LLAMA_WRITERS),
    "mistral": (hf_builder(T.MistralForCausalLM, T.MistralConfig, **DECODER, sliding_window=8), LLAMA_WRITERS),
    "qwen3": (hf_builder(T.Qwen3ForCausalLM, T.Qwen3Config, **DECODER, head_dim=16), LLAMA_WRITERS),
    "gemma2": (
        hf_builder(
            T.Gemma2ForCausalLM,
            T.Gemma2Config,
            **dict(DECODER, tie_word_embeddings=True),
            head_dim=16,
            sliding_window=8,
        ),
        LLAMA_WRITERS,
    ),
    "phi3": (
        hf_builder(T.Phi3ForCausalLM, T.Phi3Config, **DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=1),
        LLAMA_WRITERS,
    ),
    "gpt_neox": (
        hf_builder(T.GPTNeoXForCausalLM, T.GPTNeoXConfig, **dict(DECODER, num_key_value_heads=None)),
        ("attention.dense", "dense_4h_to_h"),
    ),
    "starcoder2": (hf_builder(T.Starcoder2ForCausalLM, T.Starcoder2Config, **DECODER), ("o_proj", "c_proj")),
    "opt": (
        hf_builder(
            T.OPTForCausalLM,
            T.OPTConfig,
            **dict(DECODER, ffn_dim=128, word_embed_proj_dim=64, num_key_value_heads=None),
        ),
        ("out_proj", "fc2"),
    ),
    "gpt2": (
        hf_builder(T.GPT2LMHeadModel, T.GPT2Config, vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64),
        ("attn.c_proj", "mlp.c_proj"),
    ),
    "bert (the last hidden state narrows)": (
        hf_builder(
            T.BertModel,
            T.BertConfig,
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
        ("output.dense",),
    ),
}
KEEP = 40  # of 64: 0.625, rounded to 8


def _inputs(model, batch, seq, seed=7, pad=4):
    inputs = make_inputs(model, batch, seq, seed=seed)
    inputs["attention_mask"][0, :pad] = 0  # left padding
    return inputs


class Sliced:
    """One family captured at batch 2 x seq 16 and sliced to KEEP channels (magnitude), with its reference."""

    def __init__(self, name: str) -> None:
        build, self.writers = FAMILIES[name]
        self.model = build()
        self.program = sparsec.capture(self.model, make_inputs(self.model, 2, 16))
        self.group = hidden_channel_group(self.program)
        self.shapes = {p.name: self.program.state_shape(p.name) for p in self.group.params}
        self.record = testing.apply_pass(self.program, "slice_hidden", keep=KEEP, importance="magnitude")
        self.reference = slice_hidden_by_hand(self.model, self.record.decisions["kept_indices"], self.writers)


@pytest.fixture(scope="module")
def sliced():
    cache = {}

    def get(name: str) -> Sliced:
        if name not in cache:
            cache[name] = Sliced(name)
        return cache[name]

    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_equals_the_hand_sliced_model(sliced, name):
    s = sliced(name)
    d = s.record.decisions
    assert d["width_before"] == 64 and d["width_after"] == KEEP == len(d["kept_indices"])
    assert d["kept_indices"] == sorted(d["kept_indices"]) and d["approximate"] is True
    testing.assert_equivalent(s.program, s.reference, _inputs(s.model, 3, 11), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_coupled_tensor_is_narrowed(sliced, name):
    s = sliced(name)
    for p in s.group.params:
        expected = list(s.shapes[p.name])
        expected[p.dim] = KEEP
        assert list(s.program.state_shape(p.name)) == expected, p.name
    assert s.program.num_parameters() == s.record.parameters_after
    removed = sum(p.numel() for p in s.model.parameters()) - sum(p.numel() for p in s.reference.parameters())
    head = s.model.get_output_embeddings()
    if head is not None and head.weight is s.model.get_input_embeddings().weight:
        removed += s.reference.get_output_embeddings().weight.numel()  # tied: the reference's head is untied now
    assert s.record.parameters_before - s.record.parameters_after == removed
    assert s.record.decisions["parameters_before"] - s.record.decisions["parameters_after"] == removed


def test_equals_the_model_rebuilt_with_the_smaller_hidden_size(sliced):
    """The exactness statement: the result is the Hugging Face model with hidden_size = kept (same heads, head_dim
    and intermediate size), loaded with the sliced weights, not the original model."""
    s = sliced("qwen2")
    config = copy.deepcopy(s.model.config)
    config.hidden_size, config.head_dim = KEEP, 16
    rebuilt = T.Qwen2ForCausalLM(config).eval()
    rebuilt.load_state_dict(s.reference.state_dict(), strict=True)
    inputs = _inputs(s.model, 3, 11)
    testing.assert_equivalent(s.program, rebuilt, inputs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(s.program.run(inputs)["logits"], s.model(**inputs).logits, atol=1e-3)


def test_gemma2_keeps_its_normalizer_and_one_tied_table(sliced):
    s = sliced("gemma2")
    assert list(s.record.decisions["sliced"]).count("lm_head.weight") == 1
    assert s.program.state_shape("lm_head.weight") == (256, KEEP)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2", "gpt_neox", "gemma2"])
def test_onnx_runtime_at_another_shape(sliced, tmp_path, name):
    s = sliced(name)
    export_onnx(s.program, tmp_path / "m.onnx")
    testing.assert_onnx_equivalent(
        tmp_path / "m.onnx", s.reference, _inputs(s.model, 2, 7, seed=3, pad=2), output="logits"
    )


def test_mot_copies_share_the_stream_and_are_sliced_together():
    model = build_model(builtin_config("tiny-mot"))
    program = sparsec.capture(model, mot_inputs(2, 16, 8))
    record = testing.apply_pass(program, "slice_hidden", keep=48, importance="random", seed=1)
    sliced = record.decisions["sliced"]
    for copy_ in ("", "_moe_gen"):
        assert sliced[f"model.layers.0.mlp{copy_}.down_proj.weight"] == 0
        assert sliced[f"model.layers.0.self_attn.q_proj{copy_}.weight"] == 1
        assert program.state_shape(f"model.layers.3.input_layernorm{copy_}.weight") == (48,)
    reference = slice_hidden_by_hand(model, record.decisions["kept_indices"], ("o_proj", "o_proj_moe_gen", "down_proj"))
    inputs = mot_inputs(3, 11, 5, seed=2)
    inputs["attention_mask"][0, :3] = 0
    testing.assert_equivalent(program, reference, inputs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("importance", ["activation", "magnitude"])
def test_a_dead_channel_is_removed_first(importance):
    model = make_model("tiny-qwen2")
    with torch.no_grad():  # channel 21 is zero on the whole stream: the embedding column and every writer row
        model.model.embed_tokens.weight[:, 21] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[21] = 0
            layer.mlp.down_proj.weight[21] = 0
    program = sparsec.capture(model, make_inputs(model, 2, 8))
    calibration = CalibrationSet(make_inputs(model, 4, 12, seed=4, pad_left=3), source="test", batch_size=4)
    record = testing.apply_pass(
        program, "slice_hidden", keep=63, round_to=1, importance=importance, calibration=calibration
    )
    assert record.decisions["kept_indices"] == [i for i in range(64) if i != 21]


def test_activation_importance_is_the_mean_magnitude_at_the_normalised_inputs():
    """Minitron's score, computed here with forward hooks on the Hugging Face norms (the inputs of q/k/v, gate/up
    and the LM head): the sum over those norms of E[|x_c|] over valid tokens."""
    model = make_model("tiny-qwen2")
    inputs = make_inputs(model, 4, 12, seed=4, pad_left=3)
    valid = inputs["attention_mask"].bool()
    score = torch.zeros(64, dtype=torch.float64)

    def hook(module, args, out):
        score.add_(out[valid].abs().double().mean(0))

    norms = [m for layer in model.model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    handles = [m.register_forward_hook(hook) for m in [*norms, model.model.norm]]
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    program = sparsec.capture(model, make_inputs(model, 2, 8))
    calibration = CalibrationSet(inputs, source="test", batch_size=4)
    record = testing.apply_pass(program, "slice_hidden", keep=24, round_to=1, calibration=calibration)
    assert record.decisions["kept_indices"] == score.topk(24).indices.sort().values.tolist()


def test_composes_with_drop_layers_and_slice_neurons_then_ffn_to_moe():
    model = make_model("tiny-qwen2")
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    passes = [
        get_pass("drop_layers")(layers=[1]),
        get_pass("slice_neurons")(keep_ratio=0.5, importance="magnitude"),
        get_pass("slice_hidden")(keep_ratio=0.75, importance="magnitude"),
    ]
    drop, neurons, hidden = PassManager(passes).run(program, PassContext(progress=False))
    reference = copy.deepcopy(model)
    del reference.model.layers[1]
    renumbered = {
        **neurons.decisions,
        "ffns": [
            {**f, "path": f["path"].replace("layers.2", "layers.1").replace("layers.3", "layers.2")}
            for f in neurons.decisions["ffns"]
        ],
    }
    reference = slice_hidden_by_hand(
        slice_by_hand(reference, renumbered), hidden.decisions["kept_indices"], LLAMA_WRITERS
    )
    assert hidden.decisions["width_after"] == 48
    testing.assert_equivalent(program, reference, _inputs(model, 3, 11), rtol=1e-5, atol=1e-5)

    (moe,) = PassManager(
        [
            get_pass("ffn_to_moe")(
                experts=4, top_k=2, shared=0, partition="balanced", router="random", importance="magnitude"
            )
        ]
    ).run(program, PassContext(progress=False))
    for d in moe.decisions["ffns"]:  # the experts read the narrowed stream
        assert program.state_shape(f"{d['path']}.moe.router_weight") == (4, 48)
    nodes = [n.name for n in program.graph.nodes]
    with pytest.raises(PassError, match="run slice_hidden before ffn_to_moe"):
        testing.apply_pass(program, "slice_hidden", keep_ratio=0.5, importance="magnitude")
    assert [n.name for n in program.graph.nodes] == nodes


def test_replay_keeps_the_same_channels_in_another_program():
    model = make_model("tiny-llama")
    first, second = (sparsec.capture(model, make_inputs(model, 2, 8)) for _ in range(2))
    slice_ = get_pass("slice_hidden")(keep_ratio=0.5, importance="random", seed=5)
    record = testing.apply_pass(first, slice_)
    assert "model.embed_tokens.weight" in slice_.targets(second)
    again = testing.apply_pass(second, slice_.replay(record.decisions, ["model.embed_tokens.weight"]))
    assert again.decisions["kept_indices"] == record.decisions["kept_indices"]
    for name in first.parameter_names():
        assert torch.equal(first.state_tensor(name), second.state_tensor(name))


class _StreamAttention(torch.nn.Module):
    """Reads the stream with a matmul over its channels (a Gram matrix of the embeddings)."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(32, 16), torch.nn.Linear(16, 4)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        return self.head(torch.softmax(h @ h.transpose(-1, -2), -1) @ h)


def test_bad_requests_are_clear_errors_before_any_change():
    program = sparsec.capture(_StreamAttention(), {"input_ids": torch.randint(0, 32, (2, 5))})
    nodes = [n.name for n in program.graph.nodes]
    with pytest.raises(PassError, match=r"slice_hidden: transpose .*moves the hidden channels of embedding off"):
        testing.apply_pass(program, "slice_hidden", keep=8, importance="magnitude")
    assert [n.name for n in program.graph.nodes] == nodes

    model = make_model("tiny-qwen2")
    program = sparsec.capture(model, make_inputs(model, 2, 8))
    before = {n: program.state_shape(n) for n in program.parameter_names()}
    with pytest.raises(PassError, match="keep 65 exceeds the 64 hidden channels"):
        testing.apply_pass(program, "slice_hidden", keep=65, importance="magnitude")
    with pytest.raises(PassError, match="needs calibration data"):
        testing.apply_pass(program, "slice_hidden", keep_ratio=0.5)
    assert {n: program.state_shape(n) for n in program.parameter_names()} == before
    for options, message in [
        ({"keep_ratio": 0}, "slice_hidden.keep_ratio: must be in (0, 1], got 0"),
        ({"keep_ratio": 0.5, "keep": 3}, "give exactly one of keep_ratio, keep"),
        ({"keep_ratio": 0.5, "where": "model.layers.0"}, "its channels are sliced everywhere or nowhere"),
    ]:
        with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            Recipe.from_dict({"passes": [{"slice_hidden": options}]})


def test_a_narrowed_output_cannot_be_gated_and_says_so():
    """BERT's last hidden state narrows with the stream: measuring its quality against the original's is
    impossible, so the compile stops with a clear error (exit 2) instead of comparing tensors of two shapes, and
    the program is left as it was."""
    build, _ = FAMILIES["bert (the last hidden state narrows)"]
    model = build()
    program = sparsec.capture(model, _inputs(model, 2, 8))
    before = program.graph_module.code
    calibration = CalibrationSet(_inputs(model, 2, 8, seed=3), source="test", batch_size=2)
    passes = [get_pass("slice_hidden")(keep=KEEP, importance="magnitude")]
    with pytest.raises(
        SparsecError, match=r"output 'last_hidden_state' changed shape from \(2, 8, 64\) to \(2, 8, 40\)"
    ):
        run_passes(program, passes, calibration, progress=False)
    assert program.graph_module.code == before
