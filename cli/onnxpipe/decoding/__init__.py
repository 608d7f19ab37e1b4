"""Search strategies and logits processors on numpy logits, shared by generate and translate.

Pure numpy: no torch, no onnxruntime. A model plugs in through `search.Step` (reorder by parent rows,
append one id, return the next logits); see `search.generate`.

    from onnxpipe.decoding import GenerationConfig, generate
    hyps = generate(step, first_logits, prompts, config, keys=record_indices)
"""

from onnxpipe.decoding.config import DEFAULT_MAX_NEW_TOKENS, GenerationConfig
from onnxpipe.decoding.processors import History, build_processors
from onnxpipe.decoding.search import Hypothesis, Step, generate, left_pad, row_rng

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "GenerationConfig",
    "History",
    "Hypothesis",
    "Step",
    "build_processors",
    "generate",
    "left_pad",
    "row_rng",
]
