"""Deployment targets: the backends an artifact is built for, run on and checked against."""

TARGETS = ("onnxruntime", "onnxruntime-cuda", "tensorrt")
