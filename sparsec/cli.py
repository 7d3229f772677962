"""The `sparsec` command line: inspect, compile, analyze, run, bench, eval, passes.

Exit codes: 0 success; 1 a quality gate or the backend parity check failed (nothing written); 2 bad input
(model, recipe, calibration file, options, a target that cannot run here); 3 an internal error (a bug: please report it with the trace).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import traceback
from importlib import resources
from pathlib import Path

from sparsec.errors import SparsecError, Terminated, VerificationError
from sparsec.exporters.targets import available_targets
from sparsec.families import builtin_names
from sparsec.models import BUILTIN_PREFIX
from sparsec.runner import DEFAULT_DIMS
from sparsec.staging import check_creatable, signals_as_exceptions

DEFAULT_MODEL = BUILTIN_PREFIX + "tiny-qwen2"


def default_recipe_path() -> Path:
    return Path(str(resources.files("sparsec") / "recipes" / "default.yaml"))


def _cmd_inspect(args: argparse.Namespace) -> int:
    from sparsec.analysis.inspection import explain, format_inspection, inspect_program
    from sparsec.capture import capture
    from sparsec.families import entry_points
    from sparsec.models import load_model
    from sparsec.recipe import Recipe

    recipe = Recipe.load(args.recipe) if args.recipe else Recipe()
    lazy = not args.model.startswith(BUILTIN_PREFIX)  # a directory: shapes only, no weight is read
    loaded = load_model(args.model, weights="lazy" if lazy else True)
    entry = next(iter(entry_points(loaded.model).values()))  # the program a recipe without entry_points compiles
    example = entry.example_inputs(recipe.capture.batch, recipe.capture.seq)
    program = capture(entry.module, example, dynamic=recipe.capture.dynamic, family=entry.family, tags=recipe.tags)
    if lazy:
        loaded.attach_weights(program)
    if args.why:
        why = explain(program, args.why)
        print(json.dumps({"path": args.why, "why": why}, indent=2) if args.json else "\n".join(why))
        return 0
    info = inspect_program(program, example)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    from sparsec.compiler import compile_model
    from sparsec.recipe import Recipe

    if not args.out and not args.dry_run:
        raise SparsecError("--out DIR is required (or --dry-run to see the passes' decisions without writing)")
    recipe = Recipe.load(args.recipe or default_recipe_path())
    report = compile_model(
        args.model,
        recipe,
        args.out,
        calib=args.calib,
        progress=not args.quiet,
        log=None if args.quiet else _log,
        dry_run=args.dry_run,
        target=args.target,
        dtype=args.dtype,
        device=args.device,
        lazy={"auto": None, "memory": False, "lazy": True}[args.weights],
    )
    if args.dry_run:
        print(_decisions(report))
        failed = [
            (entry, p["name"]) for entry, program in _programs(report) for p in program["passes"] if p["gate_failed"]
        ]
        if failed:
            where = ", ".join(f"{name} ({entry})" if entry else name for entry, name in failed)
            print(
                f"sparsec compile: quality gate failed after {where}; the compile would stop at the first "
                "(the passes after it ran on the program as it left it)",
                file=sys.stderr,
            )
            return 1
    elif not args.quiet:
        print(_summary(report))
    return 0


def _decisions(report: dict) -> str:
    """The gates, a table of the passes (parameters, quality, decision summary), then each pass's decisions."""
    from sparsec.data.quality import describe_agreement, describe_perplexity
    from sparsec.tables import describe_decisions, table_lines
    from sparsec.transform.pass_manager import get_pass

    lines = [_gates_line(report["quality_gates"])]
    for entry, program in _programs(report):
        if entry:
            lines.append(f"== entry point {entry}")
        if not program["passes"]:
            continue
        lines += [f"result      {program['architecture']['summary']}", _calibration_line(program["calibration"])]
        lines += table_lines(
            [
                {
                    "pass": p["name"],
                    "params before -> after": f"{p['parameters_before']:,} -> {p['parameters_after']:,}",
                    "quality": ("GATE FAILED " if p["gate_failed"] else "") + describe_agreement(p["quality"]),
                    "perplexity": describe_perplexity(p["quality"]).removeprefix("ppl "),
                    "decided": ", ".join(f"{k} {v}" for k, v in p["stats"].items() if not isinstance(v, (dict, list))),
                }
                for p in program["passes"]
            ]
        )
        for p in program["passes"]:
            options = ", ".join(f"{k}={v}" for k, v in p["options"].items() if v is not None)
            lines += ["", *textwrap.wrap(f"pass {p['name']} ({options})", 100, subsequent_indent="    ")]
            if p["gate_failed"]:
                lines.append(f"  GATE FAILED: {p['gate_failed']}; the compile would stop here")
            lines += describe_decisions(get_pass(p["name"]), p["decisions"])
    if len(lines) == 1:
        lines.append("no passes in the recipe")
    return "\n".join(lines)


