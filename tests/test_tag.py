"""`onnxpipe tag`: spans, labels and scores identical to transformers' token-classification pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from onnxpipe.main import cli

ARCHS = ("bert", "distilbert", "roberta")
STRATEGIES = ("none", "simple", "first", "average", "max")
TEXTS = [
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Émile a visité Zürich et São Paulo en été.",
    "Tokenizers split words into pieces: un-break-able, re-think-ing.",
    "quizzical xylophones   with  odd   spacing",
    'She said: "hello, world" and left the room.',
]


def invoke(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def tag_jsonl(folder, texts, *args):
    result = invoke("tag", "-m", str(folder), "--format", "jsonl", *args, input="\n".join(texts) + "\n")
    assert result.exit_code == 0, result.stderr
    return [json.loads(line)["entities"] for line in result.stdout.splitlines()]


def comparable(entities):
    return [{k: v for k, v in e.items() if k != "score"} for e in entities], [float(e["score"]) for e in entities]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_pytorch(arch, exported, checkpoint):
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from onnxpipe.runtime import load_model
    from onnxpipe.stream.readers import records_from_texts
    from onnxpipe.tasks.tag import TagTask

    task = TagTask(load_model(exported(arch, "token-classification"), device="cpu"))
    feed, _ = task.feed(task.encode(records_from_texts(TEXTS)))
    (logits,) = task.session.run(["logits"], feed)
    ckpt = checkpoint(arch, "token-classification")
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForTokenClassification.from_pretrained(ckpt).eval()
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits.numpy()
    mask = batch["attention_mask"].numpy()[..., None]
    np.testing.assert_allclose(logits * mask, expected * mask, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_entities_match_the_pipeline_for_every_aggregation(arch, exported, checkpoint):
    import warnings

    from transformers import pipeline

    folder = exported(arch, "token-classification")
    for strategy in STRATEGIES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = pipeline(
                "token-classification",
                model=str(checkpoint(arch, "token-classification")),
                aggregation_strategy=strategy,
            )
            expected = [pipe(t) for t in TEXTS]
        got = tag_jsonl(folder, TEXTS, "--aggregation", strategy)
        for text, mine, theirs in zip(TEXTS, got, expected):
            mine_keys, mine_scores = comparable(mine)
            their_keys, their_scores = comparable(theirs)
            assert mine_keys == their_keys, (strategy, text)
            assert mine_scores == pytest.approx(their_scores, abs=1e-4)
            for entity in mine:
                assert 0 <= entity["start"] <= entity["end"] <= len(text)


def test_offsets_point_into_the_original_line(exported, checkpoint):
    """Odd whitespace, accents, CJK and emoji: the same character offsets as the pipeline."""
    import warnings

    from transformers import pipeline

    texts = ["  leading spaces and Émile in Zürich\tand a tab", "日本 and 🙂 emoji", "x\u00a0y\u2028z"]
    for arch in ("bert", "roberta"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = pipeline(
                "token-classification",
                model=str(checkpoint(arch, "token-classification")),
                aggregation_strategy="first",
            )
        got = tag_jsonl(exported(arch, "token-classification"), texts, "--aggregation", "first")
        for text, mine in zip(texts, got):
            assert [(e["start"], e["end"]) for e in mine] == [(e["start"], e["end"]) for e in pipe(text)]
            assert all(0 <= e["start"] <= e["end"] <= len(text) for e in mine)


def test_text_and_tsv_output(exported):
    folder = str(exported("bert", "token-classification"))
    text = invoke("tag", "-m", folder, input=TEXTS[0] + "\n\n").stdout.split("\n")
    assert len(text) == 3 and text[1] == ""
    assert all("/" in cell for cell in text[0].split("\t"))
    tsv = invoke("tag", "-m", folder, "--format", "tsv", input=TEXTS[0] + "\n").stdout.rstrip("\n").split("\t")
    assert tsv[0] == TEXTS[0] and all(cell.count("/") >= 2 for cell in tsv[1:])


def test_results_do_not_depend_on_batching(exported):
    folder = exported("distilbert", "token-classification")
    lines = TEXTS * 3
    one = tag_jsonl(folder, lines, "--batch-size", "1")
    many = tag_jsonl(folder, lines, "--batch-size", "64")
    for a, b in zip(one, many):
        assert comparable(a)[0] == comparable(b)[0]
        assert comparable(a)[1] == pytest.approx(comparable(b)[1], abs=1e-5)
