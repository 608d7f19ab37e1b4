"""Export folder -> tokenizer + ONNX Runtime sessions on the device asked for, and the drivers that run them.

    from onnxpipe.runtime import load_model
    model = load_model("sentiment", device="auto", threads=None)
    model.tokenizer          # tokenizers.Tokenizer from tokenizer.json (no padding, no truncation set)
    model.session()          # the "model" graph; model.session("encoder") / ("decoder") for seq2seq
    model.provider           # "CUDAExecutionProvider" or "CPUExecutionProvider": what really runs
    model.runs_on            # the Device that really runs (cuda:N or cpu), once a session exists
    model.max_length         # the longest input the model takes, in tokens (specials included)

What runtime owns, and nothing above it does:
    device     `Device` and `parse_device` (--device auto|cpu|cuda[:N]), the providers for it, and the
               check of what a session really got (onnxruntime-gpu falls back to the CPU silently)
    sessions   `make_session`: the one place that creates an onnxruntime.InferenceSession
    model      `ExportedModel` / `load_model`: the export folder opened, its sessions made once
    decoder    `CausalDecoder`: a decoder-only graph step by step (prefill, decode, IO binding), and
               `SharedBufferDecoder` for export.cuda_graph's (one key/value buffer per tensor)
    running    the rows of continuous batching (serve): a growing cache or a shared buffer that rows join
    seq2seq    `Seq2SeqRunner`: an encoder and merged decoder step by step (IO binding)
    kv_cache   the key/value cache's row reorder on its device (numpy on CPU, a Gather graph on CUDA)
    machine    usable CPUs and GPUs, and --threads capped to them

The drivers take an ExportedModel (`CausalDecoder.from_model(model)`, `Seq2SeqRunner.from_model(model)`);
prompts, chat templates, languages and results are the tasks'. Nothing here imports torch,
transformers or optimum; onnxruntime is imported when the first session is made, so `--help` and
argument errors stay fast.
"""

from __future__ import annotations

from onnxpipe.runtime.device import Device, parse_device
from onnxpipe.runtime.model import ExportedModel, load_model

__all__ = ["Device", "ExportedModel", "load_model", "parse_device"]