def _gates_line(gates: dict) -> str:
    """The applied quality gates (report["quality_gates"]), loud when nothing was gated or checked."""
    if not gates["gated"]:
        why = "quality: {gates: off}" if gates["source"] == "off" else "the recipe's quality: section bounds nothing"
        return f"gates      NONE: nothing was gated ({why}); the metrics are only reported"
    bounds = "; ".join(
        f"{glob} " + ", ".join(f"{m} {'>=' if m in ('cosine', 'top1') else '<='} {v:g}" for m, v in b.items())
        for glob, b in gates["bounds"].items()
    )
    line = f"gates      {gates['source']}: {bounds}"
    if not gates["checked"]:
        line += f" (NOT CHECKED: {gates['unchecked']})"
    elif gates.get("measured_on") == "held_out":
        line += ", on held-out calibration samples no pass saw"
    elif gates.get("measured_on") == "decision":
        line += ", on the samples the passes decided on (calibration.holdout: 0)"
    return "\n".join(textwrap.wrap(line, 100, subsequent_indent=" " * 11))


def _calibration_line(calibration: dict) -> str:
    """The calibration source and its split (`describe_split`): what the passes decided on, what the gates measured."""
    from sparsec.data.calibration import describe_split

    if "split" not in calibration:  # the model was not run (a weight-only lazy dry run)
        return f"calibration {calibration['skipped']}"
    line = f"calibration {calibration['source']}: {describe_split(calibration['split'])}"
    return "\n".join(textwrap.wrap(line, 100, subsequent_indent=" " * 12))


def _programs(report: dict) -> list[tuple[str, dict]]:
    """(entry point name, its part of the report); one unnamed part for a single-program compile."""
    return list(report["entry_points"].items()) if "entry_points" in report else [("", report)]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _summary(report: dict) -> str:
    from sparsec.data.quality import describe_quality

    lines = [
        f"model      {report['model']['source']} ({report['model']['family']}, {report['model']['class']})",
        _gates_line(report["quality_gates"]),
    ]
    for entry, program in _programs(report):
        if entry:
            lines.append(f"entry      {entry}/")
        lines += [
            f"parameters {program['parameters']['before']:,} -> {program['parameters']['after']:,}",
            f"result     {program['architecture']['summary']}",
            _calibration_line(program["calibration"]),
        ]
        for p in program["passes"]:
            quality = describe_quality(p["quality"])
            lines.append(
                f"pass       {p['name']}: modified={p['modified']} params {p['parameters_before']:,} -> "
                f"{p['parameters_after']:,}" + (f" ({quality})" if quality else "") + f", {p['seconds']:.2f}s"
            )
        if "parity" in program:
            parity = program["parity"]
            for name, m in parity["metrics"].items():
                extra = f" top1 {m['top1']:.4f}" if "top1" in m else ""
                tail = "".join(f" {k} {m[k]:.2e}" for k in m if k.startswith("p99") and k.endswith("_abs"))
                lines.append(
                    f"parity     {name}: {parity['backend']} {parity['precision']}: cosine {m['cosine']:.6f} "
                    f"rel_l2 {m['rel_l2']:.2e} max_abs {m['max_abs']:.2e}{tail}{extra} at {parity['input_shapes']}"
                )
        lines.append("artifacts  " + ", ".join(f"{k} ({v / 1e6:.2f} MB)" for k, v in program["artifacts"].items()))
    lines.append("seconds    " + ", ".join(f"{k} {v:.2f}" for k, v in report["seconds"].items()))
    return "\n".join(lines)


def _inputs_of(directory: str, target: str, option: str) -> list:
    """`artifact_inputs`, with the option that named the directory in its error."""
    from sparsec.runner import artifact_inputs

    try:
        return artifact_inputs(directory, target)
    except SparsecError as exc:
        raise SparsecError(f"{option} {exc}") from exc


