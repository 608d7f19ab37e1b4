"""`onnxpipe fill-mask`: candidates identical to transformers' fill-mask pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from onnxpipe.main import cli

ARCHS = ("bert", "distilbert", "roberta")
TEMPLATES = [
    "Paris is the {m} of France.",
    "{m} quick brown fox jumps over the lazy dog.",
    "I loved every minute of {m}",
    "Émile a visité {m} et São Paulo en été.",
    "Two masks: {m} and {m}.",
]


def mask_token(arch):
    return "<mask>" if arch == "roberta" else "[MASK]"


def texts_for(arch):
    return [t.format(m=mask_token(arch)) for t in TEMPLATES]


def invoke(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def fill_jsonl(folder, texts, *args):
    result = invoke("fill-mask", "-m", str(folder), "--format", "jsonl", *args, input="\n".join(texts) + "\n")
    assert result.exit_code in (0, 3), result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def assert_same_candidates(mine, theirs):
    """Same tokens, strings and sequences in the same order; scores within 1e-4 (near-ties may swap)."""
    assert [c["score"] for c in mine] == pytest.approx([float(c["score"]) for c in theirs], abs=1e-4)
    for a, b in zip(mine, theirs):
        if a["token"] != b["token"]:
            assert abs(a["score"] - float(b["score"])) < 1e-5  # a tie broken the other way
            continue
        assert (a["token_str"], a["sequence"]) == (b["token_str"], b["sequence"])


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_pytorch(arch, exported, checkpoint):
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from onnxpipe.runtime import load_model
    from onnxpipe.stream.readers import records_from_texts
    from onnxpipe.tasks.fill_mask import FillMaskTask

    texts = texts_for(arch)
    task = FillMaskTask(load_model(exported(arch, "fill-mask"), device="cpu"))
    feed, _ = task.feed(task.encode(records_from_texts(texts)))
    (logits,) = task.session.run(["logits"], feed)
    ckpt = checkpoint(arch, "fill-mask")
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForMaskedLM.from_pretrained(ckpt).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits.numpy()
    mask = batch["attention_mask"].numpy()[..., None]
    np.testing.assert_allclose(logits * mask, expected * mask, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_candidates_match_the_pipeline(arch, exported, checkpoint):
    from transformers import pipeline

    texts = texts_for(arch)
    pipe = pipeline("fill-mask", model=str(checkpoint(arch, "fill-mask")))
    rows = fill_jsonl(exported(arch, "fill-mask"), texts, "--top-k", "4")
    assert len(rows) == len(texts)
    for text, row in zip(texts, rows):
        expected = pipe(text, top_k=4)
        if text.count(mask_token(arch)) == 1:
            assert_same_candidates(row["candidates"], expected)
        else:
            assert len(row["candidates"]) == len(expected) == 2
            for mine, theirs in zip(row["candidates"], expected):
                assert_same_candidates(mine, theirs)


def test_a_line_without_a_mask_is_a_record_error(exported):
    folder = str(exported("bert", "fill-mask"))
    data = "Paris is the [MASK] of France.\nno mask here\n\n"
    failing = invoke("fill-mask", "-m", folder, input=data)
    assert failing.exit_code == 1 and "<stdin>:2: no mask token [MASK]" in failing.stderr
    assert failing.stdout.count("\n") == 1  # what came before the bad line is written
    lenient = invoke("fill-mask", "-m", folder, "--on-error", "null", "--format", "jsonl", input=data)
    assert lenient.exit_code == 3
    rows = [json.loads(line) for line in lenient.stdout.splitlines()]
    assert [r["candidates"] is None for r in rows] == [False, True, True]
    assert "error" in rows[1] and "error" not in rows[2]


def test_text_output_lists_the_top_k_tokens(exported):
    folder = str(exported("bert", "fill-mask"))
    rows = fill_jsonl(folder, ["Paris is the [MASK] of France.", "[MASK] and [MASK]."], "-k", "3")
    text = invoke("fill-mask", "-m", folder, "-k", "3", input="Paris is the [MASK] of France.\n[MASK] and [MASK].\n")
    lines = text.stdout.split("\n")
    assert lines[0].split("\t") == [c["token_str"].strip() for c in rows[0]["candidates"]]
    assert lines[1].split("\t").count("|") == 1 and len(lines[1].split("\t")) == 7


def test_results_do_not_depend_on_batching(exported):
    folder = exported("roberta", "fill-mask")
    texts = texts_for("roberta") * 3
    one = fill_jsonl(folder, texts, "--batch-size", "1")
    many = fill_jsonl(folder, texts, "--batch-size", "64")
    for a, b in zip(one, many):
        flat_a = a["candidates"] if isinstance(a["candidates"][0], dict) else sum(a["candidates"], [])
        flat_b = b["candidates"] if isinstance(b["candidates"][0], dict) else sum(b["candidates"], [])
        assert [c["score"] for c in flat_a] == pytest.approx([c["score"] for c in flat_b], abs=1e-5)
