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

from tiny_models import _save, _torch_seed, train_sentencepiece

_T5 = dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
           decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)

# variant -> (config class, model class, config entries, initializer_factor, eos row scale).
# The factors give max |logits| of a few hundred (untied) and ~30 (tied: T5 rescales by d_model**-0.5);
# the eos scale makes some greedy outputs end early and others run long.
T5_VARIANTS = {
    "t5-v1_1": ("T5Config", "T5ForConditionalGeneration", dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False), 4.0, 2.0),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False), 4.0, 2.0),
    "t5-relu-tied": ("T5Config", "T5ForConditionalGeneration", dict(feed_forward_proj="relu", tie_word_embeddings=True), 4.0, 3.0),
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


def spm_vocab(out: Path, name: str, vocab_size: int, first: dict[str, int], drop_every: int = 0) -> tuple[Path, dict[str, int]]:
    """Train NAME.spm on CORPUS and a vocab.json that starts with FIRST, then holds the spm's pieces in
    spm order; every DROP_EVERY-th multi-character piece is left out (as a real vocabulary lacks
    pieces its training data never produced)."""
    import sentencepiece as spm

    model = train_sentencepiece(out, name, vocab_size=vocab_size, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1)
    spm_file = model.rename(out / f"{name}.spm")
    (out / f"{name}.vocab").unlink()
    vocab = dict(first)
    sp = spm.SentencePieceProcessor(model_file=str(spm_file))
    dropped = 0
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_unknown(i) or sp.is_control(i) or piece in vocab:
            continue
        if drop_every and len(piece.lstrip("\u2581")) > 1:
            dropped += 1
            if dropped % drop_every == 0:
                continue
        vocab[piece] = len(vocab)
    return spm_file, vocab


def m2m100(out: Path) -> Path:
    """M2M100 (facebook/m2m100_418M layout): sentencepiece.bpe.model + vocab.json in fairseq order
    (<s> 0, <pad> 1, </s> 2, <unk> 3), the `__en__` language codes after the vocabulary; slow-only."""
    import transformers

    _torch_seed()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spm_file, vocab = spm_vocab(out, "spm", 220, {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3})
    spm_file = spm_file.rename(out / "sentencepiece.bpe.model")
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tokenizer = transformers.M2M100Tokenizer(vocab_file=str(out / "vocab.json"), spm_file=str(spm_file),
                                             src_lang="en", tgt_lang="de", model_max_length=128)
    config = transformers.M2M100Config(
        vocab_size=max(tokenizer.lang_token_to_id.values()) + 1 + 8, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=128,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, scale_embedding=True,
    )
    model = transformers.M2M100ForConditionalGeneration(config)
    return _save(model, tokenizer, out)
