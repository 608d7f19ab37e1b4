"""`onnxpipe eval`: its figures equal scikit-learn's on the same predictions, through the ONNX export."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from onnxpipe.main import cli
from onnxpipe.measure.metrics import agreement, classification_metrics

TEXTS = [
    "A good movie with a great cast and a moving story.",
    "This film was boring, too long and badly acted.",
    "I loved every minute of it!",
    "The worst thing I have seen this year.",
    "Short.",
    "Paris is the capital of France.",
    "Numbers like 42 appear in text too.",
    "She said hello and left.",
]


def _sklearn(y_true, y_pred, n):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")  # the oracle; the tests without it still run
    labels = list(range(n))
    p, r, f, s = sklearn_metrics.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    mp, mr, mf, _ = sklearn_metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="macro", zero_division=0
    )
    return {
        "accuracy": sklearn_metrics.accuracy_score(y_true, y_pred),
        "p": p,
        "r": r,
        "f": f,
        "s": s,
        "macro": (mp, mr, mf),
        "cm": sklearn_metrics.confusion_matrix(y_true, y_pred, labels=labels),
    }


def _assert_equal_to_sklearn(ours, y_true, y_pred, names):
    ref = _sklearn(y_true, y_pred, len(names))
    assert ours["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
    assert [ours["macro"][k] for k in ("precision", "recall", "f1")] == pytest.approx(list(ref["macro"]), abs=1e-12)
    for i, name in enumerate(names):
        row = ours["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx(
            (ref["p"][i], ref["r"][i], ref["f"][i]), abs=1e-12
        )
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
    result = CliRunner().invoke(
        cli, ["eval", "-m", str(export), "--label-map", LABEL_MAP, "--json", "--device", "cpu", str(labelled)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    names = report["metrics"]["labels"]
    assert names == ["negative", "positive", "neutral"]
    y_true = [
        names.index(n)
        for n in ["positive", "negative", "positive", "negative", "neutral", "neutral", "positive", "negative"]
    ]
    y_pred = _pytorch_predictions(checkpoint("bert", "text-classification"))
    _assert_equal_to_sklearn(report["metrics"], y_true, y_pred, names)
    assert report["provider"] == "CPUExecutionProvider"
    assert "accuracy" in result.stderr and "confusion matrix" in result.stderr


def test_eval_against_itself_agrees_fully(exported, labelled):
    export = str(exported("bert", "text-classification"))
    result = CliRunner().invoke(
        cli, ["eval", "-m", export, "--against", export, "--label-map", LABEL_MAP, "--device", "cpu", str(labelled)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # without --json, stdout stays empty
    assert "agreement" in result.stderr and "100.00%" in result.stderr
    brief = CliRunner().invoke(
        cli,
        [
            "eval",
            "-m",
            export,
            "--against",
            export,
            "--label-map",
            LABEL_MAP,
            "--device",
            "cpu",
            "--brief",
            str(labelled),
        ],
    )
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
    result = CliRunner().invoke(
        cli, ["eval", "-m", str(exported("bert", "text-classification")), "--json", "--device", "cpu", str(path)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["skipped_empty"] == 1 and report["metrics"]["examples"] == 1
    assert "1 example(s) with an empty text were not scored" in result.stderr


# --- translation and summarisation: sacrebleu's BLEU and chrF through the ONNX export --------------


@pytest.fixture(scope="module")
def marian(tmp_path_factory, checkpoint):
    """(checkpoint, export) of the tiny Marian whose outputs test_translate proves equal to transformers'."""
    pytest.importorskip("transformers")
    import tiny_seq2seq

    return tiny_seq2seq.sharpened_export("marian", tmp_path_factory.mktemp("s2s"), checkpoint)


# Settings under which the sharpened tiny Marian makes outputs long enough to hold 4-grams.
SETTINGS = ["--min-length", "10", "--max-length", "24", "--no-repeat-ngram-size", "2"]


