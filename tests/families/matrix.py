"""The architecture matrix's families and rewrites, shared by its two test files: tests/families/test_matrix.py
(every pass on every family in PyTorch, and `inspect`) and tests/families/test_matrix_onnx.py (one ONNX export per
family). Two files, so that under `--dist loadfile` two workers share the matrix.

Passes: `drop_layers: {layers: [1, 2]}` (neighbours; the reference deletes those layers), `slice_neurons`
(magnitude, half the neurons; the reference slices the Linear layers with the reported indices) and
`ffn_to_moe` (4 experts, 2 active, random router; the reference runs the dense FFN with the neurons of the
experts a token is not routed to masked at the down projection's input, routed by the program's router).
One tiny random config per family; each program is captured at batch 2, seq 16 and checked at 3 x 11 with the
first sample left-padded by 4 where the model takes a mask.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers as T
from conftest import hf_builder, make_inputs, make_model, slice_by_hand

import sparsec
from sparsec import testing
from sparsec.analysis.regions import region_index
from sparsec.ops.moe import route, router_logits

LLAMA_MLP = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
DECODER = dict(TINY, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
ENCODER = dict(TINY, max_position_embeddings=64)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=32)


@dataclass(frozen=True)
class Arch:
    """One family of the matrix: how to build it, its block stack and its FFN's Linear modules by role."""

    build: Callable[[], torch.nn.Module]
    stack: str
    roles: dict = field(default_factory=lambda: LLAMA_MLP)
    parallel: bool = False  # attention and MLP in one residual branch: sublayer drops are refused
    post_norm: bool = False  # the stream is layer-normed after each residual add (BERT)


ARCHS = {
    # today's families
    "qwen2": Arch(lambda: make_model("tiny-qwen2"), "model.layers"),
    "llama": Arch(lambda: make_model("tiny-llama"), "model.layers"),
    "chameleon": Arch(lambda: make_model("tiny-chameleon"), "model.layers"),
    "mistral (sliding window 8)": Arch(
        hf_builder(T.MistralForCausalLM, T.MistralConfig, **DECODER, sliding_window=8), "model.layers"
    ),
    "qwen3 (q/k norm)": Arch(hf_builder(T.Qwen3ForCausalLM, T.Qwen3Config, **DECODER, head_dim=16), "model.layers"),
    "gemma2 (GeGLU tanh, sandwich norms, softcap, sliding window, tied)": Arch(
        hf_builder(
            T.Gemma2ForCausalLM,
            T.Gemma2Config,
            **dict(DECODER, tie_word_embeddings=True),
            head_dim=16,
            sliding_window=8,
        ),
        "model.layers",
    ),
    "phi3 (fused gate_up)": Arch(
        hf_builder(T.Phi3ForCausalLM, T.Phi3Config, **DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=1),
        "model.layers",
        {"gate_up": "gate_up_proj", "down": "down_proj"},
    ),
    # new shapes
    "olmo2 (norm after each sublayer)": Arch(hf_builder(T.Olmo2ForCausalLM, T.Olmo2Config, **DECODER), "model.layers"),
    "starcoder2 (LayerNorm with bias, plain MLP)": Arch(
        hf_builder(T.Starcoder2ForCausalLM, T.Starcoder2Config, **DECODER),
        "model.layers",
        {"up": "c_fc", "down": "c_proj"},
    ),
    "gpt_neox (parallel residual, fused QKV)": Arch(
        hf_builder(T.GPTNeoXForCausalLM, T.GPTNeoXConfig, **dict(DECODER, num_key_value_heads=None)),
        "gpt_neox.layers",
        {"up": "dense_h_to_4h", "down": "dense_4h_to_h"},
        parallel=True,
    ),
    "phi (parallel, one shared norm)": Arch(
        hf_builder(T.PhiForCausalLM, T.PhiConfig, **dict(DECODER, num_key_value_heads=None)),
        "model.layers",
        {"up": "fc1", "down": "fc2"},
        parallel=True,
    ),
    "cohere (parallel as a chain, tied)": Arch(
        hf_builder(T.CohereForCausalLM, T.CohereConfig, **dict(DECODER, tie_word_embeddings=True)), "model.layers"
    ),
    "bloom (ALiBi, fused QKV, embedding norm, tied)": Arch(
        hf_builder(T.BloomForCausalLM, T.BloomConfig, vocab_size=256, hidden_size=64, n_layer=4, n_head=4),
        "transformer.h",
        {"up": "dense_h_to_4h", "down": "dense_4h_to_h"},
    ),
    "opt (learned absolute positions, flat FFN)": Arch(
        hf_builder(
            T.OPTForCausalLM,
            T.OPTConfig,
            vocab_size=256,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=256,
        ),
        "model.decoder.layers",
        {"up": "fc1", "down": "fc2"},
    ),
    "gpt2 (Conv1D addmm, learned positions, tied)": Arch(
        hf_builder(T.GPT2LMHeadModel, T.GPT2Config, vocab_size=256, n_embd=64, n_layer=4, n_head=4, n_positions=256),
        "transformer.h",
        {"up": "c_fc", "down": "c_proj"},
    ),
    "falcon (parallel attention, x @ weight.T)": Arch(
        hf_builder(
            T.FalconForCausalLM,
            T.FalconConfig,
            vocab_size=256,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            new_decoder_architecture=False,
            parallel_attn=True,
            alibi=False,
        ),
        "transformer.h",
        {"up": "dense_h_to_4h", "down": "dense_4h_to_h"},
        parallel=True,
    ),
    "bert (post-norm encoder, pooled)": Arch(
        hf_builder(T.BertModel, T.BertConfig, **ENCODER),
        "encoder.layer",
        {"up": "intermediate.dense", "down": "output.dense"},
        post_norm=True,
    ),
    "roberta (post-norm, padding-offset positions)": Arch(
        hf_builder(T.RobertaModel, T.RobertaConfig, **dict(ENCODER, max_position_embeddings=66), pad_token_id=1),
        "encoder.layer",
        {"up": "intermediate.dense", "down": "output.dense"},
        post_norm=True,
    ),
    "xlm_roberta": Arch(
        hf_builder(T.XLMRobertaModel, T.XLMRobertaConfig, **dict(ENCODER, max_position_embeddings=66), pad_token_id=1),
        "encoder.layer",
        {"up": "intermediate.dense", "down": "output.dense"},
        post_norm=True,
    ),
    "vit (vision tower)": Arch(
        hf_builder(T.ViTModel, T.ViTConfig, **VISION, patch_size=8), "layers", {"up": "fc1", "down": "fc2"}
    ),
    "siglip (vision tower, attention-pooling head)": Arch(
        hf_builder(T.SiglipVisionModel, T.SiglipVisionConfig, **VISION, patch_size=8),
        "encoder.layers",
        {"up": "fc1", "down": "fc2"},
    ),
}
DROPPED = [1, 2]


