"""The export's fast tokenizer: `tokenizer.json` always, `target_tokenizer.json` where the target side differs.

The runtime reads only these files with the `tokenizers` library, so a checkpoint that ships
slow sentencepiece files (Marian: source.spm + target.spm + vocab.json) is converted here and the
conversion is checked for identical ids against the slow tokenizer before the export is kept.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxpipe.errors import ExportError

# Marian's multilingual target-language codes, e.g. ">>fra<<", are whole tokens in vocab.json.
_LANGUAGE_CODE = re.compile(r"^>>.+<<$")


@dataclass
class FastTokenizers:
    source: Any  # tokenizers.Tokenizer
    target: Any | None = None  # tokenizers.Tokenizer, only where it differs from source
    reference: Any = None  # the transformers tokenizer the fast one must agree with
    special_tokens: dict[str, Any] = field(default_factory=dict)
    max_length: int | None = None
    chat_template: str | None = None


def load_tokenizers(folder: Path, config: dict[str, Any], trust_remote_code: bool = False) -> FastTokenizers:
    """The transformers tokenizer of FOLDER and its fast (tokenizers) form."""
    if config.get("model_type") == "marian" and not (folder / "tokenizer.json").is_file():
        return _marian(folder, config)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, use_fast=True, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ExportError(f"cannot load the tokenizer of {folder}: {_first_line(exc)}") from None
    if tok.is_fast:
        backend = tok.backend_tokenizer
    else:
        from transformers.convert_slow_tokenizer import convert_slow_tokenizer

        try:
            backend = convert_slow_tokenizer(tok)
        except Exception as exc:
            raise ExportError(
                f"{type(tok).__name__} has no fast form and cannot be converted: {_first_line(exc)}"
            ) from None
    # A copy without the padding/truncation a checkpoint may have saved (all-MiniLM pads to 128):
    # the runtime pads per batch and counts what it truncates.
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(backend.to_str())
    backend.no_padding()
    backend.no_truncation()
    from onnxpipe.export.spm_exact import match_slow

    backend = match_slow(tok, backend)  # where transformers' fast converter is inexact (ALBERT)
    return FastTokenizers(
        source=backend,
        reference=tok,
        special_tokens=_special_ids(tok),
        max_length=_max_length(tok.model_max_length, config),
        chat_template=tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None,
    )


def save_tokenizers(toks: FastTokenizers, out: Path) -> dict[str, Any]:
    """Write the tokenizer files and return the manifest's `tokenizer` record."""
    if toks.reference is not None:
        toks.reference.save_pretrained(out)  # tokenizer_config.json etc., for other tools reading the folder
    toks.source.save(str(out / "tokenizer.json"))
    target_file = None
    if toks.target is not None:
        target_file = "target_tokenizer.json"
        toks.target.save(str(out / target_file))
    chat_template = None
    if toks.chat_template:
        chat_template = "chat_template.jinja"
        (out / chat_template).write_text(toks.chat_template, encoding="utf-8")
    return {
        "file": "tokenizer.json",
        "target_file": target_file,
        "max_length": toks.max_length,
        "chat_template": chat_template,
    }


def check_tokenizers(toks: FastTokenizers, texts: list[str]) -> dict[str, Any]:
    """The fast tokenizer must give the reference tokenizer's ids (and decoded text for the target side)."""
    ref = toks.reference
    for text in texts:
        fast_ids = toks.source.encode(text).ids
        ref_ids = ref(text)["input_ids"]
        if fast_ids != ref_ids:
            raise ExportError(
                f"the converted tokenizer.json disagrees with {type(ref).__name__} on {text[:60]!r}: "
                f"{fast_ids[:12]} vs {ref_ids[:12]}"
            )
    if toks.target is not None:
        for text in texts:
            ref_ids = ref(text_target=text)["input_ids"]
            fast_ids = toks.target.encode(text).ids
            if fast_ids != ref_ids:
                raise ExportError(f"the converted target_tokenizer.json disagrees with {type(ref).__name__} on {text[:60]!r}")
            if toks.target.decode(ref_ids) != ref.decode(ref_ids, skip_special_tokens=True):
                raise ExportError(f"the converted target_tokenizer.json decodes {text[:60]!r} differently")
    return {"checked_texts": len(texts), "identical": True}


