"""The code in README.md and docs/ runs as written: every ```python and ```bash block, page by page in order; every
```yaml block is a valid recipe (or a list of passes); every ```toml block parses; every repository file a block
names exists. bench/README.md's blocks (benchmark runs of minutes to hours) are held to the same file check.

A page's blocks run in order in one directory of their own, as a reader working through the page would run them:
a later block may read what an earlier one wrote. The directory holds what the pages assume a reader has:
`examples/` (linked, as in a checkout), `my-model/` (a Hugging Face `save_pretrained` directory: the built-in tiny
Llama with random weights and a word-level tokenizer), and `calib.txt` / `held_out.txt` (one sample per line).
`examples/custom_pass` is on the import path, as after `pip install examples/custom_pass`, which the pages name
where a block imports its `skip_ffn`. Each ```python block runs in a fresh interpreter.

A block that cannot run here (a GPU, a real checkpoint, a download, an hour) is preceded by the line
`<!-- not run: REASON -->`; those are few, and their files are still checked. A block whose commands another page
runs (the README's quick start, run step by step by docs/getting-started.md) says so, `<!-- not run: the same
commands run in PAGE ... -->`, and its command lines are checked to be that page's, so they run once. Listings that are not code to run
(synopses, output) are ```text blocks. The generated reference pages are checked by `mkdocs build --strict`
(`test_site_builds`).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
CHECKED_ONLY = [ROOT / "bench" / "README.md"]  # files named must exist; its blocks are benchmark runs
FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<language>\w*)\n(?P<code>.*?)^(?P=indent)```$", re.S | re.M)
NOT_RUN = re.compile(r"<!-- not run: (?P<reason>[^>]+?) -->\s*$")
RUN_ELSEWHERE = re.compile(r"^the same commands run in (?P<page>\S+\.md)\b")
LANGUAGES = {"python", "bash", "yaml", "toml", "text"}
MAX_NOT_RUN = 16  # blocks that cannot run here; each says why
REPO_PATH = re.compile(r"(examples|bench|tests|sparsec|docs|passes|exporters)/[\w./-]*\w$")
# What a page's commands leave behind, checked after they ran (their exit status is checked for every block).
PAGE_OUTPUTS = {
    "docs/getting-started.md": ["out/small/model.onnx", "out/small/tokenizer/tokenizer.json"],
    "docs/analyze.md": ["out/probe/analysis.md", "out/probe-llm/sensitivity.png", "out/probe-mine/quality_heads.png"],
}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    language: str
    code: str
    not_run: str | None  # the reason a block is not run here

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].splitlines()
        marker = NOT_RUN.search(before[-1]) if before else None
        indent = len(match.group("indent"))
        code = "\n".join(line[indent:] for line in match.group("code").splitlines()) + "\n"
        found.append(Block(page, len(before) + 1, match.group("language"), code, marker and marker["reason"]))
    return found


ALL = [b for page in PAGES for b in blocks(page)]


def test_every_block_names_a_known_language():
    unknown = [f"{b.where}: ```{b.language}" for b in ALL if b.language not in LANGUAGES]
    assert not unknown, f"blocks need a language of {sorted(LANGUAGES)} (```text for listings): {unknown}"
    assert sum(b.language == "python" for b in ALL) >= 6 and sum(b.language == "bash" for b in ALL) >= 8


def test_blocks_not_run_are_few_and_say_why():
    not_run = [b for b in ALL if b.not_run]
    assert all(len(b.not_run.split()) >= 3 for b in not_run), [b.where for b in not_run]
    assert len(not_run) <= MAX_NOT_RUN, "\n".join(f"{b.where}: {b.not_run}" for b in not_run)
    assert not [b.where for b in not_run if b.language in ("text", "yaml", "toml")], "only code to run is marked"


def _commands(code: str) -> list[str]:
    """A bash block's command lines, comments and spacing aside."""
    lines = (line.split(" #", 1)[0].strip() for line in code.splitlines())
    return [" ".join(line.split()) for line in lines if line and not line.startswith("#")]


def test_blocks_run_elsewhere_are_the_commands_that_page_runs():
    elsewhere = [(b, RUN_ELSEWHERE.match(b.not_run)) for b in ALL if b.not_run and RUN_ELSEWHERE.match(b.not_run)]
    assert elsewhere, "the README's quick start is run by docs/getting-started.md"
    for block, found in elsewhere:
        page = ROOT / found["page"]
        ran = {c for b in blocks(page) if b.language == "bash" and not b.not_run for c in _commands(b.code)}
        missing = [c for c in _commands(block.code) if c not in ran]
        assert not missing, f"{block.where}: {found['page']} does not run {missing}"


@pytest.fixture
def custom_pass_registered():
    """`skip_ffn` registered for the test only, so later tests in this process see the built-in passes alone."""
    sys.path.insert(0, str(ROOT / "examples" / "custom_pass"))
    try:
        from skip_ffn import SkipFfn
    finally:
        sys.path.pop(0)
    from sparsec.transform.pass_manager import PASS_REGISTRY

    with PASS_REGISTRY.temporarily(SkipFfn, replace=True):
        yield