def _inputs(model, batch, seq, seed=0):
    inputs = make_inputs(model, batch, seq, seed=seed)
    if "attention_mask" in inputs:
        inputs["attention_mask"][0, :4] = 0  # left padding
    return inputs


class Family:
    """One family's model, its program as captured (at batch 2, seq 16, on first use) and the other-shape test
    inputs."""

    def __init__(self, arch: Arch) -> None:
        self.arch = arch
        self.model = arch.build()
        self.inputs = _inputs(self.model, 3, 11, seed=7)
        self.results: dict[str, tuple] = {}

    @functools.cached_property
    def program(self):
        """The program as captured, unchanged (tests do not modify it)."""
        return self.capture()

    def capture(self):
        return sparsec.capture(self.model, make_inputs(self.model, 2, 16))

    def transformed(self, name: str):
        """(program after the pass, the Hugging Face model changed by hand, the pass record), made once."""
        if name not in self.results:
            program = self.capture()
            self.results[name] = (program, *EXPORTED[name](self, program))
        return self.results[name]


def _drop(family: Family, program):
    stack = family.arch.stack
    record = testing.apply_pass(program, "drop_layers", layers=DROPPED, where=f"{stack}.*")
    reference = copy.deepcopy(family.model)
    layers = reference.get_submodule(stack)
    for i in sorted(DROPPED, reverse=True):
        del layers[i]
    return reference, record


def _slice(family: Family, program):
    record = testing.apply_pass(program, "slice_neurons", keep_ratio=0.5, importance="magnitude")
    return slice_by_hand(family.model, record.decisions, family.arch.roles), record


