"""Converted SentencePiece tokenizers (M2M100, Marian) give the slow tokenizer's ids on hostile text, also
where vocab.json lacks pieces of the spm (extra ids that the runtime maps to <unk>); the equivalence check at
export says where it differs; M2M100 and such a Marian export and translate as transformers does.

Families this file proves (keys of export/families.py): m2m_100, marian.
"""

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
    """(checkpoint, export) of a sharpened tiny M2M100 whose vocab.json lacks some spm pieces, built once."""
    from onnxpipe.export import export_model

    root = tmp_path_factory.mktemp("m2m100")
    base = tiny_spm.m2m100(root / "base", drop_every=5)
    # eos scale and seed picked so that greedy rows end at 3, 6, 13 and 20 tokens, with 14 different outputs.
    ckpt = tiny_seq2seq.sharpen(base, root / "ckpt", eos_scale=10.0, seed=3)
    export_model(ckpt, root / "export")
    return ckpt, root / "export"


def _graph_ids(task, texts: list[str]) -> list[list[int]]:
    """The ids the runtime gives the encoder graph for TEXTS (Seq2SeqTask.encode)."""
    from onnxpipe.stream.records import Record

    return [item.data for item in task.encode([Record(i, t) for i, t in enumerate(texts)])]


def _lacking_hits(export: Path, texts: list[str]) -> int:
    """How many ids of tokenizer.json's TEXTS are extra ids (spm pieces vocab.json lacks)."""
    from tokenizers import Tokenizer

    remap = json.loads((export / "onnxpipe.json").read_text())["tokenizer"]["unk_remap"]
    fast = Tokenizer.from_file(str(export / "tokenizer.json"))
    return sum(i >= remap["from_id"] for text in texts for i in fast.encode(text).ids)


def test_m2m100_tokenizer_json_gives_m2m100tokenizer_ids(m2m):
    import transformers
    from tokenizers import Tokenizer

    from onnxpipe.export.tokenizer import HOSTILE_TEXTS
    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.seq2seq import Seq2SeqTask

    ckpt, export = m2m
    m = json.loads((export / "onnxpipe.json").read_text())
    assert m["tokenizer"]["check"]["identical"] and m["validation"]["passed"]
    slow = transformers.M2M100Tokenizer.from_pretrained(ckpt)
    assert m["tokenizer"]["unk_remap"] == {
        "from_id": max(slow.lang_token_to_id.values()) + 1,
        "unk_id": slow.unk_token_id,
    }
    assert _lacking_hits(export, HOSTILE_TEXTS) > 20 and _lacking_hits(export, TEXTS) > 5  # the remap matters
    fast = Tokenizer.from_file(str(export / "tokenizer.json"))
    model = load_model(export, device="cpu")
    for src in ("en", "fr"):
        slow = transformers.M2M100Tokenizer.from_pretrained(ckpt, src_lang=src)
        task = Seq2SeqTask(model, source_lang=src, target_lang="de")
        texts = TEXTS + HOSTILE_TEXTS
        for text, ids in zip(texts, _graph_ids(task, texts)):
            assert ids == slow(text, truncation=True, max_length=task.max_length)["input_ids"], text
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
            out = model.generate(
                **tokenizer(texts, return_tensors="pt", padding=True),
                do_sample=False,
                forced_bos_token_id=tokenizer.get_lang_id("de"),
                **settings,
            )
        expected = []
        for row in out.tolist():
            ids = row[1:]
            expected.append(ids[: ids.index(2) + 1] if 2 in ids else ids)
        sources = _graph_ids(task, texts)
        got = [
            n[0].token_ids
            for n in task.runner.generate(sources, task.generation_config, task.pad_id, task.max_new_tokens)
        ]
        assert got == expected
        assert all(ids[0] == tokenizer.get_lang_id("de") for ids in got)
        if len(texts) > 1:
            assert len({len(ids) for ids in got}) > 2, got  # rows end at different steps


