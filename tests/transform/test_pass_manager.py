"""PassManager: custom passes by name, verification after every pass, parameter bookkeeping, quality gates;
errors naming the pass, the program restored after a failed pass, plans handed to `run`, instruments."""

import traceback
from dataclasses import dataclass

import pytest
import torch
from conftest import make_inputs, make_model, small_program
from skip_ffn import SkipFfn

import sparsec
from sparsec import testing
from sparsec.analysis.regions import region_index
from sparsec.cli import main
from sparsec.data.calibration import CalibrationSet
from sparsec.data.quality import QualityGates
from sparsec.errors import PassError, QualityError, RecipeError, VerificationError
from sparsec.pipeline import pass_context, run_passes
from sparsec.recipe import Recipe
from sparsec.tables import decision_lines, describe_decisions, table_lines
from sparsec.transform.pass_manager import (
    PASS_REGISTRY,
    Pass,
    PassContext,
    PassInstrument,
    PassManager,
    PassResult,
)

aten = torch.ops.aten


class NoOp(Pass):
    """Does nothing (a pipeline placeholder)."""

    name = "noop"

    def run(self, program, ctx, plan):
        return PassResult(modified=False)


@pytest.fixture(autouse=True)
def _registered():
    with PASS_REGISTRY.temporarily(NoOp, SkipFfn):
        yield


def _fresh(name="tiny-qwen2"):
    model = make_model(name)
    return model, sparsec.capture(model, make_inputs(model, 2, 8))


def test_noop_changes_nothing():
    model, program = _fresh()
    before = testing.parameter_names(program)
    record = testing.apply_pass(program, "noop")
    assert not record.modified and record.parameters_after == record.parameters_before
    assert testing.parameter_names(program) == before


def test_requires_failure_leaves_program_untouched():
    _, program = _fresh()
    before = [n.name for n in program.graph.nodes]
    with pytest.raises(PassError, match="no FFN matches"):
        testing.apply_pass(program, "skip_ffn", where="model.vision_model.**")
    assert [n.name for n in program.graph.nodes] == before


class _BreaksShapes(Pass):
    """Feeds the residual stream into a linear of the wrong width: only shape propagation can see it."""

    name = "breaks_shapes"

    def run(self, program, ctx, plan):
        ffn = region_index(program).ffns()[0]
        ffn.down.args = (ffn.input, *ffn.down.args[1:])
        return PassResult(modified=True)


class _LeavesOrphanWeight(Pass):
    name = "leaves_orphan_weight"

    def run(self, program, ctx, plan):
        program.exported.state_dict["ghost.weight"] = torch.zeros(3)
        return PassResult(modified=True)


@pytest.mark.parametrize(
    "bad, message", [(_BreaksShapes, "shape propagation failed"), (_LeavesOrphanWeight, "ghost.weight")]
)
def test_verification_catches_broken_passes(bad, message):
    _, program = _fresh()
    with pytest.raises(VerificationError, match=message):
        testing.apply_pass(program, bad())


def test_quality_gate_failure_stops_pipeline():
    model, program = _fresh()
    calib = CalibrationSet(make_inputs(model, 4, 12, seed=1), source="test")
    with pytest.raises(
        QualityError, match=r"after pass 'skip_ffn' \(the first pass\): quality gate failed: logits: cosine"
    ):
        run_passes(program, [SkipFfn(where="model.layers.*.mlp")], calib, gates=QualityGates(min_cosine=0.999))


def test_manager_orders_lowering_after_transform():
    class Lower(NoOp):
        name = "lower_noop"
        stage = "lowering"

    order = PassManager([Lower(), NoOp(), SkipFfn()]).passes
    assert [p.name for p in order] == ["noop", "skip_ffn", "lower_noop"]


def test_registered_pass_runs_from_recipe_and_options_are_validated():
    recipe = Recipe.from_dict({"passes": [{"skip_ffn": {"where": "model.layers.0.mlp"}}, "noop"]})
    assert [p.name for p in recipe.passes] == ["skip_ffn", "noop"]
    with pytest.raises(
        RecipeError, match=r"passes\[0\]\.skip_ffn: unknown option\(s\) \['were'\]; allowed: \['where'\]"
    ):
        Recipe.from_dict({"passes": [{"skip_ffn": {"were": "x"}}]})
    with pytest.raises(RecipeError, match=r"passes\[0\]\.skip_ffn\.where: must be a non-empty"):
        Recipe.from_dict({"passes": [{"skip_ffn": {"where": ""}}]})


