"""`residual_structure`: the residual streams of blocks, cached per graph version by `Program.analysis`."""

from conftest import small_program

from sparsec.analysis.blocks import residual_structure
from sparsec.analysis.match import NoMatch


def test_residual_streams_are_cached_until_the_graph_changes():
    _, program = small_program()
    structure = residual_structure(program)
    (stream,) = structure.streams("blocks.0")
    assert [s.kind for s in stream.sublayers] == ["mlp"] and stream.input.name == "x"
    assert residual_structure(program) is structure and structure.streams("blocks.0") is structure.streams("blocks.0")
    program.recompile()
    assert residual_structure(program) is not structure


def test_a_region_without_residual_structure_is_a_no_match_saying_why():
    _, program = small_program()
    miss = residual_structure(program).streams("head")
    assert isinstance(miss, NoMatch) and (miss.pattern, miss.path) == ("residual block", "head")
    assert "is not a residual add `stream + sublayer(stream)`" in miss.rule and miss.node
