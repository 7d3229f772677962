"""The ONNX export lets go of the program: once the caller drops it, its weights are freed.

Compile frees the program before the parity session opens (`ProgramReference.release`); that only saves memory
if nothing inside the exporter still holds the weights. onnxscript's module-level rewrite rules keep the last graph
they matched, whose values hold the program's tensors (`exporters.lowering.onnx._forget_matched_graphs`).
"""

import gc
import weakref

from conftest import small_program

from sparsec.exporters.lowering.onnx import export_onnx


def test_program_weights_are_freed_after_export(tmp_path):
    program = small_program()[1]  # the model shares its weights: not kept
    weights = [weakref.ref(program.state_tensor(name)) for name in program.parameter_names()]
    assert weights
    export_onnx(program, tmp_path / "model.onnx")
    del program
    gc.collect()
    alive = [ref for ref in weights if ref() is not None]
    assert not alive, f"{len(alive)} of {len(weights)} weights outlive the program after the ONNX export"
