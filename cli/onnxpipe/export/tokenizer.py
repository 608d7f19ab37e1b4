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
from onnxpipe.runtime.model import unk_remapped

# Marian's multilingual target-language codes, e.g. ">>fra<<", are whole tokens in vocab.json.
_LANGUAGE_CODE = re.compile(r"^>>.+<<$")


@dataclass
class FastTokenizers:
    source: Any  # tokenizers.Tokenizer
    target: Any | None = None  # tokenizers.Tokenizer, only where it differs from source
    reference: Any = None  # the transformers tokenizer the fast one must agree with
    slow: Any = None  # its slow (sentencepiece) form where the checkpoint has one: the ids are checked against it
    special_tokens: dict[str, Any] = field(default_factory=dict)
    max_length: int | None = None
    chat_template: str | None = None
    # {"from_id": N, "unk_id": U}: ids >= N are SentencePiece pieces that vocab.json lacks (see marian_side);
    # the graph takes U for them. One per file; None where every piece has an id of its own.
    unk_remap: dict[str, int] | None = None
    target_unk_remap: dict[str, int] | None = None


def load_tokenizers(folder: Path, config: dict[str, Any], trust_remote_code: bool = False) -> FastTokenizers:
    """The transformers tokenizer of FOLDER and its fast (tokenizers) form."""
    if config.get("model_type") == "marian" and not (folder / "tokenizer.json").is_file():
        return _marian(folder, config)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, use_fast=True, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ExportError(f"cannot load the tokenizer of {folder}: {_first_line(exc)}") from None
    unk_remap = None
    if tok.is_fast:
        backend = tok.backend_tokenizer
    elif type(tok).__name__ == "M2M100Tokenizer":  # transformers has no converter for it
        backend, unk_remap = m2m100_tokenizer(tok)
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
    from onnxpipe.export.spm_exact import match_slow, slow_tokenizer

    corrected = match_slow(tok, backend)  # where transformers' fast converter is inexact (ALBERT, ...)
    slow = slow_tokenizer(tok, folder)
    if tok.is_fast and corrected is not backend and not _agree_on_prose(tok, corrected):
        # The checkpoint's own tokenizer.json differs from its .model on ordinary sentences, not only on
        # edge cases (a T5 saved with prepend_scheme "never" adds no U+2581 in front): it is what
        # transformers runs by default, so the export keeps it, and it is the reference.
        corrected, slow = backend, None
    return FastTokenizers(
        source=corrected,
        reference=tok,
        slow=slow,
        special_tokens=_special_ids(tok),
        max_length=_max_length(tok.model_max_length, config),
        chat_template=tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None,
        unk_remap=unk_remap,
    )


def _agree_on_prose(tok: Any, backend: Any) -> bool:
    """Whether BACKEND gives TOK's ids on ordinary sentences (the export's generated validation texts)."""
    from onnxpipe.export.validate import GENERATED_TEXTS

    return all(backend.encode(text).ids == tok(text)["input_ids"] for text in GENERATED_TEXTS)


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
    record: dict[str, Any] = {
        "file": "tokenizer.json",
        "target_file": target_file,
        "max_length": toks.max_length,
        "chat_template": chat_template,
    }
    if toks.unk_remap:  # the runtime maps these ids before they reach the encoder (ExportedModel.graph_ids)
        record["unk_remap"] = toks.unk_remap
    if toks.target_unk_remap:
        record["target_unk_remap"] = toks.target_unk_remap
    return record


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
    # Texts that normalise to almost nothing: converters that strip Unicode whitespace or add their own
    # prefix differ from sentencepiece exactly here.
    "\x85",
    "\u200b",
    "\u2581",
    "\u2581Word",
    "\ufeff\u200e\u200f",
    "  ",
]


