"""Classification metrics in plain numpy, shared by `finetune` (PyTorch side) and `eval` (ONNX side).

The runtime must not import scikit-learn; the definitions follow scikit-learn's
(`precision_recall_fscore_support` with `zero_division=0`, macro = unweighted mean over all labels
of the model, including those absent from the data) so that a test can hold them to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> np.ndarray:
    """Rows are the true label ids, columns the predicted ones."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape:
        raise ValueError(f"{t.size} true labels but {p.size} predictions")
    return np.bincount(t * num_labels + p, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro and per-class precision/recall/F1 and the confusion matrix, as plain JSON types."""
    cm = confusion_matrix(y_true, y_pred, len(labels))
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    total = int(cm.sum())
    return {
        "examples": total,
        "correct": int(tp.sum()),
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro": {
            "precision": float(precision.mean()),
            "recall": float(recall.mean()),
            "f1": float(f1.mean()),
        },
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(labels)
        },
        "labels": list(labels),
        "confusion_matrix": cm.tolist(),
    }


def agreement(pred_a: Sequence[int], pred_b: Sequence[int]) -> dict[str, Any]:
    """How often two models give the same label to the same input (e.g. int8 vs fp32)."""
    a = np.asarray(pred_a)
    b = np.asarray(pred_b)
    if a.shape != b.shape:
        raise ValueError(f"{a.size} predictions against {b.size}")
    same = int((a == b).sum())
    return {
        "examples": int(a.size),
        "same": same,
        "differ": int(a.size - same),
        "agreement": float(same / a.size) if a.size else 0.0,
    }
