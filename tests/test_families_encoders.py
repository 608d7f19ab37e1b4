"""The encoder families users bring: XLM-RoBERTa, DeBERTa-v3 (deberta-v2), ELECTRA, ALBERT, MPNet, ModernBERT.

Each tiny random checkpoint (tests/tiny_families.py) is exported for text-classification,
token-classification, fill-mask and feature-extraction, and compared with PyTorch (logits, token
states) and with transformers' pipelines through the CLI (labels, scores within 1e-4, NER entities,
fill-mask tokens). The SentencePiece families' exported tokenizer.json must give the slow
(sentencepiece) tokenizer's ids on text the training corpus never had.
"""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import tiny_families
from click.testing import CliRunner

from onnxpipe.main import cli

ARCHS = tiny_families.ENCODERS
TEXTS = [
    "A good movie with a great cast and a moving story.",
    "This film was boring, too long and badly acted.",
    "Short.",
    "Émile a visité Zürich et São Paulo en été.",
    ("Paris is the capital of France, and Berlin is the capital of Germany. " * 3).strip(),
    "words the tokenizer never saw: quizzical xylophones",
]
# Characters the training corpus never had: accents, CJK, emoji, control characters, combining marks.
HOSTILE = [
    "Ça coûte 12,50 € à Ångström — naïve façade, Œuvre, ß, İstanbul.",
    "東京は日本の首都です。北京欢迎你！서울 특별시",
    "emoji 👍🏽 and flags 🇩🇪🇫🇷 and a family 👨‍👩‍👧 in text",
    "tab\tand\x0bvertical\x0cform feed\x1fand\x7fdelete and a\u200bzero width space",
    "combining: e\u0301 a\u0308 n\u0303 versus é ä ñ; Zalgo z\u0336\u0337a\u0335l\u0334g\u0338o",
    "   leading, trailing   and   repeated   spaces   ",
    "Numbers 42, 3.14, 2026 and a very long word: Donaudampfschifffahrtsgesellschaftskapitän",
    "mixed ﬁ ligature, full-width ＡＢＣ１２３, Arabic مرحبا, Hebrew שלום, Thai สวัสดี",
    "",
]


