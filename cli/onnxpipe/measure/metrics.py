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


# --- SQuAD (extractive question answering) ---------------------------------------------------------
# The official SQuAD 2.0 evaluation script's functions (v1.1's normalisation, plus its no-answer rule):
# no kept library computes them without torch or the hub (evaluate's squad metric loads its script
# from the hub; torchmetrics needs torch), so they are here, line for line.


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace."""
    import re
    import string

    def remove_articles(text: str) -> str:
        return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def squad_exact(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def squad_f1(gold: str, pred: str) -> float:
    from collections import Counter

    gold_toks, pred_toks = _tokens(gold), _tokens(pred)
    common = Counter(gold_toks) & Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        # If either is no-answer, then F1 is 1 if they agree, 0 otherwise
        return float(gold_toks == pred_toks)
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def squad_metrics(golds: Sequence[Sequence[str]], preds: Sequence[str]) -> dict[str, Any]:
    """Exact match and F1 in percent, each the max over an example's gold answers, as the official script
    gives them: overall and split into examples with an answer and without (SQuAD 2.0: no gold answer, or
    only answers that normalise to nothing, means the right prediction is the empty answer)."""
    exact, f1, has_answer = [], [], []
    for answers, pred in zip(golds, preds):
        gold = [a for a in answers if normalize_answer(a)] or [""]
        exact.append(max(squad_exact(a, pred) for a in gold))
        f1.append(max(squad_f1(a, pred) for a in gold))
        has_answer.append(bool(answers))  # as the script's make_qid_to_has_ans: any gold answer at all

    def figures(keep: list[bool]) -> dict[str, Any]:
        n = sum(keep)
        return {
            "exact_match": 100.0 * sum(e for e, k in zip(exact, keep) if k) / n if n else 0.0,
            "f1": 100.0 * sum(f for f, k in zip(f1, keep) if k) / n if n else 0.0,
            "total": n,
        }

    out = figures([True] * len(exact))
    out["has_answer"] = figures(has_answer)
    out["no_answer"] = figures([not h for h in has_answer])
    return out
