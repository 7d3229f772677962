"""BAGEL checkpoint directories: a tiny synthetic checkpoint in BAGEL's exact layout (file names, config files as its
loader reads them, tensor names of ByteDance-Seed/Bagel's `ema.safetensors`) loaded, its programs against an
independent reference of BAGEL's inference written here from its formulas, and compiled to ONNX from the CLI."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from sparsec.analysis.regions import region_index
from sparsec.cli import main
from sparsec.compiler import compile_model
from sparsec.errors import SparsecError
from sparsec.families import entry_points
from sparsec.families.mot import MoTConfig, MoTForCausalLM
from sparsec.ir.program import Program
from sparsec.models import load_model
from sparsec.recipe import Recipe

# llm_config.json as a Qwen2 config says it; BAGEL's loader overrides qk_norm / tie_word_embeddings / layer_module
LLM = dict(
    architectures=["Qwen2ForCausalLM"],
    model_type="qwen2",
    hidden_act="silu",
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=512,
    tie_word_embeddings=True,  # the loader sets False: the checkpoint holds its own lm_head
)
# vit_config.json: 3 layers, of which BAGEL's loader builds 2 (num_hidden_layers -= 1); 3 x 3 patches of 14 pixels
VIT = dict(
    model_type="siglip_vision_model",
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=2,
    patch_size=14,
    image_size=42,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)
SOI, EOI = 90, 91  # <|vision_start|>, <|vision_end|> in the tokenizer's added tokens
LATENT_SIDE, VIT_SIDE = 4, 3  # position tables of 4 x 4 latent and 3 x 3 ViT patches
PATCH = 2 * 2 * 16  # latent_patch_size 2, z_channels 16
H, HEADS, KV, D = 32, 4, 2, 8
EPS = 1e-6


def sincos_table(side: int, dim: int) -> np.ndarray:
    """BAGEL's `get_2d_sincos_pos_embed` (DiT's): half the width encodes the row, half the column, sin then cos."""

    def one_axis(width, pos):
        omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32))  # w first, as BAGEL
    return np.concatenate([one_axis(dim // 2, w), one_axis(dim // 2, h)], axis=1).astype(np.float32)


def bagel_tensors(seed: int = 0, layers: int = LLM["num_hidden_layers"]) -> dict[str, torch.Tensor]:
    """Every tensor of a BAGEL `ema.safetensors` at the tiny shapes (`layers` decoder layers), under its names, random
    but well scaled."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=None):
        return torch.randn(*shape, generator=gen) * (scale or shape[-1] ** -0.5)

    def norm(width):
        return 1 + 0.1 * torch.randn(width, generator=gen)

    inter, vocab = LLM["intermediate_size"], LLM["vocab_size"]
    t = {
        "language_model.model.embed_tokens.weight": r(vocab, H, scale=1.0),
        "language_model.lm_head.weight": r(vocab, H),
    }
    for i in range(layers):
        for sfx in ("", "_moe_gen"):
            p = f"language_model.model.layers.{i}."
            for name, rows in (("q", HEADS * D), ("k", KV * D), ("v", KV * D)):
                t[f"{p}self_attn.{name}_proj{sfx}.weight"] = r(rows, H)
                t[f"{p}self_attn.{name}_proj{sfx}.bias"] = r(rows, scale=0.1)
            t[f"{p}self_attn.o_proj{sfx}.weight"] = r(H, HEADS * D)
            t[f"{p}self_attn.q_norm{sfx}.weight"] = norm(D)
            t[f"{p}self_attn.k_norm{sfx}.weight"] = norm(D)
            t[f"{p}mlp{sfx}.gate_proj.weight"] = r(inter, H)
            t[f"{p}mlp{sfx}.up_proj.weight"] = r(inter, H)
            t[f"{p}mlp{sfx}.down_proj.weight"] = r(H, inter)
            t[f"{p}input_layernorm{sfx}.weight"] = norm(H)
            t[f"{p}post_attention_layernorm{sfx}.weight"] = norm(H)
    t["language_model.model.norm.weight"] = norm(H)
    t["language_model.model.norm_moe_gen.weight"] = norm(H)
    t["time_embedder.mlp.0.weight"], t["time_embedder.mlp.0.bias"] = r(H, 256), r(H, scale=0.1)
    t["time_embedder.mlp.2.weight"], t["time_embedder.mlp.2.bias"] = r(H, H), r(H, scale=0.1)
    t["vae2llm.weight"], t["vae2llm.bias"] = r(H, PATCH), r(H, scale=0.1)
    t["llm2vae.weight"], t["llm2vae.bias"] = r(PATCH, H), r(PATCH, scale=0.1)
    t["latent_pos_embed.pos_embed"] = torch.from_numpy(sincos_table(LATENT_SIDE, H))
    t["connector.fc1.weight"], t["connector.fc1.bias"] = r(H, VIT["hidden_size"]), r(H, scale=0.1)
    t["connector.fc2.weight"], t["connector.fc2.bias"] = r(H, H), r(H, scale=0.1)
    t["vit_pos_embed.pos_embed"] = torch.from_numpy(sincos_table(VIT_SIDE, H))
    # the SigLIP tower, its patch embedding stored as a Linear; the file holds all 3 layers, the loader uses 2
    v, vi, tower = VIT["hidden_size"], VIT["intermediate_size"], "vit_model.vision_model."
    t[tower + "embeddings.patch_embedding.weight"], t[tower + "embeddings.patch_embedding.bias"] = (
        r(v, 3 * 14 * 14),
        r(v),
    )
    t[tower + "embeddings.position_embedding.weight"] = r(VIT_SIDE**2, v, scale=1.0)
    for i in range(VIT["num_hidden_layers"]):
        p = f"{tower}encoder.layers.{i}."
        for name, shape in (
            ("self_attn.q_proj", (v, v)),
            ("self_attn.k_proj", (v, v)),
            ("self_attn.v_proj", (v, v)),
            ("self_attn.out_proj", (v, v)),
            ("mlp.fc1", (vi, v)),
            ("mlp.fc2", (v, vi)),
        ):
            t[p + name + ".weight"], t[p + name + ".bias"] = r(*shape), r(shape[0], scale=0.1)
        for name in ("layer_norm1", "layer_norm2"):
            t[p + name + ".weight"], t[p + name + ".bias"] = norm(v), r(v, scale=0.1)
    t[tower + "post_layernorm.weight"], t[tower + "post_layernorm.bias"] = norm(v), r(v, scale=0.1)
    return t