def invoke(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
    cache: dict = {}

    def make(arch: str, task: str):
        if (arch, task) not in cache:
            cache[arch, task] = tiny_families.build(arch, tmp_path_factory.mktemp("family") / f"{arch}-{task}", task)
        return cache[arch, task]

    return make


@pytest.fixture(scope="session")
def family_export(tmp_path_factory, family_checkpoint):
    cache: dict = {}

    def make(arch: str, task: str):
        if (arch, task) not in cache:
            from onnxpipe.export import export_model

            out = tmp_path_factory.mktemp("family-exports") / f"{arch}-{task}"
            export_model(family_checkpoint(arch, task), out, task=task)
            cache[arch, task] = out
        return cache[arch, task]

    return make


def torch_outputs(folder, task, texts):
    import torch
    import transformers

    cls = {
        "text-classification": transformers.AutoModelForSequenceClassification,
        "token-classification": transformers.AutoModelForTokenClassification,
        "fill-mask": transformers.AutoModelForMaskedLM,
        "feature-extraction": transformers.AutoModel,
    }[task]
    # The slow tokenizer is the reference where there is one (transformers' fast ALBERT is not exact).
    tok = transformers.AutoTokenizer.from_pretrained(folder, use_fast=not (folder / "spiece.model").is_file())
    model = cls.from_pretrained(folder).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    value = out.last_hidden_state if task == "feature-extraction" else out.logits
    return value.numpy(), batch["attention_mask"].numpy()


def onnx_outputs(folder, texts):
    from onnxpipe.runtime import load_model
    from onnxpipe.stream.readers import records_from_texts
    from onnxpipe.tasks.encoder import EncoderTask

    task = EncoderTask(load_model(folder, device="cpu"))
    feed, _ = task.feed(task.encode(records_from_texts(texts)))
    return task.session.run(None, feed)[0], feed["attention_mask"]


@pytest.mark.parametrize("task", ["text-classification", "token-classification", "fill-mask", "feature-extraction"])
@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_match_pytorch(arch, task, family_export, family_checkpoint):
    got, mask = onnx_outputs(family_export(arch, task), TEXTS)
    expected, torch_mask = torch_outputs(family_checkpoint(arch, task), task, TEXTS)
    np.testing.assert_array_equal(mask, torch_mask)  # the same tokens, the same padding
    if task != "text-classification":
        got, expected = got * mask[..., None], expected * mask[..., None]
    assert np.abs(expected).max() > 1e-3  # not a degenerate all-zero comparison
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_labels_and_scores_match_the_pipeline(arch, family_export, family_checkpoint):
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(family_checkpoint(arch, "text-classification")))
    expected = pipe(TEXTS, top_k=None)
    result = invoke(
        "classify",
        "-m",
        str(family_export(arch, "text-classification")),
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
        assert dict(zip(row["labels"], row["scores"])) == pytest.approx(
            {w["label"]: w["score"] for w in want}, abs=1e-4
        )
        assert row["label"] == want[0]["label"] or abs(want[0]["score"] - want[1]["score"]) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_entities_match_the_pipeline(arch, family_export, family_checkpoint):
    from transformers import pipeline

    folder = family_export(arch, "token-classification")
    for strategy in ("none", "simple", "first", "max"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = pipeline(
                "token-classification",
                model=str(family_checkpoint(arch, "token-classification")),
                aggregation_strategy=strategy,
            )
            expected = [pipe(t) for t in TEXTS]
        result = invoke(
            "tag", "-m", str(folder), "--format", "jsonl", "--aggregation", strategy, input="\n".join(TEXTS) + "\n"
        )
        assert result.exit_code == 0, result.stderr
        got = [json.loads(line)["entities"] for line in result.stdout.splitlines()]
        assert sum(len(e) for e in expected) > 0  # the comparison covers entities, not only empty lists
        for text, mine, theirs in zip(TEXTS, got, expected):
            assert [{k: v for k, v in e.items() if k != "score"} for e in mine] == [
                {
                    k: (int(v) if k in ("index", "start", "end") and v is not None else v)
                    for k, v in e.items()
                    if k != "score"
                }
                for e in theirs
            ], (strategy, text)
            assert [e["score"] for e in mine] == pytest.approx([float(e["score"]) for e in theirs], abs=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_fill_mask_candidates_match_the_pipeline(arch, family_export, family_checkpoint):
    from transformers import AutoTokenizer, pipeline

    ckpt = str(family_checkpoint(arch, "fill-mask"))
    mask = AutoTokenizer.from_pretrained(ckpt).mask_token
    texts = [f"Paris is the {mask} of France.", f"I loved every minute of {mask}", f"Émile a visité {mask} en été."]
    pipe = pipeline("fill-mask", model=ckpt)
    result = invoke(
        "fill-mask",
        "-m",
        str(family_export(arch, "fill-mask")),
        "--format",
        "jsonl",
        "--top-k",
        "4",
        input="\n".join(texts) + "\n",
    )
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line)["candidates"] for line in result.stdout.splitlines()]
    for text, mine in zip(texts, rows):
        theirs = pipe(text, top_k=4)
        assert [c["score"] for c in mine] == pytest.approx([float(c["score"]) for c in theirs], abs=1e-4)
        for a, b in zip(mine, theirs):
            if a["token"] != b["token"]:
                assert abs(a["score"] - float(b["score"])) < 1e-5  # a tie broken the other way
                continue
            assert (a["token_str"], a["sequence"]) == (b["token_str"], b["sequence"])


SLOW = {"xlm-roberta": "XLMRobertaTokenizer", "deberta-v2": "DebertaV2Tokenizer", "albert": "AlbertTokenizer"}


@pytest.mark.parametrize("arch", tiny_families.SENTENCEPIECE)
def test_sentencepiece_tokenizer_json_gives_the_slow_tokenizers_ids(arch, family_export, family_checkpoint):
    import transformers
    from tokenizers import Tokenizer

    slow = getattr(transformers, SLOW[arch]).from_pretrained(family_checkpoint(arch, "text-classification"))
    assert not slow.is_fast
    fast = Tokenizer.from_file(str(family_export(arch, "text-classification") / "tokenizer.json"))
    unknown = 0
    for text in HOSTILE + TEXTS:
        want = slow(text)["input_ids"]
        assert fast.encode(text).ids == want, text
        unknown += want.count(slow.unk_token_id)
    assert unknown > 0  # the hostile set does reach pieces the vocabulary lacks


@pytest.mark.parametrize("arch", ["xlm-roberta", "deberta-v2"])
def test_info_names_the_family(arch, family_export):
    result = invoke("info", str(family_export(arch, "text-classification")))
    assert result.exit_code == 0, result.stderr
    name = {"xlm-roberta": "XLM-RoBERTa", "deberta-v2": "DeBERTa-v2 / v3"}[arch]
    assert re.search(rf"^family +{re.escape(name)} \(exports; tested: text-classification", result.stdout, re.M)