def _special_ids(tok) -> dict[str, Any]:
    return {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "mask_token_id": tok.mask_token_id,
        "unk_token_id": tok.unk_token_id,
        "sep_token_id": tok.sep_token_id,
        "cls_token_id": tok.cls_token_id,
    }


def _max_length(model_max_length: int | None, config: dict[str, Any]) -> int | None:
    if model_max_length and model_max_length < 1 << 30:  # transformers' "no limit" is 1e30
        return int(model_max_length)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(config.get(key), int):
            # RoBERTa-style position ids start after the padding index.
            offset = 2 if config.get("model_type") in ("roberta", "xlm-roberta", "camembert") else 0
            return config[key] - offset
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- Marian -----------------------------------------------------------------------------

def _marian(folder: Path, config: dict[str, Any]) -> FastTokenizers:
    from transformers import MarianTokenizer

    for name in ("source.spm", "target.spm", "vocab.json"):
        if not (folder / name).is_file():
            raise ExportError(f"{folder / name} is missing: a Marian checkpoint needs source.spm, target.spm and vocab.json")
    try:
        slow = MarianTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise ExportError(f"cannot load the Marian tokenizer of {folder}: {_first_line(exc)}") from None
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    target_vocab_file = folder / "target_vocab.json"
    target_vocab = json.loads(target_vocab_file.read_text(encoding="utf-8")) if target_vocab_file.is_file() else vocab
    source = marian_side(folder / "source.spm", vocab, slow)
    target = None
    same_spm = (folder / "source.spm").read_bytes() == (folder / "target.spm").read_bytes()
    if not same_spm or target_vocab is not vocab:
        target = marian_side(folder / "target.spm", target_vocab, slow)
    return FastTokenizers(
        source=source,
        target=target,
        reference=slow,
        special_tokens=_special_ids(slow),
        max_length=_max_length(slow.model_max_length, config),
    )


def marian_side(spm_file: Path, vocab: dict[str, int], slow) -> Any:
    """One side of a Marian tokenizer as a fast Unigram tokenizer that emits vocab.json ids.

    The slow MarianTokenizer runs sentencepiece, then looks each piece up in vocab.json (whose ids are
    not the spm's own), maps pieces it lacks to <unk> and appends </s>. Here the Unigram vocabulary is
    laid out by vocab.json id with the spm's scores; pieces the spm does not have get a score far
    below every real piece, so Viterbi picks them only where the spm itself would emit an unknown piece.
    """
    from tokenizers import AddedToken, Regex, decoders, processors
    from transformers.convert_slow_tokenizer import SpmConverter

    eos, unk, pad = slow.eos_token, slow.unk_token, slow.pad_token
    size = max(vocab.values()) + 1
    by_id = [f"<onnxpipe_unused_{i}>" for i in range(size)]
    for token, i in vocab.items():
        by_id[i] = token

    class _Side(SpmConverter):
        def vocab(self, proto):
            scores = {p.piece: p.score for p in proto.pieces if p.type in (1, 4)}  # normal, user-defined
            floor = min(scores.values(), default=0.0) - 1e6
            return [(token, scores.get(token, floor)) for token in by_id]

        def unk_id(self, proto):
            return vocab[unk]

        def post_processor(self):
            return processors.TemplateProcessing(
                single=f"$A {eos}", pair=f"$A $B {eos}", special_tokens=[(eos, vocab[eos])]
            )

    class _Original:  # what SpmConverter reads from a slow tokenizer
        vocab_file = str(spm_file)
        legacy = True
        add_prefix_space = True

    tokenizer = _Side(_Original()).converted()
    # MarianTokenizer.decode joins the spm text and then str.strip()s it, so leading spaces left by a
    # skipped <unk> disappear too: fuse first, then strip the whole string.
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Replace(Regex(r"^\s+|\s+$"), "")]
    )
    specials = [eos, unk, pad] + sorted(t for t in vocab if _LANGUAGE_CODE.match(t))
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials if t in vocab])
    return tokenizer
