"""onnxpipe: stream text through exported Transformer models with ONNX Runtime."""

__version__ = "0.1.0"
