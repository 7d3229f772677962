"""ffn_to_moe against Hugging Face models whose FFNs were turned into MoEs by hand, plus the op and its lowerings."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    PAPER_MOE,
    SMALL_DECODER,
    MoeOpModule,
    hf_builder,
    make_inputs,
    make_model,
    make_qwenimage,
    paper_moe_by_hand,
    qwenimage_inputs,
    random_moe_weights,
)

import sparsec
from sparsec import testing
from sparsec.data.calibration import CalibrationSet
from sparsec.errors import PassError, RecipeError, SparsecError
from sparsec.exporters.lowering.onnx import export_onnx
from sparsec.ops.moe import moe_dense_reference, moe_forward

MOE = torch.ops.sparsec.moe.default


class HandMoe(torch.nn.Module):
    """The reference: a dense HF FFN module's own Linear weights, split into the reported experts, routed per
    token with a plain loop (softmax, top-k, unit / softmax / renormalized weights)."""

    def __init__(self, mlp, decision, router_weight, router_bias, gating):
        super().__init__()
        self.mlp, self.decision, self.gating = mlp, decision, gating
        self.router_weight, self.router_bias = router_weight, router_bias
        shared = torch.tensor(decision["shared_indices"], dtype=torch.long)
        self.parts = [torch.tensor(e) for e in decision["expert_indices"]]
        self.shared = shared if len(shared) else None

    def _part(self, x, idx):
        mlp = self.mlp
        if hasattr(mlp, "gate_proj"):
            h = F.silu(F.linear(x, mlp.gate_proj.weight[idx])) * F.linear(x, mlp.up_proj.weight[idx])
            return F.linear(h, mlp.down_proj.weight[:, idx])
        h = mlp.activation_fn(F.linear(x, mlp.fc1.weight[idx], mlp.fc1.bias[idx]))
        return F.linear(h, mlp.fc2.weight[:, idx])

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        out = torch.zeros_like(flat)
        k = self.decision["top_k"]
        for t in range(len(flat)):
            probs = torch.softmax(F.linear(flat[t], self.router_weight, self.router_bias), -1)
            top = probs.topk(k)
            weights = {"unit": torch.ones(k), "softmax": top.values, "renormalized": top.values / top.values.sum()}[
                self.gating
            ]
            for w, e in zip(weights, top.indices.tolist()):
                out[t] += w * self._part(flat[t], self.parts[e])
        if self.shared is not None:
            out += self._part(flat, self.shared)
        bias = getattr(self.mlp, "down_proj", getattr(self.mlp, "fc2", None)).bias
        if bias is not None:
            out += bias
        return out.reshape(x.shape)


def moe_by_hand(model, program, decisions):
    reference = copy.deepcopy(model)
    for d in decisions["ffns"]:
        parent, _, name = d["path"].rpartition(".")
        mlp = reference.get_submodule(d["path"])
        rb = program.state_tensor(f"{d['path']}.moe.router_bias")
        hand = HandMoe(mlp, d, program.state_tensor(f"{d['path']}.moe.router_weight"), rb, decisions["gating"])
        setattr(reference.get_submodule(parent), name, hand)
    return reference


def calibration(model, samples=8, seq=16, seed=1):
    return CalibrationSet(make_inputs(model, samples, seq, seed=seed), source="test inputs")


def assert_true_partition(decision):
    pieces = [decision["shared_indices"], *decision["expert_indices"]]
    assert sorted(i for p in pieces for i in p) == list(range(decision["width"]))
    assert len({len(e) for e in decision["expert_indices"]}) == 1
    assert len(decision["expert_indices"]) == decision["experts"]


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama", "tiny-janus"])
def test_all_experts_active_equals_dense(name):
    """top_k == experts under unit gating is the dense model (gated LM FFNs; Janus also plain vision/aligner)."""
    model = make_model(name)
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    before = program.num_parameters()
    record = testing.apply_pass(program, "ffn_to_moe", experts=4, top_k=4, shared=0.1, calibration=calibration(model))
    ffns = record.decisions["ffns"]
    assert len(program.graph.find_nodes(op="call_function", target=MOE)) == len(ffns)
    kinds = {(d["kind"], d["activation"]) for d in ffns}
    assert ("gated", "silu") in kinds and (name != "tiny-janus" or ("plain", "gelu") in kinds)
    router = sum(d["experts"] * (program.state_tensor(f"{d['path']}.moe.router_weight").shape[1] + 1) for d in ffns)
    assert program.num_parameters() == before + router  # every neuron kept, once
    for d in ffns:
        assert_true_partition(d)
        assert d["shared_neurons"] == round(0.1 * d["width"]) + (d["width"] - round(0.1 * d["width"])) % 4
        assert d["exactness_rel_l2"] < 1e-5
    testing.assert_equivalent(
        program, model, make_inputs(model, 3, 11, seed=4, pad_left=2), output="logits", rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("partition", ["balanced", "kmeans", "coactivation"])
@pytest.mark.parametrize("gating", ["unit", "renormalized"])
def test_top_k_equals_moe_by_hand(partition, gating):
    """top_k < experts: the program equals the HF model with each FFN replaced by a hand-written MoE."""
    model = make_model("tiny-qwen2")
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    record = testing.apply_pass(
        program, "ffn_to_moe", experts=8, top_k=3, partition=partition, gating=gating, calibration=calibration(model)
    )
    for d in record.decisions["ffns"]:
        assert_true_partition(d)
        # the default shared third: round(128 / 3) = 43, + (128 - 43) mod 8 = 48; experts of (128 - 48) / 8 = 10
        assert d["shared_neurons"] == 48 and d["expert_size"] == 10 and d["active_neurons_per_token"] == 78
    reference = moe_by_hand(model, program, record.decisions)
    testing.assert_equivalent(
        program, reference, make_inputs(model, 2, 7, seed=5, pad_left=1), output="logits", rtol=1e-4, atol=1e-5
    )


def test_bfloat16_model_keeps_its_dtype_and_stays_close():
    """bfloat16 experts and router; the exactness check allows bfloat16 rounding (float32 stays at 1e-3)."""
    model = make_model("tiny-qwen2").to(torch.bfloat16)
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    record = testing.apply_pass(program, "ffn_to_moe", experts=4, top_k=4, calibration=calibration(model))
    assert program.state_tensor("model.layers.0.mlp.moe.fc1_weight").dtype == torch.bfloat16
    assert all(1e-4 < d["exactness_rel_l2"] < 3e-2 for d in record.decisions["ffns"])
    inputs = make_inputs(model, 2, 9, seed=3)
    with torch.no_grad():
        got, want = program.run(inputs)["logits"].float(), model(**inputs).logits.float()
    assert float((got - want).norm() / want.norm()) < 2e-2


def test_remainder_joins_the_shared_expert():
    model = make_model("tiny-qwen2")  # FFN width 128
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    record = testing.apply_pass(
        program,
        "ffn_to_moe",
        experts=6,
        top_k=6,
        shared=0,
        partition="balanced",
        importance="magnitude",
        router="random",
    )
    for d in record.decisions["ffns"]:
        assert_true_partition(d)
        assert (d["shared_neurons"], d["expert_size"]) == (2, 21)
    testing.assert_equivalent(program, model, make_inputs(model, 2, 9, seed=3), output="logits", rtol=1e-4, atol=1e-5)


def test_fused_gate_up_all_experts_equal_dense():
    from transformers import Phi3Config, Phi3ForCausalLM

    tokens = dict(pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model = hf_builder(Phi3ForCausalLM, Phi3Config, **SMALL_DECODER, **tokens)()
    inputs = {"input_ids": torch.randint(0, 128, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    program = sparsec.capture(model, inputs)
    record = testing.apply_pass(program, "ffn_to_moe", experts=4, top_k=4, calibration=calibration(model))
    assert {d["kind"] for d in record.decisions["ffns"]} == {"fused_gated"}
    other = {"input_ids": torch.randint(0, 128, (3, 5)), "attention_mask": torch.ones(3, 5, dtype=torch.long)}
    testing.assert_equivalent(program, model, other, output="logits", rtol=1e-4, atol=1e-5)


def test_qwenimage_feedforward_all_experts_equal_dense():
    step = make_qwenimage()
    program = sparsec.capture(step, qwenimage_inputs(2, 7), dynamic=False)
    calib = CalibrationSet(qwenimage_inputs(2, 7, seed=1), source="test")
    record = testing.apply_pass(program, "ffn_to_moe", experts=4, top_k=4, where="**.img_mlp", calibration=calib)
    assert [d["activation"] for d in record.decisions["ffns"]] == ["gelu_tanh"] * 2
    testing.assert_equivalent(program, step, qwenimage_inputs(2, 7, seed=5), rtol=1e-5, atol=1e-5)


# ----- router quality ------------------------------------------------------------------------------------
class ClusteredFfn(torch.nn.Module):
    """Tokens come from 8 clusters and each cluster fires its own 16 ReLU neurons (token-dependent sparsity,
    the property MoE conversion relies on). Static slicing must drop whole clusters' neurons; a router that
    knows the clusters loses nothing."""

    def __init__(self, hidden=32, clusters=8, per_cluster=16, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.centers = F.normalize(torch.randn(clusters, hidden, generator=gen), dim=1) * 3
        self.fc1 = torch.nn.Linear(hidden, clusters * per_cluster)
        self.fc2 = torch.nn.Linear(clusters * per_cluster, hidden)
        with torch.no_grad():
            rows = self.centers.repeat_interleave(per_cluster, 0) + 0.3 * torch.randn(
                clusters * per_cluster, hidden, generator=gen
            )
            self.fc1.weight.copy_(rows)
            self.fc1.bias.fill_(-4.5)
            self.fc2.weight.copy_(torch.randn(hidden, clusters * per_cluster, generator=gen) / 4)
            self.fc2.bias.zero_()

    def tokens(self, batch, seq, seed):
        gen = torch.Generator().manual_seed(seed)
        which = torch.randint(0, len(self.centers), (batch, seq), generator=gen)
        return {"x": self.centers[which] + 0.3 * torch.randn(batch, seq, self.centers.shape[1], generator=gen)}

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def _rel_error(program, model, inputs):
    with torch.no_grad():
        got, want = program.run(inputs)["output"], model(**inputs)
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("partition", ["kmeans", "coactivation"])
def test_fitted_routers_beat_random_router_and_static_slice(partition):
    model = ClusteredFfn().eval()
    calib = CalibrationSet(model.tokens(32, 16, seed=1), source="clustered tokens")
    held_out = model.tokens(8, 16, seed=2)
    errors = {}
    for router in ("learned", "regression", "random"):
        program = sparsec.capture(model, model.tokens(2, 8, seed=0))
        testing.apply_pass(
            program, "ffn_to_moe", experts=8, top_k=4, shared=0, partition=partition, router=router, calibration=calib
        )
        errors[router] = _rel_error(program, model, held_out)
    program = sparsec.capture(model, model.tokens(2, 8, seed=0))
    testing.apply_pass(program, "slice_neurons", keep_ratio=0.5, calibration=calib)  # same active width
    errors["static"] = _rel_error(program, model, held_out)
    assert max(errors["learned"], errors["regression"]) < 0.1 < 0.5 < min(errors["random"], errors["static"]), errors


def test_regression_router_is_the_least_squares_fit_of_expert_output_norms():
    """router: regression equals a ridge least-squares solve (an augmented lstsq) of each expert's output norm,
    computed by hand from the HF FFN's own weights on its calibration inputs (hooked, valid tokens only)."""
    model = make_model("tiny-llama")
    calib_inputs = make_inputs(model, 6, 12, seed=1, pad_left=3)
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    record = testing.apply_pass(
        program,
        "ffn_to_moe",
        experts=4,
        top_k=2,
        router="regression",
        calibration=CalibrationSet(calib_inputs, source="test inputs"),
    )
    mlp = model.model.layers[0].mlp
    seen = []
    hook = mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(**calib_inputs)
    hook.remove()
    x = seen[0][calib_inputs["attention_mask"].bool()].double()
    decision = next(d for d in record.decisions["ffns"] if d["path"] == "model.layers.0.mlp")
    norms = torch.stack(
        [
            F.linear(
                F.silu(F.linear(x, mlp.gate_proj.weight[idx].double())) * F.linear(x, mlp.up_proj.weight[idx].double()),
                mlp.down_proj.weight[:, idx].double(),
            ).norm(dim=-1)
            for idx in map(torch.tensor, decision["expert_indices"])
        ],
        dim=1,
    )
    xc, nc = x - x.mean(0), norms - norms.mean(0)
    ridge = 1e-3 * float((xc * xc).sum(0).mean())
    augmented = torch.cat([xc, ridge**0.5 * torch.eye(x.shape[1], dtype=x.dtype)])
    want = torch.linalg.lstsq(
        augmented, torch.cat([nc, torch.zeros(x.shape[1], nc.shape[1], dtype=x.dtype)])
    ).solution.T
    got = program.state_tensor("model.layers.0.mlp.moe.router_weight").double()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    bias = program.state_tensor("model.layers.0.mlp.moe.router_bias").double()
    torch.testing.assert_close(bias, norms.mean(0) - want @ x.mean(0), rtol=1e-3, atol=1e-4)
    assert 0 < decision["router"]["r2"] <= 1 and decision["router"]["tokens"] == len(x)


