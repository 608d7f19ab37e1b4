"""Converted SentencePiece tokenizers (M2M100, Marian) give the slow tokenizer's ids on hostile text; the
equivalence check at export says where it differs; M2M100 exports and translates as transformers does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tiny_models
import tiny_seq2seq
import tiny_spm

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

TEXTS = tiny_models.CORPUS[:16]


@pytest.fixture(scope="session")
def m2m(tmp_path_factory):
    """(checkpoint, export) of a sharpened tiny M2M100, built once."""
    from onnxpipe.export import export_model

    root = tmp_path_factory.mktemp("m2m100")
    base = tiny_spm.m2m100(root / "base")
    ckpt = tiny_seq2seq.sharpen(base, root / "ckpt", eos_scale=4.0)
    export_model(ckpt, root / "export")
    return ckpt, root / "export"


def test_m2m100_tokenizer_json_gives_m2m100tokenizer_ids(m2m):
    import transformers
    from onnxpipe.export.tokenizer import HOSTILE_TEXTS
    from onnxpipe.tasks.seq2seq import Languages
    from tokenizers import Tokenizer

    ckpt, export = m2m
    m = json.loads((export / "onnxpipe.json").read_text())
    assert m["tokenizer"]["check"]["identical"] and m["validation"]["passed"]
    fast = Tokenizer.from_file(str(export / "tokenizer.json"))
    config = json.loads((export / "tokenizer_config.json").read_text())
    for src in ("en", "fr"):
        slow = transformers.M2M100Tokenizer.from_pretrained(ckpt, src_lang=src)
        tok = Languages(fast, config).with_source(f"__{src}__")
        for text in TEXTS + HOSTILE_TEXTS:
            ids = tok.encode(text).ids
            assert ids == slow(text)["input_ids"], text
            assert ids[0] == slow.get_lang_id(src) and ids[-1] == slow.eos_token_id
            # M2M100Tokenizer.decode keeps language codes even with skip_special_tokens; ours skips them.
            assert fast.decode(ids) == slow.decode(ids[1:], skip_special_tokens=True), text
    assert slow.unk_token_id in fast.encode("日本語 😀").ids


@pytest.mark.parametrize("num_beams", [1, 4])
def test_m2m100_translation_matches_generate(m2m, num_beams):
    import torch
    import transformers
    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.seq2seq import Seq2SeqTask

    ckpt, export = m2m
    settings = dict(num_beams=num_beams, max_new_tokens=20)
    task = Seq2SeqTask(load_model(export, device="cpu"), target_lang="de", **settings)
    tokenizer = transformers.M2M100Tokenizer.from_pretrained(ckpt, src_lang="en")
    assert task.generation_config.forced_bos_token_id == tokenizer.get_lang_id("de")
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(ckpt).eval()
    for texts in (TEXTS, [TEXTS[3]]):
        with torch.no_grad():
            out = model.generate(**tokenizer(texts, return_tensors="pt", padding=True), do_sample=False,
                                 forced_bos_token_id=tokenizer.get_lang_id("de"), **settings)
        expected = []
        for row in out.tolist():
            ids = row[1:]
            expected.append(ids[:ids.index(2) + 1] if 2 in ids else ids)
        sources = [task.tokenizer.encode(t).ids for t in texts]
        got = [n[0].token_ids for n in task.runner.generate(sources, task.generation_config, task.pad_id, task.max_new_tokens)]
        assert got == expected
        assert all(ids[0] == tokenizer.get_lang_id("de") for ids in got)
        if len(texts) > 1:
            assert len({len(ids) for ids in got}) > 2, got  # rows end at different steps


def test_m2m100_translate_cli(m2m):
    import torch
    import transformers
    from click.testing import CliRunner
    from onnxpipe.main import cli

    ckpt, export = m2m
    result = CliRunner().invoke(cli, ["translate", "-m", str(export), "--device", "cpu", "--source-lang", "en",
                                      "--target-lang", "de", "--num-beams", "4", "--max-new-tokens", "16"],
                                input="".join(t + "\n" for t in TEXTS[:6]))
    assert result.exit_code == 0, result.output
    tokenizer = transformers.M2M100Tokenizer.from_pretrained(ckpt, src_lang="en")
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(ckpt).eval()
    with torch.no_grad():
        out = model.generate(**tokenizer(TEXTS[:6], return_tensors="pt", padding=True), num_beams=4, max_new_tokens=16,
                             forced_bos_token_id=tokenizer.get_lang_id("de"))
    # Without language codes (forced first, or generated later), which M2M100Tokenizer.decode keeps.
    codes = set(tokenizer.lang_token_to_id.values())
    expected = tokenizer.batch_decode([[t for t in row if t not in codes] for row in out.tolist()], skip_special_tokens=True)
    assert result.stdout.split("\n")[:-1] == expected and any(expected)


# --- the equivalence check -----------------------------------------------------------------

def _marian_tokenizer_folder(out: Path, drop_every: int = 0) -> Path:
    """source.spm = target.spm, vocab.json of its pieces (every DROP_EVERY-th multi-character one left out)."""
    import transformers

    out.mkdir(parents=True)
    src, vocab = tiny_spm.spm_vocab(out, "source", 150, {"</s>": 0, "<unk>": 1}, drop_every=drop_every)
    shutil.copy(src, out / "target.spm")
    vocab["<pad>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    transformers.MarianTokenizer(source_spm=str(src), target_spm=str(out / "target.spm"),
                                 vocab=str(out / "vocab.json")).save_pretrained(out)
    return out


def test_marian_converter_matches_on_hostile_text(tmp_path):
    import transformers
    from onnxpipe.export.tokenizer import (
        HOSTILE_TEXTS,
        check_tokenizers,
        load_tokenizers,
    )

    folder = _marian_tokenizer_folder(tmp_path / "m")
    toks = load_tokenizers(folder, {"model_type": "marian"})
    slow = transformers.MarianTokenizer.from_pretrained(folder)
    for text in TEXTS + HOSTILE_TEXTS:
        assert toks.source.encode(text).ids == slow(text)["input_ids"], text
    assert check_tokenizers(toks, ["user line"])["checked_texts"] == len(HOSTILE_TEXTS) + 1
    assert slow.unk_token_id in toks.source.encode(HOSTILE_TEXTS[5]).ids  # CJK: unknown here


def test_marian_vocab_lacking_spm_pieces_is_refused_in_one_line(tmp_path):
    from onnxpipe.errors import ExportError
    from onnxpipe.export.tokenizer import load_tokenizers

    folder = _marian_tokenizer_folder(tmp_path / "m", drop_every=5)
    with pytest.raises(ExportError) as info:
        load_tokenizers(folder, {"model_type": "marian"})
    message = str(info.value)
    assert "\n" not in message and "source.spm has" in message and "vocab.json lacks" in message


def test_check_names_the_first_differing_position_with_pieces(tmp_path):
    import transformers
    from onnxpipe.errors import ExportError
    from onnxpipe.export.tokenizer import check_tokenizers, load_tokenizers
    from tokenizers import AddedToken

    folder = _marian_tokenizer_folder(tmp_path / "m")
    toks = load_tokenizers(folder, {"model_type": "marian"})
    slow = transformers.MarianTokenizer.from_pretrained(folder)
    text = "Numbers like 42 and 3.14 appear in text too; so do accents: Zürich, São Paulo."
    toks.source.add_tokens([AddedToken("rich", normalized=False)])  # a fast tokenizer that splits 'Zürich' apart
    with pytest.raises(ExportError) as info:
        check_tokenizers(toks, [text])
    message = str(info.value)
    ref_ids = slow(text)["input_ids"]
    fast_ids = toks.source.encode(text).ids
    at = next(i for i, (a, b) in enumerate(zip(fast_ids, ref_ids)) if a != b)
    assert at > 12  # the old message cut both lists at 12 ids, before the difference
    assert f"at id {at}: fast [" in message and "vs MarianTokenizer [" in message
    assert f"'rich'({toks.source.token_to_id('rich')})" in message
    assert repr(slow.convert_ids_to_tokens(ref_ids[at])) in message
    assert "\n" not in message
