"""The real sentiment model built by `make models`: ONNX accuracy equals PyTorch's on the held-out set.

The held-out sentences (build/sentiment/heldout.tsv) were never trained on. The oracle is the
fine-tuned Hugging Face folder (build/sentiment/model) run with transformers.
"""

from __future__ import annotations

import pytest
from conftest import REPO

from onnxpipe.measure.quality import evaluate_classification

EXPORTS = REPO / "exports"
SENTIMENT = REPO / "build" / "sentiment"
LABEL_MAP = "1=positive,-1=negative"

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(
        not all(
            p.exists()
            for p in (
                EXPORTS / "sentiment" / "onnxpipe.json",
                SENTIMENT / "heldout.tsv",
                SENTIMENT / "model" / "config.json",
            )
        ),
        reason="needs the sentiment export: run make models",
    ),
]


@pytest.fixture(scope="module")
def onnx_report():
    return evaluate_classification(EXPORTS / "sentiment", SENTIMENT / "heldout.tsv", label_map=LABEL_MAP, device="cpu")


def _pytorch_correct() -> tuple[int, int]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from onnxpipe.stream.labelled import apply_label_map, parse_label_map, read_labelled

    data = apply_label_map(read_labelled(SENTIMENT / "heldout.tsv"), parse_label_map(LABEL_MAP))
    tok = AutoTokenizer.from_pretrained(SENTIMENT / "model")
    model = AutoModelForSequenceClassification.from_pretrained(SENTIMENT / "model").eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data), 64):
            texts = data.texts[start : start + 64]
            logits = model(**tok(texts, padding=True, truncation=True, return_tensors="pt")).logits
            for label, pred in zip(data.labels[start : start + 64], logits.argmax(-1).tolist()):
                correct += model.config.id2label[pred] == label
    return correct, len(data)


def test_onnx_accuracy_equals_pytorch_within_one_sentence(onnx_report):
    m = onnx_report["metrics"]
    assert m["examples"] == 1000
    correct, total = _pytorch_correct()
    print(f"\nheld-out accuracy: ONNX {m['correct']}/{m['examples']}, PyTorch {correct}/{total}")
    assert abs(m["correct"] - correct) <= 1
    assert m["accuracy"] >= 0.80


@pytest.mark.skipif(not (EXPORTS / "sentiment-int8" / "onnxpipe.json").exists(), reason="no sentiment-int8 export")
def test_int8_accuracy_and_agreement_with_fp32():
    report = evaluate_classification(
        EXPORTS / "sentiment-int8",
        SENTIMENT / "heldout.tsv",
        label_map=LABEL_MAP,
        against=EXPORTS / "sentiment",
        device="cpu",
    )
    int8, fp32 = report["metrics"]["accuracy"], report["against"]["metrics"]["accuracy"]
    agree = report["against"]["agreement"]
    print(f"\nint8 accuracy {int8:.4f}, fp32 {fp32:.4f}, agreement {agree['agreement']:.4f} ({agree['differ']} differ)")
    # the quality budget for a quantised classifier: at most 2 points of accuracy lost
    assert int8 >= fp32 - 0.02
    assert agree["agreement"] >= 0.90
