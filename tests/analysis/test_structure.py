"""Structural matchers on small hand-written modules: what matches as an FFN / residual block, and why not."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparsec
from sparsec.analysis.blocks import match_residual_block
from sparsec.analysis.ffn import ffn_activation, ffn_misses, find_ffns
from sparsec.analysis.hidden import HIDDEN_STREAM, hidden_channel_group
from sparsec.analysis.inspection import explain, format_inspection, inspect_program
from sparsec.analysis.match import NoMatch
from sparsec.analysis.regions import region_index
from sparsec.errors import PassError, SparsecError


class _Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _Fused(nn.Module):
    """A fused gate_up projection split into `parts` chunks, the first two used (an FFN only for halves)."""

    def __init__(self, parts=2):
        super().__init__()
        self.parts = parts
        self.gate_up, self.down = nn.Linear(8, 16 * parts), nn.Linear(16, 8)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(self.parts, dim=-1)[:2]
        return self.down(F.silu(gate) * up)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.o_proj = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (t.reshape(b, s, 2, 4).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, 8))


class _ReadTwice(nn.Module):
    """The up projection's output is also read outside the FFN."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.up(x)
        return self.down(F.relu(h)), h.sum(-1)


def _capture(module):
    return sparsec.capture(module, {"x": torch.randn(2, 5, 8)})


@pytest.mark.parametrize("module, kind", [(_Gated(), "gated"), (_Plain(), "plain"), (_Fused(), "fused_gated")])
def test_gated_plain_and_fused_ffns_match(module, kind):
    program = _capture(module)
    (ffn,) = find_ffns(program)
    assert (ffn.kind, ffn.intermediate_size) == (kind, 16)
    assert ffn_misses(program) == []


def test_an_attention_projection_is_no_ffn_because_a_reshape_lies_before_it():
    program = _capture(_Attention())
    assert find_ffns(program) == []
    misses = {m.path: m for m in ffn_misses(program)}
    o_proj = misses["o_proj"]
    assert o_proj.pattern == "FFN" and "is not computed by pointwise ops from one or two linears" in o_proj.rule
    assert program.graph.find_nodes(op="call_function", target=torch.ops.aten.reshape.default)
    assert o_proj.node.startswith("reshape") and f"{o_proj.node} (reshape.default) lies on the way" in o_proj.rule


def test_a_projection_read_by_two_consumers_is_no_ffn():
    program = _capture(_ReadTwice())
    assert find_ffns(program) == []
    (miss,) = [m for m in ffn_misses(program) if m.path == "down"]
    up = program.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default)[0]
    assert miss.node == up.name and miss.rule.startswith(f"{up.name} is also read outside the FFN, by ")


def test_a_split_not_into_halves_is_no_fused_ffn():
    program = _capture(_Fused(parts=3))
    assert find_ffns(program) == []
    (miss,) = [m for m in ffn_misses(program) if m.path == "down"]
    assert "but not into two halves of the last dimension" in miss.rule and miss.node.startswith("chunk")
    assert str(miss) == f"down: not an FFN: {miss.rule}"


class _Block(nn.Module):
    def __init__(self, residual=True):
        super().__init__()
        self.residual = residual
        self.norm, self.mlp = nn.LayerNorm(8), _Gated()

    def forward(self, x):
        y = self.mlp(self.norm(x))
        return x + y if self.residual else y * 2


