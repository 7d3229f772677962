"""Janus' generation entry points (one image-generation step, the VQ decode) captured, rewritten and lowered,
against the Hugging Face model's own generate() / decode_image_tokens and hand-edited copies of it."""

import copy

import pytest
import torch
from transformers import DynamicCache

import sparsec
from sparsec import testing
from sparsec.analysis.inspection import inspect_program
from sparsec.analysis.regions import region_index
from sparsec.data.calibration import CalibrationSet
from sparsec.exporters.lowering.onnx import export_onnx
from sparsec.families import entry_points
from sparsec.families.janus import JANUS, JanusGenerationStep
from sparsec.models import build_model, builtin_config

MOE = torch.ops.sparsec.moe.default
BOS, BOI, PAD = 1, 3, 0
GUIDANCE = 2.0
GENERATION_MODULES = ("model.generation_embeddings", "model.generation_aligner", "model.generation_head")


def make_janus():
    """builtin:tiny-janus, set up so that generate(generation_mode="image") runs and its tokens decode.

    The built-in config keeps transformers' default `num_image_tokens` (576) while its VQ grid is 4 x 4: set it to
    16 so a generated image decodes. The generation embeddings are scaled to unit-ish size (init std 0.02 leaves
    image tokens almost no say in the hidden state, so every step would pick the same token).
    """
    config = builtin_config("tiny-janus")
    config.vision_config.num_image_tokens = 16
    model = build_model(config)
    model.generation_config.pad_token_id = PAD
    model.generation_config.generation_kwargs = {"boi_token_id": BOI}
    with torch.no_grad():
        model.model.generation_embeddings.weight.mul_(30)
    return model


@pytest.fixture(scope="module")
def janus():
    return make_janus()


@pytest.fixture(scope="module")
def entries(janus):
    return JANUS.entry_points(janus)


@pytest.fixture(scope="module")
def step_program(entries):
    """Captured at 2 prompts x 8 tokens, 4 image tokens. Do not mutate."""
    return entries["generation_step"].capture(batch=2, seq=8)


@pytest.fixture(scope="module")
def vq_program(entries):
    return entries["vq_decode"].capture(batch=2)


def prompts(batch, seq, seed, pad_left=0):
    """BOS, random text, BOI (the layout Janus' processor makes); the first prompt left-padded by `pad_left`."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 200, (batch, seq), generator=gen)
    ids[:, 0], ids[:, -1] = BOS, BOI
    mask = torch.ones_like(ids)
    if pad_left:
        ids[0, :pad_left], mask[0, :pad_left] = PAD, 0
        ids[0, pad_left] = BOS
    return ids, mask


def with_unconditional(ids, mask):
    """generate()'s classifier-free-guidance batch: the prompts, then copies with all but BOS / BOI padded."""
    uncond = ids.masked_fill((ids != BOS) & (ids != BOI), PAD)
    return torch.cat([ids, uncond]), mask.repeat(2, 1)


def step_inputs(batch, seq, image, seed, pad_left=0):
    ids, mask = prompts(batch, seq, seed, pad_left)
    image_ids = torch.randint(0, 64, (batch, image), generator=torch.Generator().manual_seed(seed + 1))
    return {"input_ids": ids, "attention_mask": mask, "image_ids": image_ids}


def test_registry_shares_weights_and_keeps_hf_paths(janus, entries):
    assert sorted(entries) == ["generation_step", "understanding", "vq_decode"]
    assert sorted(entry_points(janus)) == sorted(entries)
    assert entries["understanding"].module is janus
    hf = dict(janus.named_parameters())
    for name in ("generation_step", "vq_decode"):
        params = dict(entries[name].module.named_parameters())
        assert params and all(p is hf[n] for n, p in params.items())  # same names, same tensors: nothing copied
    assert entries["generation_step"].dynamic_dims["image_ids"] == {0: "batch", 1: "image_seq"}
    with pytest.raises(sparsec.SparsecError, match="not a transformers JanusForConditionalGeneration"):
        JanusGenerationStep(build_model(builtin_config("tiny-llama")))