# ----- adaptation -----
# what the adaptation tests exercise: a learned router over balanced experts without a shared one
ADAPTED_MOE = dict(experts=8, top_k=4, shared=0, partition="balanced", router="learned")


def test_adapt_router_tunes_only_routers_deterministically():
    model = make_model("tiny-qwen2")
    calib = calibration(model, samples=16, seq=16)
    results = []
    for _ in range(2):
        program = sparsec.capture(model, make_inputs(model, 2, 16))
        record = testing.apply_pass(
            program, "ffn_to_moe", **ADAPTED_MOE, adapt="router", adapt_steps=12, lr=1e-2, calibration=calib
        )
        results.append((program, record))
    (a, record), (b, _) = results
    assert all(torch.equal(a.state_tensor(n), b.state_tensor(n)) for n in a.parameter_names())
    adapt = record.decisions["adapt"]
    assert adapt["steps"] == 12 and adapt["loss_after"] < adapt["loss_before"]
    fresh = sparsec.capture(model, make_inputs(model, 2, 16))
    testing.apply_pass(fresh, "ffn_to_moe", **ADAPTED_MOE, calibration=calib)
    changed = {n for n in a.parameter_names() if not torch.equal(a.state_tensor(n), fresh.state_tensor(n))}
    assert changed and all(".moe.router_" in n for n in changed)


