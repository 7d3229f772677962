"""The paper's released MoE checkpoints (BAGEL-MoE-7B-GEN-16to8): a BAGEL directory whose `llm_config.json` carries
`num_experts`, `top_k`, `num_shared_experts`, `transformed_gen` and whose `ema.safetensors` holds the converted
generation FFNs in the paper's layout instead of the dense tensors. `--model DIR` loads those MoEs as the paper's
forward computes them (checked against a per-token reference written from its formula), before any pass, so the
quality gates compare passes against the MoE model itself."""

import json
import math

import pytest
import torch
import yaml
from conftest import paper_moe_by_hand
from safetensors.torch import load_file
from test_bagel import LLM, PATCH, H, bagel_tensors, prompts, reference_velocity, swiglu, write_checkpoint

from sparsec import testing
from sparsec.cli import main
from sparsec.compiler import compile_model
from sparsec.families import entry_points
from sparsec.ir.program import Program
from sparsec.models import load_model
from sparsec.passes.moe_layout import export_paper_moe
from sparsec.recipe import Recipe

MOE = torch.ops.sparsec.moe.default
LAYERS = 4
CONVERTED = [1, 2]  # the paper converts every layer but the first and the last
EXPERTS, TOP_K = 4, 2
# the paper's sizes of the 48-neuron FFN: num_shared_experts S -> (shared width I // (E + S) * S, expert width)
SIZES = {0: (0, 12), 2: (16, 8)}
LLM4 = {**LLM, "num_hidden_layers": LAYERS}
GEN_FFN = "language_model.model.layers.{}.mlp_moe_gen"


def moe_tensors(shared_experts, seed=0):
    """A dense 4-layer BAGEL's tensors with layers 1 and 2's generation FFNs in the paper's layout: random experts,
    router and shared gate (as after the paper's training), the dense tensors absent."""
    tensors = bagel_tensors(seed, layers=LAYERS)
    gen = torch.Generator().manual_seed(seed + 100)

    def r(*shape):
        return torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])

    shared, width = SIZES[shared_experts]
    for layer in CONVERTED:
        p = GEN_FFN.format(layer) + "."
        for proj in ("gate_proj", "up_proj", "down_proj"):
            del tensors[f"{p}{proj}.weight"]
        tensors[p + "gate.weight"] = r(EXPERTS, H)
        tensors[p + "gate_shared.weight"] = r(1, H)
        for part, size in [(f"experts.{e}.", width) for e in range(EXPERTS)] + [("shared_expert.", shared)] * bool(
            shared
        ):
            tensors[f"{p}{part}gate_proj.weight"] = r(size, H)
            tensors[f"{p}{part}up_proj.weight"] = r(size, H)
            tensors[f"{p}{part}down_proj.weight"] = r(H, size)
    return tensors


def moe_config(shared_experts):
    return {
        **LLM4,
        "num_experts": EXPERTS,
        "top_k": TOP_K,
        "num_shared_experts": shared_experts,
        "transformed_gen": CONVERTED,
    }


def write_moe_checkpoint(directory, shared_experts, tensors=None, dtype=torch.float32):
    tensors = moe_tensors(shared_experts) if tensors is None else tensors
    return write_checkpoint(directory, tensors, dtype, llm=moe_config(shared_experts))


def paper_ffn(W, p, x):
    """An FFN of the reference: the paper's MoE per token where the checkpoint holds its router, else SwiGLU."""
    if p + "gate.weight" not in W:
        return swiglu(W, p, x)
    experts = [lambda t, e=e: swiglu(W, f"{p}experts.{e}.", t) for e in range(EXPERTS)]
    has_shared = p + "shared_expert.gate_proj.weight" in W
    shared = (lambda t: swiglu(W, p + "shared_expert.", t)) if has_shared else None
    return paper_moe_by_hand(x, W[p + "gate.weight"], experts, TOP_K, shared, W[p + "gate_shared.weight"]).to(x.dtype)