def write_checkpoint(directory, tensors, dtype=torch.float32, llm=LLM):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "llm_config.json").write_text(json.dumps(llm))
    (directory / "vit_config.json").write_text(json.dumps(VIT))
    decoder = {str(SOI): {"content": "<|vision_start|>"}, str(EOI): {"content": "<|vision_end|>"}}
    (directory / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(directory / "ema.safetensors"))
    save_file({"decoder.conv_in.weight": torch.zeros(4, 16, 3, 3)}, str(directory / "ae.safetensors"))
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("bagel") / "BAGEL-tiny", bagel_tensors())


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(checkpoint)


# ---- an independent reference of BAGEL's inference: packed context blocks through a KV cache, per sample ----


def rms(x, w):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def rope(x, positions):
    inv = 1.0 / (LLM["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    ang = positions.float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    rot = torch.cat([-x[..., D // 2 :], x[..., : D // 2]], -1)
    return x * cos + rot * sin


def reference_context(W, blocks, ffn):
    """BAGEL's `forward_inference` over a context built block by block: each block (embeddings [n, H], generation
    flags [n], rotary positions [n], causal) attends to the cached keys of the earlier blocks and to itself (causally
    or not); `ffn(W, prefix, x)` computes an FFN. Returns the last block's final-normed rows."""
    layers = {k.split(".")[3] for k in W if k.startswith("language_model.model.layers.")}
    cache = [[] for _ in layers]
    for x, is_gen, positions, causal in blocks:
        for i, past in enumerate(cache):
            x = reference_layer(W, f"language_model.model.layers.{i}.", x, is_gen, positions, causal, past, ffn)
    return per_copy(is_gen, lambda s: rms(x, W[f"language_model.model.norm{s}.weight"]))


def per_copy(is_gen, fn):
    """Every row computed with both weight copies (`fn(suffix)`), each row keeping its own (`_moe_gen` if flagged)."""
    und, gen = fn(""), fn("_moe_gen")
    return torch.where(is_gen.view(-1, *[1] * (und.dim() - 1)), gen, und)


def reference_layer(W, p, x, is_gen, positions, causal, past, ffn):
    """One MoT decoder layer; appends this block's (keys, values) to `past`, the layer's cache."""

    def proj(s, name, inp):
        return F.linear(inp, W[f"{p}self_attn.{name}_proj{s}.weight"], W.get(f"{p}self_attn.{name}_proj{s}.bias"))

    normed = per_copy(is_gen, lambda s: rms(x, W[f"{p}input_layernorm{s}.weight"]))
    q = per_copy(is_gen, lambda s: rms(proj(s, "q", normed).view(-1, HEADS, D), W[f"{p}self_attn.q_norm{s}.weight"]))
    k = per_copy(is_gen, lambda s: rms(proj(s, "k", normed).view(-1, KV, D), W[f"{p}self_attn.k_norm{s}.weight"]))
    v = per_copy(is_gen, lambda s: proj(s, "v", normed)).view(-1, KV, D)
    q, k = rope(q, positions), rope(k, positions)
    past.append((k, v))
    keys, values = torch.cat([kv[0] for kv in past]), torch.cat([kv[1] for kv in past])
    n, m = x.shape[0], keys.shape[0]
    allowed = torch.ones(n, m, dtype=torch.bool)
    if causal:
        allowed[:, m - n :] = torch.ones(n, n, dtype=torch.bool).tril()
    keys, values = keys.repeat_interleave(HEADS // KV, 1), values.repeat_interleave(HEADS // KV, 1)
    scores = torch.einsum("nhd,mhd->hnm", q, keys) / math.sqrt(D)
    attn = torch.einsum("hnm,mhd->nhd", scores.masked_fill(~allowed, -torch.inf).softmax(-1), values)
    x = x + per_copy(is_gen, lambda s: proj(s, "o", attn.reshape(n, HEADS * D)))
    return x + per_copy(is_gen, lambda s: ffn(W, f"{p}mlp{s}.", rms(x, W[f"{p}post_attention_layernorm{s}.weight"])))


def swiglu(W, p, x):
    return F.linear(
        F.silu(F.linear(x, W[p + "gate_proj.weight"])) * F.linear(x, W[p + "up_proj.weight"]), W[p + "down_proj.weight"]
    )


def grid_rows(side, rows, cols):
    return (torch.arange(rows)[:, None] * side + torch.arange(cols)[None]).reshape(-1)


def reference_velocity(W, prompt, latents, t, ffn=swiglu):
    """One sample of `Bagel._forward_flow` (no guidance): the prompt (causal, understanding weights) in the cache, then
    `<|vision_start|>`, the latent tokens (generation weights), `<|vision_end|>`, all at rotary position len(prompt),
    not causal; the velocity is llm2vae at the latent tokens."""
    emb, n, length = W["language_model.model.embed_tokens.weight"], latents.shape[0], prompt.shape[0]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    frequencies = torch.cat([torch.cos(t * freqs), torch.sin(t * freqs)])
    t_emb = F.linear(
        F.silu(F.linear(frequencies, W["time_embedder.mlp.0.weight"], W["time_embedder.mlp.0.bias"])),
        W["time_embedder.mlp.2.weight"],
        W["time_embedder.mlp.2.bias"],
    )
    side = math.isqrt(n)
    position = W["latent_pos_embed.pos_embed"][grid_rows(LATENT_SIDE, side, side)]
    tokens = F.linear(latents, W["vae2llm.weight"], W["vae2llm.bias"]) + t_emb + position
    query = torch.cat([emb[SOI][None], tokens, emb[EOI][None]])
    flags = torch.tensor([False] + [True] * n + [False])
    prompt_block = [(emb[prompt], torch.zeros(length, dtype=torch.bool), torch.arange(length), True)] if length else []
    blocks = [*prompt_block, (query, flags, torch.full((n + 2,), length), False)]  # an empty context: the image alone
    return F.linear(reference_context(W, blocks, ffn)[1 : 1 + n], W["llm2vae.weight"], W["llm2vae.bias"])


def reference_logits(W, vit_features, text):
    """One sample of BAGEL's understanding: `<|vision_start|>`, connector(ViT features) + ViT position table,
    `<|vision_end|>` at rotary position 0, not causal; then the text, causal, at 1, 2, ...; logits at the text."""
    emb, v, length = W["language_model.model.embed_tokens.weight"], vit_features.shape[0], text.shape[0]
    hidden = F.linear(vit_features, W["connector.fc1.weight"], W["connector.fc1.bias"])
    image = F.linear(F.gelu(hidden, approximate="tanh"), W["connector.fc2.weight"], W["connector.fc2.bias"])
    side = math.isqrt(v)
    image = image + W["vit_pos_embed.pos_embed"][grid_rows(VIT_SIDE, side, side)]
    blocks = [
        (
            torch.cat([emb[SOI][None], image, emb[EOI][None]]),
            torch.zeros(v + 2, dtype=torch.bool),
            torch.zeros(v + 2),
            False,
        ),
        (emb[text], torch.zeros(length, dtype=torch.bool), torch.arange(1, length + 1), True),
    ]
    return F.linear(reference_context(W, blocks, swiglu), W["language_model.lm_head.weight"])


# ---- tests ----


def test_checkpoint_loads_as_bagel_with_the_loader_overrides(checkpoint, loaded):
    """llm_config.json says tie_word_embeddings; BAGEL's loader unties (the file's lm_head is used), adds q/k norms."""
    assert loaded.family.name == "bagel" and loaded.dtype == torch.float32
    stored = load_file(str(checkpoint / "ema.safetensors"))
    params = dict(loaded.model.named_parameters())
    unused = {k for k in stored if k.startswith("vit_model.vision_model.encoder.layers.2.")}  # the layer BAGEL drops
    assert unused and set(params) == set(stored) - unused
    for name, param in params.items():
        torch.testing.assert_close(param, stored[name], rtol=0, atol=0)
    lm = loaded.model.language_model
    assert lm.lm_head.weight.data_ptr() != lm.model.embed_tokens.weight.data_ptr()


def test_language_model_equals_the_mot_reference(checkpoint, loaded):
    stored = load_file(str(checkpoint / "ema.safetensors"))
    fields = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "rope_theta",
        "max_position_embeddings",
    )
    reference = MoTForCausalLM(MoTConfig(**{f: LLM[f] for f in fields}, tie_word_embeddings=False)).eval()
    state = {k.removeprefix("language_model."): v for k, v in stored.items() if k.startswith("language_model.")}
    reference.load_state_dict(state, strict=True)
    ids = torch.randint(0, LLM["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    gen = torch.zeros_like(ids)
    gen[:, 4:] = 1
    with torch.no_grad():
        got = loaded.model.language_model(input_ids=ids, gen_mask=gen).logits
        want = reference(input_ids=ids, gen_mask=gen).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bf16_checkpoint_stays_bf16(tmp_path):
    directory = write_checkpoint(tmp_path / "bf16", bagel_tensors(), dtype=torch.bfloat16)
    loaded = load_model(directory)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    stored = load_file(str(directory / "ema.safetensors"))
    torch.testing.assert_close(loaded.model.vae2llm.weight, stored["vae2llm.weight"], rtol=0, atol=0)


@pytest.fixture(scope="module")
def entries(loaded):
    return entry_points(loaded.model)


def prompts(batch, length, seed, pad_left=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 80, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :pad_left] = 0
    return ids, mask


def test_generation_step_equals_bagel_reference_at_another_batch(checkpoint, entries):
    """Captured at batch 2 and 6 prompt tokens, run at batch 4 and 5 tokens, the first prompt left-padded by 2, the
    last all padding (BAGEL's empty text-free context of classifier-free guidance): each sample's velocity is what
    BAGEL computes for its unpadded prompt."""
    step = entries["generation_step"]
    program = step.capture(batch=2, seq=6)
    ids, mask = prompts(4, 5, seed=2, pad_left=2)
    mask[3] = 0
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(4, LATENT_SIDE**2, PATCH, generator=gen)
    timestep = torch.tensor([1.0, 0.62, 0.05, 0.62])
    inputs = {"input_ids": ids, "attention_mask": mask, "latents": latents, "timestep": timestep}
    W = load_file(str(checkpoint / "ema.safetensors"))
    want = torch.stack([reference_velocity(W, ids[b][mask[b].bool()], latents[b], timestep[b]) for b in range(4)])
    with torch.no_grad():
        eager = step.module(**inputs)["velocity"]
    torch.testing.assert_close(eager, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(program.run(inputs)["velocity"], want, rtol=1e-4, atol=1e-4)


def test_understanding_equals_bagel_reference(checkpoint, entries):
    entry = entries["understanding"]
    program = entry.capture(batch=2, seq=6)
    ids, mask = prompts(3, 7, seed=4)
    mask[1, 5:] = 0  # right padding: the valid text's logits are unchanged
    features = torch.randn(3, VIT_SIDE**2, VIT["hidden_size"], generator=torch.Generator().manual_seed(5))
    inputs = {"input_ids": ids, "attention_mask": mask, "vit_features": features}
    W = load_file(str(checkpoint / "ema.safetensors"))
    got = program.run(inputs)["logits"]
    for b in range(3):
        valid = mask[b].bool()
        torch.testing.assert_close(got[b][valid], reference_logits(W, features[b], ids[b][valid]), rtol=1e-4, atol=1e-4)


def test_component_tags(entries):
    step = entries["generation_step"].capture(batch=2, seq=6)
    tags = region_index(step).tags()
    for path in (
        "time_embedder",
        "vae2llm",
        "llm2vae",
        "latent_pos_embed",
        "language_model.model.layers.0.mlp_moe_gen",
        "language_model.model.layers.1.self_attn.q_proj_moe_gen",
        "language_model.model.norm_moe_gen",
    ):
        assert step.tagger.tag(path) == "generation", path
    assert tags["language_model.model.layers.0.mlp"] == "understanding"
    understanding = entries["understanding"].capture(batch=2, seq=6)
    assert not any("_moe_gen" in n for n in understanding.parameter_names())  # no generation weight in it
    assert understanding.tagger.tag("connector") == understanding.tagger.tag("vit_pos_embed") == "understanding"
    ffns = {f.path for f in region_index(step).ffns()}
    assert {f"language_model.model.layers.{i}.mlp_moe_gen" for i in range(2)} <= ffns


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.pop("language_model.model.layers.1.mlp_moe_gen.up_proj.weight"),
            "no tensor 'language_model.model.layers.1.mlp_moe_gen.up_proj.weight' (expected shape [48, 32]",
        ),
        (
            lambda t: t.update({"llm2vae.weight": torch.zeros(PATCH, H + 1)}),
            "tensor 'llm2vae.weight' has shape [64, 33], expected [64, 32]",
        ),
        (lambda t: t.pop("latent_pos_embed.pos_embed"), "no tensor 'latent_pos_embed.pos_embed'"),
    ],
)
def test_missing_or_misshapen_tensor_is_named(tmp_path, edit, message):
    tensors = bagel_tensors()
    edit(tensors)
    directory = write_checkpoint(tmp_path / "broken", tensors)
    with pytest.raises(SparsecError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_model(directory)


@pytest.mark.slow
def test_compile_from_the_cli_with_onnx_parity(checkpoint, tmp_path):
    """`sparsec compile --model DIR`: the three programs, the generation FFNs sliced in the step, the understanding
    FFNs sliced once and replayed (the same weights in both programs), ONNX parity checked."""
    recipe = {
        "entry_points": ["generation_step", "understanding", "vit"],
        "passes": [
            {"slice_neurons": {"keep_ratio": 0.5, "importance": "magnitude", "where": "**.mlp_moe_gen"}},
            {"slice_neurons": {"keep_ratio": 0.75, "where": "language_model.model.layers.*.mlp"}},
        ],
        "capture": {"batch": 2, "seq": 6},
        "calibration": {"samples": 4, "seq_len": 6, "batch_size": 2},
        "quality": {"gates": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main(["compile", "--model", str(checkpoint), "--recipe", str(path), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["family"] == "bagel"
    for name, output in (("generation_step", "velocity"), ("understanding", "logits"), ("vit", "vit_features")):
        assert report["entry_points"][name]["parity"]["metrics"][output]["cosine"] > 0.9999
    step = report["entry_points"]["generation_step"]
    assert step["export"]["dynamic_dims"]["latents"] == {"0": "batch"}
    assert [p["name"] for p in step["passes"]] == ["slice_neurons", "slice_neurons"]
    assert [p["name"] for p in report["entry_points"]["understanding"]["passes"]] == ["slice_neurons"]  # no gen FFN
    und = Program.load(out / "understanding" / "program.pt2")
    up = "language_model.model.layers.1.mlp.up_proj.weight"
    assert und.state_tensor(up).shape == (36, H)
    torch.testing.assert_close(
        und.state_tensor(up), Program.load(out / "generation_step" / "program.pt2").state_tensor(up)
    )
    program = Program.load(out / "generation_step" / "program.pt2")
    assert program.state_tensor("language_model.model.layers.0.mlp_moe_gen.up_proj.weight").shape == (24, H)
    inputs = {
        "input_ids": torch.randint(0, 80, (3, 4)),
        "attention_mask": torch.ones(3, 4, dtype=torch.long),
        "latents": torch.randn(3, 16, PATCH),
        "timestep": torch.rand(3),
    }
    assert program.run(inputs)["velocity"].shape == (3, 16, PATCH)


def test_inspect_shows_both_components_from_the_headers(checkpoint, capsys):
    """`sparsec inspect --model DIR`: the generation step (the first entry point) from the safetensors headers."""
    assert main(["inspect", "--model", str(checkpoint), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    components = info["components"]
    assert components["generation"]["parameters"] > 0 and components["understanding"]["parameters"] > 0
    gen_ffn = 3 * LLM["intermediate_size"] * H
    extras = (256 + 1) * H + (H + 1) * H + (PATCH + 1) * H + (H + 1) * PATCH + LATENT_SIDE**2 * H
    per_copy = 2 * (H * HEADS * D + H * KV * D) + HEADS * D + 2 * KV * D + gen_ffn + 2 * H + 2 * D
    assert components["generation"]["parameters"] == LLM["num_hidden_layers"] * per_copy + H + extras
    assert {s["path"] for s in info["block_stacks"]} == {"language_model.model.layers"}


def test_weight_only_dry_run_reads_lazily(checkpoint):
    """A 14B BAGEL's weight-only dry run reads each tensor as a pass asks: here on the tiny one, decisions equal."""
    recipe = Recipe.from_dict({"passes": [{"drop_layers": {"layers": [1], "where": "language_model.model.layers.*"}}]})
    lazy = compile_model(str(checkpoint), recipe, None, dry_run=True, progress=False, lazy=True)
    assert lazy["quality_gates"]["checked"] is False
    assert lazy["passes"][0]["parameters_after"] < lazy["passes"][0]["parameters_before"]


def test_vit_equals_transformers_siglip(checkpoint, entries):
    """The `vit` program on BAGEL's patchified image equals transformers' SigLIP vision model (its patch embedding a
    convolution again) on the image, with BAGEL's layer count."""
    import transformers

    W = load_file(str(checkpoint / "ema.safetensors"))
    config = transformers.SiglipVisionConfig(**{**VIT, "num_hidden_layers": 2}, vision_use_head=False)
    reference = transformers.SiglipVisionModel(config).eval()
    state = {k.removeprefix("vit_model.vision_model."): v for k, v in W.items() if k.startswith("vit_model.")}
    state = {k: v for k, v in state.items() if not k.startswith("encoder.layers.2.")}
    linear = state["embeddings.patch_embedding.weight"]
    state["embeddings.patch_embedding.weight"] = linear.view(-1, 14, 14, 3).permute(0, 3, 1, 2)
    own = dict(reference.named_parameters())
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in own) else ""
    reference.load_state_dict({prefix + k: v for k, v in state.items()}, strict=True)
    images = torch.randn(3, 3, 42, 42, generator=torch.Generator().manual_seed(6))
    # BAGEL's patchify: [c, h, w] -> (h/p * w/p) patches flattened (row, column, channel)
    patches = torch.einsum("bchpwq->bhwpqc", images.reshape(3, 3, 3, 14, 3, 14)).reshape(3, 9, 14 * 14 * 3)
    program = entries["vit"].capture(batch=2)
    with torch.no_grad():
        want = reference(pixel_values=images).last_hidden_state
    torch.testing.assert_close(program.run({"patches": patches})["vit_features"], want, rtol=1e-4, atol=1e-4)


def test_calibration_ids_beyond_the_vocabulary_are_refused_before_loading(checkpoint, tmp_path, capsys, monkeypatch):
    """llm_config.json's vocab_size bounds a calibration file's token ids before the model loads, as config.json's
    does elsewhere."""
    import sparsec.compiler

    monkeypatch.setattr(sparsec.compiler, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    calib = tmp_path / "calib.safetensors"
    ids = torch.full((2, 4), LLM["vocab_size"])
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, str(calib))
    argv = ["compile", "--model", str(checkpoint), "--calib", str(calib), "--dry-run", "--quiet"]
    assert main(argv) == 2
    assert f"outside the model's vocabulary [0, {LLM['vocab_size']})" in capsys.readouterr().err


def test_builtin_tiny_bagel():
    """`builtin:tiny-bagel`: BAGEL's three programs without a checkpoint, its position tables BAGEL's sin-cos values."""
    loaded = load_model("builtin:tiny-bagel")
    assert loaded.family.name == "bagel"
    model = loaded.model
    assert list(entry_points(model)) == ["generation_step", "understanding", "vit"]
    want = torch.from_numpy(sincos_table(4, 64))
    torch.testing.assert_close(model.latent_pos_embed.pos_embed, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.vit_pos_embed.pos_embed, want, rtol=0, atol=1e-6)
    inputs = loaded.family.example_inputs(model, 2, 5)
    assert set(inputs) == {"input_ids", "attention_mask", "latents", "timestep"}  # the generation step's