def test_adapt_full_tunes_experts():
    model = make_model("tiny-qwen2")
    calib = calibration(model, samples=16, seq=16)
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    record = testing.apply_pass(
        program,
        "ffn_to_moe",
        **ADAPTED_MOE,
        adapt="full",
        adapt_steps=12,
        where="model.layers.0.mlp",
        calibration=calib,
    )
    assert record.decisions["adapt"]["loss_after"] < record.decisions["adapt"]["loss_before"]
    fresh = sparsec.capture(model, make_inputs(model, 2, 16))
    testing.apply_pass(fresh, "ffn_to_moe", **ADAPTED_MOE, where="model.layers.0.mlp", calibration=calib)
    changed = {n for n in program.parameter_names() if not torch.equal(program.state_tensor(n), fresh.state_tensor(n))}
    assert "model.layers.0.mlp.moe.fc1_weight" in changed and "model.layers.0.mlp.moe.router_weight" in changed
    assert not any(n.startswith("model.layers.1.") for n in changed)


# ----- the operator ---------------------------------------------------------------------------------------
def test_op_grouped_path_autograd_and_flops():
    x = torch.randn(3, 5, 16)
    weights = random_moe_weights()
    loop = moe_forward(x, *weights, 2, "silu", "renormalized", grouped=False)
    grouped = moe_forward(x, *weights, 2, "silu", "renormalized", grouped=True)
    torch.testing.assert_close(grouped, loop)

    def dense_masked(x, router_weight, router_bias, fc1, fc1_bias, fc3, fc3_bias, fc2):
        """Every expert on every token, then the chosen ones weighted: same function, no sparsity."""
        probs = torch.softmax(F.linear(x, router_weight, router_bias), -1)
        top = probs.topk(2, -1)
        mask = torch.zeros_like(probs).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
        return (moe_dense_reference(x, fc1, fc1_bias, fc3, fc3_bias, fc2, "silu") * mask.unsqueeze(-1)).sum(-2)

    leaves = [x.clone().requires_grad_(), *[w.clone().requires_grad_() if w is not None else None for w in weights]]
    torch.ops.sparsec.moe(*leaves, 2, "silu", "renormalized").square().sum().backward()
    direct = [x.clone().requires_grad_(), *[w.clone().requires_grad_() if w is not None else None for w in weights]]
    dense_masked(*direct).square().sum().backward()
    for a, b in zip(leaves, direct):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        torch.ops.sparsec.moe(x, *weights, 2, "silu", "unit")
    assert counter.get_total_flops() == 2 * 15 * 16 * 4 + 2 * 15 * 2 * 3 * 8 * 16


