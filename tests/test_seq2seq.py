"""Encoder-decoder generation: ids identical to transformers' `generate` (PyTorch) on tiny random models.

The models are "sharpened" tiny checkpoints (tiny_seq2seq.sharpen) so that outputs depend on the input
and end at different steps; each test checks that its outputs span several lengths, including rows
that end early and rows that run to the limit, so that it can fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_models
import tiny_seq2seq

pytest.importorskip("torch")
pytest.importorskip("transformers")

TEXTS = tiny_models.CORPUS[:16]
TARGET = {"mbart": "de_DE", "nllb": "deu_Latn"}
ARCHS = ("marian", "t5", "bart", "mbart", "nllb")


@pytest.fixture(scope="session")
def s2s(tmp_path_factory, checkpoint):
    """s2s(arch) -> (checkpoint folder, export folder) of the sharpened tiny model (cached)."""
    root = tmp_path_factory.mktemp("s2s")
    return lambda arch: tiny_seq2seq.sharpened_export(arch, root, checkpoint)


def _task(export: Path, arch: str, **kw):
    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.seq2seq import Seq2SeqTask

    if arch in TARGET:
        kw.setdefault("target_lang", TARGET[arch])
    return Seq2SeqTask(load_model(export, device="cpu"), **kw)


def _reference(ckpt: Path, task, texts: list[str], **generate_kw) -> list[list[int]]:
    """transformers' ids for TEXTS (one padded batch), without the decoder start and the pads after eos."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    model = _torch_model(ckpt)
    batch = tokenizer([task.source_text(t) for t in texts], return_tensors="pt", padding=True)
    for row, text in zip(batch["input_ids"].tolist(), texts):  # the runtime tokenizes as transformers does
        ours = task.tokenizer.encode(task.source_text(text)).ids
        assert row[: len(ours)] == ours
    if task.generation_config.forced_bos_token_id is not None:
        generate_kw.setdefault("forced_bos_token_id", task.generation_config.forced_bos_token_id)
    with torch.no_grad():
        out = model.generate(**batch, **generate_kw)
    eos = set(task.generation_config.eos_token_id)
    per_input = generate_kw.get("num_return_sequences", 1)
    result = []
    for row in out.tolist():
        ids = row[1:]
        end = next((i for i, t in enumerate(ids) if t in eos), None)
        result.append(ids[: end + 1] if end is not None else ids)
    return [result[i : i + per_input] for i in range(0, len(result), per_input)]


_MODELS: dict = {}


def _torch_model(ckpt: Path):
    if ckpt not in _MODELS:
        import transformers

        _MODELS[ckpt] = transformers.AutoModelForSeq2SeqLM.from_pretrained(ckpt).eval()
    return _MODELS[ckpt]


def _ours(task, texts: list[str]) -> list[list[list[int]]]:
    sources = [task.tokenizer.encode(task.source_text(t)).ids for t in texts]
    hyps = task.runner.generate(sources, task.generation_config, task.pad_id, task.max_new_tokens)
    return [[h.token_ids for h in nbest] for nbest in hyps]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_beams", [1, 4])
def test_ids_match_transformers(s2s, arch, num_beams):
    """Batch 16 (mixed lengths, one padded batch) and batch 1, greedy and beam 4, with each model's
    own forced BOS/EOS and banned words (Marian bans pad; BART forces bos and eos; mBART/NLLB force the
    target language)."""
    ckpt, export = s2s(arch)
    settings = dict(num_beams=num_beams, max_new_tokens=24, min_length=3)
    task = _task(export, arch, **settings)
    expected = _reference(ckpt, task, TEXTS, do_sample=False, **settings)
    got = _ours(task, TEXTS)
    assert got == expected
    lengths = sorted(len(n[0]) for n in got)
    assert lengths[0] < 12 and lengths[-1] >= 20, lengths  # early ends and long rows in one batch

    for text in (TEXTS[3], TEXTS[14]):  # batch 1
        assert _ours(task, [text]) == _reference(ckpt, task, [text], do_sample=False, **settings)


def test_generation_config_is_honoured(s2s):
    """Marian's generation_config (4 beams, pad banned, forced eos at max_length) is what runs by default."""
    ckpt, export = s2s("marian")
    task = _task(export, "marian", max_length=12, min_length=4)
    gen = task.generation_config
    assert gen.num_beams == 4 and gen.bad_words_ids == [[gen.pad_token_id]] and gen.forced_eos_token_id
    assert task.max_new_tokens == 11
    expected = _reference(ckpt, task, TEXTS, max_length=12, min_length=4)  # transformers reads the same config
    assert _ours(task, TEXTS) == expected
    assert any(len(n[0]) == 11 and n[0][-1] in gen.eos_token_id for n in expected)  # the forced eos ran