class _Stack(nn.Module):
    def __init__(self, residual=True):
        super().__init__()
        self.layers = nn.ModuleList([_Block(residual), _Block(residual)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_residual_block_matches_and_a_block_without_residual_says_where_it_stops():
    program = _capture(_Stack())
    regions = region_index(program)
    (stream,) = match_residual_block(regions.region("layers.1"), regions.ffns())
    assert [s.kind for s in stream.sublayers] == ["mlp"]
    program = _capture(_Stack(residual=False))
    regions = region_index(program)
    miss = match_residual_block(regions.region("layers.0"), regions.ffns())
    assert isinstance(miss, NoMatch) and miss.pattern == "residual block" and miss.path == "layers.0"
    assert miss.node.startswith("mul") and "is not a residual add" in miss.rule
    assert str(miss).startswith("layers.0: not a residual block: its output ")
    info = inspect_program(program, {"x": torch.randn(2, 5, 8)})
    assert [b["path"] for b in info["unclassified_blocks"]] == ["layers.0", "layers.1"]


def test_explain_says_what_a_path_is_and_why_not():
    program = _capture(_Stack())
    mlp = explain(program, "layers.0.mlp")
    assert mlp[0].startswith("layers.0.mlp: an FFN, gated, width 16")
    assert mlp[1].startswith("layers.0.mlp: not a residual block: its output ")
    block = explain(program, "layers.0")
    assert len(block) == 2 and block[0] == "layers.0: no FFN, and no linear outside an FFN under it"
    assert block[1].startswith("layers.0: a residual block, stream x -> add") and block[1].endswith(": mlp (add)")
    attention = _capture(_Attention())
    why = explain(attention, "o_proj")
    assert why[:2] == ["o_proj: no FFN", str(next(m for m in ffn_misses(attention) if m.path == "o_proj"))]
    assert why[2].startswith("o_proj: not a residual block: its output ")
    with pytest.raises(SparsecError, match="no module path 'o_prj'"):
        explain(attention, "o_prj")


def test_where_matching_no_ffn_quotes_the_closest_candidates_reasons():
    program = _capture(_Attention())
    with pytest.raises(PassError) as info:
        region_index(program).require_ffns("o_proj", "slice_neurons")
    message = str(info.value)
    assert message.startswith(
        "slice_neurons: where='o_proj' matches no FFN; FFNs in this model: none. Closest candidates: "
    )
    assert "o_proj: not an FFN: the input of " in message and "lies on the way" in message
    (ffn,) = region_index(_capture(_Gated())).require_ffns("**", "slice_neurons")
    assert ffn.kind == "gated"


class _LinearBranch(nn.Module):
    """A residual branch of two linears back to back: no attention, no FFN."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.down(self.up(x))


class _OddStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_LinearBranch(), _LinearBranch()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_inspect_says_why_a_block_branch_is_neither_attention_nor_ffn():
    program = _capture(_OddStack())
    info = inspect_program(program, {"x": torch.randn(2, 5, 8)})
    assert [s["structure"] for s in info["block_stacks"]] == ["other"]
    misses = info["unclassified_sublayers"]
    assert [m["path"] for m in misses] == ["layers.0", "layers.1"]
    assert misses[0]["reason"].startswith("holds no attention op (softmax, scaled_dot_product_attention) and no FFN; ")
    assert "layers.0.down: not an FFN: no activation between" in misses[0]["reason"]
    assert "block sublayers neither attention nor FFN (2;" in format_inspection(info)


class _Activation(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.up, self.down, self.act = nn.Linear(8, 16), nn.Linear(16, 8), act

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def _gelu_new(x):  # GPT-2's and Phi's activation, spelled out
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def test_activation_spelled_out_is_recognised_by_what_it_computes_and_others_are_refused():
    (ffn,) = find_ffns(_capture(_Activation(_gelu_new)))
    assert ffn_activation(ffn) == "gelu_tanh"
    (ffn,) = find_ffns(_capture(_Activation(lambda x: x * torch.sigmoid(1.5 * x))))  # not SiLU
    miss = ffn_activation(ffn)
    assert isinstance(miss, NoMatch) and miss.path == ffn.path
    assert miss.rule.startswith("the ops between its projections (['aten.mul.Tensor', 'aten.sigmoid")


def test_flops_count_the_attention_core_on_the_cpu(captured):
    """The two matmuls of SDPA's CPU kernel (q k^T and probs v: 4 * B * H * S^2 * head_dim) are counted in each
    attention's region, so the FLOP ideal of a head or sequence change sees them."""
    from conftest import make_inputs

    from sparsec.analysis.inspection import flops_by_path

    model, program = captured("tiny-qwen2")
    config = model.config
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    linears = 2 * 37 * config.hidden_size * (2 * config.hidden_size + 2 * head_dim * config.num_key_value_heads)
    flops = flops_by_path(program, make_inputs(model, 1, 37))
    assert flops["model.layers.0.self_attn"] == 4 * heads * 37 * 37 * head_dim
    projections = sum(v for k, v in flops.items() if k.startswith("model.layers.0.self_attn."))
    assert projections == linears


class _StreamTransposed(nn.Module):
    """Moves the embeddings' channels off the last axis before its head reads them."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(32, 16), nn.Linear(5, 4)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids).transpose(-1, -2))


def test_a_stream_walk_stopped_deep_inside_is_one_no_match_naming_the_op():
    """`hidden_channel_group` stops several ops into its walk; the caller gets a `NoMatch`, not an exception."""
    program = sparsec.capture(_StreamTransposed(), {"input_ids": torch.randint(0, 32, (2, 5))}, dynamic=False)
    miss = hidden_channel_group(program)
    assert isinstance(miss, NoMatch) and miss.pattern == HIDDEN_STREAM and miss.node.startswith("transpose")
    assert miss.rule.startswith(f"{miss.node} (aten.transpose.int) moves the hidden channels of embedding off")
