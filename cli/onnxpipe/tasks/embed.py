"""Sentence embeddings: token states -> pooled vector (-> Dense layers) -> optionally L2-normalised, as sentence-transformers does.

Pooling follows sentence-transformers' Pooling module over the attention mask: mean divides by
the number of real tokens (clamped at 1e-9), max sets padding to -1e9 first, cls takes the first
token. Normalize divides by the L2 norm (clamped at 1e-12), as torch.nn.functional.normalize does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.errors import UsageError
from onnxpipe.registry import FAMILIES
from onnxpipe.stream.records import Item
from onnxpipe.tasks.encoder import EncoderTask

# sentence-transformers' Pooling modes, in the order it concatenates them when several are on.
_ST_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
POOLINGS = tuple(_ST_MODES.values())
# Dense activations (sentence-transformers stores the class's full name) that numpy applies exactly.
ACTIVATIONS = {
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
}


def read_sentence_transformers(folder: Path) -> dict[str, Any] | None:
    """What a sentence-transformers folder declares (modules.json and each module's config), or None
    where FOLDER is not one: {"pooling": "cls" | "mean+max" ..., "normalize": bool, "max_seq_length":
    int | None, "dense": [{"path": "2_Dense", "activation": "tanh", ...}]}. Raises UsageError for a module
    or option that onnxpipe cannot reproduce exactly (it must not embed differently in silence)."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        declared: dict[str, Any] = {"pooling": None, "normalize": False, "max_seq_length": None, "dense": []}
        for module in sorted(modules, key=lambda m: int(m.get("idx", 0))):
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            path = str(module.get("path") or ("1_Pooling" if kind == "Pooling" else ""))
            config = _json_or_empty(folder / path / "config.json") if path else {}
            if kind == "Transformer":
                st = _json_or_empty(folder / path / "sentence_bert_config.json") or _json_or_empty(
                    folder / "sentence_bert_config.json"
                )
                if st.get("do_lower_case"):
                    raise UsageError(f"{folder}: sentence_bert_config.json do_lower_case is not supported")
                declared["max_seq_length"] = st.get("max_seq_length")
            elif kind == "Pooling":
                modes = [mode for key, mode in _ST_MODES.items() if config.get(key)]
                if not modes:
                    modes = [config.get("pooling_mode") or "mean"]
                declared["pooling"] = "+".join(modes)
            elif kind == "Dense":
                activation = ACTIVATIONS.get(config.get("activation_function", "torch.nn.modules.activation.Tanh"))
                if activation is None:
                    raise UsageError(
                        f"{folder}/{path}: Dense activation {config.get('activation_function')!r} is not supported",
                        hint="one of: " + ", ".join(sorted(ACTIVATIONS)),
                    )
                declared["dense"].append(
                    {
                        "path": path,
                        "activation": activation,
                        "in_features": config.get("in_features"),
                        "out_features": config.get("out_features"),
                        "bias": config.get("bias", True),
                    }
                )
            elif kind == "Normalize":
                declared["normalize"] = True
            else:
                raise UsageError(
                    f"{folder}: the sentence-transformers module {module.get('type')!r} is not supported",
                    hint="onnxpipe reproduces Transformer, Pooling, Dense and Normalize",
                )
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
        raise UsageError(f"{modules_file}: not a sentence-transformers modules list ({exc})") from None
    if declared["pooling"] is None:
        declared["pooling"] = "mean"
    return declared


def _json_or_empty(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def declared_pooling(model: Any) -> tuple[str, bool]:
    """(pooling, normalize) as the export declares them: sentence-transformers files in the export folder
    where someone put them there, else the manifest's `pooling`/`normalize` (written at export from the
    checkpoint's sentence-transformers files), else mean, not normalised."""
    found = read_sentence_transformers(model.folder)
    if found:
        return found["pooling"], found["normalize"]
    return model.manifest.get("pooling") or "mean", bool(model.manifest.get("normalize"))


class EmbedTask(EncoderTask):
    task_names = FAMILIES["embed"].export_tasks  # the registry's

    def __init__(
        self, model: Any, pooling: str | None = None, normalize: bool | None = None, truncation: str = "truncate"
    ):
        super().__init__(model, truncation)
        declared, declared_normalize = declared_pooling(model)
        self.pooling = pooling or declared
        unknown = [p for p in self.pooling.split("+") if p not in POOLINGS]
        if unknown:
            raise UsageError(f"unknown pooling {unknown[0]!r}", hint="one of: " + ", ".join(POOLINGS))
        self.normalize = declared_normalize if normalize is None else normalize
        names = [n for n in ("last_hidden_state", "token_embeddings") if n in self.output_names]
        self.states_name = names[0] if names else self.output_names[0]
        # The Dense layers of a sentence-transformers model, applied after pooling as it does.
        self.dense = [_load_dense(model.folder, d) for d in model.manifest.get("dense") or []]
        limit = model.manifest.get("max_seq_length")
        if isinstance(limit, int) and 0 < limit < self.max_length:  # sentence-transformers truncates here
            self.max_length = limit
            self.tokenizer.enable_truncation(limit)

    def run(self, batch: Sequence[Item]) -> list[np.ndarray]:
        feed, lengths = self.feed(batch)
        (states,) = self.session.run([self.states_name], feed)
        vectors = pool(states.astype(np.float32), feed["attention_mask"], self.pooling, False)
        for weight, bias, activation in self.dense:
            vectors = _ACTIVATE[activation](vectors @ weight.T + bias if bias is not None else vectors @ weight.T)
        if self.normalize:
            vectors = _normalize(vectors)
        return list(vectors.astype(np.float32))

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
    """(batch, tokens, hidden) states + (batch, tokens) mask -> (batch, hidden) float32, as
    sentence-transformers' Pooling computes it; "a+b" concatenates modes in its order."""
    m = mask[..., None].astype(np.float32)
    count = np.clip(m.sum(axis=1), 1e-9, None)
    parts = []
    for mode in pooling.split("+"):
        if mode == "cls":
            parts.append(states[:, 0])
        elif mode == "max":
            parts.append(np.where(m > 0, states, np.float32(-1e9)).max(axis=1))
        elif mode == "mean":
            parts.append((states * m).sum(axis=1) / count)
        elif mode == "mean_sqrt_len":
            parts.append((states * m).sum(axis=1) / np.sqrt(count))
        elif mode == "weightedmean":
            w = m * np.arange(1, states.shape[1] + 1, dtype=np.float32)[None, :, None]
            parts.append((states * w).sum(axis=1) / np.clip(w.sum(axis=1), 1e-9, None))
        elif mode == "lasttoken":
            last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1] > 0, axis=1)  # the last real token of each row
            parts.append(states[np.arange(len(states)), last] * m[np.arange(len(states)), last])
        else:
            raise UsageError(f"unknown pooling {mode!r}", hint="one of: " + ", ".join(POOLINGS))
    vectors = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    return (_normalize(vectors) if normalize else vectors).astype(np.float32)


