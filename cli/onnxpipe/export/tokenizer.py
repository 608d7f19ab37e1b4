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
    elif type(tok).__name__ == "M2M100Tokenizer":  # transformers has no converter for it
        backend = m2m100_tokenizer(tok)
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


# Text no training corpus covers, for the equivalence check at export: scripts, digits, whitespace runs
# and tabs, unknown and control characters, combining marks, emoji (ZWJ sequences, flags, skin tones),
# very long words, capitals after spaces, markup.
HOSTILE_TEXTS = [
    "Émile, Zoë and Søren met in Zürich, São Paulo, Kraków and Reykjavík; naïve façade, jalapeño.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "مرحبا بالعالم، هذا نص عربي للتجربة.",
    "שלום עולם, זה טקסט בעברית.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "नमस्ते दुनिया, यह हिंदी पाठ है।",
    "สวัสดีชาวโลก นี่คือข้อความภาษาไทย",
    "Emoji: 😀 👍🏽 👩‍👩‍👧‍👦 🏳️‍🌈 🇩🇪 ❤️ and ✓ ☃ ♞.",
    "Numbers 0 7 42 3.14159 -2,500.75 1e-9 2026-01-31 12:30 +49 (0)30 1234567 ½ ² ٣ ४",
    "Spaces   runs     and\ttabs\t\tbetween  words ,  and trailing   ",
    "   leading spaces, then a line",
    "Control\x00chars\x01here\x7f and \u200b zero width \u200d joiner \ufeff bom \u00ad soft hyphen.",
    "Combining: e\u0301 a\u0308 n\u0303 o\u0302\u0323 Z\u0335\u0321a\u0336\u0322l\u0337\u0328g\u0338o",
    "Unknown: \U0001d54f\U0001d552\U0001d553 \u2603\ufe0f \ue000 \U000f0000 \u0370 \u03a2 ⅯⅯⅩⅩⅥ ﬁ ﬂ Ａ Ｂ",
    "Pneumonoultramicroscopicsilicovolcanoconiosis " + "Donaudampfschifffahrtsgesellschaftskapitän" * 3,
    "x" * 300,
    "MiXeD CaSe WORDS In A ROW: NASA, iPhone, McDonald's, O'Neill, HTTP/2, camelCaseIdentifier",
    " A Capital After A Space, And Another: The Zebra Quickly Ate.",
    "<b>markup</b> &amp; {json: [1, 2]} `code` $HOME ~/path\\file.txt user@example.com https://x.org/?a=1&b=2",
    "Quotes “curly” ‘single’ «guillemets» „low“ — dashes – and … ellipsis",
    "a",
    ".",
]


def check_tokenizers(toks: FastTokenizers, texts: list[str]) -> dict[str, Any]:
    """The fast tokenizer must give the reference tokenizer's ids on TEXTS and on HOSTILE_TEXTS (and the
    same decoded text on the target side). A difference fails the export in one line that shows the
    first differing position with the pieces of both sides around it."""
    ref = toks.reference
    name = type(ref).__name__
    texts = list(dict.fromkeys(list(texts) + HOSTILE_TEXTS))
    for text in texts:
        fast = toks.source.encode(text)
        ref_ids = ref(text)["input_ids"]
        if fast.ids != ref_ids:
            raise ExportError(f"the converted tokenizer.json disagrees with {name} on {_quote(text)}: "
                              + _first_difference(fast.ids, ref_ids, toks.source, ref, name))
    if toks.target is not None:
        for text in texts:
            ref_ids = ref(text_target=text)["input_ids"]
            fast_ids = toks.target.encode(text).ids
            if fast_ids != ref_ids:
                raise ExportError(f"the converted target_tokenizer.json disagrees with {name} on {_quote(text)}: "
                                  + _first_difference(fast_ids, ref_ids, toks.target, ref, name))
            if toks.target.decode(ref_ids) != ref.decode(ref_ids, skip_special_tokens=True):
                raise ExportError(f"the converted target_tokenizer.json decodes {_quote(text)} differently: "
                                  f"{toks.target.decode(ref_ids)!r} vs {name}'s {ref.decode(ref_ids, skip_special_tokens=True)!r}")
    return {"checked_texts": len(texts), "identical": True}


