"""Tiny random multilingual encoder-decoders (mBART, mBART-50, NLLB/M2M100), built like tiny_models,
and "sharpened" copies of any tiny encoder-decoder for generation parity tests.

The sentencepiece models are trained here on tiny_models.CORPUS; the language codes are the real
ones of each tokenizer (transformers adds them), so the runtime reads them from the exported files.

A freshly initialised tiny model (std 0.02) gives nearly the same logits whatever its input: every
line decodes to the same ids, and eos comes at once or never. `sharpen` redraws the weight matrices
wider and scales the output row of eos, so outputs depend on the input and end at different steps:
a parity test then covers rows that finish early, rows that run to the limit, and both at once.
"""

from __future__ import annotations

from pathlib import Path

from tiny_models import _save, _torch_seed, train_sentencepiece

_COMMON = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=37,
    decoder_ffn_dim=37,
    max_position_embeddings=128,
)


def _spm(out: Path) -> Path:
    # fairseq layout (unk 0, bos 1, eos 2): what MBart/NLLB tokenizers expect under their id offset.
    model = train_sentencepiece(out, "spm", vocab_size=200, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    (out / "spm.vocab").unlink()
    return model


def _mbart(out: Path, fifty: bool = False) -> Path:
    """mbart-large-cc25 style (src code after </s>), or mBART-50 style (src code first)."""
    import transformers

    _torch_seed()
    out.mkdir(parents=True, exist_ok=True)
    spm_file = _spm(out)
    cls = transformers.MBart50TokenizerFast if fifty else transformers.MBartTokenizerFast
    tokenizer = cls(vocab_file=str(spm_file), src_lang="en_XX", tgt_lang="de_DE", from_slow=True)
    tokenizer.model_max_length = 128
    config = transformers.MBartConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
        **_COMMON,
    )
    model = transformers.MBartForConditionalGeneration(config)
    return _save(model, tokenizer, out)


def _nllb(out: Path) -> Path:
    """NLLB: an M2M100 model with `eng_Latn`-style codes, src code first, target code forced as BOS."""
    import transformers

    _torch_seed()
    out.mkdir(parents=True, exist_ok=True)
    spm_file = _spm(out)
    tokenizer = transformers.NllbTokenizerFast(
        vocab_file=str(spm_file), src_lang="eng_Latn", tgt_lang="deu_Latn", from_slow=True
    )
    tokenizer.model_max_length = 128
    config = transformers.M2M100Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        scale_embedding=True,
        **_COMMON,
    )
    model = transformers.M2M100ForConditionalGeneration(config)
    return _save(model, tokenizer, out)