def test_bad_words_ngrams_length_penalty_nbest(s2s):
    """Multi-token banned sequences, no_repeat_ngram_size, length_penalty and n-best lists together."""
    ckpt, export = s2s("t5")
    task = _task(export, "t5", prefix="")
    greedy = _ours(task.__class__(task.model, prefix="", num_beams=1, max_new_tokens=20, min_length=5), TEXTS[:4])
    common = max({t for n in greedy for t in n[0][:-1]}, key=lambda t: sum(n[0].count(t) for n in greedy))
    pair = greedy[0][0][:2]
    settings = dict(
        num_beams=4,
        num_return_sequences=3,
        max_new_tokens=20,
        min_length=5,
        length_penalty=0.6,
        no_repeat_ngram_size=2,
        bad_words_ids=[[common], pair],
    )
    task = task.__class__(task.model, prefix="", **settings)
    got = _ours(task, TEXTS[:6])
    assert got == _reference(ckpt, task, TEXTS[:6], **settings)
    assert all(len(n) == 3 for n in got)
    assert all(common not in h for n in got for h in n)


def test_mbart_and_nllb_language_tokens(s2s):
    """--source-lang moves the code where the model's tokenizer puts it; --target-lang is the forced BOS."""
    import transformers

    for arch, (src, tgt) in {"mbart": ("fr_XX", "ro_RO"), "nllb": ("fra_Latn", "ron_Latn")}.items():
        ckpt, export = s2s(arch)
        task = _task(export, arch, source_lang=src, target_lang=tgt, max_new_tokens=8)
        ref = transformers.AutoTokenizer.from_pretrained(ckpt, src_lang=src)
        assert task.tokenizer.encode(TEXTS[0]).ids == ref(TEXTS[0])["input_ids"]
        assert task.generation_config.forced_bos_token_id == ref.convert_tokens_to_ids(tgt)
        got = _ours(task, TEXTS[:2])
        assert all(n[0][0] == task.generation_config.forced_bos_token_id for n in got)


def test_mbart50_source_code_goes_first(tmp_path):
    """mBART-50 puts the source code first (mBART-cc25 after </s>): the template swap follows either."""
    import json

    import transformers
    from tokenizers import Tokenizer

    from onnxpipe.tasks.seq2seq import Languages

    for fifty in (False, True):
        folder = tiny_seq2seq._mbart(tmp_path / f"m{fifty}", fifty=fifty)
        langs = Languages(
            Tokenizer.from_file(str(folder / "tokenizer.json")),
            json.loads((folder / "tokenizer_config.json").read_text()),
        )
        assert "en_XX" in langs.codes and langs.source == "en_XX"
        ids = langs.with_source("ja_XX").encode("Short.").ids
        ref = transformers.AutoTokenizer.from_pretrained(folder, src_lang="ja_XX")("Short.")["input_ids"]
        assert ids == ref
        assert (ids[0] if fifty else ids[-1]) == ref[0 if fifty else -1] == langs.token_id("ja_XX")


def test_wide_topk_is_exact():
    """decoding.beam.topk on beams x vocabulary rows (the fast path seq2seq needed): value desc, index asc,
    ties at the boundary included; rows of -inf fall back to the partition path."""
    import numpy as np

    from onnxpipe.decoding.beam import topk

    rng = np.random.default_rng(0)
    for trial in range(20):
        x = np.round(rng.standard_normal((3, 5000)), 1).astype(np.float32)  # many ties
        x[0, rng.integers(0, 5000, 300)] = -np.inf
        k = int(rng.integers(1, 9))
        expected = np.array([sorted(range(5000), key=lambda j: (-x[i, j], j))[:k] for i in range(3)])
        assert (topk(x, k) == expected).all(), trial
    x = np.full((2, 8192), -np.inf, dtype=np.float32)
    x[:, 5] = 1.0
    x[1, 9] = 2.0
    assert topk(x, 2)[:, 0].tolist() == [5, 9]
    # Thin and partition rows in one call, and the best values in the columns after the last whole chunk.
    x = np.round(rng.standard_normal((4, 58101)), 2).astype(np.float32)
    x[1] = -np.inf
    x[1, [7, 8, 9, 10, 11, 58096, 58097, 58098, 58099, 58100]] = [0.5, 0.5, 1, 2, 2, 2, 1, 0, 0, 3.0]
    x[2, 58090:] = 9.0
    expected = np.array([sorted(range(58101), key=lambda j: (-x[i, j], j))[:8] for i in range(4)])
    assert (topk(x, 8) == expected).all()


def test_marian_multi_target_token(s2s):
    """opus-mt multi-target models: --target-lang fra puts `>>fra<<` before the text, as users of
    MarianTokenizer do; the ids then match transformers' generate."""
    import transformers

    ckpt, export = s2s("marian_multi")
    task = _task(export, "marian_multi", target_lang="fra", num_beams=4, max_new_tokens=12, min_length=3)
    assert task.source_text("Short.") == ">>fra<< Short."
    ref = transformers.MarianTokenizer.from_pretrained(ckpt)
    ids = task.tokenizer.encode(task.source_text("Short.")).ids
    assert ids == ref(">>fra<< Short.")["input_ids"] and ids[0] == ref.convert_tokens_to_ids(">>fra<<")
    assert _ours(task, TEXTS[:4]) == _reference(ckpt, task, TEXTS[:4], num_beams=4, max_new_tokens=12, min_length=3)
    from onnxpipe.errors import UsageError

    with pytest.raises(UsageError, match=">>fra<<, >>ita<<, >>spa<<"):
        _task(export, "marian_multi")