def test_step_program_reproduces_generate_tokens_and_scores(janus, step_program):
    """All 16 greedy CFG steps of generate(generation_mode="image") from one program call (teacher forcing):
    its logits, mixed as CFG mixes them, pick generate's tokens; the last position is generate's last scores."""
    ids, mask = prompts(2, 6, seed=3, pad_left=2)
    out = janus.generate(
        ids,
        attention_mask=mask,
        generation_mode="image",
        do_sample=False,
        guidance_scale=GUIDANCE,
        return_dict_in_generate=True,
        output_scores=True,
    )
    tokens = out.sequences
    assert tokens.shape == (2, 16) and len(set(tokens.flatten().tolist())) > 3
    both_ids, both_mask = with_unconditional(ids, mask)
    logits = step_program.run(
        {"input_ids": both_ids, "attention_mask": both_mask, "image_ids": tokens[:, :-1].repeat(2, 1)}
    )["logits"]
    assert logits.shape == (4, 16, 64)
    cond, uncond = logits.split(2)
    assert torch.equal((uncond + (cond - uncond) * GUIDANCE).argmax(-1), tokens)
    torch.testing.assert_close(logits[:, -1], out.scores, rtol=1e-5, atol=1e-5)  # raw head output, both halves


def kv_cache_steps(janus, ids, mask, image_ids):
    """generate()'s per-step computation written out with the model's own modules: prefill the prompt embeddings,
    then one image-token embedding per step through a KV cache; the generation head on each last hidden state."""
    model = janus.model
    cache = DynamicCache(config=janus.config.text_config)
    embeds = janus.get_input_embeddings()(ids)
    scores = []
    with torch.no_grad():
        for i in range(image_ids.shape[1] + 1):
            hidden = model.language_model(
                inputs_embeds=embeds, attention_mask=mask, past_key_values=cache, use_cache=True
            ).last_hidden_state
            scores.append(model.generation_head(hidden[:, -1]))
            if i < image_ids.shape[1]:
                embeds = janus.prepare_embeddings_for_image_generation(image_ids[:, i : i + 1])
                mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
    return torch.stack(scores, dim=1)


