"""Reranking with a cross-encoder: each record is scored as the pair (query, record), the order that
sentence-transformers' CrossEncoder.rank gives its tokenizer, truncated longest-first as CrossEncoder does.

The score is CrossEncoder.predict's: the logits through the model's activation, which is the one its
config names (`sentence_transformers.activation_fn`, written by sentence-transformers >= 4), else a sigmoid
for a one-label model and the raw logits otherwise. A model with several labels ranks by one of them
(`label`; the second of two by default, the "relevant" class of binary rerankers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxpipe.errors import UsageError
from onnxpipe.registry import FAMILIES
from onnxpipe.stream.records import Item, Record
from onnxpipe.tasks.classify import encode_pairs
from onnxpipe.tasks.encoder import EncoderTask, sigmoid, softmax

ACTIVATIONS = ("sigmoid", "identity", "softmax")

# The torch modules sentence-transformers writes as a CrossEncoder's activation_fn, by the name we use.
_TORCH_ACTIVATIONS = {
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Softmax": "softmax",
}


@dataclass
class Relevance:
    score: float  # the ranking score
    scores: list[float] | None = None  # every label's, for a model with several labels


class RerankTask(EncoderTask):
    task_names = FAMILIES["rerank"].export_tasks  # the registry's

    def __init__(
        self,
        model: Any,
        query: str | None = None,
        activation: str | None = None,
        label: str | int | None = None,
        truncation: str = "truncate",
    ):
        if not isinstance(query, str) or not query:
            raise UsageError("rerank needs a query", hint='e.g. --query "how do pipes work"')
        super().__init__(model, truncation)
        self.query = query
        self.num_labels = int(self.session.get_outputs()[0].shape[-1] or len(model.labels) or 1)
        self.labels = model.labels or [f"LABEL_{i}" for i in range(self.num_labels)]
        self.notes: list[str] = []
        self.activation = activation or self._default_activation()
        if self.activation not in ACTIVATIONS:
            raise UsageError(f"unknown activation {self.activation!r}", hint="one of: " + ", ".join(ACTIVATIONS))
        self.label = self._label_index(label)

    def _default_activation(self) -> str:
        """CrossEncoder.get_default_activation_fn, for the activations a config can name without code."""
        config = self.model.config
        named = (config.get("sentence_transformers") or {}).get("activation_fn") or config.get(
            "sbert_ce_default_activation_function"
        )
        if isinstance(named, str):
            if named in _TORCH_ACTIVATIONS:
                return _TORCH_ACTIVATIONS[named]
            self.notes.append(f"the model's activation {named!r} is not one onnxpipe knows; using the default")
        return "sigmoid" if self.num_labels == 1 else "identity"

    def _label_index(self, label: str | int | None) -> int:
        if label is None:
            if self.num_labels <= 2:
                return self.num_labels - 1
            raise UsageError(
                f"this model has {self.num_labels} labels: say which one ranks with --label",
                hint="its labels: " + ", ".join(self.labels),
            )
        if isinstance(label, int) or label.isdigit():
            index = int(label)
        elif label in self.labels:
            index = self.labels.index(label)
        else:
            raise UsageError(f"no label {label!r}", hint="its labels: " + ", ".join(self.labels))
        if not 0 <= index < self.num_labels:
            raise UsageError(f"no label {label!r}: the model has {self.num_labels}")
        return index

    # --- the Task protocol --------------------------------------------------------------------
    def encode(self, records: Sequence[Record]) -> list[Item]:
        self.tokenizer.enable_truncation(self.max_length)  # longest-first; the export's tokenizer is shared
        encodings = encode_pairs(self.tokenizer, self.max_length, [(self.query, r.text) for r in records])
        return [self.make_item(record, encoding) for record, encoding in zip(records, encodings)]

    def postprocess(self, outputs: dict[str, np.ndarray], batch: Sequence[Item], lengths: list[int]) -> list[Any]:
        logits = outputs.get("logits", next(iter(outputs.values()))).astype(np.float32)
        if self.activation == "sigmoid":
            scores = sigmoid(logits)
        elif self.activation == "softmax":
            scores = softmax(logits)
        else:
            scores = logits
        if self.num_labels == 1:
            return [Relevance(float(row[0])) for row in scores]
        return [Relevance(float(row[self.label]), [float(v) for v in row]) for row in scores]

    # --- formatters ---------------------------------------------------------------------------
    def to_text(self, result: Relevance) -> str:
        return f"{result.score:.6g}"

    def to_fields(self, result: Relevance | None) -> dict[str, Any]:
        fields: dict[str, Any] = {"score": None if result is None else result.score}
        if self.num_labels > 1:
            fields["scores"] = None if result is None else dict(zip(self.labels, result.scores or []))
        fields["provider"] = self.provider
        return fields

    def to_columns(self, result: Relevance | None) -> list[str]:
        return [""] if result is None else [f"{result.score:.6g}"]
