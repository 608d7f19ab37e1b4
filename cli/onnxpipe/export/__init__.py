"""Checkpoint -> validated ONNX export folder. The only place torch, transformers and optimum are imported."""
