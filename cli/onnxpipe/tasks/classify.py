"""Text classification: logits -> softmax (single-label) or sigmoid (multi-label) scores -> labels.

The choice of function follows transformers' TextClassificationPipeline: sigmoid for
`multi_label_classification` or a single output, none for regression, softmax otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxpipe.registry import FAMILIES
from onnxpipe.stream.records import Item
from onnxpipe.tasks.encoder import EncoderTask, sigmoid, softmax


@dataclass
class Classification:
    labels: list[str]  # selected labels, best first (top-k, then --threshold)
    scores: list[float]


class ClassifyTask(EncoderTask):
    task_names = FAMILIES["classify"].export_tasks  # the registry's

    def __init__(
        self, model: Any, top_k: int | None = None, threshold: float | None = None, function: str | None = None
    ):
        super().__init__(model)
        self.labels = model.labels or [f"LABEL_{i}" for i in range(self.session.get_outputs()[0].shape[-1] or 0)]
        self.function = function or default_function(
            model.manifest.get("problem_type") or model.config.get("problem_type"), len(self.labels)
        )
        self.threshold = threshold
        # Without --top-k: the best label, or every label above --threshold when one is given.
        self.top_k = top_k if top_k is not None else (len(self.labels) if threshold is not None else 1)

    def postprocess(
        self, outputs: dict[str, np.ndarray], batch: Sequence[Item], lengths: list[int]
    ) -> list[Classification]:
        logits = outputs.get("logits", next(iter(outputs.values()))).astype(np.float32)
        if self.function == "softmax":
            scores = softmax(logits)
        elif self.function == "sigmoid":
            scores = sigmoid(logits)
        else:
            scores = logits
        order = np.argsort(-scores, axis=-1, kind="stable")[:, : self.top_k]
        top = np.take_along_axis(scores, order, axis=-1).tolist()
        results = []
        for indices, values in zip(order.tolist(), top):
            if self.threshold is not None:
                kept = [k for k, v in enumerate(values) if v >= self.threshold]
                indices, values = [indices[k] for k in kept], [values[k] for k in kept]
            results.append(Classification([self._label(i) for i in indices], values))
        return results

    def _label(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else f"LABEL_{index}"

    # --- formatters ---------------------------------------------------------------------------
    def to_text(self, result: Classification) -> str:
        return ",".join(result.labels)

    def to_fields(self, result: Classification | None) -> dict[str, Any]:
        if result is None:
            return {"label": None, "score": None, "labels": [], "scores": [], "provider": self.provider}
        return {
            "label": result.labels[0] if result.labels else None,
            "score": result.scores[0] if result.scores else None,
            "labels": result.labels,
            "scores": result.scores,
            "provider": self.provider,
        }

    def to_columns(self, result: Classification | None) -> list[str]:
        if result is None:
            return ["", ""]
        return [",".join(result.labels), ",".join(f"{s:.6g}" for s in result.scores)]


def default_function(problem_type: str | None, num_labels: int) -> str:
    if problem_type == "regression":
        return "none"
    if problem_type == "multi_label_classification" or num_labels == 1:
        return "sigmoid"
    return "softmax"
