"""Export folder -> tokenizer + ONNX Runtime sessions (providers, IO binding)."""