def moe_nodes(program):
    return {
        list(n.meta["nn_module_stack"].values())[-1][0]: n
        for n in program.graph.find_nodes(op="call_function", target=MOE)
    }


def step_inputs(batch, length, seed):
    ids, mask = prompts(batch, length, seed, pad_left=1)
    gen = torch.Generator().manual_seed(seed + 1)
    latents = torch.randn(batch, 16, PATCH, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "latents": latents, "timestep": torch.rand(batch, generator=gen)}


@pytest.mark.parametrize("shared_experts", [0, 2])
def test_generation_step_is_the_papers_moe_forward(tmp_path, shared_experts):
    """Captured at batch 2 and 6 prompt tokens, run at batch 3 and 5: the velocity equals BAGEL's inference with
    the converted FFNs computed per token as the paper's block does; the program holds the checkpoint's MoEs."""
    directory = write_moe_checkpoint(tmp_path / "BAGEL-MoE", shared_experts)
    step = entry_points(load_model(directory).model)["generation_step"]
    program = step.capture(batch=2, seq=6)
    nodes = moe_nodes(program)
    assert sorted(nodes) == [GEN_FFN.format(i) for i in CONVERTED]
    assert all(n.args[8] == TOP_K and n.args[10] == "one_plus_logit" for n in nodes.values())
    shared, width = SIZES[shared_experts]
    W = load_file(str(directory / "ema.safetensors"))
    for i in CONVERTED:
        p = GEN_FFN.format(i)
        torch.testing.assert_close(program.state_tensor(f"{p}.moe.router_weight"), W[f"{p}.gate.weight"])
        fc2 = program.state_tensor(f"{p}.moe.fc2_weight")
        assert fc2.shape == (EXPERTS, H, width)
        torch.testing.assert_close(fc2[3], W[f"{p}.experts.3.down_proj.weight"], rtol=0, atol=0)
        assert (f"{p}.moe.shared_gate_weight" in program.parameter_names()) == bool(shared)
        assert (f"{p}.up_proj.weight" in program.parameter_names()) == bool(shared)
    inputs = step_inputs(3, 5, seed=7)
    mask = inputs["attention_mask"]
    want = torch.stack(
        [
            reference_velocity(W, inputs["input_ids"][b][mask[b].bool()], inputs["latents"][b], inputs["timestep"][b],
                               paper_ffn)
            for b in range(3)
        ]
    )  # fmt: skip
    torch.testing.assert_close(program.run(inputs)["velocity"], want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(step.module(**inputs)["velocity"], want, rtol=1e-4, atol=1e-4)
    dense = reference_velocity(W | bagel_tensors(layers=LAYERS), inputs["input_ids"][0][1:], inputs["latents"][0],
                               inputs["timestep"][0])  # fmt: skip
    assert not torch.allclose(want[0], dense, atol=1e-2)  # the MoE, not a dense FFN, made the velocity


def test_bf16_and_lazy_loads_keep_the_moe(tmp_path):
    """A bf16 checkpoint's MoE weights stay bf16; lazily, inspect and a weight-only dry run read them on demand."""
    directory = write_moe_checkpoint(tmp_path / "bf16", 2, dtype=torch.bfloat16)
    loaded = load_model(directory)
    moe = loaded.model.language_model.model.layers[1].mlp_moe_gen
    assert {p.dtype for p in moe.parameters()} == {torch.bfloat16}
    W = load_file(str(directory / "ema.safetensors"))
    torch.testing.assert_close(
        moe.moe.fc1_weight[2], W[GEN_FFN.format(1) + ".experts.2.gate_proj.weight"], rtol=0, atol=0
    )

    lazy = load_model(directory, weights="lazy")
    program = entry_points(lazy.model)["generation_step"].capture(batch=2, seq=6)
    lazy.attach_weights(program)
    name = GEN_FFN.format(2) + ".moe.fc3_weight"
    assert name in program.lazy_state()
    read = program.state_tensor(name)
    assert read.dtype == torch.bfloat16 and torch.equal(read[1], W[GEN_FFN.format(2) + ".experts.1.up_proj.weight"])
    recipe = Recipe.from_dict({"passes": [{"drop_layers": {"layers": [3], "where": "language_model.model.layers.*"}}]})
    report = compile_model(str(directory), recipe, None, dry_run=True, progress=False, lazy=True)
    assert report["passes"][0]["parameters_after"] < report["passes"][0]["parameters_before"]


def test_inspect_counts_the_moe_from_the_headers(tmp_path, capsys):
    directory = write_moe_checkpoint(tmp_path / "BAGEL-MoE", 2)
    assert main(["inspect", "--model", str(directory), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    shared, width = SIZES[2]
    moe = EXPERTS * H + H + 3 * shared * H + 3 * EXPERTS * width * H  # router, shared gate, shared expert, experts
    dense = 3 * LLM["intermediate_size"] * H
    counted = info["components"]["generation"]["parameters"]
    write_checkpoint(tmp_path / "dense", bagel_tensors(layers=LAYERS), llm=LLM4)
    assert main(["inspect", "--model", str(tmp_path / "dense"), "--json"]) == 0
    dense_count = json.loads(capsys.readouterr().out)["components"]["generation"]["parameters"]
    assert counted - dense_count == len(CONVERTED) * (moe - dense)


@pytest.mark.slow
def test_compile_from_the_cli_gates_against_the_moe_model(tmp_path):
    """`sparsec compile --model DIR` with the default quality gates: the understanding FFNs sliced, the gates and
    the ONNX parity measured against the checkpoint's MoE model; program.pt2 holds its MoEs."""
    directory = write_moe_checkpoint(tmp_path / "BAGEL-MoE", 2)
    recipe = {
        "passes": [{"slice_neurons": {"keep_ratio": 0.875, "where": "language_model.model.layers.*.mlp"}}],
        "capture": {"batch": 2, "seq": 6},
        "calibration": {"samples": 10, "seq_len": 6, "batch_size": 2},  # 2 held out for the gates
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main(["compile", "--model", str(directory), "--recipe", str(path), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["quality_gates"]["source"] == "default" and report["quality_gates"]["checked"]
    assert report["parity"]["metrics"]["velocity"]["cosine"] > 0.9999
    program = Program.load(out / "program.pt2")
    assert sorted(moe_nodes(program)) == [GEN_FFN.format(i) for i in CONVERTED]
    W = load_file(str(directory / "ema.safetensors"))
    router = GEN_FFN.format(1) + ".moe.router_weight"
    torch.testing.assert_close(program.state_tensor(router), W[GEN_FFN.format(1) + ".gate.weight"], rtol=0, atol=0)
    assert program.state_tensor("language_model.model.layers.1.mlp.up_proj.weight").shape == (42, H)


def test_export_then_load_round_trips(tmp_path):
    """A dense checkpoint's generation FFNs converted by ffn_to_moe (router and shared gates then set, as trained),
    written by export_paper_moe into a BAGEL directory in place of the dense tensors, load back as the same MoEs."""
    dense = bagel_tensors(layers=LAYERS)
    source = write_checkpoint(tmp_path / "dense", dense, llm=LLM4)
    step = entry_points(load_model(source).model)["generation_step"]
    program = step.capture(batch=2, seq=6)
    where = "language_model.model.layers.{1-2}.mlp_moe_gen"
    options = dict(
        experts=EXPERTS,
        top_k=TOP_K,
        shared=1 / 3,
        partition="balanced",
        gating="one_plus_logit",
        router="zero",
        where=where,
    )
    record = testing.apply_pass(program, "ffn_to_moe", importance="magnitude", **options)
    gen = torch.Generator().manual_seed(5)
    for d in record.decisions["ffns"]:
        program.replace_state(d["shared_gate"], torch.randn(1, H, generator=gen) * 0.2)
        router = d["path"] + ".moe.router_weight"
        program.replace_state(router, torch.randn(EXPERTS, H, generator=gen) * 0.2)
    config = export_paper_moe(program, tmp_path / "export", where=where)
    assert config == {"num_experts": EXPERTS, "top_k": TOP_K, "num_shared_experts": 2, "transformed_gen": CONVERTED}

    tensors = {k: v for k, v in dense.items() if not any(k.startswith(GEN_FFN.format(i) + ".") for i in CONVERTED)}
    tensors |= load_file(str(tmp_path / "export" / "moe.safetensors"))
    directory = write_checkpoint(tmp_path / "BAGEL-MoE", tensors, llm={**LLM4, **config})
    loaded = entry_points(load_model(directory).model)["generation_step"].capture(batch=2, seq=6)
    assert set(loaded.parameter_names()) == set(program.parameter_names())
    assert all(torch.equal(loaded.state_tensor(n), program.state_tensor(n)) for n in program.parameter_names())
    inputs = step_inputs(3, 4, seed=9)
    torch.testing.assert_close(loaded.run(inputs)["velocity"], program.run(inputs)["velocity"], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.pop("language_model.model.layers.2.mlp_moe_gen.experts.3.up_proj.weight"),
            "no tensor 'language_model.model.layers.2.mlp_moe_gen.experts.3.up_proj.weight' (expected shape [8, 32]",
        ),
        (
            lambda t: t.update({"language_model.model.layers.1.mlp_moe_gen.gate.weight": torch.zeros(5, H)}),
            "tensor 'language_model.model.layers.1.mlp_moe_gen.gate.weight' has shape [5, 32], expected [4, 32]",
        ),
        (
            lambda t: t.pop("language_model.model.layers.1.mlp_moe_gen.shared_expert.down_proj.weight"),
            "no tensor 'language_model.model.layers.1.mlp_moe_gen.shared_expert.down_proj.weight' (expected shape "
            "[32, 16]",
        ),
    ],
)
def test_a_missing_or_misshapen_moe_tensor_is_named(tmp_path, capsys, edit, message):
    tensors = moe_tensors(2)
    edit(tensors)
    directory = write_moe_checkpoint(tmp_path / "broken", 2, tensors)
    assert main(["inspect", "--model", str(directory)]) == 2  # checked from the headers, before anything runs
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"top_k": None}, "needs ['num_experts', 'top_k', 'num_shared_experts'] as integers"),
        ({"top_k": 5}, "top_k=5, num_shared_experts=0 do not fit 4 layers"),
        ({"transformed_gen": [1, 4]}, "transformed_gen [1, 4], num_experts=4"),
        ({"transformed_und": True}, "sparsec loads only the generation FFNs' MoEs"),
    ],
)
def test_a_bad_moe_config_is_refused(tmp_path, capsys, edit, message):
    directory = write_moe_checkpoint(tmp_path / "BAGEL-MoE", 0)
    config = {k: v for k, v in {**moe_config(0), **edit}.items() if v is not None}
    (directory / "llm_config.json").write_text(json.dumps(config))
    assert main(["inspect", "--model", str(directory)]) == 2
    assert message in capsys.readouterr().err


def test_without_transformed_gen_the_checkpoint_is_dense(tmp_path):
    """As the paper's decoder layer reads the config: no `transformed_gen`, no MoE, whatever else it says."""
    config = {**LLM4, "num_experts": EXPERTS, "top_k": TOP_K, "num_shared_experts": 0}
    directory = write_checkpoint(tmp_path / "dense", bagel_tensors(layers=LAYERS), llm=config)
    program = entry_points(load_model(directory).model)["generation_step"].capture(batch=2, seq=6)
    assert not moe_nodes(program)