@pytest.mark.usefixtures("custom_pass_registered")
@pytest.mark.parametrize("block", [b for b in ALL if b.language == "yaml"], ids=lambda b: b.where)
def test_yaml_block_is_a_valid_recipe(block):
    """A list is a recipe's `passes:`; a mapping is a whole recipe. Both are validated as `sparsec compile` does."""
    from sparsec.recipe import Recipe

    data = yaml.safe_load(block.code)
    Recipe.from_dict({"passes": data} if isinstance(data, list) else data, source=block.where)


def test_toml_blocks_parse():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    for block in (b for b in ALL if b.language == "toml"):
        tomllib.loads(block.code)


def test_files_named_by_blocks_exist():
    for page in PAGES + CHECKED_ONLY:
        for block in blocks(page):
            for word in re.findall(r"[\w./-]+", block.code):
                if REPO_PATH.fullmatch(word):
                    assert (ROOT / word).exists(), f"{block.where}: {word} does not exist"


WORDS = "the a cat dog sat ran on far and home then end blue sky sun is what model small large fast slow".split()


def _write_model_dir(directory: Path) -> None:
    """A tiny random-weight Llama as `save_pretrained` writes it, with a word-level tokenizer that adds BOS."""
    from sparsec.models import build_model, builtin_config
    from sparsec.testing import save_word_tokenizer

    build_model(builtin_config("tiny-llama")).save_pretrained(directory)
    save_word_tokenizer(directory, ["[PAD]", "[UNK]", "[BOS]", "[EOS]", *WORDS], bos="[BOS]", eos="[EOS]")


def _text(lines: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(" ".join(rng.choices(WORDS, k=rng.randint(8, 60))) + "\n" for _ in range(lines))


@pytest.fixture(scope="session")
def reader_files(tmp_path_factory) -> Path:
    """What the pages assume a reader has, written once: the model directory and the two text files."""
    directory = tmp_path_factory.mktemp("reader")
    _write_model_dir(directory / "my-model")
    (directory / "calib.txt").write_text(_text(64, seed=0))
    (directory / "held_out.txt").write_text(_text(24, seed=1))
    return directory


def _run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_MKDOCS_2_WARNING="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "examples" / "custom_pass"), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # `python`, `sparsec`
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


RUNNABLE = {
    page.relative_to(ROOT).as_posix(): [b for b in blocks(page) if b.language in ("python", "bash") and not b.not_run]
    for page in PAGES
}


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p, bs in RUNNABLE.items() if bs])
def test_page_code_runs(page, reader_files, tmp_path):
    """The page's bash and python blocks, in order, in one directory: each must exit 0."""
    work = tmp_path / "reader"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    (work / "my-model").symlink_to(reader_files / "my-model")
    for name in ("calib.txt", "held_out.txt"):
        (work / name).write_text((reader_files / name).read_text())
    for block in RUNNABLE[page]:
        command = ["bash", "-euo", "pipefail", "-c", block.code]
        if block.language == "python":
            command = [sys.executable, "-c", block.code]
        done = _run(command, work)
        assert done.returncode == 0, (
            f"{block.where} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        )
    missing = [path for path in PAGE_OUTPUTS.get(page, []) if not (work / path).is_file()]
    assert not missing, f"{page}: its commands did not write {missing}"


@pytest.mark.slow
def test_site_builds(tmp_path):
    """`mkdocs build --strict`: every page, link and anchor resolves, and the generated references build (a pass
    option that docs/passes.md leaves out, or one it names that the pass lacks, fails it)."""
    pytest.importorskip("mkdocs", reason='the docs extra: pip install -e ".[docs]"')
    done = _run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")], ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    reference = (tmp_path / "site" / "reference" / "passes" / "index.html").read_text()
    assert all(f"<code>{name}</code>" in reference for name in ("slice_neurons", "prune_heads", "drop_layers"))


def test_the_pass_guide_is_checked_against_the_options():
    """The check `mkdocs build` runs on docs/passes.md: an option table that leaves out an option, or names one the
    pass lacks, is reported; the page as it is passes."""
    pytest.importorskip("mkdocs", reason='the docs extra: pip install -e ".[docs]"')
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import hooks
    finally:
        sys.path.pop(0)
    page = """## `slice_neurons`: width

| option | meaning |
|---|---|
| `keep_ratio` / `keep` | exactly one |
| `where` | glob, e.g. `a \\| b` |
"""
    tables = hooks.guide_option_tables(page)
    assert tables == {
        "slice_neurons": {"keep_ratio": "exactly one", "keep": "exactly one", "where": "glob, e.g. `a \\| b`"}
    }
    problems = hooks._check_guide("slice_neurons", ["keep_ratio", "keep", "seed"], tables["slice_neurons"])
    assert problems == [
        "docs/passes.md documents option(s) ['where'] that pass 'slice_neurons' does not have",
        "docs/passes.md leaves out option(s) ['seed'] of pass 'slice_neurons'",
    ]
    assert "prune_heads" in hooks.pass_reference()  # the real page passes the check (it raises otherwise)
