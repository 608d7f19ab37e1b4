"""Corrections to transformers' fast SentencePiece converters, where they differ from the slow tokenizer.

The runtime reads only tokenizer.json, so the fast form must give the slow tokenizer's ids on any
text. transformers' ALBERT converter does not: the slow AlbertTokenizer first joins Python's
`str.split()` pieces with one space (so \\x0b, \\x1c-\\x1f, \\x85 and friends are spaces, and a text of
only spaces is empty), and removes accents with `unicodedata.combining(c) != 0`, where the fast
`StripAccents` removes every nonspacing mark (U+034F, Thaana vowel signs, ... have combining
class 0 and are kept by the slow tokenizer). Here the normalizer is rebuilt in the slow order with
those two steps made exact.

The other SentencePiece families (XLM-RoBERTa, CamemBERT, DeBERTa-v2/v3, mBART, NLLB, Pegasus, T5 in
its legacy mode, BigBird) run `sp_model.encode` on the text and nothing else. sentencepiece normalizes
with the charsmap, then drops leading spaces, collapses runs of spaces, writes each space as U+2581,
adds U+2581 in front and removes every trailing U+2581, the literal ones included. The converters
approximate that with `Strip` (which strips all Unicode whitespace, so a lone \\x85 vanishes where
sentencepiece keeps it as an unknown piece) and with Metaspace's prepend (which skips a text that
already starts with U+2581 and keeps a text that the charsmap emptied, such as a lone U+200B, as
one U+2581). `sentencepiece_normalization` rebuilds those steps on U+0020 and U+2581 only.

What stays inexact is `tokenizers`' Precompiled itself: it maps a whole grapheme cluster of fewer than
6 bytes by its shortest charsmap key, where sentencepiece takes the longest key and goes on after it
(so 'a' + U+0303 + U+0303 loses its second tilde, and a compatibility letter with a mark such as
'ª' + U+0301 loses the mark). No `tokenizers` normalizer does a longest-match over the charsmap's
~225,000 keys; those texts are caught by the export's check against the slow tokenizer.
"""

from __future__ import annotations

import json
import sys
import unicodedata
from functools import lru_cache
from typing import Any

# Python's str.split() whitespace (str.isspace), as a regex character class.
_PY_SPACE = "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())


def match_slow(tok: Any, backend: Any) -> Any:
    """BACKEND (a tokenizers.Tokenizer converted from TOK) corrected where its family's converter is inexact."""
    if type(tok).__name__ in ("AlbertTokenizerFast", "AlbertTokenizer"):
        return _albert(tok, backend)
    spec = _plain_spm_spec(tok)
    if spec is not None:
        return sentencepiece_normalization(backend, spec)
    return backend


# Slow tokenizers whose _tokenize is `self.sp_model.encode(text, out_type=str)` and nothing more.
_PLAIN_SPM = (
    "XLMRobertaTokenizer",
    "CamembertTokenizer",
    "DebertaV2Tokenizer",
    "MBartTokenizer",
    "MBart50Tokenizer",
    "NllbTokenizer",
    "PegasusTokenizer",
    "T5Tokenizer",
    "BigBirdTokenizer",
)


def slow_tokenizer(tok: Any, folder: Any) -> Any:
    """The slow form of TOK, for the export's id check, where TOK is a fast SentencePiece tokenizer whose
    checkpoint ships the .model file too: the fast form is a conversion of it, and only the slow one
    shows what the model was trained with. None where there is none (a fast-only checkpoint)."""
    name = type(tok).__name__
    if not getattr(tok, "is_fast", False) or name.removesuffix("Fast") not in _PLAIN_SPM + ("AlbertTokenizer",):
        return None
    if not getattr(tok, "vocab_file", None):
        return None
    import transformers

    try:
        return getattr(transformers, name.removesuffix("Fast")).from_pretrained(folder)
    except Exception:  # a broken or missing .model file: the fast tokenizer stays the reference
        return None


