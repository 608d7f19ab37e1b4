"""Sentence embeddings: token states -> one vector per record (mean, CLS or max pooling), optionally L2-normalised.

Pooling follows sentence-transformers' Pooling module over the attention mask: mean divides by
the number of real tokens (clamped at 1e-9), max sets padding to -1e9 first, cls takes the first
token. Normalize divides by the L2 norm (clamped at 1e-12), as torch.nn.functional.normalize does.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from onnxpipe.errors import UsageError
from onnxpipe.stream.records import Item
from onnxpipe.tasks.encoder import EncoderTask

POOLINGS = ("mean", "cls", "max")
_ST_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean"}


def declared_pooling(model: Any) -> tuple[str, bool]:
    """(pooling, normalize) as the export declares them: its 1_Pooling/config.json and modules.json
    (sentence-transformers) when it carries them, else the manifest's `pooling`/`normalize`, else mean."""
    pooling = model.manifest.get("pooling") or None
    normalize = bool(model.manifest.get("normalize"))
    config = model.folder / "1_Pooling" / "config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        for key, mode in _ST_MODES.items():
            if data.get(key):
                pooling = mode
                break
    modules = model.folder / "modules.json"
    if modules.is_file():
        normalize = normalize or any("Normalize" in m.get("type", "") for m in json.loads(modules.read_text(encoding="utf-8")))
    return (pooling if pooling in POOLINGS else "mean"), normalize


class EmbedTask(EncoderTask):
    task_names = ("feature-extraction",)

    def __init__(self, model: Any, pooling: str | None = None, normalize: bool | None = None):
        super().__init__(model)
        declared, declared_normalize = declared_pooling(model)
        self.pooling = pooling or declared
        if self.pooling not in POOLINGS:
            raise UsageError(f"unknown pooling {self.pooling!r}", hint="one of: " + ", ".join(POOLINGS))
        self.normalize = declared_normalize if normalize is None else normalize
        names = [n for n in ("last_hidden_state", "token_embeddings") if n in self.output_names]
        self.states_name = names[0] if names else self.output_names[0]

    def run(self, batch: Sequence[Item]) -> list[np.ndarray]:
        feed, lengths = self.feed(batch)
        (states,) = self.session.run([self.states_name], feed)
        return list(pool(states.astype(np.float32), feed["attention_mask"], self.pooling, self.normalize))

    # --- formatters ---------------------------------------------------------------------------
    def to_text(self, result: np.ndarray) -> str:
        return _format(len(result)) % tuple(result.tolist())

    def to_fields(self, result: np.ndarray | None) -> dict[str, Any]:
        return {"embedding": None if result is None else result.tolist(), "provider": self.provider}

    def to_columns(self, result: np.ndarray | None) -> list[str]:
        return [] if result is None else _floats(result)

    def to_vector(self, result: np.ndarray) -> np.ndarray:
        return result


def pool(states: np.ndarray, mask: np.ndarray, pooling: str, normalize: bool) -> np.ndarray:
    """(batch, tokens, hidden) states + (batch, tokens) mask -> (batch, hidden) float32."""
    m = mask[..., None].astype(np.float32)
    if pooling == "cls":
        vectors = states[:, 0]
    elif pooling == "max":
        vectors = np.where(m > 0, states, np.float32(-1e9)).max(axis=1)
    else:
        vectors = (states * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
    if normalize:
        vectors = vectors / np.clip(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12, None)
    return vectors.astype(np.float32)


def _floats(vector: np.ndarray) -> list[str]:
    return (_format(len(vector)) % tuple(vector.tolist())).split(" ")


@lru_cache(maxsize=8)
def _format(width: int) -> str:
    return " ".join(["%.9g"] * width)  # 9 significant digits: exact for float32