def _expert_calls(fc1, fc3, fc2):
    return [lambda t, e=e: F.linear(F.silu(F.linear(t, fc1[e])) * F.linear(t, fc3[e]), fc2[e]) for e in range(len(fc1))]


def test_one_plus_logit_gating_is_the_papers_routing_forward_and_backward():
    router, _, fc1, _, fc3, _, fc2 = random_moe_weights(experts=6)
    x = torch.randn(3, 5, 16)
    got = torch.ops.sparsec.moe(x, router, None, fc1, None, fc3, None, fc2, 2, "silu", "one_plus_logit")
    torch.testing.assert_close(got, paper_moe_by_hand(x, router, _expert_calls(fc1, fc3, fc2), 2))
    zero = torch.ops.sparsec.moe(
        x, torch.zeros_like(router), None, fc1, None, fc3, None, fc2, 3, "silu", "one_plus_logit"
    )
    experts = _expert_calls(fc1, fc3, fc2)
    torch.testing.assert_close(zero, sum(experts[e](x) for e in range(3)))  # all tie: experts 0, 1, 2, weight 1

    # router training: the op's gradient is that of the same function computed densely (every expert, masked)
    def dense_masked(x, router_weight):
        logits = F.linear(x, router_weight)
        top = logits.topk(2, -1)
        mask = torch.zeros_like(logits).scatter(-1, top.indices, 1 + top.values)
        return (moe_dense_reference(x, fc1, None, fc3, None, fc2, "silu") * mask.unsqueeze(-1)).sum(-2)

    leaves = [x.clone().requires_grad_(), router.clone().requires_grad_()]
    torch.ops.sparsec.moe(
        leaves[0], leaves[1], None, fc1, None, fc3, None, fc2, 2, "silu", "one_plus_logit"
    ).square().sum().backward()
    direct = [x.clone().requires_grad_(), router.clone().requires_grad_()]
    dense_masked(*direct).square().sum().backward()
    for a, b in zip(leaves, direct):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_zero_router_ties_route_alike_in_onnx(tmp_path):
    """Every logit of a zero router ties: PyTorch and ONNX TopK both take the lowest expert indices."""
    router, _, fc1, _, fc3, _, fc2 = random_moe_weights(experts=6)
    module = MoeOpModule((torch.zeros_like(router), None, fc1, None, fc3, None, fc2), 2, "silu", "one_plus_logit")
    program = sparsec.capture(module, {"x": torch.randn(2, 8, 16)}, dynamic={"x": {0: "batch", 1: "seq"}})
    export_onnx(program, tmp_path / "moe.onnx")
    x = torch.randn(3, 5, 16)
    experts = _expert_calls(fc1, fc3, fc2)
    torch.testing.assert_close(program.run({"x": x})["output"], experts[0](x) + experts[1](x))
    testing.assert_onnx_equivalent(tmp_path / "moe.onnx", program, {"x": x}, rtol=1e-5, atol=1e-5)