@pytest.mark.parametrize("image", [0, 1, 6])
def test_step_program_equals_kv_cache_stepping_at_other_shapes(janus, step_program, image):
    inputs = step_inputs(3, 5, image, seed=11, pad_left=2)
    got = step_program.run(inputs)["logits"]
    assert got.shape == (3, image + 1, 64)
    want = kv_cache_steps(janus, inputs["input_ids"], inputs["attention_mask"], inputs["image_ids"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_vq_program_equals_decode_image_tokens(janus, vq_program):
    image_ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = janus.decode_image_tokens(image_ids)
    got = vq_program.run({"image_ids": image_ids})["pixel_values"]
    assert got.shape == want.shape == (3, 8, 8, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="16"):  # the VQ grid is fixed: 4 x 4 tokens, nothing else
        vq_program.run({"image_ids": image_ids[:, :9]})


def test_component_tags(janus, step_program, vq_program, entries):
    step_tags = region_index(step_program).tags()
    assert all(step_tags[path] == "generation" for path in GENERATION_MODULES)
    assert step_tags["model.language_model"] == step_tags["model.language_model.layers.0.mlp"] == "shared"
    assert not any(p.startswith(("model.vision_model", "model.aligner", "model.vqmodel", "lm_head")) for p in step_tags)
    step_info = inspect_program(step_program, entries["generation_step"].example_inputs(2, 8))
    generation_params = sum(p.numel() for m in GENERATION_MODULES for p in janus.get_submodule(m).parameters())
    assert step_info["components"]["generation"]["parameters"] == generation_params
    assert step_info["components"]["shared"]["parameters"] == sum(
        p.numel() for p in janus.model.language_model.parameters()
    )
    assert step_info["components"]["understanding"] == {"parameters": 0, "flops": 0}

    vq_tags = {p: t for p, t in region_index(vq_program).tags().items() if p.startswith("model.")}
    assert vq_tags and set(vq_tags.values()) == {"generation"}
    vq_info = inspect_program(vq_program, entries["vq_decode"].example_inputs(2))
    assert vq_info["components"]["generation"]["parameters"] == vq_program.num_parameters() > 0
    assert vq_info["components"]["generation"]["flops"] == vq_info["flops"] > 0


def _up_down(module):
    """The (up, down[, gate]) Linear attribute names of each FFN-shaped module of Janus' generation step."""
    if hasattr(module, "gate_proj"):
        return "up_proj", "down_proj", "gate_proj"
    if hasattr(module, "proj_out"):
        return "proj_out", "vision_head", None
    return "fc1", "hidden_layers", None


def _linear(module, name):
    return module.hidden_layers[0] if name == "hidden_layers" else getattr(module, name)


def magnitude_keep(module, keep):
    """Hand-computed magnitude importance: ||W_down[:, j]|| * ||W_up[j, :]|| (* ||W_gate[j, :]||), top `keep`, sorted."""
    up, down, gate = _up_down(module)
    score = _linear(module, down).weight.norm(dim=0) * _linear(module, up).weight.norm(dim=1)
    if gate:
        score = score * _linear(module, gate).weight.norm(dim=1)
    return sorted(score.topk(keep).indices.tolist())


def slice_by_hand(model, kept):
    reference = copy.deepcopy(model)
    for path, idx in kept.items():
        module = reference.get_submodule(path)
        idx = torch.tensor(idx)
        up, down, gate = _up_down(module)
        for name in (up, gate):
            if name:
                setattr(module, name, testing.linear_rows(getattr(module, name), idx))
        if down == "hidden_layers":
            module.hidden_layers[0] = testing.linear_columns(module.hidden_layers[0], idx)
        else:
            setattr(module, down, testing.linear_columns(getattr(module, down), idx))
    return reference


def test_slice_neurons_on_generation_and_language_ffns(janus, entries):
    program = entries["generation_step"].capture(batch=2, seq=8)
    ffns = {f.path: f.kind for f in region_index(program).ffns()}
    assert ffns == {
        "model.generation_aligner": "plain",
        "model.generation_head": "plain",
        **{f"model.language_model.layers.{i}.mlp": "gated" for i in range(4)},
    }
    generation = testing.apply_pass(
        program, "slice_neurons", keep=24, where="model.generation_*", importance="magnitude"
    )
    language = testing.apply_pass(
        program, "slice_neurons", keep=48, where="model.language_model.**", importance="magnitude"
    )
    kept = {d["path"]: d["kept_indices"] for r in (generation, language) for d in r.decisions["ffns"]}
    assert set(kept) == set(ffns)
    for path, idx in kept.items():
        assert idx == magnitude_keep(janus.get_submodule(path), 24 if "generation" in path else 48), path
    reference = slice_by_hand(janus, kept)
    assert program.num_parameters() == sum(
        p.numel()
        for n, p in reference.named_parameters()
        if n.startswith(("model.language_model", *GENERATION_MODULES))
    )
    testing.assert_equivalent(
        program, JanusGenerationStep(reference), step_inputs(3, 5, 7, seed=2, pad_left=1), rtol=1e-5, atol=1e-5
    )


def test_ffn_to_moe_with_every_expert_active_is_exact(janus, entries):
    step = entries["generation_step"]
    program = step.capture(batch=2, seq=8)
    calibration = CalibrationSet(step.example_inputs(8, 8, seed=3), source="test inputs")
    record = testing.apply_pass(program, "ffn_to_moe", experts=4, top_k=4, router="similarity", calibration=calibration)
    paths = {d["path"] for d in record.decisions["ffns"]}
    assert {"model.generation_aligner", "model.generation_head", "model.language_model.layers.3.mlp"} <= paths
    assert len(program.graph.find_nodes(op="call_function", target=MOE)) == len(paths) == 6
    assert all(d["exactness_rel_l2"] < 1e-5 for d in record.decisions["ffns"])
    testing.assert_equivalent(program, step.module, step_inputs(3, 5, 7, seed=2, pad_left=1), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_step_onnx_matches_the_model_at_other_shapes(tmp_path, step_program, entries):
    facts = export_onnx(step_program, tmp_path / "step.onnx")
    assert {"batch", "seq", "image_seq"} <= {n for axes in facts["dynamic_dims"].values() for n in axes.values()}
    for batch, seq, image in [(3, 5, 7), (1, 11, 0)]:
        testing.assert_onnx_equivalent(
            tmp_path / "step.onnx",
            entries["generation_step"].module,
            step_inputs(batch, seq, image, seed=4),
            output="logits",
        )


@pytest.mark.slow
def test_vq_decode_onnx_matches_decode_image_tokens(tmp_path, janus, vq_program):
    export_onnx(vq_program, tmp_path / "vq.onnx")
    image_ids = torch.randint(0, 64, (5, 16), generator=torch.Generator().manual_seed(6))
    testing.assert_onnx_equivalent(
        tmp_path / "vq.onnx",
        lambda image_ids: janus.decode_image_tokens(image_ids),
        {"image_ids": image_ids},
        output="pixel_values",
    )