def check_tokenizers(toks: FastTokenizers, texts: list[str]) -> dict[str, Any]:
    """The fast tokenizer must give the reference tokenizer's ids on TEXTS and on HOSTILE_TEXTS (and the
    same decoded text on the target side). A difference fails the export in one line that shows the
    first differing position with the pieces of both sides around it."""
    ref = toks.slow if toks.slow is not None else toks.reference
    name = type(ref).__name__
    texts = list(dict.fromkeys(list(texts) + HOSTILE_TEXTS))
    for text in texts:
        # The ids the graph gets: pieces that vocab.json lacks mapped to <unk>, as the runtime maps them.
        fast_ids = unk_remapped(toks.source.encode(text).ids, toks.unk_remap)
        ref_ids = ref(text)["input_ids"]
        if fast_ids != ref_ids:
            raise ExportError(
                f"the converted tokenizer.json disagrees with {name} on {_quote(text)}: "
                + _first_difference(fast_ids, ref_ids, toks.source, ref, name)
            )
    if toks.target is not None:
        for text in texts:
            ref_ids = ref(text_target=text)["input_ids"]
            fast_ids = unk_remapped(toks.target.encode(text).ids, toks.target_unk_remap)
            if fast_ids != ref_ids:
                raise ExportError(
                    f"the converted target_tokenizer.json disagrees with {name} on {_quote(text)}: "
                    + _first_difference(fast_ids, ref_ids, toks.target, ref, name)
                )
            if toks.target.decode(ref_ids) != ref.decode(ref_ids, skip_special_tokens=True):
                raise ExportError(
                    f"the converted target_tokenizer.json decodes {_quote(text)} differently: "
                    f"{toks.target.decode(ref_ids)!r} vs {name}'s {ref.decode(ref_ids, skip_special_tokens=True)!r}"
                )
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


def for_graph(tokenizer, unk_remap: dict[str, int] | None):
    """TOKENIZER whose encodings carry the ids the graph takes (UNK_REMAP applied, as the runtime does), for
    validating the export against PyTorch: an unmapped extra id is past the embedding table of both."""
    return _GraphIds(tokenizer, unk_remap) if unk_remap else tokenizer


class _GraphIds:
    def __init__(self, tokenizer, unk_remap: dict[str, int]):
        self._tokenizer, self._remap = tokenizer, unk_remap

    def encode(self, *args, **kwargs):
        return _GraphEncoding(self._tokenizer.encode(*args, **kwargs), self._remap)

    def encode_batch(self, *args, **kwargs):
        return [_GraphEncoding(e, self._remap) for e in self._tokenizer.encode_batch(*args, **kwargs)]

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


class _GraphEncoding:
    def __init__(self, encoding, unk_remap: dict[str, int]):
        self._encoding, self._remap = encoding, unk_remap

    @property
    def ids(self) -> list[int]:  # read after any truncate() of the encoding
        return unk_remapped(self._encoding.ids, self._remap)

    def __getattr__(self, name: str):
        return getattr(self._encoding, name)


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
            raise ExportError(
                f"{folder / name} is missing: a Marian checkpoint needs source.spm, target.spm and vocab.json"
            )
    try:
        slow = MarianTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise ExportError(f"cannot load the Marian tokenizer of {folder}: {_first_line(exc)}") from None
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    target_vocab_file = folder / "target_vocab.json"
    target_vocab = json.loads(target_vocab_file.read_text(encoding="utf-8")) if target_vocab_file.is_file() else vocab
    source, unk_remap = marian_side(folder / "source.spm", vocab, slow)
    target, target_unk_remap = None, None
    same_spm = (folder / "source.spm").read_bytes() == (folder / "target.spm").read_bytes()
    if not same_spm or target_vocab is not vocab:
        target, target_unk_remap = marian_side(folder / "target.spm", target_vocab, slow)
    return FastTokenizers(
        source=source,
        target=target,
        reference=slow,
        special_tokens=_special_ids(slow),
        max_length=_max_length(slow.model_max_length, config),
        unk_remap=unk_remap,
        target_unk_remap=target_unk_remap,
    )


