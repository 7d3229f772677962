"""`sparsec.registry.Registry`, the one registry of passes, targets and families: duplicates refused naming both
sources (the same definition again and `replace=True` excepted), unregister, lookups naming the registered,
temporary registration restoring everything, and entry points found lazily in a distribution put on the path."""

import sys
from dataclasses import dataclass

import pytest
from skip_ffn import SkipFfn

from sparsec.errors import RecipeError, SparsecError
from sparsec.exporters.targets import TARGET_REGISTRY, available_targets, get_target
from sparsec.families import FAMILY_REGISTRY
from sparsec.registry import Registry
from sparsec.transform.pass_manager import PASS_REGISTRY, Pass, PassResult, available_passes, get_pass, register_pass

GROUP = "sparsec_registry_test.items"


@dataclass(frozen=True, eq=False)
class Item:
    name: str
    value: int = 0


BUILTIN = Item("builtin", 1)


class Plugged:
    """A class item (as passes are), for the decorator forms."""

    name = "plugged"


def _registry(calls: list | None = None) -> Registry[Item]:
    def builtins() -> None:
        if calls is not None:
            calls.append("builtins")
        registry.register(BUILTIN, source="the built-ins")

    registry = Registry("widget", "widgets", group=GROUP, builtins=builtins)
    return registry


def test_a_taken_name_is_refused_naming_both_sources_unless_replace():
    registry = _registry()
    other = Item("builtin", 2)
    message = (
        r"a widget named 'builtin' is registered already, from the built-ins; test_registries.Item 'builtin' registers "
        r"another: give it another name, or pass replace=True to replace the registered one"
    )
    with pytest.raises(SparsecError, match=message):
        registry.register(other)
    assert registry.get("builtin") is BUILTIN
    assert registry.register(other, replace=True) is other
    assert registry.get("builtin") is other and registry.source("builtin") == "test_registries.Item 'builtin'"


def test_the_same_definition_again_replaces_quietly():
    registry = _registry()
    registry.register(BUILTIN)  # the same object: nothing to refuse
    first = registry.register(type("Plugged", (), {"name": "plugged", "__module__": __name__, "__qualname__": "P"}))
    again = type("Plugged", (), {"name": "plugged", "__module__": __name__, "__qualname__": "P"})  # a cell run again
    assert registry.register(again) is again and registry.get("plugged") is again and again is not first
    elsewhere = type("Plugged", (), {"name": "plugged", "__module__": "another_module", "__qualname__": "P"})
    with pytest.raises(SparsecError, match="registered already, from test_registries.P; another_module.P registers"):
        registry.register(elsewhere)


def test_decorators_unregister_and_unknown_names():
    registry = _registry()
    assert registry.register(Plugged) is Plugged
    replaced = registry.register(replace=True)(type("Plugged", (), {"name": "plugged"}))
    assert registry.items() == {"builtin": BUILTIN, "plugged": replaced}  # registration order
    assert registry.unregister("plugged") is replaced and "plugged" not in registry
    with pytest.raises(SparsecError, match=r"unknown widget 'plugged'; registered widgets: \['builtin'\]"):
        registry.get("plugged")
    with pytest.raises(SparsecError, match=r"no widget 'plugged' is registered; registered widgets: \['builtin'\]"):
        registry.unregister("plugged")
    with pytest.raises(TypeError, match="needs a non-empty string `name`"):
        registry.register(Item(""))


def test_temporarily_restores_what_the_block_registered_replaced_and_removed():
    registry = _registry()
    kept = registry.register(Item("kept"))
    with registry.temporarily(Item("extra"), Item("builtin", 3), replace=True) as (extra, builtin):
        assert registry.get("extra") is extra and registry.get("builtin") is builtin and builtin.value == 3
        registry.unregister("kept")
        registry.register(Item("more"))
    assert registry.items() == {"builtin": BUILTIN, "kept": kept}
    with pytest.raises(SparsecError, match="registered already"), registry.temporarily(Item("builtin", 4)):
        pass  # refused as `register` refuses
    assert registry.items() == {"builtin": BUILTIN, "kept": kept}


