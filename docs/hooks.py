"""mkdocs hooks: the reference pages are generated from the code at build time, so they cannot drift from it.

- `reference/cli.md`: every `sparsec` command and option, read from the argparse parser (`sparsec.cli.build_parser`):
  usage, description, and per option its flags, values, default and help text.
- `reference/passes.md`: every registered pass (`sparsec.transform.pass_manager.available_passes`: built-ins and
  installed `sparsec.passes` entry points), its stage and docstring, and a table of its recipe options from its
  `Options` dataclass (name, type, default; the meaning from the field's `metadata["doc"]`, else from the option
  table of the pass's section in `docs/passes.md`).
- The option tables of `docs/passes.md` are checked against the `Options` fields: a table naming an option the
  pass does not have, or leaving one of its options out, fails the build.
- `bench/results/quality/quality.png` is published beside the benchmarks page, which includes `bench/README.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
PASSES_PAGE = ROOT / "docs" / "passes.md"
USAGE_WIDTH = 100
BENCH_IMAGES = ["results/quality/quality.png"]  # relative to bench/, as bench/README.md links them


def _cell(text: object) -> str:
    """Text for one markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "flag"
    if action.choices:
        return " \\| ".join(f"`{c}`" for c in action.choices)
    return f"`{action.metavar or action.dest.upper()}`"


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
        return ""
    return f"`{action.default}`"


def _command_section(name: str, parser: argparse.ArgumentParser) -> list[str]:
    formatter = argparse.HelpFormatter(parser.prog, width=USAGE_WIDTH)  # the same width whatever the terminal
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    usage = formatter.format_help().strip()
    lines = [f"## `sparsec {name}`", "", "```text", usage, "```", ""]
    if parser.description:
        lines += [parser.description, ""]
    one_of = [group for group in parser._mutually_exclusive_groups if group.required]
    for group in one_of:
        flags = ", ".join(f"`{a.option_strings[0]}`" for a in group._group_actions)
        lines += [f"Exactly one of {flags}.", ""]
    lines += ["| option | value | default | meaning |", "|---|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flags = ", ".join(f"`{flag}`" for flag in action.option_strings) or f"`{action.dest}`"
        helptext = formatter._expand_help(action) if action.help else ""
        helptext = _cell(helptext).replace("*", "\\*")  # plain text: `*.safetensors` is no emphasis
        lines.append(f"| {flags} | {_value(action)} | {_cell(_default(action))} | {helptext} |")
    if parser.epilog:
        lines += ["", parser.epilog]
    return lines + [""]


def cli_reference() -> str:
    """The command-line reference, from `sparsec.cli.build_parser()`."""
    from sparsec.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    summaries = {choice.dest: choice.help for choice in commands._choices_actions}
    lines = [
        "# Command-line reference",
        "",
        "Generated from the `sparsec` argument parser when this site is built; `sparsec COMMAND --help` prints the "
        "same text.",
        "",
        parser.description or "",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    lines += [f"| [`{name}`](#sparsec-{name}) | {_cell(summaries.get(name, ''))} |" for name in commands.choices]
    lines += ["", parser.epilog or "", ""]
    for name, sub in commands.choices.items():
        lines += _command_section(name, sub)
    return "\n".join(lines)


OPTION_ROW = re.compile(r"^\|\s*(?P<names>[^|]*?)\s*\|\s*(?P<rest>.*)\|\s*$")
PASS_HEADING = re.compile(r"^#+ `(?P<name>\w+)`")


def guide_option_tables(text: str) -> dict[str, dict[str, str]]:
    """{pass name: {option: meaning}} from the `| option | ... | meaning |` tables of a pass guide page: the
    first such table after each heading that starts with a pass name in backticks. A row may name several options
    (`keep_ratio` / `keep`); the meaning is the last cell."""
    tables: dict[str, dict[str, str]] = {}
    current: str | None = None
    for line in text.splitlines():
        heading = PASS_HEADING.match(line)
        if heading:
            current = heading.group("name")
            continue
        if current is None or not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "option":
            tables.setdefault(current, {})
            continue
        if current not in tables or set(line) <= set("|-: "):
            continue
        names = re.findall(r"`(\w+)`", cells[0])
        meaning = re.split(r"(?<!\\)\|", line.strip().strip("|"))[-1].strip()
        for name in names:
            tables[current][name] = meaning
    return tables


def _check_guide(name: str, fields: list[str], documented: dict[str, str] | None) -> list[str]:
    if documented is None:
        return [f"docs/passes.md has no option table for the built-in pass {name!r}"]
    problems = []
    unknown = sorted(set(documented) - set(fields))
    missing = [f for f in fields if f not in documented]
    if unknown:
        problems.append(f"docs/passes.md documents option(s) {unknown} that pass {name!r} does not have")
    if missing:
        problems.append(f"docs/passes.md leaves out option(s) {missing} of pass {name!r}")
    return problems


def pass_reference() -> str:
    """The pass reference, from each registered pass's class and `Options` dataclass; checks the guide's tables."""
    from sparsec.transform.options import describe_section
    from sparsec.transform.pass_manager import available_passes

    guide = guide_option_tables(PASSES_PAGE.read_text(encoding="utf-8"))
    lines = [
        "# Pass reference",
        "",
        "Generated from the registered passes when this site is built (`sparsec passes` prints the same list): "
        "each pass's stage, docstring and recipe options, with types and defaults from its `Options` dataclass. "
        "What the passes do and when to use them: [Passes](../passes.md).",
        "",
    ]
    problems: list[str] = []
    for name, cls in sorted(available_passes().items()):
        fields = {f.name: f for f in dataclasses.fields(cls.Options) if f.init}
        documented = guide.get(name)
        if fields and cls.__module__.startswith("sparsec.passes."):  # built-ins: the guide documents each option
            problems += _check_guide(name, list(fields), documented)
        lines += [f"## `{name}`", "", f"Stage: `{cls.stage}`. Class: `{cls.__module__}.{cls.__qualname__}`.", ""]
        lines += [inspect.cleandoc(cls.__doc__ or ""), ""]
        if not fields:
            lines += ["No options: `- " + name + ": {}`.", ""]
            continue
        lines += ["| option | type | default | meaning |", "|---|---|---|---|"]
        for option, type_name, default in describe_section(cls.Options):
            meaning = fields[option].metadata.get("doc") or (documented or {}).get(option, "")
            meaning = re.sub(r"\]\((?![a-z]+:|#|/)", "](../", meaning)  # the guide's relative links, from reference/
            shown = default if default == "(required)" else f"`{default!r}`"
            lines.append(f"| `{option}` | {_cell(type_name)} | {shown} | {meaning} |")
        lines.append("")
    if problems:
        raise PluginError("pass reference: " + "; ".join(problems))
    return "\n".join(lines)


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, "reference/cli.md", content=cli_reference()))
    files.append(File.generated(config, "reference/passes.md", content=pass_reference()))
    for image in BENCH_IMAGES:
        files.append(File.generated(config, image, abs_src_path=str(ROOT / "bench" / image)))
    return files