class MaskedExperts:
    """Routes each token of the hand-made MoE: the router (the program's weights) reads the FFN input at its
    first projection, and the down projection's input keeps only the neurons of the chosen experts."""

    def __init__(self, decision: dict, router_weight, router_bias, top_k: int) -> None:
        self.experts = [torch.tensor(e) for e in decision["expert_indices"]]
        self.shared = torch.tensor(decision["shared_indices"], dtype=torch.long)
        self.width, self.top_k = decision["width"], top_k
        self.router = (router_weight, router_bias)
        self.mask = None

    def route(self, module, args):
        x = args[0]
        _, chosen = route(router_logits(x.reshape(-1, x.shape[-1]), *self.router), self.top_k)
        mask = torch.zeros(len(chosen), self.width)
        mask[:, self.shared] = 1
        for e, idx in enumerate(self.experts):
            mask[(chosen == e).any(-1).nonzero()[:, :1], idx] = 1
        self.mask = mask

    def keep(self, module, args):
        h = args[0]
        return (h * self.mask.reshape(*h.shape[:-1], self.width).to(h.dtype),)


def _moe(family: Family, program, reference=None, renumbered: Callable[[str], str] = str):
    """`reference`: the model to route by hand (a copy of the family's model if None); `renumbered`: a program
    path -> the same module's path in `reference` (after a drop, the reference's blocks are numbered anew)."""
    record = testing.apply_pass(
        program,
        "ffn_to_moe",
        experts=4,
        top_k=2,
        shared=0,
        partition="balanced",
        router="random",
        importance="magnitude",
        seed=3,
    )
    reference = copy.deepcopy(family.model) if reference is None else reference
    roles = family.arch.roles
    for d in record.decisions["ffns"]:
        routing = MaskedExperts(
            d,
            program.state_tensor(f"{d['path']}.moe.router_weight"),
            program.state_tensor(f"{d['path']}.moe.router_bias"),
            d["top_k"],
        )
        first = roles.get("gate_up", roles.get("up"))
        path = renumbered(d["path"])
        reference.get_submodule(f"{path}.{first}").register_forward_pre_hook(routing.route)
        reference.get_submodule(f"{path}.{roles['down']}").register_forward_pre_hook(routing.keep)
    return reference, record


def _drop_then_moe(family: Family, program):
    """Both rewrites on one program: the ONNX check of every family exports once and still lowers a bypassed
    stack and the MoE operator."""
    reference, _ = _drop(family, program)
    kept = [i for i in range(4) if i not in DROPPED]
    prefix = f"{family.arch.stack}."

    def renumbered(path: str) -> str:
        if not path.startswith(prefix):
            return path
        index, _, rest = path.removeprefix(prefix).partition(".")
        return f"{prefix}{kept.index(int(index))}" + (f".{rest}" if rest else "")

    return _moe(family, program, reference, renumbered)


PASSES = {"drop_layers": _drop, "slice_neurons": _slice, "ffn_to_moe": _moe}
EXPORTED = {**PASSES, "drop_layers + ffn_to_moe": _drop_then_moe}  # the ONNX check's rewrites


def family_cache() -> Callable[[str], Family]:
    """A function giving the `Family` of an `ARCHS` name, built on first use (a test module's fixture holds one)."""
    cache: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in cache:
            cache[name] = Family(ARCHS[name])
        return cache[name]

    return get


def check_structure(family: Family, name: str, program, record) -> None:
    stack = family.arch.stack
    before = family.program
    if name == "drop_layers":
        blocks = [b.index for b in region_index(program).blocks(f"{stack}.*")]
        assert blocks == [i for i in range(4) if i not in DROPPED]
        testing.assert_parameters_removed(
            testing.parameter_names(before), program, [f"{stack}.{i}.**" for i in DROPPED]
        )
    elif name == "slice_neurons":
        ffns = region_index(before).ffns()
        assert len(record.decisions["ffns"]) == len(ffns) >= 4
        assert all(d["width_after"] == d["width_before"] // 2 for d in record.decisions["ffns"])
        assert record.parameters_after < record.parameters_before
    else:
        moes = program.graph.find_nodes(op="call_function", target=torch.ops.sparsec.moe.default)
        assert len(moes) == len(region_index(before).ffns()) >= 4
        linears = testing.op_counts(before)["aten.linear.default"]
        in_ffns = sum(len(f.linears) for f in region_index(before).ffns())
        testing.assert_op_count(program, "**", "aten.linear.default", linears - in_ffns)