def _plain_spm_spec(tok: Any) -> Any:
    """The normalizer spec of TOK's sentencepiece model, where TOK's slow form only runs sentencepiece."""
    name = type(tok).__name__.removesuffix("Fast")
    if name not in _PLAIN_SPM:
        return None
    if name == "T5Tokenizer" and getattr(tok, "legacy", True) is False:
        return None  # legacy=False prepends and strips an <unk> around sentencepiece: not this pipeline
    if name == "DebertaV2Tokenizer" and (getattr(tok, "do_lower_case", False) or getattr(tok, "split_by_punct", False)):
        return None
    vocab_file = getattr(tok, "vocab_file", None)
    if not vocab_file:
        return None
    return spm_normalizer_spec(vocab_file)


def spm_normalizer_spec(model_file: Any) -> Any:
    """The normalizer spec of the sentencepiece model in MODEL_FILE, where this pipeline can follow it
    (None for a model that puts whitespace after pieces or does not escape it)."""
    try:
        from sentencepiece import sentencepiece_model_pb2

        # protobuf's generated module makes its classes at import time: no attribute a checker can see
        proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
        with open(model_file, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception:
        return None
    spec = proto.normalizer_spec
    if proto.trainer_spec.treat_whitespace_as_suffix or not spec.escape_whitespaces:
        return None
    return spec


def sentencepiece_normalization(backend: Any, spec: Any) -> Any:
    """BACKEND with sentencepiece's own normalization (charsmap, spaces, dummy prefix) and a Metaspace
    pre-tokenizer that only splits before each U+2581."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers

    data = json.loads(backend.to_str())
    if (data.get("model") or {}).get("type") != "Unigram":
        return backend
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex("^ +"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    steps.append(normalizers.Replace(" ", "\u2581"))
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("\u2581"))
    if spec.remove_extra_whitespaces:
        steps.append(normalizers.Replace(Regex("\u2581+$"), ""))
    fixed = Tokenizer.from_str(backend.to_str())
    fixed.normalizer = normalizers.Sequence(steps)
    fixed.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    return fixed


def _albert(tok: Any, backend: Any) -> Any:
    from tokenizers import Regex, Tokenizer, normalizers

    data = json.loads(backend.to_str())
    steps = (data.get("normalizer") or {}).get("normalizers") or []
    precompiled = [s for s in steps if s.get("type") == "Precompiled"]
    new = []
    if getattr(tok, "remove_space", True):
        new.append(normalizers.Replace(Regex(f"[{_escape(_PY_SPACE)}]+"), " "))
        new.append(normalizers.Strip())
    new += [normalizers.Replace("``", '"'), normalizers.Replace("''", '"')]
    if not getattr(tok, "keep_accents", False):
        new += [normalizers.NFKD(), normalizers.Replace(Regex(f"[{_combining_class()}]"), "")]
    if getattr(tok, "do_lower_case", True):
        new.append(normalizers.Lowercase())
    fixed = Tokenizer.from_str(backend.to_str())
    rest = [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()]
    if precompiled:
        # The Precompiled step cannot be built from Python: keep the converter's normalizer for it by
        # round-tripping through JSON.
        data["normalizer"] = {
            "type": "Sequence",
            "normalizers": [json.loads(_to_json(n)) for n in new]
            + precompiled
            + [json.loads(_to_json(n)) for n in rest],
        }
        return Tokenizer.from_str(json.dumps(data))
    fixed.normalizer = normalizers.Sequence(new + rest)
    return fixed


def _to_json(normalizer: Any) -> str:
    from tokenizers import Tokenizer, models

    holder = Tokenizer(models.WordLevel({"a": 0}, unk_token="a"))
    holder.normalizer = normalizer
    return json.dumps(json.loads(holder.to_str())["normalizer"])


@lru_cache(maxsize=1)
def _combining_class() -> str:
    """unicodedata.combining(c) != 0, as regex ranges (what the slow tokenizer strips after NFKD)."""
    ranges: list[tuple[int, int]] = []
    start: int | None = None
    prev = 0  # read only once start is set
    for c in range(sys.maxunicode + 1):
        if 0xD800 <= c < 0xE000 or not unicodedata.combining(chr(c)):
            continue
        if start is None:
            start = prev = c
        elif c == prev + 1:
            prev = c
        else:
            ranges.append((start, prev))
            start = prev = c
    if start is not None:
        ranges.append((start, prev))
    return "".join(_escape(chr(a)) + (f"-{_escape(chr(b))}" if b > a else "") for a, b in ranges)


def _escape(chars: str) -> str:
    return "".join(f"\\x{{{ord(c):x}}}" for c in chars)
