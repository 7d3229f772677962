"""The import contract: sparsec's layers depend on each other one way only, and so do the modules inside a layer.

Every `import` in the package (module level and inside functions alike) is read from the source with `ast`
and mapped to the layer it lands in. A layer may import itself and the layers below it, never one above;
layers on one line are independent of each other. Inside a layer given a `MODULE_ORDER`, a module may import only
the modules listed before it, so no import circle can form there (a function-level import does not hide one).
Imports under `if TYPE_CHECKING:` name types for annotations and never run, so they are not dependencies (as
import-linter's `exclude_type_checking_imports`). Run on its own in `.ci/run` before the tests.
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
    ("sparsec.conversion",),
    ("sparsec.passes", "sparsec.exporters", "sparsec.families", "sparsec.pipeline"),
    ("sparsec.transform", "sparsec.analysis", "sparsec.data"),
    ("sparsec.ops",),
    ("sparsec.ir",),
    ("sparsec.resources", "sparsec.progress", "sparsec.registry", "sparsec.staging", "sparsec.tables"),
    ("sparsec.errors",),
]
# Inside a layer, bottom first: each module may import only the modules before it. Every module of a layer listed
# here must have a place (a new module is placed when it is added); layers not listed are not ordered inside (yet).
MODULE_ORDER: dict[str, list[str]] = {
    "sparsec.analysis": [
        "vocabulary",  # op sets, node predicates, module paths: what every matcher reads ops through
        "match",  # NoMatch and the Mismatch a matcher raises inside and returns as a NoMatch
        "ffn",
        "dependency",
        "experts",
        "regions",
        "blocks",
        "heads",
        "hidden",
        "architecture",  # what a config states: blocks, widths, heads, experts
        "importance",
        "inspection",
    ],
    "sparsec.ir": [
        "paths",
        "tags",
        "stored",
        "canonical",
        "weights",
        "editing",
        "verification",
        "serialization",
        "execution",
        "copies",
        "snapshots",
        "program",
        "capture",
    ],
}
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


def _place(layer: str, module: str) -> str | None:
    """The top-level module of `layer` that the dotted name `module` lies in; None for the layer's package itself."""
    return module[len(layer) + 1 :].split(".")[0] if module.startswith(layer + ".") else None


def _order_problems(modules: dict[str, Path]) -> dict[tuple[str, int, str], str]:
    """Modules of an ordered layer that are not placed in `MODULE_ORDER`, and places that name no module."""
    problems = {}
    for layer, order in MODULE_ORDER.items():
        present = {_place(layer, m) for m in modules} - {None}
        for name in sorted(present - set(order)):
            problems[(f"{layer}.{name}", 0, "")] = f"{layer}.{name}: no place in MODULE_ORDER[{layer!r}]; add it"
        for name in sorted(set(order) - present) if present else ():  # a tree without the layer places nothing
            problems[(f"{layer}.{name}", 0, "")] = f"MODULE_ORDER[{layer!r}] places {name}, which is no module"
    return problems


def violations() -> list[str]:
    modules = _modules()
    problems = _order_problems(modules)  # one per import statement and layer (or module of a layer) it reaches
    for module, path in sorted(modules.items()):
        own = _layer(module)
        if own is None:
            if module != "sparsec":
                problems[(module, 0, "")] = f"{module}: in no layer; add it to LAYERS"
            continue
        order = MODULE_ORDER.get(own[1], [])
        mine = _place(own[1], module)
        for line, imported in _imports(module, path):
            target = _layer(imported)
            if target is None:
                continue
            if target[1] == own[1]:
                theirs = _place(own[1], imported)
                if mine in order and theirs in order and order.index(theirs) > order.index(mine):
                    problems.setdefault(
                        (module, line, f"{own[1]}.{theirs}"),
                        f"{module}:{line}: imports {imported} ({own[1]}.{theirs} is above {mine} in MODULE_ORDER)",
                    )
                continue
            if target[0] <= own[0] and (module, line, target[1]) not in problems:
                problems[(module, line, target[1])] = (
                    f"{module}:{line}: {own[1]} imports {imported} ({target[1]} is "
                    f"{'a sibling' if target[0] == own[0] else 'a layer above'})"
                )
    return sorted(problems.values())


