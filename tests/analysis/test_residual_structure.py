"""`residual_structure`: the residual streams of blocks, cached per graph version by `Program.analysis`."""

import pytest
from conftest import small_program

from sparsec.analysis.structure import residual_structure
from sparsec.errors import PassError


def test_residual_streams_are_cached_until_the_graph_changes():
    _, program = small_program()
    structure = residual_structure(program)
    (stream,) = structure.streams("blocks.0")
    assert [s.kind for s in stream.sublayers] == ["mlp"] and stream.input.name == "x"
    assert residual_structure(program) is structure and structure.streams("blocks.0") is structure.streams("blocks.0")
    program.recompile()
    assert residual_structure(program) is not structure


def test_a_region_without_residual_structure_is_refused():
    _, program = small_program()
    with pytest.raises(PassError, match="cannot find the residual structure of head"):
        residual_structure(program).streams("head")
