"""The paper's released MoE layout: checkpoints written by hand in it import into MoE nodes equal to a per-token
reference of the paper's forward; sparsec's MoEs export into it and import back bit for bit; bad checkpoints name
the tensor and the shape they should have."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import PAPER_MOE, make_inputs, make_model, mot_inputs, paper_moe_by_hand
from safetensors.torch import save_file

import sparsec
from sparsec import testing
from sparsec.errors import SparsecError
from sparsec.passes.moe_layout import ImportMoe, export_paper_moe, paper_moe_state

MOE = torch.ops.sparsec.moe.default
HIDDEN, WIDTH = 64, 128  # the tiny models' hidden size and FFN width


def paper_checkpoint(prefix, layers, experts, shared, router, seed=0):
    """Tensors in the paper's layout for FFNs `prefix{layer}.`, random experts; `router`: zero or random."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])

    expert_width = (WIDTH - shared) // experts
    tensors = {}
    for layer in layers:
        name = f"{prefix}{layer}."
        tensors[name + "gate.weight"] = r(experts, HIDDEN) if router == "random" else torch.zeros(experts, HIDDEN)
        tensors[name + "gate_shared.weight"] = r(1, HIDDEN) if router == "random" else torch.zeros(1, HIDDEN)
        parts = [(f"experts.{e}.", expert_width) for e in range(experts)] + (
            [("shared_expert.", shared)] if shared else []
        )
        for part, width in parts:
            tensors[f"{name}{part}gate_proj.weight"] = r(width, HIDDEN)
            tensors[f"{name}{part}up_proj.weight"] = r(width, HIDDEN)
            tensors[f"{name}{part}down_proj.weight"] = r(HIDDEN, width)
    return tensors


def write_checkpoint(directory, tensors, **config):
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "ema.safetensors"))
    (directory / "llm_config.json").write_text(json.dumps({"hidden_size": HIDDEN, **config}))
    return directory


class CheckpointMoe(torch.nn.Module):
    """The paper's `Qwen2MoeSparseMoeBlock` forward from the checkpoint's tensors, per token (`paper_moe_by_hand`)."""

    def __init__(self, tensors, name, experts, top_k):
        super().__init__()
        self.t, self.name, self.experts, self.top_k = tensors, name, experts, top_k

    def _mlp(self, part):
        t, n = self.t, f"{self.name}{part}"
        return lambda x: F.linear(
            F.silu(F.linear(x, t[n + "gate_proj.weight"])) * F.linear(x, t[n + "up_proj.weight"]),
            t[n + "down_proj.weight"],
        )

    def forward(self, x):
        has_shared = f"{self.name}shared_expert.gate_proj.weight" in self.t
        return paper_moe_by_hand(
            x,
            self.t[self.name + "gate.weight"],
            [self._mlp(f"experts.{e}.") for e in range(self.experts)],
            self.top_k,
            self._mlp("shared_expert.") if has_shared else None,
            self.t[self.name + "gate_shared.weight"],
        ).to(x.dtype)


@pytest.mark.parametrize("router", ["zero", "random"])
@pytest.mark.parametrize("shared", [0, 16])
def test_a_checkpoint_in_the_papers_layout_imports_as_its_forward(tmp_path, router, shared):
    """BAGEL's names on the MoT model (`language_model.` + `model.layers.{i}.mlp_moe_gen`), layers 1 and 2 converted
    as the config's transformed_gen says (the paper leaves the first and last dense); zero router: every generation
    token gets experts 0 and 1 (and the shared expert), weight 1 each."""
    experts = 7 if shared else 4  # 16 shared of 128 neurons is num_shared_experts 1 of 7 + 1
    model = make_model("tiny-mot")
    tensors = paper_checkpoint("language_model.model.layers.", [1, 2], experts, shared, router)
    tensors = {k.replace(".layers.1.", ".layers.1.mlp_moe_gen.").replace(".layers.2.", ".layers.2.mlp_moe_gen."): v
               for k, v in tensors.items()}  # fmt: skip
    config = dict(num_experts=experts, top_k=2, num_shared_experts=int(shared > 0), transformed_gen=[1, 2])
    path = write_checkpoint(tmp_path / "BAGEL-MoE", tensors, **config)
    program = sparsec.capture(model, mot_inputs(2, 12, gen_from=5))
    pass_ = ImportMoe(path=str(path), prefix="language_model.", where="model.layers.*.mlp_moe_gen")
    record = testing.apply_pass(program, pass_)
    assert [d["path"] for d in record.decisions["ffns"]] == ["model.layers.1.mlp_moe_gen", "model.layers.2.mlp_moe_gen"]
    moe = {n.args[1].name: n for n in program.graph.find_nodes(op="call_function", target=MOE)}
    assert len(moe) == 2 and all(n.args[2] is None and n.args[10] == "one_plus_logit" for n in moe.values())
    reference = copy.deepcopy(model)
    for layer in (1, 2):
        name = f"language_model.model.layers.{layer}.mlp_moe_gen."
        reference.model.layers[layer].mlp_moe_gen = CheckpointMoe(tensors, name, experts, 2)
    testing.assert_equivalent(program, reference, mot_inputs(2, 9, gen_from=3, seed=4), rtol=1e-4, atol=1e-5)