class PaperMoe(torch.nn.Module):
    """A Qwen2 FFN module's own weights split into the reported experts and shared expert, run as the paper's MoE
    (`paper_moe_by_hand`) with the program's router and shared gate."""

    def __init__(self, mlp, decision, program):
        super().__init__()
        self.mlp, self.decision = mlp, decision
        moe = f"{decision['path']}.moe"
        self.router_weight = program.state_tensor(f"{moe}.router_weight")
        has_bias = f"{moe}.router_bias" in program.parameter_names()
        self.router_bias = program.state_tensor(f"{moe}.router_bias") if has_bias else None
        self.shared_gate = program.state_tensor(decision["shared_gate"]) if decision["shared_gate"] else None

    def _part(self, idx):
        m = self.mlp
        idx = torch.tensor(idx, dtype=torch.long)
        return lambda t: F.linear(
            F.silu(F.linear(t, m.gate_proj.weight[idx])) * F.linear(t, m.up_proj.weight[idx]),
            m.down_proj.weight[:, idx],
        )

    def forward(self, x):
        d = self.decision
        shared = self._part(d["shared_indices"]) if d["shared_indices"] else None
        experts = [self._part(e) for e in d["expert_indices"]]
        y = paper_moe_by_hand(x, self.router_weight, experts, d["top_k"], shared, self.shared_gate, self.router_bias)
        return y.to(x.dtype)


