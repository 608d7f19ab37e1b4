"""Tiny random checkpoints of the SentencePiece families users bring: T5 v1.1/flan-T5, mT5 and a relu T5
with tied embeddings at the scale of real logits, M2M100 with its own spm model and vocab.json, and
Marian whose vocab.json lacks some of its spm pieces (as real opus-mt vocabularies do).

A default tiny T5 (initializer_factor 1) gives logits of about 10. Real T5 v1.1/flan/mT5 checkpoints
reach the hundreds, and there float32 noise alone is above any fixed absolute tolerance: the builders
scale the initialisation so that validation meets the same scale.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiny_models import CORPUS, _save, _torch_seed, train_sentencepiece

_T5 = dict(
    d_model=32,
    d_kv=8,
    d_ff=37,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)

# variant -> (config class, model class, config entries, initializer_factor, eos row scale).
# The factors give max |logits| of a few hundred (untied) and ~30 (tied: T5 rescales by d_model**-0.5);
# the eos scale makes some greedy outputs end early and others run long.
T5_VARIANTS = {
    "t5-v1_1": (
        "T5Config",
        "T5ForConditionalGeneration",
        dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        4.0,
        2.0,
    ),
    "mt5": (
        "MT5Config",
        "MT5ForConditionalGeneration",
        dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        4.0,
        2.0,
    ),
    "t5-relu-tied": (
        "T5Config",
        "T5ForConditionalGeneration",
        dict(feed_forward_proj="relu", tie_word_embeddings=True),
        4.0,
        3.0,
    ),
}


def t5_variant(variant: str, out: Path) -> Path:
    import torch
    import transformers

    config_cls, model_cls, entries, factor, eos_scale = T5_VARIANTS[variant]
    _torch_seed()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spm_file = train_sentencepiece(out, "spiece", vocab_size=250, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    tokenizer = transformers.T5TokenizerFast(vocab_file=str(spm_file), extra_ids=10, from_slow=True)
    tokenizer.model_max_length = 128
    (out / "spiece.vocab").unlink()
    config = getattr(transformers, config_cls)(vocab_size=len(tokenizer), initializer_factor=factor, **_T5, **entries)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        model.get_output_embeddings().weight[config.eos_token_id] *= eos_scale
    return _save(model, tokenizer, out)


# CORPUS and lines with the characters the hostile texts use (accents, CJK, Hangul, Cyrillic, emoji,
# combining marks), so that a SentencePiece model trained on it has pieces for them, which a vocab.json
# can then lack.
WIDE_CORPUS = (
    CORPUS
    + [
        "Zoë et Søren à Kraków et Reykjavík : naïve façade, jalapeño, Zürich, São Paulo.",
        "東京は日本の首都です。北京是中国的首都。東京と北京。",
        "서울은 한국의 수도입니다. 서울과 한국.",
        "Съешь же ещё этих булок, да выпей чаю.",
        "Emoji 😀 and 👍🏽 and ❤️ and ✓ ☃ in a line; 😀 again.",
        "Combining marks: Z\u0335\u0321a\u0336\u0322l\u0337\u0328g\u0338o and n\u0303.",
    ]
    * 4
)
# Not "o\u0302\u0323" (as in HOSTILE_TEXTS): tokenizers' Precompiled normalizer drops the U+0323 that
# sentencepiece keeps (huggingface/tokenizers#2116), which the export's check then refuses; with no
# "ô" or U+0323 piece both sides give <unk> there.


def train_spm(out: Path, name: str, vocab_size: int, corpus: list[str] = CORPUS, **kw) -> Path:
    """NAME.spm, a unigram SentencePiece model trained on CORPUS (no bos/eos/pad pieces, <unk> first)."""
    import sentencepiece as spm

    prefix = out / name
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="unigram",
        hard_vocab_limit=False,
        character_coverage=1.0,
        minloglevel=2,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        **kw,
    )
    (out / f"{name}.vocab").unlink()
    return prefix.with_suffix(".model").rename(out / f"{name}.spm")


def vocab_of(spm_files: list[Path], first: dict[str, int], drop_every: int = 0) -> tuple[dict[str, int], list[str]]:
    """A vocab.json that starts with FIRST and then holds the pieces of SPM_FILES in spm order, and the
    pieces it leaves out: with DROP_EVERY, every DROP_EVERY-th multi-character piece and every other piece
    with a non-ASCII character (as a real vocabulary lacks pieces its training data never produced)."""
    import sentencepiece as spm

    vocab, dropped = dict(first), []
    multi = foreign = 0
    for spm_file in spm_files:
        sp = spm.SentencePieceProcessor(model_file=str(spm_file))
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_unknown(i) or sp.is_control(i) or piece in vocab or piece in dropped:
                continue
            if drop_every:
                text = piece.lstrip("\u2581")
                if not text.isascii():
                    foreign += 1
                    if foreign % 2:
                        dropped.append(piece)
                        continue
                elif len(text) > 1:
                    multi += 1
                    if multi % drop_every == 0:
                        dropped.append(piece)
                        continue
            vocab[piece] = len(vocab)
    return vocab, dropped


def spm_vocab(
    out: Path, name: str, vocab_size: int, first: dict[str, int], drop_every: int = 0, corpus: list[str] = CORPUS
) -> tuple[Path, dict[str, int]]:
    """NAME.spm trained on CORPUS and a vocab.json of its pieces (see vocab_of)."""
    spm_file = train_spm(out, name, vocab_size, corpus)
    return spm_file, vocab_of([spm_file], first, drop_every)[0]


def m2m100(out: Path, drop_every: int = 0) -> Path:
    """M2M100 (facebook/m2m100_418M layout): sentencepiece.bpe.model + vocab.json in fairseq order
    (<s> 0, <pad> 1, </s> 2, <unk> 3), the `__en__` language codes after the vocabulary; slow-only.
    With DROP_EVERY, the spm is trained on WIDE_CORPUS and vocab.json lacks some of its pieces."""
    import transformers

    _torch_seed()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus, size = (WIDE_CORPUS, 320) if drop_every else (CORPUS, 220)
    spm_file, vocab = spm_vocab(out, "spm", size, {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}, drop_every, corpus)
    spm_file = spm_file.rename(out / "sentencepiece.bpe.model")
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tokenizer = transformers.M2M100Tokenizer(
        vocab_file=str(out / "vocab.json"), spm_file=str(spm_file), src_lang="en", tgt_lang="de", model_max_length=128
    )
    config = transformers.M2M100Config(
        vocab_size=max(tokenizer.lang_token_to_id.values()) + 1 + 8,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_position_embeddings=128,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        scale_embedding=True,
    )
    model = transformers.M2M100ForConditionalGeneration(config)
    return _save(model, tokenizer, out)


def marian(out: Path, drop_every: int = 5) -> Path:
    """A Marian checkpoint as Helsinki-NLP ships it (source.spm, target.spm, one vocab.json of both), the
    spms trained on WIDE_CORPUS and vocab.json lacking some of their pieces, as real opus-mt ones do."""
    import transformers

    _torch_seed()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src = train_spm(out, "source", 260, WIDE_CORPUS)
    tgt = train_spm(out, "target", 300, WIDE_CORPUS)
    vocab, _ = vocab_of([src, tgt], {"</s>": 0, "<unk>": 1}, drop_every)
    vocab["<pad>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
    tokenizer = transformers.MarianTokenizer(
        source_spm=str(src),
        target_spm=str(tgt),
        vocab=str(out / "vocab.json"),
        source_lang="en",
        target_lang="de",
        model_max_length=128,
    )
    pad = vocab["<pad>"]
    config = transformers.MarianConfig(
        vocab_size=len(vocab),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_position_embeddings=128,
        pad_token_id=pad,
        eos_token_id=0,
        decoder_start_token_id=pad,
        forced_eos_token_id=0,
        bad_words_ids=[[pad]],
        num_beams=4,
        max_length=64,
    )
    model = transformers.MarianMTModel(config)
    model.generation_config = transformers.GenerationConfig.from_model_config(config)
    return _save(model, tokenizer, out)