def test_export_then_import_round_trips_bit_for_bit(tmp_path):
    model = make_model("tiny-qwen2")
    program = sparsec.capture(model, make_inputs(model, 2, 16))
    record = testing.apply_pass(program, "ffn_to_moe", **PAPER_MOE)
    gen = torch.Generator().manual_seed(1)
    for d in record.decisions["ffns"]:  # trained shared gates, as the paper's would be
        program.replace_state(d["shared_gate"], torch.randn(1, HIDDEN, generator=gen))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "llm_config.json").write_text(json.dumps({"hidden_size": HIDDEN}))
    config = export_paper_moe(program, tmp_path / "out")
    assert config == {"num_experts": 7, "top_k": 3, "num_shared_experts": 1, "transformed_gen": [0, 1, 2, 3]}
    written = json.loads((tmp_path / "out" / "llm_config.json").read_text())
    assert written == {"hidden_size": HIDDEN, **config}  # merged into the directory's config
    exported, _ = paper_moe_state(program)
    assert sorted(exported)[:4] == [
        "model.layers.0.mlp.experts.0.down_proj.weight",
        "model.layers.0.mlp.experts.0.gate_proj.weight",
        "model.layers.0.mlp.experts.0.up_proj.weight",
        "model.layers.0.mlp.experts.1.down_proj.weight",
    ]
    assert exported["model.layers.0.mlp.shared_expert.down_proj.weight"].shape == (HIDDEN, 16)

    fresh = sparsec.capture(model, make_inputs(model, 2, 16))
    testing.apply_pass(fresh, ImportMoe(path=str(tmp_path / "out" / "moe.safetensors")))
    imported, again = paper_moe_state(fresh)
    assert again == config and imported.keys() == exported.keys()
    assert all(torch.equal(imported[k], exported[k]) for k in exported)
    testing.assert_equivalent(fresh, program, make_inputs(model, 2, 9, seed=2), output="logits", rtol=0, atol=0)


@pytest.mark.parametrize(
    "damage,message",
    [
        ("drop", r"model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight is missing from ema\.safetensors; expected a "
                 r"tensor of shape \[32, 64\]"),
        ("reshape", r"model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight in ema\.safetensors has shape \[31, 64\], "
                    r"expected \[32, 64\] \(num_experts=4, num_shared_experts=0, FFN width 128, hidden 64\)"),
    ],
)  # fmt: skip
def test_a_missing_or_misshapen_tensor_is_named_with_its_shape(tmp_path, damage, message):
    tensors = paper_checkpoint("model.layers.", [1, 2], 4, 0, "random")
    tensors = {k.replace(".layers.1.", ".layers.1.mlp.").replace(".layers.2.", ".layers.2.mlp."): v
               for k, v in tensors.items()}  # fmt: skip
    name = "model.layers.2.mlp.experts.3.up_proj.weight"
    if damage == "drop":
        del tensors[name]
    else:
        tensors[name] = tensors[name][:31].clone()
    path = write_checkpoint(tmp_path, tensors, num_experts=4, top_k=2, num_shared_experts=0, transformed_gen=[1, 2])
    model = make_model("tiny-qwen2")
    program = sparsec.capture(model, make_inputs(model, 2, 8))
    code, params = program.graph_module.code, set(program.parameter_names())
    with pytest.raises(SparsecError, match=message):
        testing.apply_pass(program, ImportMoe(path=str(path)))
    assert program.graph_module.code == code and set(program.parameter_names()) == params  # nothing changed


def test_config_and_program_mismatches_are_refused(tmp_path):
    model = make_model("tiny-qwen2")
    program = sparsec.capture(model, make_inputs(model, 2, 8))
    path = write_checkpoint(tmp_path, {"x": torch.zeros(1)}, num_experts=4, top_k=2, transformed_gen=[1])
    with pytest.raises(SparsecError, match=r"the paper's config lacks \['num_shared_experts'\]"):
        testing.apply_pass(program, ImportMoe(path=str(path)))
    path = write_checkpoint(tmp_path, {"x": torch.zeros(1)}, num_experts=4, top_k=2, num_shared_experts=0,
                            transformed_gen=[1, 9])  # fmt: skip
    with pytest.raises(SparsecError, match=r"transformed_gen lists layers \[9\], which have no FFN under '\*\*'"):
        testing.apply_pass(program, ImportMoe(path=str(path)))
    (path / "llm_config.json").write_text("{not json")
    with pytest.raises(SparsecError, match=r"llm_config.json is not valid JSON .*set config: to the paper's"):
        testing.apply_pass(program, ImportMoe(path=str(path)))


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(gating="unit", router="zero"), "has gating unit .*convert with gating: one_plus_logit"),
        (dict(gating="one_plus_logit", router="random"), "has a router bias"),  # random routers get a bias
        (dict(gating="one_plus_logit", router="zero", shared=0.1), "fits no num_shared_experts"),
    ],
)
def test_export_refuses_what_the_papers_block_cannot_hold(tmp_path, options, message):
    model = make_model("tiny-qwen2")
    program = sparsec.capture(model, make_inputs(model, 2, 8))
    testing.apply_pass(
        program,
        "ffn_to_moe",
        experts=4,
        top_k=2,
        importance="magnitude",
        **{"shared": 0, "partition": "balanced", **options},
    )
    if options["router"] == "random":
        name = "model.layers.0.mlp.moe.router_bias"
        program.replace_state(name, torch.ones_like(program.state_tensor(name)))
    with pytest.raises(SparsecError, match=message):
        export_paper_moe(program, tmp_path)
    assert not (tmp_path / "moe.safetensors").exists()