def _normalize(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.clip(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12, None)


_ACTIVATE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "tanh": np.tanh,
    "identity": lambda x: x,
    "relu": lambda x: np.maximum(x, np.float32(0)),
    "sigmoid": lambda x: (1 / (1 + np.exp(-x))).astype(np.float32),
}


def _load_dense(folder: Path, record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None, str]:
    """One Dense layer of the manifest: float32 .npy files inside the export folder (no pickle, no torch)."""
    from onnxpipe.errors import ModelNotFoundError

    def load(name: str | None) -> np.ndarray | None:
        if name is None:
            return None
        path = (folder / name).resolve()
        if folder.resolve() not in path.parents:
            raise ModelNotFoundError(f"{folder}: dense layer file {name!r} is outside the export folder")
        try:
            return np.load(path, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(
                f"{folder}: cannot read dense layer {name}: {exc}", hint="re-run onnxpipe export"
            ) from None

    if record.get("activation") not in _ACTIVATE:
        raise ModelNotFoundError(f"{folder}: unknown dense activation {record.get('activation')!r}")
    weight = load(record.get("weight"))
    if weight is None:  # without one, the first batch would fail on None.T
        raise ModelNotFoundError(f"{folder}: dense layer has no weight file", hint="re-run onnxpipe export")
    return weight, load(record.get("bias")), record["activation"]


def _floats(vector: np.ndarray) -> list[str]:
    return (_format(len(vector)) % tuple(vector.tolist())).split(" ")


@lru_cache(maxsize=8)
def _format(width: int) -> str:
    return " ".join(["%.9g"] * width)  # 9 significant digits: exact for float32