def _artifact_inputs(args: argparse.Namespace, specs: list) -> tuple[list[dict], str]:
    """The batches `run` / `bench` feed the artifact taking inputs `specs` (`_inputs_of`): the calibration file's, or
    one synthetic batch sized by --dims."""
    from sparsec.data.calibration import TOKENIZER_DIR, load_calibration
    from sparsec.runner import artifact_report, parse_dims, synthetic_inputs

    if args.calib:
        source = (artifact_report(args.artifact) or {}).get("model", {}).get("source")
        why = (
            f"{source} is a built-in model, which has none"
            if source and source.startswith(BUILTIN_PREFIX)
            else f"its model directory {source} had none when it was compiled"
            if source
            else "it has no report.json saying what it was compiled from"
        )
        calibration = load_calibration(
            args.calib,
            input_names=[spec.name for spec in specs],
            tokenizer_dir=Path(args.artifact) / TOKENIZER_DIR,
            tokenizer_missing=f"the artifact {args.artifact} holds none in {TOKENIZER_DIR}/ ({why})",
            batch_size=args.batch_size,
            samples=args.samples,
            vocab={spec.name: spec.high for spec in specs if spec.high is not None},
        )
        return list(calibration.batches()), calibration.source
    dims = {**DEFAULT_DIMS, **parse_dims(args.dims or "")}
    return [synthetic_inputs(specs, dims)], "synthetic inputs (" + ",".join(f"{k}={v}" for k, v in dims.items()) + ")"


def _compiled_target(directory: str) -> str:
    """The `--target` the artifact in `directory` was compiled for (its report.json), else `onnxruntime`."""
    from sparsec.runner import artifact_report

    return (artifact_report(directory) or {}).get("target") or "onnxruntime"


def _program_directories(args: argparse.Namespace) -> None:
    """--artifact (and --baseline) as the directory of one program: OUT itself, or OUT/NAME of a multi-program
    output chosen with --entry (`artifact_directory`, which lists the programs when none is chosen)."""
    from sparsec.evaluation import artifact_directory

    args.artifact = str(artifact_directory(args.artifact, args.entry))
    if getattr(args, "baseline", None):
        args.baseline = str(artifact_directory(args.baseline, args.entry))