# ----- on a small graph: errors in context, restore on failure, plans, instruments ----------------------------
def _small_calibration():
    return CalibrationSet({"x": torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(1))}, source="test")


def _fingerprint(program):
    """What must be exactly as before a failed pass: graph code, signature, state (the tensors), size."""
    ep = program.exported
    return (
        program.graph_module.code,
        str(ep.graph_signature),
        {**ep.state_dict, **ep.constants},
        program.num_parameters(),
    )


def _assert_same(program, fingerprint):
    code, signature, state, parameters = _fingerprint(program)
    assert code == fingerprint[0] and signature == fingerprint[1] and parameters == fingerprint[3]
    assert state.keys() == fingerprint[2].keys() and all(state[k] is v for k, v in fingerprint[2].items())


class _Raises(Pass):
    name = "raises"

    def run(self, program, ctx, plan):
        program.replace_state("blocks.0.up.weight", torch.zeros(16, 8))  # half done, then a bug
        relu = program.graph.find_nodes(op="call_function", target=aten.relu.default)[0]
        relu.replace_all_uses_with(relu.args[0])
        program.graph.erase_node(relu)
        raise KeyError("boom")


def test_errors_name_the_pass_and_the_passes_before_it_and_keep_their_type():
    _, program = small_program()
    with pytest.raises(
        VerificationError,
        match=r"^after pass 'breaks_shapes' \(passes before it: noop, skip_ffn\): "
        r"shape propagation failed",
    ) as info:
        PassManager([NoOp(), SkipFfn(where="blocks.1"), _BreaksShapes()]).run(program, PassContext(progress=False))
    assert isinstance(info.value.__cause__, VerificationError)
    assert str(info.value.__cause__).startswith("shape propagation failed")

    with pytest.raises(KeyError, match=r"in pass 'raises' \(the first pass\): 'boom'"):
        PassManager([_Raises()]).run(program, PassContext(progress=False))
    with pytest.raises(PassError, match=r"in pass 'skip_ffn' \(passes before it: noop\): skip_ffn: no FFN matches"):
        PassManager([NoOp(), SkipFfn(where="nowhere")]).run(program, PassContext(progress=False))


