"""`sparsec analyze`: each sweep point equals the compression made by hand; statistics, errors, report files."""

import copy
import json
import re

import pytest
import torch
from conftest import mot_inputs

import sparsec
from sparsec import testing
from sparsec.cli import main
from sparsec.data.calibration import CalibrationSet
from sparsec.families import entry_points
from sparsec.ir.tags import TagRule
from sparsec.models import build_model, builtin_config
from sparsec.probe import (
    COMPONENTS,
    AnalysisError,
    Probe,
    Task,
    _mean_pairwise,
    format_markdown,
    task_entry,
    write_report,
)


def _set(batches: list[dict]) -> CalibrationSet:
    return CalibrationSet({k: torch.cat([b[k] for b in batches]) for k in batches[0]}, source="test", batch_size=4)


@pytest.fixture(scope="module")
def mot_probe():
    model = build_model(builtin_config("tiny-mot"))
    program = sparsec.capture(model, mot_inputs(2, 16, 8))
    und = _set([mot_inputs(4, 14, None, seed=1), mot_inputs(2, 14, None, seed=2)])
    gen = _set([mot_inputs(6, 14, 4, seed=3)])
    probe = Probe([Task("understanding", program, und), Task("generation", program, gen)])
    stats, top_sets = probe._collect()
    return model, program, probe, stats, top_sets


def _hooked_mean_abs(model, module_path: str, calibrations) -> torch.Tensor:
    """E|h| at the module's down projection input over every token it sees, by a forward hook on the eager model."""
    total, count = 0, 0

    def hook(_module, args):
        nonlocal total, count
        h = args[0].reshape(-1, args[0].shape[-1]).abs()
        total, count = total + h.sum(0), count + h.shape[0]

    handle = model.get_submodule(module_path + ".down_proj").register_forward_pre_hook(hook)
    with torch.no_grad():
        for calib in calibrations:
            model(**calib.inputs)
    handle.remove()
    return total / count


def test_width_point_equals_hand_sliced_generation_ffns(mot_probe):
    model, program, probe, stats, _ = mot_probe
    plan = probe.plan(program, "generation", "width", 0.5, stats[id(program)])
    assert {f.path for f in plan["kept_neurons"]} == {f"model.layers.{i}.mlp_moe_gen" for i in range(4)}
    reference = copy.deepcopy(model)
    for ffn, kept in plan["kept_neurons"].items():
        # importance as slice_neurons defines it, pooled over both tasks, recomputed with hooks on the eager model
        mlp = model.get_submodule(ffn.path)
        score = _hooked_mean_abs(model, ffn.path, [t.calibration for t in probe.tasks]) * mlp.down_proj.weight.norm(
            dim=0
        )
        assert kept.tolist() == score.topk(64).indices.sort().values.tolist()
        ref_mlp = reference.get_submodule(ffn.path)
        for name in ("gate_proj", "up_proj"):
            getattr(ref_mlp, name).weight.data = getattr(ref_mlp, name).weight.data[kept]
        ref_mlp.down_proj.weight.data = ref_mlp.down_proj.weight.data[:, kept]
    for task in probe.tasks:
        got = probe.outputs(task, plan)
        for out, batch in zip(got, task.calibration.batches()):
            torch.testing.assert_close(out["logits"], reference(**batch).logits, rtol=1e-5, atol=1e-5)


def test_mot_depth_point_skips_only_the_components_tokens(mot_probe):
    """Skipping understanding blocks: understanding tokens pass those layers unchanged, generation tokens do not."""
    model, program, probe, stats, _ = mot_probe
    plan = probe.plan(program, "understanding", "depth", 0.5, stats[id(program)])
    skipped = [b.path for b in plan["skipped_blocks"]]
    assert len(skipped) == 2
    # the ranking is drop_layers': mean cos(block input, block output) over understanding tokens, highest first
    cos = {b.path: stats[id(program)].cosine(b) for b in probe.targets[(id(program), "understanding")].blocks}
    assert set(skipped) == set(sorted(cos, key=cos.get, reverse=True)[:2])
    reference = copy.deepcopy(model)
    for path in skipped:
        layer = reference.get_submodule(path)
        original = layer.forward

        def forward(flat, modality, shape, cos_, sin, mask, original=original):
            out = original(flat, modality, shape, cos_, sin, mask)
            und_rows = torch.zeros(flat.shape[0], 1, dtype=torch.bool)
            und_rows[modality.und] = True
            return torch.where(und_rows, flat, out)

        layer.forward = forward
    task = probe.tasks[1]
    for out, batch in zip(probe.outputs(task, plan), task.calibration.batches()):
        torch.testing.assert_close(out["logits"], reference(**batch).logits, rtol=1e-5, atol=1e-5)