def test_m2m100_translate_cli(m2m):
    import torch
    import transformers
    from click.testing import CliRunner

    from onnxpipe.export.tokenizer import HOSTILE_TEXTS
    from onnxpipe.main import cli

    ckpt, export = m2m
    lines = TEXTS[:3] + HOSTILE_TEXTS[:9]  # accents, Cyrillic, CJK, emoji: pieces vocab.json lacks
    assert _lacking_hits(export, HOSTILE_TEXTS[:9]) > 10
    result = CliRunner().invoke(
        cli,
        [
            "translate",
            "-m",
            str(export),
            "--device",
            "cpu",
            "--source-lang",
            "en",
            "--target-lang",
            "de",
            "--num-beams",
            "4",
            "--max-new-tokens",
            "16",
        ],
        input="".join(t + "\n" for t in lines),
    )
    assert result.exit_code == 0, result.output
    tokenizer = transformers.M2M100Tokenizer.from_pretrained(ckpt, src_lang="en")
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(ckpt).eval()
    with torch.no_grad():
        out = model.generate(
            **tokenizer(lines, return_tensors="pt", padding=True),
            num_beams=4,
            max_new_tokens=16,
            forced_bos_token_id=tokenizer.get_lang_id("de"),
        )
    # Without language codes (forced first, or generated later), which M2M100Tokenizer.decode keeps.
    codes = set(tokenizer.lang_token_to_id.values())
    expected = tokenizer.batch_decode(
        [[t for t in row if t not in codes] for row in out.tolist()], skip_special_tokens=True
    )
    assert result.stdout.split("\n")[:-1] == expected and any(expected)


# --- the equivalence check -----------------------------------------------------------------


def _marian_tokenizer_folder(out: Path, drop_every: int = 0) -> Path:
    """source.spm = target.spm, vocab.json of its pieces (with DROP_EVERY: trained on text with accents, CJK,
    emoji and combining marks, and some pieces left out, see tiny_spm.vocab_of)."""
    import transformers

    out.mkdir(parents=True)
    corpus, size = (tiny_spm.WIDE_CORPUS, 260) if drop_every else (tiny_models.CORPUS, 150)
    src, vocab = tiny_spm.spm_vocab(out, "source", size, {"</s>": 0, "<unk>": 1}, drop_every, corpus)
    shutil.copy(src, out / "target.spm")
    vocab["<pad>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    transformers.MarianTokenizer(
        source_spm=str(src), target_spm=str(out / "target.spm"), vocab=str(out / "vocab.json")
    ).save_pretrained(out)
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