class _ExitError(Exception):
    """An exception whose constructor takes more than a message (as `subprocess.CalledProcessError` does)."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"exit {code}: {detail}")
        self.code = code


class _RaisesOdd(Pass):
    name = "raises_odd"

    def run(self, program, ctx, plan):
        raise _ExitError(7, "tool failed")


def test_an_error_that_cannot_be_renamed_is_raised_as_it_is_with_a_note_naming_the_pass():
    _, program = small_program()
    with pytest.raises(_ExitError) as info:
        PassManager([NoOp(), _RaisesOdd()]).run(program, PassContext(progress=False))
    assert str(info.value) == "exit 7: tool failed" and info.value.code == 7
    assert info.value.__notes__ == ["in pass 'raises_odd' (passes before it: noop): exit 7: tool failed"]
    assert "in pass 'raises_odd' (passes before it: noop)" in "".join(traceback.format_exception(info.value))


@pytest.mark.parametrize(
    "bad, code, lines",
    [
        (
            _BreaksShapes,
            3,
            [
                "sparsec compile: internal error: after pass 'breaks_shapes' (the first pass): shape propagation failed",
                "sparsec compile: this is a bug in that pass (sparsec's for a built-in pass, its author's for a custom "
                "one), not a problem with the model or recipe",
            ],
        ),
        (
            _RaisesOdd,
            3,
            ["sparsec compile: internal error: in pass 'raises_odd' (the first pass): exit 7: tool failed"],
        ),
    ],
)
def test_a_broken_pass_exits_3_as_a_bug_not_2_as_a_user_error(tmp_path, capsys, bad, code, lines):
    (tmp_path / "recipe.yaml").write_text(f"passes: [{{{bad.name}: {{}}}}]\nexport: {{onnx: false}}\n")
    out = tmp_path / "out"
    with PASS_REGISTRY.temporarily(bad):
        argv = [
            "compile",
            "--model",
            "builtin:tiny-qwen2",
            "--recipe",
            str(tmp_path / "recipe.yaml"),
            "--out",
            str(out),
        ]
        assert main([*argv, "--quiet"]) == code
    err = capsys.readouterr().err
    assert all(line in err for line in lines), err
    assert not out.exists()


@pytest.mark.parametrize("bad", [_BreaksShapes, _LeavesOrphanWeight, _Raises])
def test_a_failed_pass_leaves_the_program_as_it_was(bad):
    _, program = small_program()
    PassManager([SkipFfn(where="blocks.0")]).run(program, PassContext(progress=False))  # an earlier pass stays
    before = _fingerprint(program)
    with pytest.raises(Exception, match=f"pass '{bad.name}' \\(passes before it: noop\\)"):
        PassManager([NoOp(), bad()]).run(program, PassContext(progress=False))
    _assert_same(program, before)
    program.verify()


def test_a_failed_quality_gate_leaves_the_program_as_it_was():
    _, program = small_program()
    inputs = {"x": torch.randn(2, 3, 8)}
    before, outputs = _fingerprint(program), program.run(inputs)["y"]
    with pytest.raises(QualityError, match=r"after pass 'skip_ffn' \(the first pass\): quality gate failed: y: cosine"):
        run_passes(program, [SkipFfn(where="blocks.*")], _small_calibration(), gates=QualityGates(min_cosine=0.99999))
    _assert_same(program, before)
    torch.testing.assert_close(program.run(inputs)["y"], outputs, rtol=0, atol=0)


class _ChangesWeightsInPlace(Pass):
    name = "changes_weights_in_place"

    def run(self, program, ctx, plan):
        with torch.no_grad():
            program.state_tensor("head.weight").mul_(0.5)
        return PassResult(modified=True)


def test_a_pass_changing_weights_in_place_is_refused():
    _, program = small_program()
    with pytest.raises(
        VerificationError,
        match=r"changed state tensors in place \(\['head.weight'\]\); replace them "
        r"with program.replace_state",
    ):
        PassManager([_ChangesWeightsInPlace()]).run(program, PassContext(progress=False))


class _Planned(Pass):
    """Records how often its analysis runs and which plan `run` received."""

    name = "planned"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.analyses, self.received = 0, []

    def requires(self, program, ctx):
        self.analyses += 1
        return {"ffns": region_index(program).ffns()}

    def run(self, program, ctx, plan):
        self.received.append(plan)
        return PassResult(modified=False, stats={"ffns": len(plan["ffns"])})


def test_the_plan_from_requires_reaches_run_once():
    _, program = small_program()
    planned = _Planned()
    (record,) = PassManager([planned]).run(program, PassContext(progress=False))
    assert planned.analyses == 1 and len(planned.received) == 1
    assert [f.path for f in planned.received[0]["ffns"]] == ["blocks.0", "blocks.1"]
    assert record.stats == {"ffns": 2}


@dataclass(frozen=True)
class _Skipped:
    path: str
    score: float | None  # always reported, None when unscored
    note: str | None = None  # an optional entry: absent unless set


@dataclass(frozen=True)
class _Decisions:
    skipped: list[_Skipped]
    reason: str


class _DecidesTyped(Pass):
    """Decides in typed dataclasses; its `ensures` reads them by attribute."""

    name = "decides_typed"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ensured = None

    def run(self, program, ctx, plan):
        skipped = [_Skipped("blocks.0", 0.5, note="first"), _Skipped("blocks.1", None)]
        return PassResult(modified=True, decisions=_Decisions(skipped, "test"))  # modified: ensures runs

    def ensures(self, program, ctx, result):
        self.ensured = [d.path for d in result.decisions.skipped]


def test_typed_decisions_reach_ensures_as_made_and_the_record_as_plain_data():
    _, program = small_program()
    typed = _DecidesTyped()
    (record,) = PassManager([typed]).run(program, PassContext(progress=False))
    assert typed.ensured == ["blocks.0", "blocks.1"]
    assert record.decisions == {
        "skipped": [{"path": "blocks.0", "score": 0.5, "note": "first"}, {"path": "blocks.1", "score": None}],
        "reason": "test",
    }


class _Log(PassInstrument):
    def __init__(self):
        self.events = []

    def before_pass(self, p, program, ctx):
        self.events.append(("before", p.name, program.num_parameters()))

    def after_pass(self, p, program, ctx, result, record):
        self.events.append(("after", p.name, program.num_parameters(), record.quality is not None))


def test_a_custom_instrument_sees_every_pass_after_the_built_in_checks():
    _, program = small_program()
    log = _Log()
    n = program.num_parameters()
    passes = [SkipFfn(where="blocks.0"), NoOp(), SkipFfn(where="blocks.1")]
    records = run_passes(program, passes, _small_calibration(), progress=False, instruments=[log])
    m = records[0].parameters_after
    assert log.events == [
        ("before", "skip_ffn", n),
        ("after", "skip_ffn", m, True),  # the quality check ran before
        ("before", "noop", m),
        ("after", "noop", m, False),  # not modified: no quality check
        ("before", "skip_ffn", m),
        ("after", "skip_ffn", records[2].parameters_after, True),
    ]
    assert [r.name for r in records] == ["skip_ffn", "noop", "skip_ffn"] and records[0].seconds > 0


def test_an_instrument_error_is_a_failed_pass():
    class Refuses(PassInstrument):
        def after_pass(self, p, program, ctx, result, record):
            raise RecipeError(f"{p.name} is not allowed here")

    _, program = small_program()
    before = _fingerprint(program)
    with pytest.raises(RecipeError, match=r"after pass 'skip_ffn' \(the first pass\): skip_ffn is not allowed here"):
        PassManager([SkipFfn(where="blocks.0")], instruments=[Refuses()]).run(program, PassContext(progress=False))
    _assert_same(program, before)


def test_describe_decisions_writes_each_key_with_long_lists_summarised_and_records_as_a_table():
    ffns = [{"path": "mlp", "score": 0.123456789, "kept": list(range(20)), "fit": {"loss": 0.5}}]
    decisions = {"importance": "activation", "kept": list(range(20)), "ffns": ffns}
    assert decision_lines(decisions) == [
        "  importance: activation",
        "  kept: <20 items>",
        "  ffns:",
        "    path  score     fit.loss",
        "    mlp   0.123457  0.5",
    ]
    assert decision_lines([1, 2]) == ["  decisions: [1, 2]"]


def test_a_pass_describes_its_decisions_itself_only_when_it_says_how():
    class Ranks(NoOp):
        name = "ranks"

        @classmethod
        def describe_decisions(cls, decisions):
            return [f"  ranked {len(decisions['order'])}"]

    decisions = {"order": [3, 1, 2]}
    assert describe_decisions(Ranks, decisions) == ["  ranked 3"]
    assert describe_decisions(NoOp, decisions) == decision_lines(decisions) == ["  order: [3, 1, 2]"]


def test_wide_tables_wrap_into_column_groups_that_repeat_the_name():
    rows = [{"path": f"model.layers.{i}.mlp", **{f"metric_{j}": 1000 * i + j for j in range(12)}} for i in range(3)]
    lines = table_lines(rows, width=100)
    assert max(map(len, lines)) <= 100 and len(lines) == 8  # two tables of a header and three rows
    assert lines[0].split()[0] == lines[4].split()[0] == "path" and lines[7].split()[0] == "model.layers.2.mlp"
    cells = {h: v for block in (lines[:4], lines[4:]) for h, v in zip(block[0].split(), block[3].split())}
    assert cells == {"path": "model.layers.2.mlp", **{f"metric_{j}": str(2000 + j) for j in range(12)}}


class _ScalesLogits(Pass):
    """Multiplies the final norm's weight, so the logits by the same factor (no bias after it): above 1 a random
    model's wrong guesses get surer, and its perplexity rises."""

    name = "scales_logits"

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def run(self, program, ctx, plan):
        program.replace_state("model.norm.weight", program.state_tensor("model.norm.weight") * self.factor)
        return PassResult(modified=True)


