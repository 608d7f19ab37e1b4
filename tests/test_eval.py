"""`onnxpipe eval`: its figures equal scikit-learn's on the same predictions, through the ONNX export."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from onnxpipe.main import cli
from onnxpipe.metrics import agreement, classification_metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")

TEXTS = ["A good movie with a great cast and a moving story.", "This film was boring, too long and badly acted.",
         "I loved every minute of it!", "The worst thing I have seen this year.", "Short.",
         "Paris is the capital of France.", "Numbers like 42 appear in text too.", "She said hello and left."]


def _sklearn(y_true, y_pred, n):
    labels = list(range(n))
    p, r, f, s = sklearn_metrics.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    mp, mr, mf, _ = sklearn_metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="macro", zero_division=0)
    return {"accuracy": sklearn_metrics.accuracy_score(y_true, y_pred), "p": p, "r": r, "f": f, "s": s,
            "macro": (mp, mr, mf), "cm": sklearn_metrics.confusion_matrix(y_true, y_pred, labels=labels)}


def _assert_equal_to_sklearn(ours, y_true, y_pred, names):
    ref = _sklearn(y_true, y_pred, len(names))
    assert ours["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
    assert [ours["macro"][k] for k in ("precision", "recall", "f1")] == pytest.approx(list(ref["macro"]), abs=1e-12)
    for i, name in enumerate(names):
        row = ours["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((ref["p"][i], ref["r"][i], ref["f"][i]), abs=1e-12)
        assert row["support"] == ref["s"][i]
    assert ours["confusion_matrix"] == ref["cm"].tolist()


@pytest.mark.parametrize("seed, n, size", [(0, 2, 50), (1, 3, 200), (2, 5, 37), (3, 4, 6)])
def test_metrics_equal_sklearn(seed, n, size):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, n, size).tolist()
    y_pred = rng.integers(0, n, size).tolist()
    names = [f"c{i}" for i in range(n)]
    _assert_equal_to_sklearn(classification_metrics(y_true, y_pred, names), y_true, y_pred, names)


def test_metrics_with_a_class_never_predicted_or_absent():
    # zero division: sklearn's zero_division=0; an absent class still counts in the macro mean
    y_true, y_pred, names = [0, 0, 1, 1], [0, 0, 0, 0], ["a", "b", "c"]
    ours = classification_metrics(y_true, y_pred, names)
    _assert_equal_to_sklearn(ours, y_true, y_pred, names)
    assert ours["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}


def test_agreement():
    assert agreement([0, 1, 1, 2], [0, 1, 2, 2]) == {"examples": 4, "same": 3, "differ": 1, "agreement": 0.75}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """The tiny classifier's labels are negative/positive/neutral; the file uses the raw -1/1/0."""
    path = tmp_path_factory.mktemp("eval") / "data.tsv"
    raw = ["1", "-1", "1", "-1", "0", "0", "1", "-1"]
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in zip(TEXTS, raw)), encoding="utf-8")
    return path


LABEL_MAP = "1=positive,-1=negative,0=neutral"


def _pytorch_predictions(checkpoint_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint_dir)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint_dir).eval()
    with torch.no_grad():
        logits = model(**tok(TEXTS, padding=True, truncation=True, return_tensors="pt")).logits
    return logits.argmax(-1).tolist()


def test_eval_through_onnx_equals_sklearn_on_pytorch_predictions(checkpoint, exported, labelled):
    export = exported("bert", "text-classification")
    result = CliRunner().invoke(cli, ["eval", "-m", str(export), "--label-map", LABEL_MAP, "--json",
                                      "--device", "cpu", str(labelled)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    names = report["metrics"]["labels"]
    assert names == ["negative", "positive", "neutral"]
    y_true = [names.index(n) for n in ["positive", "negative", "positive", "negative", "neutral", "neutral",
                                       "positive", "negative"]]
    y_pred = _pytorch_predictions(checkpoint("bert", "text-classification"))
    _assert_equal_to_sklearn(report["metrics"], y_true, y_pred, names)
    assert report["provider"] == "CPUExecutionProvider"
    assert "accuracy" in result.stderr and "confusion matrix" in result.stderr


def test_eval_against_itself_agrees_fully(exported, labelled):
    export = str(exported("bert", "text-classification"))
    result = CliRunner().invoke(cli, ["eval", "-m", export, "--against", export, "--label-map", LABEL_MAP,
                                      "--device", "cpu", str(labelled)])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # without --json, stdout stays empty
    assert "agreement" in result.stderr and "100.00%" in result.stderr
    brief = CliRunner().invoke(cli, ["eval", "-m", export, "--against", export, "--label-map", LABEL_MAP,
                                     "--device", "cpu", "--brief", str(labelled)])
    assert "agreement" in brief.stderr and "confusion matrix" not in brief.stderr


def test_eval_unknown_label_names_the_line(exported, labelled):
    export = str(exported("bert", "text-classification"))
    result = CliRunner().invoke(cli, ["eval", "-m", export, "--device", "cpu", str(labelled)])
    assert result.exit_code == 1
    assert "data.tsv:2: label '1' is not one of the model's labels (negative, positive, neutral)" in result.stderr


def test_eval_refuses_other_tasks(exported, labelled):
    export = str(exported("bert", "feature-extraction"))
    result = CliRunner().invoke(cli, ["eval", "-m", export, str(labelled)])
    assert result.exit_code == 2
    assert "feature-extraction export" in result.stderr


def test_eval_skips_empty_texts_and_says_so(exported, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "good", "label": "positive"}\n{"text": "", "label": "negative"}\n', encoding="utf-8")
    result = CliRunner().invoke(cli, ["eval", "-m", str(exported("bert", "text-classification")), "--json",
                                      "--device", "cpu", str(path)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["skipped_empty"] == 1 and report["metrics"]["examples"] == 1
    assert "1 example(s) with an empty text were not scored" in result.stderr