def test_marian_vocab_lacking_spm_pieces_gives_marian_ids(tmp_path):
    """Pieces vocab.json lacks get extra ids (spm scores kept, so the segmentation is sentencepiece's),
    mapped to <unk> by the record's remap; the check compares the remapped ids, so a wrong remap fails it."""
    import transformers

    from onnxpipe.errors import ExportError
    from onnxpipe.export.tokenizer import HOSTILE_TEXTS, check_tokenizers, load_tokenizers
    from onnxpipe.runtime.model import unk_remapped

    folder = _marian_tokenizer_folder(tmp_path / "m", drop_every=5)
    toks = load_tokenizers(folder, {"model_type": "marian"})
    slow = transformers.MarianTokenizer.from_pretrained(folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert toks.unk_remap == {"from_id": max(vocab.values()) + 1, "unk_id": slow.unk_token_id}
    extras = 0
    for text in TEXTS + HOSTILE_TEXTS:
        raw = toks.source.encode(text).ids
        extras += sum(i >= toks.unk_remap["from_id"] for i in raw)
        assert unk_remapped(raw, toks.unk_remap) == slow(text)["input_ids"], text
    assert extras > 20  # the hostile texts hit the pieces vocab.json lacks
    assert check_tokenizers(toks, ["user line"])["identical"]
    toks.unk_remap = {"from_id": toks.unk_remap["from_id"], "unk_id": slow.eos_token_id}
    with pytest.raises(ExportError, match="disagrees with MarianTokenizer"):
        check_tokenizers(toks, [])


def test_check_names_the_first_differing_position_with_pieces(tmp_path):
    import transformers
    from tokenizers import AddedToken

    from onnxpipe.errors import ExportError
    from onnxpipe.export.tokenizer import check_tokenizers, load_tokenizers

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


# --- a Marian export whose vocab.json lacks spm pieces ----------------------------------------


@pytest.fixture(scope="session")
def marian_lacking(tmp_path_factory):
    """(checkpoint, export) of a sharpened tiny Marian (source.spm != target.spm, one vocab.json lacking
    pieces of both), built once."""
    from onnxpipe.export import export_model

    root = tmp_path_factory.mktemp("marian-lacking")
    ckpt = tiny_seq2seq.sharpen(
        tiny_spm.marian(root / "base"), root / "ckpt", eos_scale=tiny_seq2seq.EOS_SCALE["marian"]
    )
    export_model(ckpt, root / "export")
    return ckpt, root / "export"


def test_marian_lacking_pieces_runtime_ids_are_marian_tokenizers(marian_lacking):
    import transformers
    from tokenizers import Tokenizer

    from onnxpipe.export.tokenizer import HOSTILE_TEXTS
    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.seq2seq import Seq2SeqTask

    ckpt, export = marian_lacking
    record = json.loads((export / "onnxpipe.json").read_text())["tokenizer"]
    slow = transformers.MarianTokenizer.from_pretrained(ckpt)
    vocab_end = len(slow.encoder)
    assert record["unk_remap"] == record["target_unk_remap"] == {"from_id": vocab_end, "unk_id": slow.unk_token_id}
    assert record["check"]["identical"] and record["target_file"] == "target_tokenizer.json"
    assert _lacking_hits(export, HOSTILE_TEXTS) > 20
    task = Seq2SeqTask(load_model(export, device="cpu"))
    texts = TEXTS + HOSTILE_TEXTS
    for text, ids in zip(texts, _graph_ids(task, texts)):
        assert ids == slow(text, truncation=True, max_length=task.max_length)["input_ids"], text
        assert max(ids) < vocab_end
    # The target side: generated ids (never extra ones) decode as MarianTokenizer.decode does.
    target = Tokenizer.from_file(str(export / "target_tokenizer.json"))
    for text in texts:
        ids = slow(text_target=text)["input_ids"]
        assert target.decode(ids, skip_special_tokens=True) == slow.decode(ids, skip_special_tokens=True), text


def test_marian_lacking_pieces_translate_matches_generate(marian_lacking):
    import torch
    import transformers
    from click.testing import CliRunner

    from onnxpipe.export.tokenizer import HOSTILE_TEXTS
    from onnxpipe.main import cli

    ckpt, export = marian_lacking
    lines = TEXTS[:4] + HOSTILE_TEXTS[:6] + HOSTILE_TEXTS[8:9] + HOSTILE_TEXTS[13:15]
    assert _lacking_hits(export, lines) > 15
    result = CliRunner().invoke(
        cli,
        ["translate", "-m", str(export), "--device", "cpu", "--max-length", "20"],
        input="".join(t + "\n" for t in lines),
    )
    assert result.exit_code == 0, result.output
    tokenizer = transformers.MarianTokenizer.from_pretrained(ckpt)
    model = transformers.MarianMTModel.from_pretrained(ckpt).eval()
    with torch.no_grad():  # the model's generation_config: 4 beams, pad banned, forced eos
        out = model.generate(**tokenizer(lines, return_tensors="pt", padding=True), max_length=20)
    expected = tokenizer.batch_decode(out, skip_special_tokens=True)
    assert result.stdout.split("\n")[:-1] == expected
    assert len(set(expected)) >= 4 and all(expected)
    assert "records" in result.stderr


def test_manifest_refuses_a_malformed_unk_remap(marian_lacking, tmp_path):
    from onnxpipe.errors import ExportFolderError
    from onnxpipe.manifest import read_manifest

    _, export = marian_lacking
    for bad in ({"from_id": "9"}, {"from_id": 9, "unk_id": True}, [9, 1], {"from_id": -1, "unk_id": 1}):
        folder = tmp_path / f"e{len(list(tmp_path.iterdir()))}"
        shutil.copytree(export, folder)
        m = json.loads((folder / "onnxpipe.json").read_text())
        m["tokenizer"]["unk_remap"] = bad
        (folder / "onnxpipe.json").write_text(json.dumps(m))
        with pytest.raises(ExportFolderError, match="tokenizer.unk_remap must be"):
            read_manifest(folder)
    assert read_manifest(export)["tokenizer"]["unk_remap"]["from_id"] > 0
