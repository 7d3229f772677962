"""prune_heads against Hugging Face models rebuilt by hand with fewer heads and weights sliced from the reported
kept heads, in PyTorch (batch 3 x seq 11, left padding) and ONNX Runtime; GQA group arithmetic through both units
(`query` first: every group keeps the same query heads count; then `kv_group` on the result)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from conftest import make_inputs, slice_by_hand

import sparsec
from sparsec import testing
from sparsec.analysis.heads import find_attentions, head_counts
from sparsec.data.calibration import CalibrationSet
from sparsec.errors import PassError
from sparsec.exporters.lowering.onnx import export_onnx

D = 8  # head_dim, kept explicit in the rebuilt configs
GQA = dict(
    vocab_size=256,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=D,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def _chameleon(**shape):
    """The built-in tiny Chameleon's config (its VQ model and image vocabulary) in the shape of the others."""
    from sparsec.families.chameleon import tiny_chameleon_config

    config = tiny_chameleon_config()
    for key, value in shape.items():
        setattr(config, key, value)
    return config


FAMILIES = {
    "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config, {}),
    "llama (3 groups of 2)": (T.LlamaForCausalLM, T.LlamaConfig, dict(num_key_value_heads=3)),
    "mistral": (T.MistralForCausalLM, T.MistralConfig, dict(sliding_window=8)),
    "qwen3 (q/k norm)": (T.Qwen3ForCausalLM, T.Qwen3Config, {}),
    "gemma2 (eager, softcap)": (T.Gemma2ForCausalLM, T.Gemma2Config, dict(sliding_window=8)),
    "phi3 (fused qkv)": (T.Phi3ForCausalLM, T.Phi3Config, dict(pad_token_id=0, bos_token_id=1, eos_token_id=1)),
    "starcoder2 (biases)": (T.Starcoder2ForCausalLM, T.Starcoder2Config, {}),
    "olmo2 (q/k norm over all heads: approximate)": (T.Olmo2ForCausalLM, T.Olmo2Config, {}),
    "gpt_neox (MHA, fused qkv heads outer)": (T.GPTNeoXForCausalLM, T.GPTNeoXConfig, dict(num_key_value_heads=None)),
    "gpt2 (Conv1D c_attn split in three)": (T.GPT2LMHeadModel, T.GPT2Config, dict(num_key_value_heads=None)),
    "cohere (interleaved rotary: stack, flatten)": (T.CohereForCausalLM, T.CohereConfig, {}),
    "persimmon (fused qkv viewed [H, 3, d], q/k layer norm, partial rotary)": (
        T.PersimmonForCausalLM,
        T.PersimmonConfig,
        dict(num_key_value_heads=None, qk_layernorm=True),
    ),
    "gemma3 (q/k RMSNorm cast back with type_as, local and global layers)": (
        T.Gemma3ForCausalLM,
        T.Gemma3TextConfig,
        dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    ),
    "chameleon (q/k layer norm per head, weights [heads, d])": (T.ChameleonForConditionalGeneration, _chameleon, {}),
}


def _build(name: str):
    model_class, config_class, extra = FAMILIES[name]
    torch.manual_seed(0)
    return model_class(config_class(**{**GQA, **extra})).eval()


def _inputs(model, batch=3, seq=11, seed=7):
    return make_inputs(model, batch, seq, seed=seed, pad_left=4)


def _rows(heads, base=0):
    return torch.cat([torch.arange(base + h * D, base + (h + 1) * D) for h in heads])


