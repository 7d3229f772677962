"""The import contract: sparsec's layers depend on each other one way only.

Every `import` in the package (module level and inside functions alike) is read from the source with `ast`
and mapped to the layer it lands in. A layer may import itself and the layers below it, never one above;
layers on one line are independent of each other. Imports under `if TYPE_CHECKING:` name types for annotations
and never run, so they are not dependencies (as import-linter's `exclude_type_checking_imports`). Run on its own
in `.ci/run` before the tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Top to bottom. Names on one line are siblings: neither may import the other.
LAYERS: list[tuple[str, ...]] = [
    ("sparsec.cli",),
    ("sparsec.harness",),
    ("sparsec.compiler", "sparsec.probe", "sparsec.testing", "sparsec.evaluation"),
    ("sparsec.runner",),
    ("sparsec.recipe",),
    ("sparsec.capture", "sparsec.models"),
    ("sparsec.passes", "sparsec.exporters", "sparsec.families", "sparsec.pipeline"),
    ("sparsec.transform", "sparsec.analysis", "sparsec.data"),
    ("sparsec.ops",),
    ("sparsec.ir",),
    ("sparsec.resources", "sparsec.progress", "sparsec.staging", "sparsec.tables"),
    ("sparsec.errors",),
]
SOURCE_DIRS = {"sparsec": ROOT / "sparsec", "sparsec.passes": ROOT / "passes", "sparsec.exporters": ROOT / "exporters"}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, directory in SOURCE_DIRS.items():
        for path in directory.rglob("*.py"):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _layer(module: str) -> tuple[int, str] | None:
    for rank, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                return rank, name
    return None


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for statement in node.body
        for inner in ast.walk(statement)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]  # `from pkg import module`
    return [(line, name) for line, name in found if name.startswith("sparsec")]


def violations() -> list[str]:
    modules = _modules()
    problems: dict[tuple[str, int, str], str] = {}  # one per import statement and layer it reaches
    for module, path in sorted(modules.items()):
        own = _layer(module)
        if own is None:
            if module != "sparsec":
                problems[(module, 0, "")] = f"{module}: in no layer; add it to LAYERS"
            continue
        for line, imported in _imports(module, path):
            target = _layer(imported)
            if target is None or target[1] == own[1]:
                continue
            if target[0] <= own[0] and (module, line, target[1]) not in problems:
                problems[(module, line, target[1])] = (
                    f"{module}:{line}: {own[1]} imports {imported} ({target[1]} is "
                    f"{'a sibling' if target[0] == own[0] else 'a layer above'})"
                )
    return sorted(problems.values())


def test_layers_depend_one_way():
    problems = violations()
    assert not problems, "import contract broken:\n" + "\n".join(problems)


def test_contract_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: an IR module importing the driver is reported."""
    fake = tmp_path / "sparsec" / "ir"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from sparsec.compiler import compile_model\n")
    monkeypatch.setitem(SOURCE_DIRS, "sparsec", tmp_path / "sparsec")
    monkeypatch.setitem(SOURCE_DIRS, "sparsec.passes", tmp_path / "none")
    monkeypatch.setitem(SOURCE_DIRS, "sparsec.exporters", tmp_path / "none")
    assert violations() == ["sparsec.ir.bad:1: sparsec.ir imports sparsec.compiler (sparsec.compiler is a layer above)"]


def test_contract_skips_type_only_imports_and_still_sees_the_others(tmp_path, monkeypatch):
    """An import under `if TYPE_CHECKING:` is no dependency; the same import outside it (even in the `else`) is."""
    fake = tmp_path / "sparsec" / "ir"
    fake.mkdir(parents=True)
    (fake / "typed.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sparsec.compiler import compile_model\n"
        "else:\n    import sparsec.cli\n"
    )
    monkeypatch.setitem(SOURCE_DIRS, "sparsec", tmp_path / "sparsec")
    monkeypatch.setitem(SOURCE_DIRS, "sparsec.passes", tmp_path / "none")
    monkeypatch.setitem(SOURCE_DIRS, "sparsec.exporters", tmp_path / "none")
    assert violations() == ["sparsec.ir.typed:5: sparsec.ir imports sparsec.cli (sparsec.cli is a layer above)"]


if __name__ == "__main__":
    problems = violations()
    print("\n".join(problems) or "import contract kept")
    raise SystemExit(1 if problems else 0)