@pytest.mark.parametrize("router", ["zero", "random"])
def test_papers_moe_equals_its_forward_by_hand(router):
    """gating one_plus_logit with a shared expert is the paper's MoE: zero router (every token: experts 0 and 1
    plus the shared expert, weight 1 each) and random router and shared gates, against a per-token reference."""
    model = make_model("tiny-qwen2")
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    options = dict(
        experts=4,
        top_k=2,
        shared=0.25,
        partition="balanced",
        gating="one_plus_logit",
        router=router,
        importance="magnitude",
    )
    record = testing.apply_pass(program, "ffn_to_moe", **options)
    gen = torch.Generator().manual_seed(3)
    for d in record.decisions["ffns"]:
        assert_true_partition(d)
        assert (d["shared_neurons"], d["expert_size"]) == (32, 24)
        gate = program.state_tensor(d["shared_gate"])
        assert d["shared_gate"] == f"{d['path']}.moe.shared_gate_weight" and gate.shape == (1, 64) and not gate.any()
        if router == "zero":
            assert not program.state_tensor(f"{d['path']}.moe.router_weight").any()
            assert f"{d['path']}.moe.router_bias" not in program.parameter_names()
        else:
            program.replace_state(d["shared_gate"], torch.randn(1, 64, generator=gen) / 8)
    reference = copy.deepcopy(model)
    for d in record.decisions["ffns"]:
        parent, _, name = d["path"].rpartition(".")
        setattr(reference.get_submodule(parent), name, PaperMoe(reference.get_submodule(d["path"]), d, program))
    testing.assert_equivalent(
        program, reference, make_inputs(model, 2, 7, seed=5, pad_left=1), output="logits", rtol=1e-4, atol=1e-5
    )


def test_adapt_router_trains_the_zero_router_and_the_shared_gate():
    model = make_model("tiny-qwen2")
    calib = calibration(model, samples=8, seq=16)
    options = dict(
        experts=4,
        top_k=2,
        shared=0.25,
        partition="balanced",
        gating="one_plus_logit",
        router="zero",
        where="model.layers.0.mlp",
    )
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    record = testing.apply_pass(
        program, "ffn_to_moe", **options, adapt="router", adapt_steps=6, lr=1e-2, calibration=calib
    )
    assert record.decisions["adapt"]["loss_after"] < record.decisions["adapt"]["loss_before"]
    fresh = sparsec.capture(model, make_inputs(model, 2, 16))
    testing.apply_pass(fresh, "ffn_to_moe", **options, calibration=calib)
    changed = {n for n in program.parameter_names() if not torch.equal(program.state_tensor(n), fresh.state_tensor(n))}
    assert changed == {"model.layers.0.mlp.moe.router_weight", "model.layers.0.mlp.moe.shared_gate_weight"}


def test_program_with_moe_saves_and_loads(tmp_path):
    model = make_model("tiny-qwen2")
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    testing.apply_pass(
        program, "ffn_to_moe", experts=4, top_k=2, partition="balanced", importance="magnitude", router="similarity"
    )
    loaded = sparsec.Program.load(program.save(tmp_path / "moe.pt2"))
    testing.assert_equivalent(loaded, program, make_inputs(model, 2, 9, seed=2))


