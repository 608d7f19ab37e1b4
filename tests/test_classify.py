"""`onnxpipe classify`: parity with the PyTorch model and transformers' pipeline, options, devices."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from onnxpipe.main import cli

ARCHS = ("bert", "distilbert", "roberta")
TEXTS = [
    "A good movie with a great cast and a moving story.",
    "This film was boring, too long and badly acted.",
    "Short.",
    "Émile a visité Zürich et São Paulo en été.",
    "words the tokenizer never saw: quizzical xylophones",
    "Paris is the capital of France, and Berlin is the capital of Germany. " * 3,
]


def invoke(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def torch_logits(checkpoint, texts):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        return model(**tok(texts, padding=True, return_tensors="pt")).logits.numpy()


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_pytorch(arch, exported, checkpoint):
    from onnxpipe.runtime import load_model
    from onnxpipe.stream.readers import records_from_texts
    from onnxpipe.tasks.classify import ClassifyTask

    task = ClassifyTask(load_model(exported(arch, "text-classification"), device="cpu"))
    items = task.encode(records_from_texts(TEXTS))
    feed, _ = task.feed(items)
    (logits,) = task.session.run(["logits"], feed)
    expected = torch_logits(checkpoint(arch, "text-classification"), TEXTS)
    np.testing.assert_allclose(logits, expected, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_labels_and_scores_match_the_pipeline(arch, exported, checkpoint):
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(checkpoint(arch, "text-classification")))
    expected = pipe(TEXTS, top_k=None)
    result = invoke(
        "classify",
        "-m",
        str(exported(arch, "text-classification")),
        "--format",
        "jsonl",
        "--top-k",
        "3",
        "--device",
        "cpu",
        input="\n".join(TEXTS) + "\n",
    )
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == len(TEXTS)
    for row, want in zip(rows, expected):
        got = dict(zip(row["labels"], row["scores"]))
        assert got == pytest.approx({w["label"]: w["score"] for w in want}, abs=1e-4)
        assert row["label"] == want[0]["label"] or abs(want[0]["score"] - want[1]["score"]) < 1e-5
        assert row["provider"] == "CPUExecutionProvider"


def test_multi_label_uses_sigmoid_like_the_pipeline(exported, checkpoint):
    from transformers import pipeline

    kw = {"problem_type": "multi_label_classification"}
    folder = exported("bert", "text-classification", checkpoint_kw=kw)
    pipe = pipeline("text-classification", model=str(checkpoint("bert", "text-classification", **kw)))
    expected = pipe(TEXTS[:3], top_k=None)
    result = invoke(
        "classify", "-m", str(folder), "--format", "jsonl", "--threshold", "0.0", input="\n".join(TEXTS[:3]) + "\n"
    )
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    for row, want in zip(rows, expected):
        assert len(row["labels"]) == 3  # --threshold alone keeps every label that passes
        assert dict(zip(row["labels"], row["scores"])) == pytest.approx(
            {w["label"]: w["score"] for w in want}, abs=1e-4
        )
        assert sum(row["scores"]) != pytest.approx(1.0, abs=1e-3)  # independent sigmoids
    high = invoke("classify", "-m", str(folder), "--threshold", "0.99", input="x\n")
    assert high.stdout == "\n"  # nothing passes: an empty result, still one line


def test_text_output_is_the_top_label_and_results_do_not_depend_on_batching(exported):
    folder = str(exported("roberta", "text-classification"))
    lines = (TEXTS * 5)[::-1] + ["", "again"]
    data = "\n".join(lines) + "\n"
    outs = []
    for batch_size in ("1", "3", "64"):
        result = invoke("classify", "-m", folder, "--format", "jsonl", "--batch-size", batch_size, input=data)
        assert result.exit_code == 0
        outs.append([json.loads(line) for line in result.stdout.splitlines()])
    for rows in outs[1:]:
        for a, b in zip(outs[0], rows):
            assert a["labels"] == b["labels"] or abs(a["scores"][0] - a["scores"][1]) < 1e-5 if a["labels"] else True
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
    text = invoke("classify", "-m", folder, input=data)
    assert text.stdout.splitlines() == [",".join(r["labels"]) for r in outs[0]]
    assert text.stdout.splitlines()[-2] == ""


def test_top_k_and_tsv(exported):
    folder = str(exported("bert", "text-classification"))
    result = invoke("classify", "-m", folder, "-k", "2", input="good movie\n")
    assert len(result.stdout.strip().split(",")) == 2
    tsv = invoke("classify", "-m", folder, "--format", "tsv", input="good\tmovie\n")
    cells = tsv.stdout.rstrip("\n").split("\t")
    assert cells[0] == "good\\tmovie" and len(cells) == 3 and float(cells[2]) > 0


def test_summary_and_device_line_go_to_stderr_only(exported):
    result = invoke("classify", "-m", str(exported("bert", "text-classification")), input="a\nb\n")
    assert result.stdout.count("\n") == 2
    assert "2 records in" in result.stderr and "CPU" in result.stderr
    quiet = invoke("-q", "classify", "-m", str(exported("bert", "text-classification")), input="a\n")
    assert quiet.stderr == ""


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine may have a working GPU")
def test_device_cuda_fails_clearly_without_a_gpu(exported):
    result = invoke("classify", "-m", str(exported("bert", "text-classification")), "--device", "cuda", input="a\n")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("onnxpipe: error: --device cuda") and "CUDA" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1


def test_wrong_task_and_bad_device_are_errors(exported):
    result = invoke("classify", "-m", str(exported("bert", "feature-extraction")), input="a\n")
    assert result.exit_code == 2 and "feature-extraction export" in result.stderr
    result = invoke("classify", "-m", str(exported("bert", "text-classification")), "--device", "tpu", input="a\n")
    assert result.exit_code == 2 and "unknown device" in result.stderr


def test_cuda_fallback_banner_stays_off_stdout(exported, monkeypatch):
    """onnxruntime print()s an "EP Error" banner when the CUDA provider fails and it retries on the
    CPU: stdout must still hold only the results, and the reason goes into the one stderr line."""
    import onnxruntime as ort

    real = ort.InferenceSession

    def failing_cuda(path, sess_options=None, providers=None, **kw):
        if providers and "CUDAExecutionProvider" in str(providers[0]):
            print("*************** EP Error ***************")
            print("EP Error libcublasLt.so.13: cannot open shared object file when using CUDA")
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"], **kw)

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", failing_cuda)
    result = invoke("classify", "-m", str(exported("bert", "text-classification")), input="a good movie\n")
    assert result.exit_code == 0, result.output
    assert "EP Error" not in result.stdout and len(result.stdout.splitlines()) == 1
    assert "CUDA not usable (libcublasLt.so.13 not found)" in result.stderr
