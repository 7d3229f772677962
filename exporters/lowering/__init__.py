"""Lowering: a `Program` -> ONNX (the graph, the MoE lowerings, the precision conversion)."""