def _rebuild(model, decisions: list[dict], layers: list[str]):
    """`model` with each layer's attention cut to its decision's heads, the weights sliced by hand."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for layer, decision in zip(layers, decisions):
        q, kv = decision["kept_heads"], decision["kept_kv_heads"]
        h_before, g_before = decision["heads_before"], decision["kv_heads_before"]
        if f"{layer}.attn.c_attn.weight" in state:  # GPT-2's Conv1D, [in, out]: columns [q | k | v]
            w = f"{layer}.attn.c_attn"
            cols = torch.cat([_rows(q, part * h_before * D) for part in range(3)])
            state[f"{w}.weight"], state[f"{w}.bias"] = state[f"{w}.weight"][:, cols], state[f"{w}.bias"][cols]
            state[f"{layer}.attn.c_proj.weight"] = state[f"{layer}.attn.c_proj.weight"][_rows(q)]
            continue
        fused = next(
            (f"{layer}.{a}" for a in ("attention", "self_attn") if f"{layer}.{a}.query_key_value.weight" in state), None
        )
        if fused is not None:  # GPT-NeoX, Persimmon: [H, 3 * d] rows, heads outer
            w = f"{fused}.query_key_value"
            rows = torch.cat([torch.arange(h * 3 * D, (h + 1) * 3 * D) for h in q])
            for p in ("weight", "bias"):
                state[f"{w}.{p}"] = state[f"{w}.{p}"][rows]
            state[f"{fused}.dense.weight"] = state[f"{fused}.dense.weight"][:, _rows(q)]
            continue
        a = f"{layer}.self_attn"
        if f"{a}.qkv_proj.weight" in state:  # Phi-3: [q | k | v] rows
            rows = torch.cat([_rows(q), _rows(kv, h_before * D), _rows(kv, (h_before + g_before) * D)])
            state[f"{a}.qkv_proj.weight"] = state[f"{a}.qkv_proj.weight"][rows]
        else:
            for proj, heads in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                for p in ("weight", "bias"):
                    if f"{a}.{proj}.{p}" in state:
                        state[f"{a}.{proj}.{p}"] = state[f"{a}.{proj}.{p}"][_rows(heads)]
        state[f"{a}.o_proj.weight"] = state[f"{a}.o_proj.weight"][:, _rows(q)]
        for norm, heads, before in (("q_norm", q, h_before), ("k_norm", kv, g_before)):
            for p in ("weight", "bias"):
                tensor = state.get(f"{a}.{norm}.{p}", torch.empty(0))
                if tensor.shape == (before, D):  # Chameleon: a weight per head
                    state[f"{a}.{norm}.{p}"] = tensor[heads]
                elif tensor.numel() == before * D:  # OLMo2: over all heads
                    state[f"{a}.{norm}.{p}"] = tensor[_rows(heads)]
    if isinstance(model, (T.GPTNeoXForCausalLM, T.PersimmonForCausalLM)):  # head size hidden / heads: cut modules
        reference = copy.deepcopy(model)
        for layer in layers:
            attn = reference.get_submodule(f"{layer}.{'attention' if hasattr(model, 'gpt_neox') else 'self_attn'}")
            attn.query_key_value = torch.nn.Linear(48, 3 * D * len(q))
            attn.dense = torch.nn.Linear(D * len(q), 48)
            if isinstance(model, T.PersimmonForCausalLM):
                attn.num_heads, attn.head_dim = len(q), D
    elif isinstance(model, T.GPT2LMHeadModel):  # the same (its head_dim is n_embd / n_head), and its split size
        reference = copy.deepcopy(model)
        for layer in layers:
            attn = reference.get_submodule(f"{layer}.attn")
            attn.c_attn = transformers_conv1d(3 * D * len(q), 48)
            attn.c_proj = transformers_conv1d(48, D * len(q))
            attn.split_size, attn.num_heads = D * len(q), len(q)
    elif isinstance(model, T.ChameleonForConditionalGeneration):  # head_dim is hidden / heads: the modules are cut
        from transformers.models.chameleon.modeling_chameleon import ChameleonLayerNorm

        reference = copy.deepcopy(model)
        for layer in layers:
            attn = reference.get_submodule(f"{layer}.self_attn")
            attn.num_heads, attn.num_key_value_heads, attn.head_dim = len(q), len(kv), D
            attn.num_key_value_groups = len(q) // len(kv)
            attn.q_proj, attn.o_proj = (
                torch.nn.Linear(48, D * len(q), bias=False),
                torch.nn.Linear(D * len(q), 48, bias=False),
            )
            attn.k_proj, attn.v_proj = (torch.nn.Linear(48, D * len(kv), bias=False) for _ in range(2))
            attn.q_norm, attn.k_norm = ChameleonLayerNorm((len(q), D)), ChameleonLayerNorm((len(kv), D))
    else:
        config = copy.deepcopy(model.config)
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = len(q), len(kv), D
        torch.manual_seed(0)
        reference = type(model)(config).eval()
    reference.load_state_dict(state)
    return reference.eval()


@pytest.fixture(scope="module")
def captured():
    """(model, a fresh capture of it) by family name; the models are built once."""
    models = {}

    def get(name):
        if name not in models:
            models[name] = _build(name)
        return models[name], sparsec.capture(models[name], make_inputs(models[name], 2, 16))

    return get


def transformers_conv1d(out_features: int, in_features: int):
    from transformers.pytorch_utils import Conv1D

    return Conv1D(out_features, in_features)


def _layers(model) -> list[str]:
    stacks = {T.GPTNeoXForCausalLM: "gpt_neox.layers", T.GPT2LMHeadModel: "transformer.h"}
    stack = stacks.get(type(model), "model.layers")
    return [f"{stack}.{i}" for i in range(model.config.num_hidden_layers)]


def _check_same_in_every_layer(decisions):
    (first, *rest) = decisions
    for d in rest:  # magnitude picks differ per layer: the reference takes them layer by layer
        assert d["heads_after"] == first["heads_after"] and d["kv_heads_after"] == first["kv_heads_after"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_prune_equals_the_model_rebuilt_with_fewer_heads(captured, name):
    model, program = captured(name)
    inputs, layers = _inputs(model), _layers(model)
    g, r = model.config.num_key_value_heads or 6, 6 // (model.config.num_key_value_heads or 6)
    reference = model
    steps = [("query", r - 1)] if r > 1 else []
    steps.append(("kv_group", max(1, g // 2)))
    for unit, keep in steps:
        record = testing.apply_pass(program, "prune_heads", keep=keep, unit=unit, importance="random", seed=3)
        decisions = record.decisions["attentions"]
        assert [d["path"].rsplit(".", 1)[0] for d in decisions] == layers
        for d in decisions:
            kept = torch.tensor(d["kept_heads"])
            group = d["heads_before"] // d["kv_heads_before"]
            assert sorted(set((kept // group).tolist())) == d["kept_kv_heads"]  # q head h reads KV head h // R
            if unit == "query":
                assert d["kv_heads_after"] == d["kv_heads_before"] and d["heads_after"] == keep * d["kv_heads_before"]
            else:
                assert d["kv_heads_after"] == keep and d["heads_after"] == keep * group
        _check_same_in_every_layer(decisions)
        assert all(("approximate" in d) == ("olmo2" in name) for d in decisions)
        reference = _rebuild(reference, decisions, layers)
        testing.assert_equivalent(program, reference, inputs, rtol=1e-5, atol=1e-5)
        captured = (p for n, p in reference.named_parameters() if ".vqmodel." not in f".{n}")  # Chameleon's VQ model
        assert program.num_parameters() == sum(p.numel() for p in captured)
    expected = (decisions[0]["heads_after"], decisions[0]["kv_heads_after"])
    assert set(head_counts(program).values()) == {expected}  # the literal head counts were rewritten


def program_has_gqa(model) -> bool:
    return (getattr(model.config, "num_key_value_heads", None) or 6) < 6


def _prune(program, **options):
    return testing.apply_pass(program, "prune_heads", **options)


@pytest.mark.parametrize("unit", ["kv_group", "query"])
def test_activation_importance_drops_a_head_that_writes_nothing(captured, unit):
    model, _ = captured("qwen2")
    model = copy.deepcopy(model)
    silent = [1, 3, 4, 5] if unit == "kv_group" else [4]  # group 1 = query heads 3, 4, 5; head 1 is in group 0
    with torch.no_grad():  # query head 1 silent too: a group's score is the sum of its heads'
        for h in silent:
            model.model.layers[0].self_attn.o_proj.weight[:, h * D : (h + 1) * D] = 0
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    calibration = CalibrationSet(make_inputs(model, 4, 12, seed=4, pad_left=3), source="test", batch_size=2)
    keep = 1 if unit == "kv_group" else 2
    record = _prune(program, keep=keep, unit=unit, where="model.layers.0.*", calibration=calibration)
    (d,) = record.decisions["attentions"]
    if unit == "kv_group":
        assert d["kept_kv_heads"] == [0] and d["kept_heads"] == [0, 1, 2]
    else:
        assert 4 not in d["kept_heads"] and d["kept_kv_heads"] == [0, 1] and len(d["kept_heads"]) == 4
    assert d["importance"]["min"] == 0.0
    assert program.state_shape("model.layers.0.self_attn.q_proj.weight")[0] == d["heads_after"] * D


def test_bad_requests_are_clear_errors_before_any_change(captured):
    model, program = captured("qwen2")
    code, parameters = program.graph_module.code, program.num_parameters()
    with pytest.raises(PassError, match=r"where='model\.blocks\.\*' matches no attention.*model\.layers\.0\.self_attn"):
        _prune(program, keep=1, where="model.blocks.*", importance="magnitude")
    with pytest.raises(PassError, match="keep 3 exceeds the 2 KV groups of model.layers.0.self_attn"):
        _prune(program, keep=3, importance="magnitude")
    with pytest.raises(PassError, match="leaves model.layers.0.self_attn none of its 3 query heads per KV group"):
        _prune(program, keep_ratio=0.1, unit="query", importance="magnitude")
    with pytest.raises(PassError, match="same number of query heads in every kept KV group"):
        _prune(program, keep=1, importance="magnitude", kept={"model.layers.0.self_attn": [[0, 1], [2]]})
    with pytest.raises(Exception, match="keep: must be >= 1"):
        _prune(program, keep=0, importance="magnitude")
    assert program.graph_module.code == code and program.num_parameters() == parameters


def test_global_scope_keeps_different_counts_per_layer(captured):
    model, program = captured("llama (3 groups of 2)")
    with torch.no_grad():  # layer 1's output projection is small: its groups rank below layer 0's
        program.state_tensor("model.layers.1.self_attn.o_proj.weight").mul_(0.01)
    record = _prune(program, keep_ratio=0.5, scope="global", importance="magnitude")
    kv = [d["kv_heads_after"] for d in record.decisions["attentions"]]
    assert kv == [3, 1]  # layer 0's 3 groups rank above layer 1's; layer 1 still keeps one
    assert list(head_counts(program).values()) == [(6, 3), (2, 1)]
    assert program.state_shape("model.layers.1.self_attn.k_proj.weight")[0] == D


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["qwen2", "phi3 (fused qkv)", "gpt_neox (MHA, fused qkv heads outer)", "gpt2 (Conv1D c_attn split in three)"],
)
def test_onnx_at_another_shape_with_a_smaller_kv_cache(captured, tmp_path, name):
    model, program = captured(name)
    record = _prune(program, keep=1 if program_has_gqa(model) else 3, importance="magnitude")
    reference = _rebuild(model, record.decisions["attentions"], _layers(model))
    export_onnx(program, tmp_path / "m.onnx")
    inputs = make_inputs(model, 2, 13, seed=9, pad_left=5)
    testing.assert_onnx_equivalent(tmp_path / "m.onnx", reference, inputs, output="logits")
    kv = ("k_proj.weight", "v_proj.weight", "qkv_proj.weight", "query_key_value.weight", "c_attn.weight")
    original = model.state_dict()
    for key, tensor in reference.state_dict().items():
        if key.endswith(kv):  # the k/v rows (the KV cache width) shrank with the KV groups
            out = -1 if key.endswith("c_attn.weight") else 0  # Conv1D: [in, out]
            assert program.state_shape(key)[out] == tensor.shape[out] < original[key].shape[out]


def test_composes_with_drop_layers_slice_neurons_and_ffn_to_moe(captured):
    from sparsec.transform.pass_manager import PassContext, PassManager, get_pass

    model, program = captured("qwen2")
    passes = [
        ("slice_neurons", dict(keep_ratio=0.5, importance="magnitude")),
        ("prune_heads", dict(keep=2, unit="query", importance="magnitude")),
        ("drop_layers", dict(layers=[1], where="model.layers.*")),
        (
            "ffn_to_moe",
            dict(experts=2, top_k=1, shared=0, partition="balanced", router="random", importance="magnitude", seed=3),
        ),
    ]
    dense, moe = program, captured("qwen2")[1]
    records = PassManager([get_pass(n)(**o) for n, o in passes[:3]]).run(dense, PassContext(progress=False))
    PassManager([get_pass(n)(**o) for n, o in passes]).run(moe, PassContext(progress=False))
    reference = _rebuild(model, records[1].decisions["attentions"], _layers(model))
    reference = slice_by_hand(reference, records[0].decisions)
    del reference.model.layers[1]
    testing.assert_equivalent(dense, reference, _inputs(model), rtol=1e-5, atol=1e-5)
    assert list(head_counts(moe).values()) == [(4, 2)]
    assert any(n.target is torch.ops.sparsec.moe.default for n in moe.graph.nodes if n.op == "call_function")


def test_an_attention_it_cannot_follow_is_refused_saying_why():
    torch.manual_seed(0)
    bloom = T.BloomForCausalLM(T.BloomConfig(vocab_size=256, hidden_size=48, n_layer=1, n_head=6)).eval()
    program = sparsec.capture(bloom, make_inputs(bloom, 2, 16))
    with pytest.raises(
        PassError, match=r"attentions found: none\. .*transformer\.h\.0\.self_attention: .*baddbmm.*ALiBi"
    ):
        _prune(program, keep=3, importance="magnitude")


@pytest.mark.slow
def test_removing_heads_that_write_nothing_leaves_janus_unchanged():
    """On Janus (a SigLIP-style vision tower with multi-head attention, a GQA language model): every attention's
    first half of KV groups gets zero output-projection columns, so removing them, which magnitude importance must
    choose, changes nothing."""
    from conftest import make_model

    model = make_model("tiny-janus")
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    attentions = find_attentions(program)
    assert {a.path.split(".")[1] for a in attentions} == {"vision_model", "language_model"}
    with torch.no_grad():
        for a in attentions:  # the query heads of the first half of the groups, in the model and the program
            model.get_parameter(a.output_weight.name)[:, : a.num_heads // 2 * a.head_dim] = 0
            program.state_tensor(a.output_weight.name)[:, : a.num_heads // 2 * a.head_dim] = 0
    record = _prune(program, keep_ratio=0.5, importance="magnitude")
    for d in record.decisions["attentions"]:
        assert d["kept_kv_heads"] == list(range(d["kv_heads_before"] // 2, d["kv_heads_before"]))
    testing.assert_equivalent(program, model, make_inputs(model, 3, 11, seed=7, pad_left=4), rtol=1e-5, atol=1e-5)
