"""Export folder -> tokenizer + ONNX Runtime sessions, on the device the user asked for.

    from onnxpipe.runtime import load_model
    model = load_model("sentiment", device="auto", threads=None)
    model.tokenizer          # tokenizers.Tokenizer from tokenizer.json (no padding, no truncation set)
    model.session()          # the "model" graph; model.session("encoder") / ("decoder") for seq2seq
    model.provider           # "CUDAExecutionProvider" or "CPUExecutionProvider": what really runs
    model.max_length         # the longest input the model takes, in tokens (specials included)

Nothing here imports torch, transformers or optimum; onnxruntime is imported when the first
session is made, so `--help` and argument errors stay fast.
"""

from __future__ import annotations

from onnxpipe.runtime.device import Device, parse_device
from onnxpipe.runtime.model import ExportedModel, load_model

__all__ = ["Device", "ExportedModel", "load_model", "parse_device"]