def _quote(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _first_difference(fast_ids: list[int], ref_ids: list[int], fast_tok, ref, name: str, context: int = 3) -> str:
    """'at id 7: fast [..., '▁Zü', 'rich'] vs MarianTokenizer [..., '▁Z', '<unk>', ...]': the first
    position where the two id lists differ, with CONTEXT pieces before and after it on each side."""
    at = next((i for i, (a, b) in enumerate(zip(fast_ids, ref_ids)) if a != b), min(len(fast_ids), len(ref_ids)))

    def window(ids: list[int], piece) -> str:
        start, end = max(0, at - context), min(len(ids), at + context + 1)
        pieces = [f"{piece(i)!r}({i})" for i in ids[start:end]]
        return "[" + ", ".join((["..."] if start else []) + pieces + (["..."] if end < len(ids) else [])) + "]"

    fast_side = window(fast_ids, lambda i: fast_tok.id_to_token(i))
    ref_side = window(ref_ids, lambda i: ref.convert_ids_to_tokens(i))
    return f"at id {at}: fast {fast_side} vs {name} {ref_side} ({len(fast_ids)} vs {len(ref_ids)} ids)"


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


def _require_every_piece(spm_file: Path, vocab: dict[str, int], name: str) -> None:
    """The slow tokenizer segments with the spm's pieces, then maps those vocab.json lacks to <unk>.
    A tokenizers Unigram model picks and numbers pieces from one table, so a piece cannot be chosen
    for its score and still come out as <unk>: such a checkpoint is refused, not exported wrong."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_file))
    missing = [sp.id_to_piece(i) for i in range(sp.get_piece_size())
               if not (sp.is_unknown(i) or sp.is_control(i) or sp.is_unused(i)) and sp.id_to_piece(i) not in vocab]
    if missing:
        shown = ", ".join(repr(p) for p in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ExportError(
            f"{spm_file.name} has {len(missing)} piece(s) that vocab.json lacks ({shown}): {name} segments with them "
            "and then writes <unk>, which a tokenizers.json cannot reproduce exactly",
            hint="add the pieces to vocab.json (and the model's embeddings), or export with a tokenizer.json")


def m2m100_tokenizer(slow) -> Any:
    """M2M100Tokenizer as a fast tokenizer: like Marian's (spm pieces looked up in vocab.json, <unk>
    for pieces it lacks), then `__src__ ... </s>`, the source-language code from the tokenizer's
    src_lang first. The language codes follow vocab.json's ids, as M2M100Tokenizer numbers them; the
    target side is the same vocabulary (generation forces the target code as the first token)."""
    from tokenizers import processors

    vocab = dict(slow.encoder)
    vocab.update(slow.lang_token_to_id)
    eos, code = slow.eos_token, slow.get_lang_token(slow.src_lang)
    template = processors.TemplateProcessing(
        single=f"{code} $A {eos}", pair=f"{code} $A $B {eos}", special_tokens=[(code, vocab[code]), (eos, vocab[eos])]
    )
    return marian_side(Path(slow.spm_file), vocab, slow, post_processor=template, codes=list(slow.lang_token_to_id))


def marian_side(spm_file: Path, vocab: dict[str, int], slow, post_processor=None, codes: list[str] | None = None) -> Any:
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

    _require_every_piece(spm_file, vocab, type(slow).__name__)

    class _Side(SpmConverter):
        def vocab(self, proto):
            scores = {p.piece: p.score for p in proto.pieces if p.type in (1, 4)}  # normal, user-defined
            floor = min(scores.values(), default=0.0) - 1e6
            return [(token, scores.get(token, floor)) for token in by_id]

        def unk_id(self, proto):
            return vocab[unk]

        def post_processor(self):
            return post_processor or processors.TemplateProcessing(
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
    specials = [eos, unk, pad] + (codes if codes is not None else sorted(t for t in vocab if _LANGUAGE_CODE.match(t)))
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials if t in vocab])
    return tokenizer