def test_tagged_blocks_drop_like_drop_layers():
    """A component made of whole blocks (tags on a plain decoder): the sweep point equals drop_layers' result."""
    model = build_model(builtin_config("tiny-qwen2"))
    ids = torch.randint(0, 256, (8, 12), generator=torch.Generator().manual_seed(0))
    calib = CalibrationSet({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, source="test", batch_size=4)
    tags = [TagRule("model.layers.*", "generation")]
    program = sparsec.capture(model, {"input_ids": ids[:2], "attention_mask": torch.ones_like(ids[:2])}, tags=tags)
    probe = Probe([Task("t", program, calib)], components=["generation"], kinds=["depth"])
    stats, _ = probe._collect()
    plan = probe.plan(program, "generation", "depth", 0.5, stats[id(program)])
    dropped = sparsec.capture(model, {"input_ids": ids[:2], "attention_mask": torch.ones_like(ids[:2])}, tags=tags)
    record = testing.apply_pass(dropped, "drop_layers", ratio=0.5, where="model.layers.*", calibration=calib)
    assert sorted(b.path for b in plan["skipped_blocks"]) == sorted(record.decisions["dropped"])
    for out, batch in zip(probe.outputs(probe.tasks[0], plan), calib.batches()):
        torch.testing.assert_close(out["logits"], dropped.run(batch)["logits"], rtol=1e-5, atol=1e-5)


def test_sparsity_overlap(mot_probe):
    _, program, probe, _, top_sets = mot_probe
    assert _mean_pairwise([{1, 2}, {2, 3}, {1, 2}], None) == pytest.approx((1 / 3 + 1 + 1 / 3) / 3)
    assert _mean_pairwise([{1, 2}], [{2, 3}, {4}]) == pytest.approx((1 / 3 + 0) / 2)
    # generation FFNs see no tokens of the understanding task; understanding FFNs see both tasks' samples
    assert set(top_sets["model.layers.0.mlp_moe_gen"]) == {"generation"}
    assert [len(s) for s in top_sets["model.layers.0.mlp"].values()] == [6, 6]
    assert all(len(s) == 13 for s in top_sets["model.layers.0.mlp"]["understanding"])  # top 10% of 128
    # identical samples give identical top sets: overlap 1
    same = _set([mot_inputs(1, 14, None, seed=7)] * 3)
    _, identical = Probe([Task("u", program, same)])._collect()
    assert _mean_pairwise(identical["model.layers.1.mlp"]["u"], None) == 1.0


def test_errors_before_work(mot_probe):
    _, program, probe, _, _ = mot_probe
    qwen = build_model(builtin_config("tiny-qwen2"))
    ids = torch.randint(0, 256, (2, 8))
    plain = sparsec.capture(qwen, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    calib = CalibrationSet({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, source="t")
    with pytest.raises(AnalysisError, match="component 'generation' has no blocks in any task's program"):
        Probe([Task("t", plain, calib)], components=["generation"], kinds=["depth"], strict=True)
    lenient = Probe([Task("t", plain, calib)], components=COMPONENTS)
    assert {(s["component"], s["kind"]) for s in lenient.skipped} == {
        (c, k) for c in ("understanding", "generation") for k in ("depth", "width")
    }
    # by default a model without understanding / generation tags is probed whole, as its `shared` component
    default = Probe([Task("t", plain, calib)])
    assert default.combos == [("shared", "depth"), ("shared", "width")] and not default.skipped
    with pytest.raises(AnalysisError, match="do not match the program's inputs"):
        Probe([Task("t", program, calib)])
    with pytest.raises(AnalysisError, match="unknown component"):
        Probe(probe.tasks, components=["vision"])
    with pytest.raises(AnalysisError, match=r"ratios must lie in \(0, 1\)"):
        probe.run(ratios=[0.5, 1.0])


def test_report_files(tmp_path, mot_probe):
    _, program, probe, _, _ = mot_probe
    result = probe.run(ratios=[0.5])
    files = write_report(result, tmp_path / "probe")
    assert sorted(files) == [
        "analysis.json",
        "analysis.md",
        "quality_depth.png",
        "quality_width.png",
        "sensitivity.png",
        "sparsity.png",
    ]
    for name in files:
        if name.endswith(".png"):
            assert (tmp_path / "probe" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "probe" / "analysis.json").read_text())
    rows = {(r["component"], r["kind"], r["task"]): r for r in data["sweep"]}
    assert len(rows) == 8 and data["metric"] == "top1"
    # generation weights serve no understanding-task token: compressing them leaves that task exactly as it was
    assert rows[("generation", "width", "understanding")]["value"] == 1.0
    assert rows[("generation", "depth", "understanding")]["metrics"]["logits"]["max_abs"] == 0.0
    assert rows[("understanding", "width", "understanding")]["value"] < 1.0
    markdown = (tmp_path / "probe" / "analysis.md").read_text()
    assert "| generation | width | 0.5 (0.5) |" in markdown
    tables = _tables(markdown)
    assert len(tables) == 3  # sweep, each unit alone, sparsity
    assert tables[2][0][-1] == "across generation vs understanding"
    assert "(n/a)" not in markdown and "synthetic" not in markdown.lower()  # neither occurs, so neither is explained
    renamed = json.loads(json.dumps(data).replace('"generation"', '"gen|img"'))  # a task name holding a pipe
    assert _tables(format_markdown(renamed))[0][0][-1] == "gen\\|img"
    renamed["sweep"][0]["in_program"] = False  # as for an entry point without the component: legend explains it
    assert "(n/a): the task's program does not hold that component" in format_markdown(renamed)
    units = {(u["component"], u["kind"], u["task"]) for u in data["units"]}
    assert len(units) == 8 and len(data["units"]) == 8 * 4  # 4 blocks / FFNs per component and kind
    assert [p.name for p in tmp_path.iterdir()] == ["probe"]  # nothing staged left behind


def _tables(markdown: str) -> list[list[list[str]]]:
    """The markdown tables as rows of cells, each checked to render: a separator row under the header and every
    row as many cells as the header (a cell's own `|` must be escaped)."""
    tables, rows = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            assert line.endswith("|"), line
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line[1:-1])])
        elif rows:
            header, separator, *body = rows
            assert set(separator) == {"---"} and len(separator) == len(header), rows[:2]
            assert body and all(len(r) == len(header) for r in body), (header, body)
            tables.append([header, *body])
            rows = []
    return tables