def m2m100_tokenizer(slow) -> tuple[Any, dict[str, int] | None]:
    """M2M100Tokenizer as a fast tokenizer: like Marian's (spm pieces looked up in vocab.json, <unk>
    for pieces it lacks), then `__src__ ... </s>`, the source-language code from the tokenizer's
    src_lang first. The language codes follow vocab.json's ids, as M2M100Tokenizer numbers them; the
    target side is the same vocabulary (generation forces the target code as the first token).
    Returns the tokenizer and its unk remap (see marian_side)."""
    from tokenizers import processors

    vocab = dict(slow.encoder)
    vocab.update(slow.lang_token_to_id)
    eos, code = slow.eos_token, slow.get_lang_token(slow.src_lang)
    template = processors.TemplateProcessing(
        single=f"{code} $A {eos}", pair=f"{code} $A $B {eos}", special_tokens=[(code, vocab[code]), (eos, vocab[eos])]
    )
    return marian_side(Path(slow.spm_file), vocab, slow, post_processor=template, codes=list(slow.lang_token_to_id))


def marian_side(
    spm_file: Path, vocab: dict[str, int], slow, post_processor=None, codes: list[str] | None = None
) -> tuple[Any, dict[str, int] | None]:
    """One side of a Marian tokenizer as a fast Unigram tokenizer, and the unk remap its ids need.

    The slow MarianTokenizer runs sentencepiece, then looks each piece up in vocab.json (whose ids are
    not the spm's own), maps pieces it lacks to <unk> and appends </s>. Here the Unigram vocabulary is
    laid out by vocab.json id with the spm's scores; vocab.json entries the spm does not have get a score
    far below every real piece, so Viterbi picks them only where the spm itself would emit an unknown piece.

    A Unigram piece's id is its position, so a piece cannot be chosen for its score and still come out
    as <unk>. The spm pieces vocab.json lacks (real opus-mt vocabularies lack some) therefore keep their
    spm scores at extra ids past the vocabulary (segmentation stays sentencepiece's), and the remap
    {"from_id": first extra id, "unk_id": <unk>'s id} turns them into <unk> before the ids reach the
    graph (None when there are none).
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Regex, decoders, processors
    from transformers.convert_slow_tokenizer import SpmConverter

    eos, unk, pad = slow.eos_token, slow.unk_token, slow.pad_token
    size = max(vocab.values()) + 1
    by_id = [f"<onnxpipe_unused_{i}>" for i in range(size)]
    for token, i in vocab.items():
        by_id[i] = token
    sp = spm.SentencePieceProcessor(model_file=str(spm_file))
    lacking = [
        sp.id_to_piece(i)
        for i in range(sp.get_piece_size())
        if not (sp.is_unknown(i) or sp.is_control(i) or sp.is_unused(i)) and sp.id_to_piece(i) not in vocab
    ]
    by_id += lacking
    remap = {"from_id": size, "unk_id": vocab[unk]} if lacking else None

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
    # sentencepiece's own whitespace and charsmap order, not SpmConverter's (which drops a lone \x85 that
    # sentencepiece keeps as an unknown piece): see export/spm_exact.py.
    from onnxpipe.export.spm_exact import sentencepiece_normalization, spm_normalizer_spec

    spec = spm_normalizer_spec(spm_file)
    if spec is not None:
        tokenizer = sentencepiece_normalization(tokenizer, spec)
    # MarianTokenizer.decode joins the spm text and then str.strip()s it, so leading spaces left by a
    # skipped <unk> disappear too: fuse first, then strip the whole string.
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Replace(Regex(r"^\s+|\s+$"), "")]
    )
    specials = [eos, unk, pad] + (codes if codes is not None else sorted(t for t in vocab if _LANGUAGE_CODE.match(t)))
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials if t in vocab])
    return tokenizer, remap