def _cmd_run(args: argparse.Namespace) -> int:
    import torch

    _program_directories(args)
    args.target = args.target or _compiled_target(args.artifact)
    from sparsec.runner import load_artifact

    batches, source = _artifact_inputs(args, _inputs_of(args.artifact, args.target, "--artifact"))
    runner = load_artifact(args.artifact, args.target)
    outputs: dict[str, list] = {}
    for batch in batches:
        for name, value in runner(batch).items():
            outputs.setdefault(name, []).append(value)
    summary = {}
    for name, values in outputs.items():
        value = torch.cat(values) if values[0].dim() else values[0]
        floats = value.double()
        summary[name] = {
            "shape": list(value.shape),
            "dtype": str(value.dtype).replace("torch.", ""),
            "mean": float(floats.mean()),
            "std": float(floats.std()) if floats.numel() > 1 else 0.0,
            "finite": float(torch.isfinite(floats).double().mean()),
        }
    result = {
        "artifact": str(args.artifact),
        "target": args.target,
        "inputs": source,
        "batches": len(batches),
        "outputs": summary,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.artifact} on {args.target}, {len(batches)} batch(es) of {source}")
        for name, m in summary.items():
            print(
                f"  {name}: {m['shape']} {m['dtype']} mean {m['mean']:.4g} std {m['std']:.4g} "
                f"finite {100 * m['finite']:.1f}%"
            )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from sparsec.runner import ideal_speedup, interleaved_timing, load_artifact

    _program_directories(args)
    baseline_target = args.target or (_compiled_target(args.baseline) if args.baseline else None)
    args.target = args.target or _compiled_target(args.artifact)
    specs = _inputs_of(args.artifact, args.target, "--artifact")
    if args.baseline:
        names = [spec.name for spec in specs]
        baseline_names = [spec.name for spec in _inputs_of(args.baseline, baseline_target, "--baseline")]
        if names != baseline_names:
            raise SparsecError(
                f"--artifact {args.artifact} takes inputs {names}, --baseline {args.baseline} takes {baseline_names}"
                f" (only in the artifact: {sorted(set(names) - set(baseline_names))}, only in the baseline: "
                f"{sorted(set(baseline_names) - set(names))}); compare artifacts of the same model's program"
            )
    batches, source = _artifact_inputs(args, specs)
    runners = [load_artifact(args.artifact, args.target)]
    if args.baseline:
        runners.append(load_artifact(args.baseline, baseline_target))
    batch = batches[0]
    timings = interleaved_timing(runners, batch, warmup=args.warmup, runs=args.runs)
    result = {
        "artifact": str(args.artifact),
        "target": args.target,
        "inputs": source,
        "input_shapes": {k: list(v.shape) for k, v in batch.items()},
        **timings[0],
    }
    if args.baseline:
        ideal, ideal_from = ideal_speedup(args.artifact, args.baseline)
        result["baseline"] = {"artifact": str(args.baseline), "target": baseline_target, **timings[1]}
        result["speedup"] = timings[1]["p50_ms"] / timings[0]["p50_ms"]
        result["ideal_speedup"] = ideal
        result["ideal_from"] = ideal_from
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{args.artifact} on {args.target}, inputs {result['input_shapes']} ({source}): "
        f"{args.warmup} warm-up, {args.runs} timed runs"
        + (f", interleaved with {args.baseline}" if args.baseline else "")
    )
    for label, summary in [("artifact", result), *([("baseline", result["baseline"])] if args.baseline else [])]:
        print(
            f"  {label + ' ' if args.baseline else ''}mean {summary['mean_ms']:.3f} ms  p50 {summary['p50_ms']:.3f}  "
            f"p90 {summary['p90_ms']:.3f}  p99 {summary['p99_ms']:.3f}  min {summary['min_ms']:.3f}  "
            f"max {summary['max_ms']:.3f}"
        )
    if args.baseline:
        ideal = f"{result['ideal_speedup']:.3f}x ({result['ideal_from']})" if result["ideal_speedup"] else "unknown"
        print(f"  speedup {result['speedup']:.3f}x (baseline p50 / artifact p50); ideal {ideal}")
        if not result["ideal_speedup"]:
            print(f"  ({result['ideal_from']})")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    from sparsec import evaluation as ev

    if not args.text and not args.tasks:
        raise SparsecError("nothing to evaluate: give --text FILE (perplexity) and/or --tasks NAME,... (lm-eval)")
    if args.baseline and not args.text:
        raise SparsecError("--baseline compares the two models on --text FILE; give one")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise SparsecError(f"--batch-size and --limit must be >= 1, got {args.batch_size} and {args.limit}")
    if args.text:
        ev.read_text(args.text)
    if args.artifact:
        directory = ev.artifact_directory(args.artifact, args.entry)
        target = args.target or _compiled_target(str(directory))
        names = ev.artifact_input_names(directory, target)
        tokenizer_dir = ev.find_tokenizer(directory, args.tokenizer, f"the artifact {directory}")
    else:
        directory = None if args.model.startswith(BUILTIN_PREFIX) else Path(args.model)
        if directory is not None and not directory.is_dir():
            from sparsec.models import hub_id_error

            raise SparsecError(hub_id_error(args.model) or f"--model {args.model}: no such directory")
        tokenizer_dir = ev.find_tokenizer(directory, args.tokenizer, f"--model {args.model}")
    if args.baseline:
        baseline_dir = ev.artifact_directory(args.baseline, args.entry)
        baseline_target = args.target or _compiled_target(str(baseline_dir))
        baseline_names = ev.artifact_input_names(baseline_dir, baseline_target)
    tasks, manager = [], None
    if args.tasks:
        from sparsec.harness import task_manager

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        manager = task_manager(tasks, args.tasks_dir)

    progress = not args.quiet
    start = time.perf_counter()
    samples = (
        ev.TextSamples.read(args.text, tokenizer_dir=tokenizer_dir, protocol=args.protocol, seq_len=args.seq_len)
        if args.text
        else None
    )
    timings = {"tokenize_s": time.perf_counter() - start}
    start = time.perf_counter()
    model = ev.load_artifact_lm(directory, target, names) if args.artifact else ev.load_model_lm(args.model)
    timings["load_s"] = time.perf_counter() - start
    result: dict = {
        "model": {"source": model.source, **({"target": target} if args.artifact else {})},
        "tokenizer": str(tokenizer_dir),
    }
    if samples is not None:
        result["protocol"] = dataclasses.asdict(samples.protocol)
        if args.baseline:
            baseline = ev.load_artifact_lm(baseline_dir, baseline_target, baseline_names)
            compared = ev.agreement(model, baseline, samples, batch_size=args.batch_size, progress=progress)
            measured = compared.artifact
            result["baseline"] = {"source": baseline.source, "target": baseline_target, **compared.describe()}
        else:
            measured = ev.perplexity(model, samples, batch_size=args.batch_size, progress=progress)
        scored = measured.describe()
        timings["perplexity_s"] = scored.pop("seconds")
        timings["tokens_per_second"] = scored.pop("tokens_per_second")
        result.update(scored)
    if tasks:
        from sparsec.harness import make_lm, run_tasks

        lm = make_lm(
            model,
            ev.load_tokenizer(tokenizer_dir),
            max_length=args.seq_len,
            batch_size=args.batch_size,
            progress=progress,
        )
        start = time.perf_counter()
        ran = run_tasks(lm, tasks, manager, limit=args.limit)
        timings["tasks_s"] = time.perf_counter() - start
        result["tasks"] = {"results": ran["results"], "n_samples": ran["n_samples"], "limit": args.limit}
    result["timings"] = timings
    print(json.dumps(result, indent=2) if args.json else _eval_summary(result))
    return 0


