"""README.md's code runs as written: every ```python block on its own (fresh globals, a directory of its own),
and the analyze example's commands; every repository file a ```bash block names exists.

Listings that are not Python to run (command synopses, output) are ```text blocks. Blocks see the repository's
`examples/` (linked into their directory, as for a reader in a checkout) and `examples/custom_pass` on the import
path, as after `pip install examples/custom_pass`, which the README names where a block imports its `skip_ffn`.
The blocks share one interpreter (imports are paid once); what a block registers (passes, targets, families) is
undone after it, as for a reader running it on its own: a block registering a pass name it uses must do so itself
(the README's unit-test block does).
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


def _blocks(language: str) -> list[tuple[int, str, str]]:
    """(line, section heading, code) of every ``` block in that language."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1) != language:
            continue
        before = text[: match.start()]
        heading = next((line for line in reversed(before.splitlines()) if line.startswith("#")), "")
        blocks.append((before.count("\n") + 1, heading.lstrip("# "), match.group(2)))
    return blocks


def _run(args: list[str], cwd: Path, timeout: float = 300, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "examples" / "custom_pass"), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # `python`, `sparsec`
    return subprocess.run(args, cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)


PYTHON_BLOCKS = _blocks("python")

# Each block with fresh globals, in a directory of its own: a name it uses without defining or importing it fails
# as it would for a reader.
RUN_BLOCKS = """
import contextlib, json, os, sys, traceback
from sparsec.exporters.targets import TARGET_REGISTRY
from sparsec.families import FAMILY_REGISTRY
from sparsec.transform.pass_manager import PASS_REGISTRY
blocks, root = json.loads(sys.stdin.read()), sys.argv[1]
failures = []
for line, code in blocks:
    work = os.path.join(root, f"line{line}")
    os.makedirs(work)
    os.symlink(sys.argv[2], os.path.join(work, "examples"))
    os.chdir(work)
    try:
        with contextlib.ExitStack() as registered:
            for registry in (PASS_REGISTRY, TARGET_REGISTRY, FAMILY_REGISTRY):
                registered.enter_context(registry.temporarily())
            exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__main__"})
    except BaseException:
        failures.append([line, traceback.format_exc(limit=-3)])
with open(os.path.join(root, "failures.json"), "w") as f:
    json.dump(failures, f)
"""


def test_every_block_names_its_language():
    text = (ROOT / "README.md").read_text()
    assert all(m.group(1) for m in FENCE.finditer(text)), "a ``` block without a language (```text for listings)"
    assert len(PYTHON_BLOCKS) >= 6


@pytest.mark.slow
def test_python_blocks_run(tmp_path):
    blocks = json.dumps([[line, code] for line, _, code in PYTHON_BLOCKS])
    done = _run([sys.executable, "-c", RUN_BLOCKS, str(tmp_path), str(ROOT / "examples")], ROOT, stdin=blocks)
    assert done.returncode == 0, done.stderr[-3000:]
    failures = json.loads((tmp_path / "failures.json").read_text())
    assert not failures, "\n".join(f"README.md line {line}:\n{trace}" for line, trace in failures)


def test_files_named_by_bash_blocks_exist():
    for line, _, code in _blocks("bash"):
        for word in shlex.split(code.replace("\\\n", " "), comments=True):
            if re.match(r"(examples|bench|tests|sparsec)/[\w./-]+$", word):
                assert (ROOT / word).exists(), f"README.md line {line}: {word} does not exist"


@pytest.mark.slow
def test_analyze_example_runs(tmp_path):
    """The analyze section's commands, as written: the task files are written by the shipped script."""
    (code,) = [c for _, s, c in _blocks("bash") if s.startswith("The sensitivity probe")]
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    done = _run(["bash", "-ec", code], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "probe" / "analysis.md").is_file()
    assert (tmp_path / "out" / "probe-llm" / "sensitivity.png").is_file()
