"""Corrections to transformers' fast SentencePiece converters, where they differ from the slow tokenizer.

The runtime reads only tokenizer.json, so the fast form must give the slow tokenizer's ids on any
text. transformers' ALBERT converter does not: the slow AlbertTokenizer first joins Python's
`str.split()` pieces with one space (so \\x0b, \\x1c-\\x1f, \\x85 and friends are spaces, and a text of
only spaces is empty), and removes accents with `unicodedata.combining(c) != 0`, where the fast
`StripAccents` removes every nonspacing mark (U+034F, Thaana vowel signs, ... have combining
class 0 and are kept by the slow tokenizer). Here the normalizer is rebuilt in the slow order with
those two steps made exact.
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
    return backend


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
        data["normalizer"] = {"type": "Sequence", "normalizers": [json.loads(_to_json(n)) for n in new]
                              + precompiled + [json.loads(_to_json(n)) for n in rest]}
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
    ranges, start, prev = [], None, None
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