def _lm_split():
    model, program = _fresh()
    inputs = make_inputs(model, 6, 10, seed=3, pad_left=3)
    return program, CalibrationSet(inputs, source="test", batch_size=4).split(0.5, seed=0)


def test_max_ppl_ratio_refuses_a_pass_over_it_and_keeps_one_under_it():
    program, split = _lm_split()
    dense = program.snapshot()

    def run(scale, gates=None):
        return run_passes(
            program, [_ScalesLogits(scale)], split.decision, holdout=split.holdout, gates=gates, progress=False
        )

    (ungated,) = run(4.0)
    ratio = ungated.quality["logits"]["ppl_ratio"]
    assert ratio > 1.1  # what the gate below must refuse
    logits = ungated.quality["logits"]
    assert logits["top1"] == 1.0 and logits["cosine"] > 0.9999  # scaled logits: only the perplexity sees the change
    program.restore(dense)

    before, outputs = _fingerprint(program), program.run(split.holdout.inputs)["logits"]
    tokens = split.holdout.num_tokens()
    with pytest.raises(
        QualityError,
        match=rf"quality gate failed: logits: ppl_ratio {ratio:.6g} > 1.1 \(measured on {tokens} tokens: logits cos "
        rf".*; ppl .* x{ratio:.3f}\)\)\. Relax",
    ):
        run(4.0, QualityGates(max_ppl_ratio=1.1))
    _assert_same(program, before)
    torch.testing.assert_close(program.run(split.holdout.inputs)["logits"], outputs, rtol=0, atol=0)

    (kept,) = run(4.0, QualityGates(max_ppl_ratio=ratio))
    assert kept.quality["logits"]["ppl_ratio"] == ratio
    (same,) = run(1.0, QualityGates(max_ppl_ratio=1.0))
    assert same.quality["logits"]["ppl_ratio"] == 1.0


