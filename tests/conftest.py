import copy
import math
import os
import sys
from pathlib import Path

import pytest
import torch

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # `-n N`: share the cores instead of each worker taking all of them
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ["OMP_NUM_THREADS"] = _threads  # the CLI subprocesses tests start
    torch.set_num_threads(int(_threads))

import sparsec.testing  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "custom_pass"))  # the example pass, SkipFfn

from sparsec.families import detect_family  # noqa: E402
from sparsec.families.qwenimage import TINY_QWENIMAGE_CONFIG, QwenImageStep, qwenimage_step_inputs, tiny_qwenimage  # noqa: E402
from sparsec.models import build_model, builtin_config  # noqa: E402

MODELS = ("tiny-qwen2", "tiny-llama", "tiny-janus")


def make_model(name: str, seed: int = 0) -> torch.nn.Module:
    return build_model(builtin_config(name), seed=seed)


SMALL_DECODER = dict(  # a two-layer decoder of any Llama-like config class, for the families a test checks one by one
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def hf_builder(model_class, config_class, **config):
    """A function building `model_class(config_class(**config))` in eval mode from seed 0 (random weights)."""

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return model_class(config_class(**config)).eval()

    return build


def make_inputs(model: torch.nn.Module, batch: int, seq: int, seed: int = 0, pad_left: int = 0) -> dict:
    """Family example inputs; the first sample gets `pad_left` masked (left-padded) positions."""
    inputs = detect_family(model).example_inputs(model, batch, seq, seed=seed)
    if pad_left:
        inputs["attention_mask"][0, :pad_left] = 0
    return inputs


@pytest.fixture(scope="session")
def captured():
    """Session cache of (model, program) per built-in name. Do not mutate these programs."""
    from sparsec import capture

    cache = {}

    def get(name: str):
        if name not in cache:
            model = make_model(name)
            cache[name] = (model, capture(model, make_inputs(model, 2, 16)))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def default_artifact(tmp_path_factory):
    """(output directory, report) of `compile_model("builtin:tiny-qwen2", Recipe())`: the default compile to
    ONNX with its parity check, made once per session (per xdist worker) for the tests that only read it. Do not
    write into it; copy it first."""
    from sparsec.compiler import compile_model
    from sparsec.recipe import Recipe

    out = tmp_path_factory.mktemp("default_artifact") / "out"
    return out, compile_model("builtin:tiny-qwen2", Recipe(), out, progress=False)


def make_qwenimage(seed: int = 0) -> QwenImageStep:
    """A tiny QwenImageTransformer2DModel (random weights) as one denoising step on a 4x4 latent grid."""
    return tiny_qwenimage(seed)


def qwenimage_inputs(batch: int, text: int, seed: int = 0) -> dict:
    """Step inputs for `make_qwenimage()`: 16 latent tokens, prompts of `text` tokens."""
    c = TINY_QWENIMAGE_CONFIG
    return qwenimage_step_inputs(
        batch, text, image_tokens=16, in_channels=c["in_channels"], text_dim=c["joint_attention_dim"], seed=seed
    )


def gpu_missing(needs: tuple[str, ...] = ()) -> list[str]:
    """What a `gpu` test lacks here (empty: it can run): a CUDA device torch sees, and each of `needs` (the
    marker's arguments): `tensorrt` (the module), `onnxruntime-cuda` (ORT's CUDA provider), `triton`."""
    import importlib.util

    missing = [] if torch.cuda.is_available() else [f"torch {torch.__version__} sees no CUDA device"]
    for need in needs:
        if need in ("tensorrt", "triton") and importlib.util.find_spec(need) is None:
            missing.append(f"{need} is not installed")
        elif need == "onnxruntime-cuda":
            import onnxruntime

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                missing.append("onnxruntime has no CUDAExecutionProvider")
        elif need not in ("tensorrt", "triton", "onnxruntime-cuda"):
            raise ValueError(f"@pytest.mark.gpu({need!r}): not a known need")
    return missing


def pytest_configure(config):
    from time_budget import TimeBudget

    config.pluginmanager.register(TimeBudget(config), "sparsec-time-budget")


def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = item.get_closest_marker("gpu")
        missing = gpu_missing(marker.args) if marker else []
        if missing:
            hint = ' (pip install -e ".[gpu]")' if {"tensorrt", "onnxruntime-cuda"} & set(marker.args) else ""
            item.add_marker(pytest.mark.skip(reason=f"gpu test: {'; '.join(missing)}{hint}"))


def mot_inputs(batch: int, seq: int, gen_from: int | None, seed: int = 0) -> dict:
    """Random ids; tokens from position `gen_from` on are generation tokens (None: none are)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, seq), generator=gen)
    is_gen = torch.zeros_like(ids)
    if gen_from is not None:
        is_gen[:, gen_from:] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "gen_mask": is_gen}


def slice_by_hand(model, decisions, roles=None):
    """The reference: each FFN module's Linear layers sliced with the kept indices the pass reported.

    `roles`: the FFN's Linear modules by role, relative to the FFN path (`{"up": "intermediate.dense", "down":
    "output.dense"}`; `gate`, or `gate_up` for a fused [gate | up] projection); default: Llama's `gate_proj` /
    `up_proj` / `down_proj` where the module has them, else ViT's `fc1` / `fc2`. GPT-2's Conv1D modules
    (weight stored [in, out]) are sliced along the transposed dimensions.
    """
    reference = copy.deepcopy(model)
    for d in decisions["ffns"]:
        mlp = reference.get_submodule(d["path"])
        idx = torch.tensor(d["kept_indices"])
        names = roles or (
            {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
            if hasattr(mlp, "gate_proj")
            else {"up": "fc1", "down": "fc2"}
        )
        for role, name in names.items():
            parent, _, attr = f"{d['path']}.{name}".rpartition(".")
            owner, linear = reference.get_submodule(parent), reference.get_submodule(f"{d['path']}.{name}")
            if role == "gate_up":  # rows [gate | up], each half of width_before
                idx_role = torch.cat([idx, idx + d["width_before"]])
            else:
                idx_role = idx
            if not isinstance(linear, torch.nn.Linear):  # GPT-2's Conv1D: weight [in, out], y = x @ W + b
                weight = linear.weight.detach()
                linear.weight = torch.nn.Parameter(weight[idx_role] if role == "down" else weight[:, idx_role])
                if role != "down":
                    linear.bias = torch.nn.Parameter(linear.bias.detach()[idx_role])
                linear.nf = linear.weight.shape[1]
            elif role == "down":
                setattr(owner, attr, sparsec.testing.linear_columns(linear, idx_role))
            else:
                setattr(owner, attr, sparsec.testing.linear_rows(linear, idx_role))
    return reference


def slice_hidden_by_hand(model, kept, writers):
    """The reference for `slice_hidden`: a copy of `model` with every module of the hidden width sliced to the
    channels `kept`, found from module types and names, not from the graph.

    Embeddings of the hidden width keep columns `kept`; LayerNorms and RMSNorms (a module whose own `weight` is
    [hidden]) keep those entries; Linear modules whose path ends with one of `writers` (`("o_proj", "down_proj")`, or
    `("output.dense",)` for BERT, whose pooler is also a `dense`: they write the residual stream) keep rows `kept` and those bias entries; any other Linear with `in_features` ==
    hidden keeps columns `kept` (GPT-2's Conv1D, weight [in, out], the transposed dimensions). The config is left alone, so a constant derived from `hidden_size` (Gemma's
    sqrt(hidden) embedding normalizer) keeps its original value, as the pass keeps it.
    """
    reference = copy.deepcopy(model)
    kept = torch.as_tensor(kept)
    width = reference.get_input_embeddings().embedding_dim
    for path, module in list(reference.named_modules()):
        parent, _, leaf = path.rpartition(".")
        owner = reference.get_submodule(parent)
        if isinstance(module, torch.nn.Embedding) and module.embedding_dim == width:
            module.weight = torch.nn.Parameter(module.weight.detach()[:, kept].clone())
            module.embedding_dim = len(kept)
        elif type(module).__name__ == "Conv1D":  # GPT-2: weight [in, out], y = x @ W + b
            weight = module.weight.detach()
            if any(f".{path}".endswith(f".{w}") for w in writers):
                module.weight = torch.nn.Parameter(weight[:, kept].clone())
                module.bias = torch.nn.Parameter(module.bias.detach()[kept].clone())
                module.nf = len(kept)
            elif weight.shape[0] == width:
                module.weight = torch.nn.Parameter(weight[kept].clone())
        elif isinstance(module, torch.nn.Linear) and any(f".{path}".endswith(f".{w}") for w in writers):
            setattr(owner, leaf, sparsec.testing.linear_rows(module, kept))
        elif isinstance(module, torch.nn.Linear) and module.in_features == width:
            setattr(owner, leaf, sparsec.testing.linear_columns(module, kept))
        elif isinstance(getattr(module, "weight", None), torch.nn.Parameter) and module.weight.shape == (width,):
            module.weight = torch.nn.Parameter(module.weight.detach()[kept].clone())
            if isinstance(getattr(module, "bias", None), torch.nn.Parameter):
                module.bias = torch.nn.Parameter(module.bias.detach()[kept].clone())
            if isinstance(module, torch.nn.LayerNorm):
                module.normalized_shape = (len(kept),)
    return reference


# The paper's MoE layout with a gated shared expert, made without data (random router): what lowers and round-trips.
PAPER_MOE = dict(
    experts=7,
    top_k=3,
    shared=0.125,
    partition="balanced",
    gating="one_plus_logit",
    router="random",
    importance="magnitude",
)


def random_moe_weights(experts=4, width=8, hidden=16, gated=True, seed=0):
    """Random `sparsec::moe` weights (router, fc1, fc3, fc2 with biases), seeded."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])

    return (
        r(experts, hidden),
        r(experts),
        r(experts, width, hidden),
        r(experts, width),
        r(experts, width, hidden) if gated else None,
        None,
        r(experts, hidden, width),
    )


def paper_moe_by_hand(x, router_weight, experts, top_k, shared=None, shared_gate=None, router_bias=None):
    """The paper's MoE forward per token, written out: the k largest raw router logits (ties: lower index first)
    pick the experts, each weighted 1 + logit, plus the shared expert weighted 1 + gate_shared(x). `experts` and
    `shared` are callables on one token."""
    out = []
    for token in x.reshape(-1, x.shape[-1]):
        logits = router_weight.float() @ token.float()
        logits = (logits if router_bias is None else logits + router_bias.float()).tolist()
        chosen = sorted(range(len(logits)), key=lambda e: (-logits[e], e))[:top_k]
        y = sum((1 + logits[e]) * experts[e](token).float() for e in chosen)
        if shared is not None:
            y = y + shared(token).float() * (1 + float(shared_gate.float() @ token.float()))
        out.append(y)
    return torch.stack(out).reshape(*x.shape[:-1], -1)


class MoeOpModule(torch.nn.Module):
    """One `torch.ops.sparsec.moe` call with fixed weights: the op on its own, captured and lowered."""

    def __init__(self, weights, top_k, activation, gating):
        super().__init__()
        self.weights = [torch.nn.Parameter(w, requires_grad=False) if w is not None else None for w in weights]
        for i, w in enumerate(self.weights):
            if w is not None:
                self.register_parameter(f"w{i}", w)
        self.top_k, self.activation, self.gating = top_k, activation, gating

    def forward(self, x):
        return torch.ops.sparsec.moe(x, *self.weights, self.top_k, self.activation, self.gating)


class _ResidualMlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class TwoBlockMlp(torch.nn.Module):
    """A tiny residual network for IR and pass-manager unit tests: two blocks `x + down(relu(up(x)))` (a block
    stack `blocks.*`, each block one plain FFN 8 -> 16 -> 8), a scale buffer, a head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = torch.nn.ModuleList(_ResidualMlp() for _ in range(2))
        self.head = torch.nn.Linear(8, 4)
        self.register_buffer("scale", torch.full((8,), 0.5))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return {"y": self.head(x * self.scale)}


def compressed_llama(samples: int):
    """(the dense program of a tiny Llama, the same model with block 1 dropped and half of each FFN's neurons sliced,
    a calibration set of `samples` samples of 12 tokens, the first 4 left-padded, in batches of 3)."""
    from sparsec import capture
    from sparsec.data.calibration import CalibrationSet

    model = make_model("tiny-llama")
    dense = capture(model, make_inputs(model, 2, 16))
    program = capture(model, make_inputs(model, 2, 16))
    calibration = CalibrationSet(make_inputs(model, samples, 12, seed=3, pad_left=4), source="test", batch_size=3)
    sparsec.testing.apply_pass(program, "drop_layers", layers=[1])
    sparsec.testing.apply_pass(program, "slice_neurons", keep_ratio=0.5, calibration=calibration)
    return dense, program, calibration


def small_program(seed: int = 0):
    """(model, program) of a `TwoBlockMlp` captured with a dynamic batch dim (inputs `x` [batch, 3, 8])."""
    from sparsec import capture
    from sparsec.ir.tags import TagRule

    model = TwoBlockMlp(seed).eval()
    return model, capture(model, {"x": torch.randn(2, 3, 8)}, tags=[TagRule("**", "shared")])


MOE_MODELS = ("tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-olmoe", "tiny-deepseek-v3")


def slice_experts_by_hand(model, decisions):
    """The reference: each MoE block's fused expert weights sliced per expert with the kept rows reported
    (gate_up_proj [E, 2I, H]: rows j and I + j of expert e; down_proj [E, H, I]: column j)."""
    reference = copy.deepcopy(model)
    for d in decisions["experts"]:
        experts = reference.get_submodule(d["path"])
        kept, width = torch.tensor(d["kept_indices"]), experts.down_proj.shape[-1]
        gate_up = [w[torch.cat([k, k + width])] for w, k in zip(experts.gate_up_proj.detach(), kept)]
        experts.gate_up_proj = torch.nn.Parameter(torch.stack(gate_up))
        experts.down_proj = torch.nn.Parameter(torch.stack([w[:, k] for w, k in zip(experts.down_proj.detach(), kept)]))
    return reference


def prune_experts_by_hand(model, decisions):
    """The reference: the reported experts deleted from each MoE block (their weight slices and the router's
    rows), `num_experts` lowered to match."""
    reference = copy.deepcopy(model)
    for d in decisions["blocks"]:
        block = reference.get_submodule(d["path"])
        kept = torch.tensor(d["kept_experts"])
        for module, name in ((block.experts, "gate_up_proj"), (block.experts, "down_proj"), (block.gate, "weight")):
            setattr(module, name, torch.nn.Parameter(getattr(module, name).detach()[kept]))
        block.experts.num_experts = block.gate.num_experts = len(kept)
    return reference


_FRESH_LOAD = """
import json, sys, torch
torch.set_grad_enabled(False)
plain, custom, inputs_file, out_file = sys.argv[1:]
plain, custom = json.loads(plain), json.loads(custom)
inputs = torch.load(inputs_file, weights_only=True)


def named(value, prefix=""):  # nested outputs by dotted name, as Program.output_names spells them
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    if not items:
        return {prefix or "output": value}
    return {k: v for key, child in items for k, v in named(child, f"{prefix}.{key}" if prefix else str(key)).items()}


outputs = {key: named(torch.export.load(path).module()(**inputs[key])) for key, path in plain.items()}
imported = sorted(m for m in ("transformers", "sparsec") if m in sys.modules)
errors = {}
for key, path in custom.items():
    try:
        torch.export.load(path)
    except Exception as exc:
        errors[key] = str(exc)
if custom:
    import sparsec
    outputs.update({key: named(sparsec.load_program(path).module()(**inputs[key])) for key, path in custom.items()})
torch.save({"outputs": outputs, "imported": imported, "errors": errors}, out_file)
"""


def load_in_fresh_process(tmp_path, inputs: dict, plain: dict, custom: dict | None = None) -> dict:
    """Load and run `program.pt2` files in a new interpreter: `plain` ({key: path}) with only torch imported
    (`torch.export.load`), then `custom` ones (holding sparsec's ops) first with plain `torch.export.load` (its
    error kept) and then with `sparsec.load_program`; each runs on `inputs[key]`.

    Returns `outputs` ({key: {output name: tensor}}, nested outputs by dotted name), `imported` (which of transformers / sparsec were imported
    after the plain programs ran), `errors` ({key: plain torch.export.load's error}) and the process' `stderr`.
    """
    import json
    import subprocess

    torch.save(inputs, tmp_path / "inputs.pt")
    argv = [json.dumps({k: str(v) for k, v in paths.items()}) for paths in (plain, custom or {})]
    done = subprocess.run(
        [sys.executable, "-c", _FRESH_LOAD, *argv, str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {**torch.load(tmp_path / "outputs.pt", weights_only=True), "stderr": done.stderr}