def _marian_outputs(ckpt, texts):
    """transformers' generate (the model's generation_config plus SETTINGS): the oracle for the hypotheses."""
    import torch
    import transformers

    tokenizer = transformers.MarianTokenizer.from_pretrained(ckpt)
    model = transformers.MarianMTModel.from_pretrained(ckpt).eval()
    with torch.no_grad():
        out = model.generate(
            **tokenizer(texts, return_tensors="pt", padding=True), min_length=10, max_length=24, no_repeat_ngram_size=2
        )
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def _tsv(path, rows):
    path.write_text("text\treference\n" + "".join(f"{s}\t{r}\n" for s, r in rows), encoding="utf-8")
    return path


def test_bleu_and_chrf_equal_sacrebleu_on_transformers_outputs(marian, tmp_path):
    from sacrebleu.metrics import BLEU, CHRF

    ckpt, export = marian
    import tiny_models

    sources = tiny_models.CORPUS[:12]
    hyps = _marian_outputs(ckpt, sources)
    assert len(set(hyps)) >= 4 and all(hyps)  # real, different outputs: the scores below can fail
    # References: half exact, half the source itself, so BLEU is neither 0 nor 100.
    refs = [h if i % 2 == 0 else s for i, (h, s) in enumerate(zip(hyps, sources))]
    data = _tsv(tmp_path / "pairs.tsv", zip(sources, refs))
    result = CliRunner().invoke(cli, ["eval", "-m", str(export), "--device", "cpu", *SETTINGS, "--json", str(data)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    bleu, chrf = BLEU().corpus_score(hyps, [refs]), CHRF().corpus_score(hyps, [refs])
    assert 0 < bleu.score < 100
    assert report["scores"]["bleu"]["score"] == pytest.approx(bleu.score, abs=1e-9)
    assert report["scores"]["chrf"]["score"] == pytest.approx(chrf.score, abs=1e-9)
    assert report["scores"]["bleu"]["signature"].startswith("nrefs:1|case:mixed")
    assert report["examples"] == 12 and report["provider"] == "CPUExecutionProvider"
    assert "BLEU signature: nrefs:1" in result.stderr and "chrF signature:" in result.stderr


def test_plain_text_with_references_file_and_against_itself(marian, tmp_path):
    ckpt, export = marian
    import tiny_models

    sources = tiny_models.CORPUS[:6]
    hyps = _marian_outputs(ckpt, sources)
    (tmp_path / "src.txt").write_text("\n".join(sources) + "\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("\n".join(hyps) + "\n", encoding="utf-8")
    result = CliRunner().invoke(
        cli,
        [
            "eval",
            "-m",
            str(export),
            "--device",
            "cpu",
            *SETTINGS,
            "--references",
            str(tmp_path / "ref.txt"),
            "--against",
            str(export),
            "--json",
            str(tmp_path / "src.txt"),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["scores"]["bleu"]["score"] == pytest.approx(100.0)
    assert report["against"]["agreement"] == {"examples": 6, "same": 6, "differ": 0, "agreement": 1.0}
    (tmp_path / "short.txt").write_text("\n".join(hyps[:4]) + "\n", encoding="utf-8")
    result = CliRunner().invoke(
        cli, ["eval", "-m", str(export), "--references", str(tmp_path / "short.txt"), str(tmp_path / "src.txt")]
    )
    assert result.exit_code == 2 and "has 6 line(s)" in result.stderr and "has 4" in result.stderr
    assert "Traceback" not in result.stderr


def test_options_of_the_other_kind_are_refused(marian, exported, tmp_path):
    _, export = marian
    data = _tsv(tmp_path / "pairs.tsv", [("a", "b")])
    result = CliRunner().invoke(cli, ["eval", "-m", str(export), "--label-map", "1=a", str(data)])
    assert result.exit_code == 2 and "--label-map: only for text-classification exports" in result.stderr
    result = CliRunner().invoke(
        cli, ["eval", "-m", str(exported("bert", "text-classification")), "--references", str(data), str(data)]
    )
    assert result.exit_code == 2 and "--references: only for text2text-generation exports" in result.stderr
    result = CliRunner().invoke(cli, ["eval", "-m", str(export), "--reference-column", "de", str(data)])
    assert result.exit_code == 1 and "no column 'de'" in result.stderr and "--reference-column" in result.stderr