def test_plain_llm_is_probed_whole(tmp_path, capsys):
    """A model with every region `shared` gets the sweep and per-block / per-FFN numbers of the whole model, on one
    task named after its entry point: no understanding or generation task is invented for it."""
    out = tmp_path / "probe"
    assert (
        main(
            ["analyze", "--model", "builtin:tiny-llama", "--out", str(out), "--ratios", "0.25,0.5"]
            + ["--samples", "4", "--seq", "12", "--quiet"]
        )
        == 0
    )
    data = json.loads((out / "analysis.json").read_text())
    assert data["components"] == ["shared"] and data["untagged"] and not data["skipped"]
    assert list(data["tasks"]) == ["forward"] and data["synthetic"] == ["forward"]
    assert {(r["kind"], r["ratio"]) for r in data["sweep"]} == {(k, r) for k in ("depth", "width") for r in (0.25, 0.5)}
    layers = builtin_config("tiny-llama").num_hidden_layers
    depth = [u for u in data["units"] if u["kind"] == "depth"]
    assert [u["path"] for u in depth] == [f"model.layers.{i}" for i in range(layers)]
    assert {u["task"] for u in data["units"]} == {"forward"}
    markdown = (out / "analysis.md").read_text()
    assert "Warning: synthetic inputs (task forward)" in markdown
    assert "every region is `shared`" in markdown and "understanding |" not in markdown
    sweep, units, _ = _tables(markdown)
    assert sweep[0][-1] == "forward" and units[0][-1] == "forward"
    assert len(units) == 1 + 2 * layers  # the header, then one row per block and per FFN (a column per task)
    assert "sensitivity.png" in [p.name for p in out.iterdir()]


