"""The architecture matrix in ONNX Runtime: for every family of tests/families/matrix.py, one export of
`drop_layers` then `ffn_to_moe` on one program (a bypassed stack and the MoE operator lowered; slicing lowers to
plain smaller MatMuls, which tests/families/test_matrix.py checks in PyTorch) equals the same changes made by
hand on the Hugging Face model, at 3 x 11 tokens with left padding. Its own file so that another worker runs it
beside the PyTorch part.
"""

import pytest
from matrix import ARCHS, family_cache

from sparsec import testing
from sparsec.exporters.lowering.onnx import export_onnx


@pytest.fixture(scope="module")
def families():
    return family_cache()


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
def test_onnx_equals_the_change_made_by_hand(families, arch, tmp_path):
    """One export per family, of `drop_layers` then `ffn_to_moe` (slicing lowers to plain smaller MatMuls)."""
    family = families(arch)
    program, reference, _ = family.transformed("drop_layers + ffn_to_moe")
    export_onnx(program, tmp_path / "m.onnx")
    testing.assert_onnx_equivalent(tmp_path / "m.onnx", reference, family.inputs, rtol=2e-4, atol=2e-4)