def _distribution(site, module: str, entry_points: str, body: str) -> None:
    """A package as pip leaves it in a site directory: its module and a dist-info declaring entry points."""
    site.mkdir(exist_ok=True)
    (site / f"{module}.py").write_text(body)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n{entry_points}\n")


ITEMS = """
from test_registries import Item

ONE = Item("one", 1)
PAIR = (Item("two", 2), Item("three", 3))
CLASH = (Item("four", 4), Item("builtin", 5))
"""


def test_entry_points_load_lazily_after_the_builtins_and_when_the_path_changes(tmp_path, monkeypatch):
    calls: list[str] = []
    registry = _registry(calls)
    _distribution(tmp_path / "site", "sparsec_items_plugin", "one = sparsec_items_plugin:ONE", ITEMS)
    assert calls == [] and list(registry.items()) == ["builtin"] and calls == ["builtins"]
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert "sparsec_items_plugin" not in sys.modules  # nothing imported until a lookup
    assert registry.get("one").value == 1 and calls == ["builtins"]  # the built-ins once
    assert registry.source("one") == (
        f"entry point one = sparsec_items_plugin:ONE (group {GROUP}, package sparsec_items_plugin)"
    )
    assert list(registry.items()) == ["builtin", "one"]


def test_an_entry_point_may_load_several_items_one_named_after_it(tmp_path, monkeypatch):
    registry = _registry()
    _distribution(tmp_path / "site", "sparsec_items_pair", "two = sparsec_items_pair:PAIR", ITEMS)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert [i.value for i in registry.items().values()] == [1, 2, 3]


@pytest.mark.parametrize(
    "entry, message",
    [
        ("five = sparsec_items_bad:ONE", r"loads no widget named 'five' \(it loads \['one'\]\); name the entry point"),
        (
            "four = sparsec_items_bad:CLASH",
            "a widget named 'builtin' is registered already, from the built-ins; entry point four",
        ),
        ("one = sparsec_items_bad:MISSING", "failed to load .*AttributeError.*; fix or uninstall it"),
    ],
)
@pytest.mark.parametrize("looked_before", [True, False])
def test_a_bad_entry_point_fails_every_lookup_and_registers_nothing(
    tmp_path, monkeypatch, entry, message, looked_before
):
    registry = _registry()
    if looked_before:
        registry.items()
    _distribution(tmp_path / "site", "sparsec_items_bad", entry, ITEMS)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for _ in range(2):
        with pytest.raises(SparsecError, match=message):
            registry.get("builtin")
    monkeypatch.undo()
    assert list(registry.items()) == ["builtin"]  # "four" of the clashing pair rolled back


class DropLayers(Pass):
    """Not the built-in: a pass claiming its name."""

    name = "drop_layers"

    def run(self, program, ctx, plan):
        return PassResult(modified=False)


def test_passes_use_the_registry():
    builtin = get_pass("drop_layers")
    assert PASS_REGISTRY.source("drop_layers").startswith("entry point drop_layers = sparsec.passes.drop_layers:")
    with pytest.raises(RecipeError, match="a pass named 'drop_layers' is registered already, from entry point"):
        register_pass(DropLayers)
    with PASS_REGISTRY.temporarily(DropLayers, SkipFfn, replace=True):
        assert get_pass("drop_layers") is DropLayers and "skip_ffn" in available_passes()
    assert get_pass("drop_layers") is builtin and "skip_ffn" not in available_passes()
    with pytest.raises(TypeError, match="register_pass takes a Pass subclass"):
        register_pass(object)


def test_targets_and_families_use_the_registry():
    onnxruntime = get_target("onnxruntime")
    with pytest.raises(SparsecError, match="a target named 'onnxruntime' is registered already, from built-in module"):
        TARGET_REGISTRY.register(type(onnxruntime)(cuda=False))
    with TARGET_REGISTRY.temporarily():
        TARGET_REGISTRY.unregister("onnxruntime")
        assert "onnxruntime" not in available_targets()
    assert get_target("onnxruntime") is onnxruntime
    assert FAMILY_REGISTRY.source("janus") == "built-in module sparsec.families.janus"