def test_block_alone_equals_the_block_removed_by_hand():
    """One per-block number recomputed independently: the HF model with that decoder layer replaced by the
    identity, top-1 agreement with the intact model over valid tokens."""
    model = build_model(builtin_config("tiny-qwen2"))
    ids = torch.randint(0, 256, (6, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    calib = CalibrationSet({"input_ids": ids, "attention_mask": mask}, source="test", batch_size=4)
    program = sparsec.capture(model, {"input_ids": ids[:2], "attention_mask": mask[:2]})
    result = Probe([Task("t", program, calib)], kinds=["depth"]).run(ratios=[0.5])
    unit = next(u for u in result["units"] if u["path"] == "model.layers.1")

    class Identity(torch.nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            return hidden_states

    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        model.model.layers[1] = Identity()
        skipped = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    agree = (reference.argmax(-1) == skipped.argmax(-1))[valid].double().mean()
    torch.testing.assert_close(torch.tensor(unit["value"], dtype=torch.float64), agree)
    max_abs = (reference - skipped).abs()[valid].max()
    torch.testing.assert_close(unit["metrics"]["logits"]["max_abs"], max_abs.item(), rtol=1e-5, atol=1e-5)


def test_cli(tmp_path, capsys):
    out = tmp_path / "probe"
    code = main(
        [
            "analyze",
            "--model",
            "builtin:tiny-mot",
            "--out",
            str(out),
            "--ratios",
            "0.5",
            "--samples",
            "4",
            "--seq",
            "12",
            "--quiet",
        ]
    )
    assert code == 0 and (out / "analysis.md").is_file()
    assert "no calibration file" in capsys.readouterr().err
    # a model with understanding and generation components gets a synthetic task of each by default
    assert list(json.loads((out / "analysis.json").read_text())["tasks"]) == ["understanding", "generation"]
    code = main(
        [
            "analyze",
            "--model",
            "builtin:tiny-qwen2",
            "--out",
            str(tmp_path / "x"),
            "--components",
            "generation",
            "--kinds",
            "depth",
            "--samples",
            "2",
            "--seq",
            "8",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "component 'generation' has no blocks" in err and "tags:" in err
    assert not (tmp_path / "x").exists()


def test_scored_positions(tmp_path, mot_probe):
    """A task scored at one position (a classifier's answer) is measured there only, also from a task file."""
    from safetensors.torch import save_file

    from sparsec.probe import load_tasks

    model, program, probe, stats, _ = mot_probe
    und = probe.tasks[0]
    scored = torch.zeros(len(und.calibration), 14, dtype=torch.bool)
    scored[:, -1] = True
    task = Task("label", program, und.calibration, scored=scored)
    result = Probe([task], components=["understanding"], kinds=["width"]).run(ratios=[0.5])
    (row,) = result["sweep"]
    plan = probe.plan(program, "understanding", "width", 0.5, stats[id(program)])
    agree = [
        (out["logits"][:, -1].argmax(-1) == program.run(b)["logits"][:, -1].argmax(-1)).float()
        for out, b in zip(probe.outputs(und, plan), und.calibration.batches())
    ]
    assert row["metrics"]["logits"]["tokens"] == len(und.calibration)
    assert row["value"] == pytest.approx(float(torch.cat(agree).mean()))

    path = tmp_path / "label.safetensors"
    save_file({**{k: v.contiguous() for k, v in und.calibration.inputs.items()}, "score_mask": scored}, str(path))
    (loaded,) = load_tasks(model, {"label": (None, str(path))}, log=lambda _: None)
    assert torch.equal(loaded.scored, scored) and sorted(loaded.calibration.inputs) == sorted(und.calibration.inputs)
    with pytest.raises(AnalysisError, match=r"scoring mask must be \[N, S\] with N = 6 samples"):
        Task("bad", program, und.calibration, scored=scored[:2])


def test_task_entry_follows_the_family_task_mapping():
    """Janus maps the `generation` task to `generation_step` (`Family.task_entry_points`); others use their first."""
    janus = dict(entry_points(build_model(builtin_config("tiny-janus"))))
    assert task_entry(janus, "generation", None) == "generation_step"
    assert task_entry(janus, "understanding", None) == "understanding"
    assert task_entry(janus, "captioning", None) == "understanding"
    assert task_entry(janus, "generation", "vq_decode") == "vq_decode"
    assert task_entry(dict(entry_points(build_model(builtin_config("tiny-qwen2")))), "generation", None) == "forward"


def test_heads_sweep_equals_query_heads_removed_by_hand():
    """`kinds: heads` on a plain LLM: each attention keeps its most important query heads, scored and removed here
    on the Hugging Face model itself (hooks on o_proj: a head's contribution ||W_o[:, cols_h] a_h||, then its
    columns of o_proj's input zeroed), and the sweep's quality equals that model's agreement with the original."""
    model = build_model(builtin_config("tiny-qwen2"))
    inputs = {
        "input_ids": torch.randint(0, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(5)),
        "attention_mask": torch.ones(4, 12, dtype=torch.long),
    }
    inputs["attention_mask"][0, :3] = 0  # left padding
    program = sparsec.capture(model, {k: v[:2, :8].clone() for k, v in inputs.items()})
    calib = CalibrationSet(inputs, source="test", batch_size=4)
    probe = Probe([Task("t", program, calib)], kinds=["heads"])
    result = probe.run(ratios=[0.5])
    (row,) = result["sweep"]

    heads = model.config.num_attention_heads
    d = model.config.hidden_size // heads
    valid = inputs["attention_mask"].bool()
    scores = {}

    def score(i):
        def hook(module, args):
            x = args[0][valid]
            w = module.weight
            scores[i] = torch.stack(
                [(x[:, h * d : (h + 1) * d] @ w[:, h * d : (h + 1) * d].T).norm(dim=-1).mean() for h in range(heads)]
            )

        return hook

    layers = model.model.layers
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(score(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        original = model(**inputs).logits
    for h in handles:
        h.remove()
    kept = {i: scores[i].topk(heads // 2).indices.sort().values for i in scores}
    assert row["kept_heads"] == {f"model.layers.{i}.self_attn": heads // 2 for i in range(len(layers))}
    assert row["actual_ratio"] == 0.5
    plan = probe.plan(program, "shared", "heads", 0.5, probe.statistics()[id(program)])
    assert [(a.path, k.tolist()) for a, k in plan["kept_heads"]] == [
        (f"model.layers.{i}.self_attn", kept[i].tolist()) for i in range(len(layers))
    ]

    reference = copy.deepcopy(model)
    for i, layer in enumerate(reference.model.layers):
        keep = torch.zeros(heads * d)
        for h in kept[i].tolist():
            keep[h * d : (h + 1) * d] = 1
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args, keep=keep: (args[0] * keep,))
    with torch.no_grad():
        pruned = reference(**inputs).logits
    agree = (pruned.argmax(-1) == original.argmax(-1))[valid].float().mean()
    assert row["value"] == pytest.approx(float(agree))
    assert [u["path"] for u in result["units"]] == [f"model.layers.{i}.self_attn" for i in range(len(layers))]
    assert "heads" in format_markdown(result) and "query heads removed" in format_markdown(result)


def test_plot_legends_cover_no_curve_and_fit_in_the_image(tmp_path, mot_probe, monkeypatch):
    """Each legend lies outside every axes of its figure (so over no curve) and inside the saved image."""
    import matplotlib.figure

    _, _, probe, _, _ = mot_probe
    result = probe.run(ratios=[0.25, 0.5])
    saved = []
    save = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        save(fig, *args, **kwargs)
        renderer = fig.canvas.get_renderer()
        image = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)  # inches -> pixels, as the extents
        axes = [ax.get_window_extent(renderer) for ax in fig.axes]
        saved.append((image, axes, [ax.get_legend().get_window_extent(renderer) for ax in fig.axes]))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    write_report(result, tmp_path / "probe")
    assert len(saved) == 4  # quality_depth, quality_width, sensitivity, sparsity
    for image, axes, legends in saved:
        for legend in legends:
            assert not any(legend.overlaps(ax) for ax in axes)
            assert image.x0 <= legend.x0 + 1 and legend.x1 <= image.x1 + 1