def _eval_summary(result: dict) -> str:
    lines = [f"model      {result['model']['source']}"]
    if "protocol" in result:
        from sparsec.evaluation import TextProtocol

        lines.append("protocol   " + TextProtocol(**result["protocol"]).describe())
        timings = result["timings"]
        lines.append(
            f"perplexity {result['perplexity']:.4f} (loss {result['loss']:.5f} nats/token over {result['tokens']:,} "
            f"predicted tokens; {timings['perplexity_s']:.2f} s, {timings['tokens_per_second']:.0f} tokens/s)"
        )
    if "baseline" in result:
        base = result["baseline"]
        lines.append(
            f"baseline   {base['source']}: perplexity {base['perplexity']:.4f}; artifact / baseline "
            f"{base['perplexity_ratio']:.4f}"
        )
        for name, m in base["outputs"].items():
            extra = f" kl {m['kl']:.5f} top1 {m['top1']:.4f}" if "kl" in m else ""
            lines.append(f"agreement  {name}:{extra} cosine {m['cosine']:.5f} over {m['tokens']:,} tokens")
    for task, metrics in result.get("tasks", {}).get("results", {}).items():
        shown = ", ".join(
            f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k
        )
        lines.append(f"task       {task}: {shown}")
    return "\n".join(lines)


def _cmd_passes(args: argparse.Namespace) -> int:
    from sparsec.transform.options import describe_section
    from sparsec.transform.pass_manager import available_passes

    passes = available_passes()
    if not passes:
        print("no passes registered")
    for name, cls in passes.items():
        doc = (cls.__doc__ or "").strip().splitlines()
        print(f"{name}  [{cls.stage}]  {doc[0] if doc else ''}")
        for opt, typ, default in describe_section(cls.Options):
            print(f"    {opt}: {typ} = {default!r}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from sparsec.data.calibration import check_calibration_file
    from sparsec.models import load_model
    from sparsec.probe import (
        DEFAULT_KINDS,
        Probe,
        check_options,
        default_tasks,
        format_markdown,
        load_tasks,
        write_report,
    )
    from sparsec.recipe import Recipe

    if not args.out:
        raise SparsecError("--out DIR is required: the table (analysis.md, analysis.json) and plots go there")
    check_creatable(args.out, "--out")
    specs: dict[str, tuple[str | None, str | None]] = {}
    for item in args.task or []:
        head, _, path = item.partition("=")
        name, _, entry = head.partition("@")
        if not name or name in specs:
            raise SparsecError(
                f"--task {item!r}: give NAME[@ENTRY]=FILE (or NAME for synthetic inputs), each name once"
            )
        specs[name] = (entry or None, path or None)
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError as exc:
        raise SparsecError(f"--ratios {args.ratios!r}: expected comma-separated numbers such as 0.25,0.5") from exc
    components = args.components.split(",") if args.components else None
    kinds = args.kinds.split(",") if args.kinds else list(DEFAULT_KINDS)
    check_options(components=components, kinds=kinds, ratios=ratios, top_fraction=args.top_fraction)
    recipe = Recipe.load(args.recipe) if args.recipe else Recipe()
    directory = None if args.model.startswith(BUILTIN_PREFIX) else args.model
    for _, path in specs.values():
        if path:
            check_calibration_file(path, tokenizer_dir=directory)
    loaded = load_model(args.model)
    if not specs:
        specs = {name: (None, None) for name in default_tasks(loaded.model, recipe.tags)}
    tasks = load_tasks(
        loaded.model,
        specs,
        tags=recipe.tags,
        capture_batch=recipe.capture.batch,
        capture_seq=recipe.capture.seq,
        samples=args.samples,
        seq=args.seq,
        tokenizer_dir=loaded.directory,
        log=_log,
    )
    probe = Probe(
        tasks,
        components=components,
        kinds=kinds,
        strict=bool(args.components or args.kinds),
        top_fraction=args.top_fraction,
        metric=args.metric,
        progress=not args.quiet,
    )
    for skipped in probe.skipped:
        _log(f"skipped {skipped['component']} / {skipped['kind']}: {skipped['reason']}")
    result = probe.run(ratios)
    files = write_report(result, args.out)
    if not args.quiet:
        print(format_markdown(result))
        print(f"wrote {', '.join(files)} to {args.out}")
    return 0


def load_plugin(spec: str) -> None:
    """Import `spec`, a module name (`my_passes`, `pkg.passes`) or a Python file (`./my_pass.py`), whose import
    registers passes, targets or families (`register_pass`, `register_target`, `register_family`): how a pass in a
    local file reaches the command line without being installed. `SparsecError` (exit 2) naming the plugin for a
    file or module that does not exist and for an error its import raises (where it was raised)."""
    import importlib
    import importlib.util

    is_file = spec.endswith(".py") or "/" in spec or "\\" in spec
    try:
        if not is_file:
            importlib.import_module(spec)
            return
        path = Path(spec).expanduser()
        if not path.is_file():
            raise SparsecError(f"--plugin {spec}: no such file (give a .py file that registers passes or targets)")
        name = f"sparsec_plugin_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling look their module up by name
        module_spec.loader.exec_module(module)
    except ModuleNotFoundError as exc:
        if not is_file and spec.startswith(str(exc.name)):
            raise SparsecError(
                f"--plugin {spec}: no module named {exc.name!r} on the Python path; give an importable module name "
                "or the path of a .py file"
            ) from exc
        raise _plugin_error(spec, exc) from exc
    except SparsecError:
        raise
    except Exception as exc:
        raise _plugin_error(spec, exc) from exc


def _plugin_error(spec: str, exc: Exception) -> SparsecError:
    """An error raised while importing plugin `spec`, with where the plugin's code raised it."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return SparsecError(f"--plugin {spec} failed to import: {type(exc).__name__}: {exc}{where}")


def _plugins(argv: list[str] | None) -> list[str]:
    """The --plugin values of `argv`, read before the parser is built (its --target choices include the targets
    plugins register)."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--plugin", action="append", default=[])
    return early.parse_known_args(argv)[0].plugin