class _Counts(NoOp):
    name = "counts"
    runs = 0

    def requires(self, program, ctx):
        type(self).runs += 1


def test_max_ppl_ratio_on_a_program_without_perplexity_is_refused_before_any_pass():
    _, program = small_program()  # x -> y: no input_ids, no logits
    with pytest.raises(RecipeError, match=r"max_ppl_ratio: perplexity needs a causal language model.* \['x'\]"):
        run_passes(program, [_Counts()], _small_calibration(), gates=QualityGates(max_ppl_ratio=1.1), progress=False)
    assert _Counts.runs == 0


def test_gates_without_data_are_refused_when_set_and_reported_unchecked_when_default():
    _, program = small_program()
    with pytest.raises(RecipeError, match="quality gates are set, and there is no calibration data to check them on"):
        run_passes(program, [SkipFfn(where="blocks.0")], gates=QualityGates(min_cosine=0.9))
    (record,) = run_passes(program, [SkipFfn(where="blocks.0")], gates=QualityGates.default(), progress=False)
    assert (
        record.quality is None and record.unchecked == "no calibration data: the default quality gates were not checked"
    )
    with pytest.raises(QualityError, match="quality gate failed: y: cosine"):  # with data, the same gates are checked
        run_passes(program, [SkipFfn(where="blocks.1")], _small_calibration(), gates=QualityGates.default())


def test_the_gates_measure_on_the_held_out_samples_and_the_passes_get_the_others():
    _, program = small_program()
    calibration = _small_calibration()
    split = calibration.split(0.25, seed=0)
    seen = []

    class Sees(NoOp):
        name = "sees"

        def requires(self, program, ctx):
            seen.append((ctx.calibration, ctx.statistics.calibration))

    (_, record) = run_passes(
        program, [Sees(), SkipFfn(where="blocks.0")], split.decision, holdout=split.holdout, progress=False
    )
    assert seen == [(split.decision, split.decision)]
    assert record.quality["y"]["tokens"] == len(split.holdout) * 3  # [samples, 3, 8]: 3 token vectors a sample


def test_keep_going_records_a_failed_gate_and_runs_the_later_passes_on_what_it_left():
    """A dry run's checks: the failed gate is on the record, the pass is kept, the next pass decides after it."""
    _, program = small_program()
    gates = QualityGates(min_cosine=0.99999)
    first, second = run_passes(
        program,
        [SkipFfn(where="blocks.0"), SkipFfn(where="blocks.1")],
        _small_calibration(),
        gates=gates,
        keep_going=True,
        progress=False,
    )
    assert first.gate_failed.startswith("y: cosine") and "< 0.99999" in first.gate_failed
    assert second.gate_failed is not None and second.parameters_before == first.parameters_after
    assert not any(n.startswith(("blocks.0.ffn", "blocks.1.ffn")) for n in program.parameter_names())
    (passing,) = run_passes(program, [NoOp()], _small_calibration(), gates=gates, keep_going=True, progress=False)
    assert passing.gate_failed is None


def test_calibration_without_its_statistics_is_refused():
    _, program = small_program()
    with pytest.raises(TypeError, match="without statistics: build it with sparsec.pipeline.pass_context"):
        PassManager([NoOp()]).run(program, PassContext(calibration=_small_calibration()))
    ctx = pass_context(program, _small_calibration(), progress=False)
    assert ctx.statistics.calibration is ctx.calibration and ctx.statistics.program is program
    PassManager([NoOp()]).run(program, ctx)