def stray_imports() -> list[str]:
    """Imports of `passes` or `exporters` by their directory name (`from passes.drop_layers import ...`) anywhere in
    the repository: each such module would load a second time under another name (two `DropLayers` classes)."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if any(part.startswith(".") or part.endswith(".egg-info") for part in path.relative_to(ROOT).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            found += [
                f"{path.relative_to(ROOT)}:{node.lineno}: imports {name}; import sparsec.{name} instead"
                for name in names
                if name.split(".")[0] in ("passes", "exporters")
            ]
    return found


def test_layers_depend_one_way():
    problems = violations()
    assert not problems, "import contract broken:\n" + "\n".join(problems)


def test_passes_and_exporters_are_imported_under_one_name():
    problems = stray_imports()
    assert not problems, "\n".join(problems)


def test_contract_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: an IR module importing the driver is reported."""
    fake = tmp_path / "sparsec" / "ir"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from sparsec.compiler import compile_model\n")
    monkeypatch.setitem(SOURCE_DIRS, "sparsec", tmp_path / "sparsec")
    monkeypatch.setitem(SOURCE_DIRS, "sparsec.passes", tmp_path / "none")
    monkeypatch.setitem(SOURCE_DIRS, "sparsec.exporters", tmp_path / "none")
    monkeypatch.delitem(MODULE_ORDER, "sparsec.ir")
    assert violations() == ["sparsec.ir.bad:1: sparsec.ir imports sparsec.compiler (sparsec.compiler is a layer above)"]


def _fake_tree(tmp_path, monkeypatch, files: dict[str, str]) -> None:
    """Point the checker at a package made of `files` (path under `sparsec/` -> source); only the analysis layer
    keeps its module order (the tests set it)."""
    for layer in [name for name in MODULE_ORDER if name != "sparsec.analysis"]:
        monkeypatch.delitem(MODULE_ORDER, layer)
    for name, source in files.items():
        path = tmp_path / "sparsec" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    monkeypatch.setitem(SOURCE_DIRS, "sparsec", tmp_path / "sparsec")
    monkeypatch.setitem(SOURCE_DIRS, "sparsec.passes", tmp_path / "none")
    monkeypatch.setitem(SOURCE_DIRS, "sparsec.exporters", tmp_path / "none")


def test_contract_catches_an_import_circle_inside_a_layer(tmp_path, monkeypatch):
    """The checker itself: two modules of one layer importing each other, one of them from inside a function (the
    way a circle hides from Python), break the order; the import from the lower module is the one reported."""
    monkeypatch.setitem(MODULE_ORDER, "sparsec.analysis", ["vocabulary", "ffn"])
    _fake_tree(
        tmp_path,
        monkeypatch,
        {
            "analysis/__init__.py": "",
            "analysis/vocabulary.py": "def ffn_of(node):\n    from sparsec.analysis.ffn import match_ffn\n",
            "analysis/ffn.py": "from sparsec.analysis.vocabulary import ffn_of\n",
        },
    )
    assert violations() == [
        "sparsec.analysis.vocabulary:2: imports sparsec.analysis.ffn (sparsec.analysis.ffn is above vocabulary in "
        "MODULE_ORDER)"
    ]


def test_contract_places_every_module_of_an_ordered_layer(tmp_path, monkeypatch):
    """A module missing from its layer's order, and a place naming no module, are reported."""
    monkeypatch.setitem(MODULE_ORDER, "sparsec.analysis", ["vocabulary", "structure"])
    _fake_tree(
        tmp_path,
        monkeypatch,
        {"analysis/__init__.py": "", "analysis/vocabulary.py": "", "analysis/blocks.py": "import sparsec.ir\n"},
    )
    assert violations() == [
        "MODULE_ORDER['sparsec.analysis'] places structure, which is no module",
        "sparsec.analysis.blocks: no place in MODULE_ORDER['sparsec.analysis']; add it",
    ]


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
    monkeypatch.delitem(MODULE_ORDER, "sparsec.ir")
    assert violations() == ["sparsec.ir.typed:5: sparsec.ir imports sparsec.cli (sparsec.cli is a layer above)"]


if __name__ == "__main__":
    problems = violations() + stray_imports()
    print("\n".join(problems) or "import contract kept")
    raise SystemExit(1 if problems else 0)