def build_parser() -> argparse.ArgumentParser:
    model_help = (
        "a Hugging Face save_pretrained directory (config.json + *.safetensors) or a built-in tiny model: "
        + ", ".join(BUILTIN_PREFIX + b for b in sorted(builtin_names()))
        + f" (default: {DEFAULT_MODEL})"
    )
    parser = argparse.ArgumentParser(
        prog="sparsec",
        description="Capture a transformer as one FX graph, rewrite it with quality-checked passes, lower it to ONNX.",
        epilog="Run 'sparsec COMMAND --help' for a command's options. Exit codes: 0 ok, 1 quality/parity "
        "check failed (nothing written), 2 bad input, 3 internal error.",
    )
    plugin = argparse.ArgumentParser(add_help=False)
    plugin.add_argument(
        "--plugin",
        action="append",
        metavar="MODULE_OR_FILE",
        help="import a module (my_passes) or a .py file (./my_pass.py) first, whose import registers passes or "
        "targets (register_pass, register_target); repeatable",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[plugin], **kwargs)

    p = command(
        "inspect",
        help="show regions, component tags, parameters and FLOPs per component",
        description="Capture the model and show its regions, component tags (understanding / "
        "generation / shared), parameters and FLOPs per component, block stacks and FFNs.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    p.add_argument("--recipe", help="recipe whose capture shape and tag overrides to use (optional)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument(
        "--why",
        metavar="PATH",
        help="say whether module PATH is an FFN / a residual block, and if not which node broke which rule",
    )
    p.set_defaults(func=_cmd_inspect)

    p = command(
        "compile",
        help="run a recipe's passes and write program.pt2, model.onnx, report.json and decisions.json",
        description="Capture the model, run the recipe's passes (each verified and quality-checked on "
        "calibration data), save the program, export ONNX and check it in ONNX Runtime. "
        "Artifacts appear in --out only if every check passed.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    p.add_argument("--recipe", help="recipe YAML (default: the built-in default recipe, no compression passes)")
    p.add_argument("--out", help="output directory (created; an earlier sparsec output there is replaced)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="run the passes and print their decisions (e.g. layer rankings) and quality; write nothing",
    )
    p.add_argument(
        "--calib",
        help="calibration inputs: .safetensors/.npz of model inputs, or .txt/.jsonl text "
        "(overrides the recipe's calibration.file; default: synthetic random inputs)",
    )
    targets = available_targets()
    p.add_argument(
        "--target",
        default="onnxruntime",
        choices=list(targets),
        help="backend the artifact is built and parity-checked for, checked before any work: "
        + "; ".join(f"{name}: {t.description}" for name, t in targets.items()).replace("%", "%%")
        + " (entry-point group 'sparsec.targets' adds more)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype the model loads and runs in (default: the recipe's model.dtype, auto: the checkpoint's "
        "own; a half-precision program is written as FP32 ONNX for FP32 targets)",
    )
    p.add_argument(
        "--device", help="device of every PyTorch step: cpu or cuda[:N] (default: the recipe's model.device, cpu)"
    )
    p.add_argument(
        "--weights",
        choices=["auto", "memory", "lazy"],
        default="auto",
        help="memory: load the checkpoint's weights whole; lazy: read them from its safetensors files as needed "
        "(each block's while it runs; the transformed program's for writing; one program, CPU only); auto "
        "(default): lazy when the estimated in-memory peak exceeds half the memory available",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output or summary")
    p.set_defaults(func=_cmd_compile)

    p = command(
        "analyze",
        help="probe which component (understanding / generation; a plain LLM: the whole model) tolerates depth "
        "and width compression",
        description="Compress one component at a time (by component tags), in depth (skip its most redundant blocks) "
        "or width (zero its least important FFN neurons), over a sweep of ratios, and measure each task's "
        "quality relative to the uncompressed model; also the dynamic sparsity of every FFN (Jaccard "
        "overlap of each sample's top neurons, within and across tasks). Training-free: one statistics "
        "pass per task, then forward passes. Writes analysis.md, analysis.json and PNG plots to --out.",
        epilog="Example (python examples/analyze_tasks.py --out tasks writes the task files): sparsec analyze "
        "--model builtin:tiny-mot --task understanding=tasks/und.safetensors --task generation=tasks/gen.safetensors "
        "--ratios 0.25,0.5 --out out/probe",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    p.add_argument(
        "--task",
        action="append",
        metavar="NAME[@ENTRY]=FILE",
        help="a task and its calibration inputs (.safetensors/.npz of the program's inputs, or .txt/.jsonl); "
        "repeat per task; NAME alone uses synthetic inputs (default, synthetic: understanding and generation for a "
        "model with those components, else one task named after its entry point, forward). ENTRY: the entry point "
        "serving it (Janus: understanding, generation_step; default: the one named like the task, generation_step "
        "for 'generation', else forward)",
    )
    p.add_argument(
        "--components",
        help="comma-separated components to compress: understanding, generation, shared (default: "
        "understanding,generation, or shared when no region is tagged with them; given explicitly, one with "
        "nothing to compress is an error)",
    )
    p.add_argument(
        "--kinds",
        help="comma-separated: depth (blocks skipped), width (FFN neurons), heads (attention query heads); "
        "default: depth,width",
    )
    p.add_argument(
        "--ratios", default="0.125,0.25,0.375,0.5", help="fractions removed, each in (0, 1) (default: %(default)s)"
    )
    p.add_argument(
        "--metric",
        default="auto",
        choices=["auto", "top1", "cosine", "kl", "rel_l2"],
        help="headline quality metric (auto: top-1 agreement for logits, else cosine)",
    )
    p.add_argument(
        "--top-fraction",
        type=float,
        default=0.1,
        help="share of an FFN's neurons counted as highly active for the overlap (default: %(default)s)",
    )
    p.add_argument("--samples", type=int, default=16, help="synthetic samples per task (default: %(default)s)")
    p.add_argument("--seq", type=int, default=32, help="synthetic sequence length (default: %(default)s)")
    p.add_argument("--recipe", help="recipe whose capture shape and tag overrides to use (optional)")
    p.add_argument(
        "--out", help="output directory for analysis.md, analysis.json, quality_*.png, sensitivity.png, sparsity.png"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")
    p.set_defaults(func=_cmd_analyze)

    for name, helptext in (
        ("run", "run a compiled artifact on calibration or synthetic inputs, summarize its outputs"),
        ("bench", "time a compiled artifact: warm-up, then timed runs; mean and percentiles"),
    ):
        p = command(
            name,
            help=helptext,
            description=helptext[0].upper() + helptext[1:] + ". The artifact is a "
            "`sparsec compile --out` directory (model.onnx; model.engine for --target tensorrt; model.aoti.pt2 for "
            "--target aotinductor; program.pt2, the program itself, for --target pytorch; config.json and "
            "model.safetensors for --target hf).",
        )
        p.add_argument("--artifact", required=True, help="a sparsec compile output directory")
        p.add_argument("--entry", metavar="NAME", help="the program of a multi-program output (OUT/NAME)")
        p.add_argument(
            "--target",
            choices=list(targets),
            help="backend to run it on (default: the one it was compiled for, in its report.json; else onnxruntime)",
        )
        p.add_argument(
            "--calib",
            help="inputs: a .safetensors/.npz file of the model's inputs, or .txt/.jsonl text tokenized with the "
            "artifact's tokenizer (copied from the model directory at compile) (default: synthetic)",
        )
        p.add_argument("--samples", type=int, default=16, help="samples read from --calib (default: %(default)s)")
        p.add_argument("--batch-size", type=int, default=8, help="batch size for --calib (default: %(default)s)")
        p.add_argument(
            "--dims",
            metavar="NAME=N,...",
            help="sizes of the dynamic dims for synthetic inputs, over the defaults "
            + ",".join(f"{k}={v}" for k, v in DEFAULT_DIMS.items())
            + " (--dims batch=4 keeps seq=128)",
        )
        p.add_argument("--json", action="store_true", help="print JSON")
        if name == "bench":
            p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default: %(default)s)")
            p.add_argument("--runs", type=int, default=20, help="timed runs (default: %(default)s)")
            p.add_argument(
                "--baseline",
                metavar="OUT2",
                help="a second compile output with the same inputs, timed interleaved with --artifact on the same "
                "inputs (on --target, else the target it was compiled for: an AOTInductor package against an ONNX "
                "Runtime artifact works); prints both, the speedup (baseline p50 / artifact p50) and the ideal from "
                "the reports",
            )
        p.set_defaults(func=_cmd_run if name == "run" else _cmd_bench)

    p = command(
        "eval",
        help="perplexity of an artifact or model on a text, agreement with a baseline, lm-eval task accuracy",
        description="What a model is worth in the terms users report. Perplexity: next-token loss over a text "
        "file, exp(total nats / predicted tokens) (sparsec.data.language_model.next_token_loss): every token but a "
        "sample's first is predicted from the ones before it in the same sample. The protocol is fixed by the "
        "options and recorded with the result (--json 'protocol'): the tokenizer (the artifact's OUT/tokenizer, "
        "copied from the model directory at compile; the model directory's; or --tokenizer) with its own special "
        "tokens (whether it adds BOS is recorded); --protocol lines: one sample per non-empty line, truncated to "
        "--seq-len tokens; --protocol windows: the file's whole text tokenized once and cut into non-overlapping "
        "windows of --seq-len tokens (BOS first when the tokenizer adds one); samples batched in file order, "
        "right-padded; the number of samples and predicted tokens; the file's sha256. The same protocol gives the "
        "same number on every run, and the same predicted tokens for every model with that tokenizer.",
        epilog="Examples: sparsec eval --artifact out/ --text held_out.txt --seq-len 512 --json; "
        "sparsec eval --model DIR --text held_out.txt (the uncompressed model); sparsec eval --artifact out/ "
        "--baseline dense/ --text held_out.txt; sparsec eval --artifact out/ --tasks sparsec_tiny_mc "
        "--tasks-dir examples/eval_tasks (needs " + 'pip install -e ".[eval]")',
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--artifact", metavar="OUT", help="a sparsec compile output directory")
    which.add_argument(
        "--model", help="the uncompressed model, run by PyTorch: a save_pretrained directory or builtin:NAME"
    )
    p.add_argument(
        "--target",
        choices=list(targets),
        help="backend to run the artifact (and --baseline) on (default: the one each was compiled for, in its "
        "report.json; pytorch: program.pt2)",
    )
    p.add_argument("--entry", metavar="NAME", help="the program of a multi-program output (OUT/NAME)")
    p.add_argument("--text", metavar="FILE", help="UTF-8 text file to measure perplexity on")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the artifact's or model's)")
    p.add_argument(
        "--protocol", choices=["lines", "windows"], default="lines", help="how the text is cut (default: %(default)s)"
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=512,
        help="tokens per sample; also lm-eval's maximum length (default: %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="samples per run of the model (default: %(default)s)")
    p.add_argument(
        "--baseline",
        metavar="OUT2",
        help="a second compile output run on the same samples: its perplexity, the ratio, and per output KL "
        "(baseline || artifact), top-1 agreement and cosine",
    )
    p.add_argument(
        "--tasks",
        metavar="NAME,...",
        help="lm-evaluation-harness tasks to score (loglikelihood, rolling loglikelihood, greedy generation by full "
        "recompute)",
    )
    p.add_argument("--tasks-dir", metavar="DIR", help="a directory of lm-eval task YAML files (and their data)")
    p.add_argument("--limit", type=int, help="items per task (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_eval)

    p = command(
        "passes",
        help="list registered passes and their options",
        description="List every registered pass (built-in, entry point 'sparsec.passes') with options.",
    )
    p.set_defaults(func=_cmd_passes)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the command; parsing is inside the handlers too, since building the parser imports the
    model families and targets (seconds), and a Ctrl-C then is still a plain `interrupted`, exit 130."""
    prog = "sparsec"
    try:
        for spec in _plugins(argv):
            load_plugin(spec)
        args = build_parser().parse_args(argv)
        prog = f"sparsec {args.command}"
        with signals_as_exceptions():
            return args.func(args)
    except VerificationError as exc:
        print(f"{prog}: internal error: {exc}", file=sys.stderr)
        print(
            f"{prog}: this is a bug in that pass (sparsec's for a built-in pass, its author's for "
            "a custom one), not a problem with the model or recipe; please report it with the recipe and this message",
            file=sys.stderr,
        )
        return exc.exit_code
    except SparsecError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except Exception as exc:
        traceback.print_exc()
        notes = getattr(exc, "__notes__", None)  # where it failed (`PassManager`), which 3.10's traceback omits
        print(
            f"{prog}: internal error{f': {notes[-1]}' if notes else ''} (a bug in sparsec); the trace above says where",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