def _marian_multi(out: Path) -> Path:
    """A multi-target Marian (opus-mt-en-ROMANCE style): `>>fra<<`-style tokens in vocab.json, put
    at the start of the source text to pick the target language."""
    import json

    import sentencepiece as spm
    import transformers

    _torch_seed()
    out.mkdir(parents=True, exist_ok=True)
    for name, size in (("source", 150), ("target", 180)):
        model = train_sentencepiece(out, name, vocab_size=size, unk_id=1, eos_id=0, bos_id=-1, pad_id=-1)
        model.rename(out / f"{name}.spm")
        (out / f"{name}.vocab").unlink()
    vocab: dict[str, int] = {"</s>": 0, "<unk>": 1, ">>fra<<": 2, ">>spa<<": 3, ">>ita<<": 4}
    for name in ("source.spm", "target.spm"):
        sp = spm.SentencePieceProcessor(model_file=str(out / name))
        for i in range(sp.get_piece_size()):
            vocab.setdefault(sp.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
    tokenizer = transformers.MarianTokenizer(
        source_spm=str(out / "source.spm"),
        target_spm=str(out / "target.spm"),
        vocab=str(out / "vocab.json"),
        model_max_length=128,
    )
    pad = vocab["<pad>"]
    config = transformers.MarianConfig(
        vocab_size=len(vocab),
        pad_token_id=pad,
        eos_token_id=0,
        decoder_start_token_id=pad,
        forced_eos_token_id=0,
        bad_words_ids=[[pad]],
        num_beams=4,
        max_length=64,
        **_COMMON,
    )
    model = transformers.MarianMTModel(config)
    model.generation_config = transformers.GenerationConfig.from_model_config(config)
    return _save(model, tokenizer, out)


def _pegasus(out: Path) -> Path:
    """Pegasus as google/pegasus-* ships it: a slow PegasusTokenizer (spiece.model; ids offset by 103 for
    <pad>, </s>, <mask_1>, <mask_2>, <unk_2>..<unk_102>), sinusoidal positions, scaled embeddings, and a
    generation config with beams, no_repeat_ngram_size, a banned word and forced eos."""
    import transformers

    _torch_seed()
    out.mkdir(parents=True, exist_ok=True)
    spm_file = train_sentencepiece(out, "spiece", vocab_size=200, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    (out / "spiece.vocab").unlink()
    tokenizer = transformers.PegasusTokenizer(vocab_file=str(spm_file), model_max_length=128)
    config = transformers.PegasusConfig(
        vocab_size=len(tokenizer),
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        forced_eos_token_id=1,
        scale_embedding=True,
        **_COMMON,
    )
    model = transformers.PegasusForConditionalGeneration(config)
    model.generation_config = transformers.GenerationConfig(
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        forced_eos_token_id=1,
        num_beams=4,
        length_penalty=0.8,
        max_length=40,
        no_repeat_ngram_size=3,
        bad_words_ids=[[tokenizer.unk_token_id]],
    )
    _save(model, tokenizer, out)
    (out / "tokenizer.json").unlink(missing_ok=True)  # slow only, as the hub's google/pegasus-* folders
    return out


# eos output-row scale per architecture, found by generating for 16 lines of CORPUS with greedy search:
# a few end within 2-10 tokens, some later, the rest run to 30 tokens.
EOS_SCALE = {
    "t5": 2.0,
    "marian": 1.2,
    "marian_multi": 1.2,
    "bart": -3.0,
    "mbart": 3.0,
    "nllb": 12.0,
    "mbart50": 6.0,
    "pegasus": -1.4,
}
KEEP_POSITIONS = {"pegasus"}  # its sinusoidal table is what the family test is about


def sharpen(
    source: Path, out: Path, eos_scale: float, std: float = 0.3, seed: int = 1, keep_positions: bool = False
) -> Path:
    """A copy of the checkpoint SOURCE with weight matrices redrawn from N(0, std) and eos's row scaled
    (KEEP_POSITIONS: not the position tables, so sinusoidal ones stay sinusoidal)."""
    import shutil

    import torch
    import transformers

    out = Path(out)
    shutil.copytree(source, out)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(source)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and not (keep_positions and "embed_positions" in name):
                param.normal_(0.0, std)
        eos = model.generation_config.eos_token_id
        model.get_output_embeddings().weight[eos] *= eos_scale
    model.save_pretrained(out, safe_serialization=True)
    return out


BUILDERS = {
    "marian_multi": _marian_multi,
    "mbart": _mbart,
    "mbart50": lambda out: _mbart(out, fifty=True),
    "nllb": _nllb,
    "pegasus": _pegasus,
}


def build(arch: str, out: Path) -> Path:
    return BUILDERS[arch](Path(out))


_EXPORTS: dict[str, tuple[Path, Path]] = {}


def sharpened_export(arch: str, root: Path, base_checkpoint) -> tuple[Path, Path]:
    """(checkpoint, export) of the sharpened ARCH, built once per test process under ROOT.

    `base_checkpoint(arch)` gives tiny_models' checkpoints (the conftest `checkpoint` fixture); the
    multilingual ones are built here.
    """
    if arch not in _EXPORTS:
        from onnxpipe.export import export_model

        root = Path(root) / f"s2s-{arch}"
        base = build(arch, root / "base") if arch in BUILDERS else base_checkpoint(arch)
        ckpt = sharpen(base, root / "ckpt", EOS_SCALE[arch], keep_positions=arch in KEEP_POSITIONS)
        export_model(ckpt, root / "export")
        _EXPORTS[arch] = (ckpt, root / "export")
    return _EXPORTS[arch]