# ----- ONNX lowerings --------------------------------------------------------------------------------------
@pytest.mark.parametrize("lowering", ["contrib", "standard", "standard_for_tensorrt"])
@pytest.mark.parametrize(
    "activation,gated,gating",
    [
        ("silu", True, "unit"),
        ("silu", True, "softmax"),
        ("relu", False, "renormalized"),
        ("gelu_tanh", False, "unit"),
        ("gelu", False, "softmax"),  # erf GELU: the contrib path falls back
        ("silu", True, "one_plus_logit"),  # the paper's gating: contrib refuses it
    ],
)
def test_onnx_lowerings_match_the_op(tmp_path, lowering, activation, gated, gating):
    import onnx

    module = MoeOpModule(random_moe_weights(experts=6, gated=gated), 2, activation, gating)
    program = sparsec.capture(module, {"x": torch.randn(2, 8, 16)}, dynamic={"x": {0: "batch", 1: "seq"}})
    if lowering == "contrib" and gating == "one_plus_logit":
        with pytest.raises(SparsecError, match="cannot express gating one_plus_logit .*use moe_lowering: standard"):
            export_onnx(program, tmp_path / "moe.onnx", moe_lowering="contrib")
        assert not (tmp_path / "moe.onnx").exists()
        return
    for_tensorrt = lowering == "standard_for_tensorrt"  # what --target tensorrt exports: no ScatterND reduction
    info = export_onnx(
        program,
        tmp_path / "moe.onnx",
        moe_lowering="standard" if for_tensorrt else lowering,
        scatter_reduction=not for_tensorrt,
    )
    contrib = lowering == "contrib" and activation != "gelu"
    assert ("com.microsoft::MoE" in info["op_counts"]) == contrib
    assert ("NonZero" in info["op_counts"]) == (not contrib)
    reductions = {
        a.s.decode()
        for n in onnx.load(str(tmp_path / "moe.onnx")).graph.node
        if n.op_type == "ScatterND"
        for a in n.attribute
        if a.name == "reduction"
    }
    assert reductions - {"none"} == (set() if for_tensorrt or contrib else {"add"})
    testing.assert_onnx_equivalent(tmp_path / "moe.onnx", program, {"x": torch.randn(3, 5, 16)}, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("lowering", ["contrib", "standard"])
def test_onnx_model_with_moe_matches_pytorch_at_another_shape(tmp_path, lowering):
    model = make_model("tiny-qwen2")
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    testing.apply_pass(program, "ffn_to_moe", experts=4, top_k=2, calibration=calibration(model))
    export_onnx(program, tmp_path / "m.onnx", moe_lowering=lowering)
    testing.assert_onnx_equivalent(
        tmp_path / "m.onnx",
        program,
        make_inputs(model, 3, 11, seed=9, pad_left=2),
        output="logits",
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.slow
def test_papers_moe_with_a_gated_shared_expert_lowers_to_onnx(tmp_path):
    model = make_model("tiny-qwen2")
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    record = testing.apply_pass(program, "ffn_to_moe", **PAPER_MOE)
    gen = torch.Generator().manual_seed(0)
    for d in record.decisions["ffns"]:
        program.replace_state(d["shared_gate"], torch.randn(1, 64, generator=gen) / 8)
    export_onnx(program, tmp_path / "m.onnx")
    testing.assert_onnx_equivalent(
        tmp_path / "m.onnx",
        program,
        make_inputs(model, 3, 11, seed=9, pad_left=2),
        output="logits",
        rtol=1e-4,
        atol=1e-5,
    )


# ----- bad input -------------------------------------------------------------------------------------------
def _untouched(program, before_code, before_params):
    assert program.graph_module.code == before_code and set(program.parameter_names()) == before_params


@pytest.mark.parametrize(
    "options,message",
    [
        ({"experts": 4, "top_k": 5}, "top_k: must be in [1, experts=4]"),
        ({"experts": 1}, "experts: must be >= 2"),
        ({"shared": 1.0}, "shared: a fraction"),
        ({"partition": "spectral"}, "partition"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        sparsec.transform.pass_manager.get_pass("ffn_to_moe")(**options)


def test_bad_programs_and_data_leave_the_program_untouched():
    model = make_model("tiny-qwen2")
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    code, params = program.graph_module.code, set(program.parameter_names())
    with pytest.raises(PassError, match="matches no FFN; FFNs in this model: \\['model.layers.0.mlp'"):
        testing.apply_pass(program, "ffn_to_moe", where="model.decoder.**", router="random", importance="magnitude")
    _untouched(program, code, params)
    empty = make_inputs(model, 2, 8)
    empty["attention_mask"][:] = 0
    with pytest.raises(PassError, match="zero valid tokens"):
        testing.apply_pass(program, "ffn_to_moe", calibration=empty)
    _untouched(program, code, params)
    with pytest.raises(PassError, match="needs calibration data"):
        testing.apply_pass(program, "ffn_to_moe")
    _untouched(program, code, params)
    with pytest.raises(PassError, match="has 128 neurons, too few for 200 experts"):
        testing.apply_pass(program, "ffn_to_moe", experts=200, top_k=2, router="random", importance="magnitude")
    _untouched(program, code, params)


def test_unsupported_activation_is_refused():
    class SineFfn(torch.nn.Module):  # elementwise, but no activation the MoE operator knows
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.fc2(torch.sin(self.fc1(x)))

    program = sparsec.capture(SineFfn(), {"x": torch.randn(2, 3, 8)})
    with pytest.raises(PassError, match="FFN at the top level .*aten.sin.default.* not act"):
        testing.apply_pass(program, "ffn_to_moe", experts=2, top_k=1, router="random", importance="magnitude")
