"""Encoder-decoder generation (translate, summarize), the text side: languages, prefixes, defaults, results.

The encoder and merged decoder are driven by runtime.seq2seq (`Seq2SeqRunner`: the sessions, IO
binding, the key/value caches, the first and later decoder steps); the search is `onnxpipe.decoding`.
Languages, prefixes and generation defaults are read from the export's files (generation_config.json,
config.json, tokenizer_config.json, tokenizer.json), as transformers' tokenizers and pipelines use
them: see `Languages` and `task_defaults`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from onnxpipe.decoding import DEFAULT_MAX_NEW_TOKENS, GenerationConfig, Hypothesis
from onnxpipe.errors import UsageError
from onnxpipe.registry import FAMILIES
from onnxpipe.runtime.seq2seq import Seq2SeqRunner
from onnxpipe.stream.records import Item, Record
from onnxpipe.tasks.encoder import CHARS_PER_TOKEN_CAP

# Decoders with relative positions: no table to run out of, so onnxpipe states a bound of its own, the
# model's input limit (T5: 512, its pre-training length), as absolute models stop at their table
# (BART 1024, Marian 512): each decoder token keeps its keys/values in every layer for the rest of the run.
_RELATIVE_POSITIONS = {"t5", "mt5", "longt5", "umt5"}


# --- languages and defaults ------------------------------------------------------------------

_CODE_PATTERNS = (
    re.compile(r"^[a-z]{2,3}_[A-Z][A-Za-z]{1,3}$"),  # mBART en_XX, NLLB eng_Latn
    re.compile(r"^__[A-Za-z_-]+__$"),  # M2M100 __en__
    re.compile(r"^>>[^<>]+<<$"),  # Marian multilingual targets >>fra<<
)


class Languages:
    """The language codes of a multilingual export, and how the model takes them.

    Transformers' tokenizers put the source code where the model was trained to see it (mBART: after
    `</s>`; mBART-50, M2M100, NLLB: first) through the tokenizer.json post-processor, so a source
    language is set by swapping the code in that template. The target language is the forced first
    generated token (`forced_bos_token_id`), as transformers' translation pipeline sets it; Marian's
    multi-target models take a `>>xxx<<` token at the start of the source text instead.
    """

    def __init__(self, tokenizer, tokenizer_config: dict[str, Any]):
        self.tokenizer = tokenizer
        declared = tokenizer_config.get("additional_special_tokens") or []
        names = [t.get("content") if isinstance(t, dict) else t for t in declared]
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        codes = [t for t in names if isinstance(t, str) and t in vocab and _is_code(t)]
        if not codes:  # only special (added) tokens: a plain vocabulary may hold code-like pieces
            codes = sorted(
                t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special and _is_code(t.content)
            )
        self.codes: list[str] = codes
        self.marian = bool(codes) and codes[0].startswith(">>")
        self.source = self._template_code() if codes and not self.marian else None  # parses tokenizer.json

    def __bool__(self) -> bool:
        return bool(self.codes)

    def resolve(self, code: str, which: str) -> str:
        """A user's code -> the token: 'de' also finds '__de__' (M2M100) and '>>de<<' (Marian)."""
        for candidate in (code, f"__{code}__", f">>{code}<<"):
            if candidate in self.codes:
                return candidate
        if not self.codes:
            raise UsageError(f"--{which}-lang: this model has no language codes", hint="drop the option")
        # 'fr' for mBART's fr_XX, 'deu' for NLLB's deu_Latn (or the code in other case): taken when only one fits
        for same in (
            [c for c in self.codes if c.lower() == code.lower()],
            [c for c in self.codes if c.split("_")[0].lower() == code.lower()],
        ):
            if len(same) == 1:
                return same[0]
        import difflib

        close = same or difflib.get_close_matches(code, self.codes, n=3, cutoff=0.5)
        raise UsageError(
            f"unknown {which} language {code!r}" + (f"; did you mean {', '.join(close)}?" if close else ""),
            hint="known: " + ", ".join(sorted(self.codes)),
        )

    def token_id(self, code: str) -> int:
        return int(self.tokenizer.token_to_id(code))

    def _template_code(self) -> str | None:
        processor = json.loads(self.tokenizer.to_str()).get("post_processor") or {}
        for piece in processor.get("single") or []:
            token = (piece.get("SpecialToken") or {}).get("id")
            if token in self.codes:
                return token
        return None

    def with_source(self, code: str):
        """A copy of the tokenizer whose template adds CODE where it added the export's source code."""
        from tokenizers import Tokenizer

        if self.source is None:
            raise UsageError("--source-lang: this model does not mark the source language", hint="drop --source-lang")
        if code == self.source:
            return self.tokenizer
        data = json.loads(self.tokenizer.to_str())
        processor = data["post_processor"]
        for key in ("single", "pair"):
            for piece in processor.get(key) or []:
                special = piece.get("SpecialToken")
                if special and special.get("id") == self.source:
                    special["id"] = code
        specials = processor.get("special_tokens") or {}
        specials.pop(self.source, None)
        specials[code] = {"id": code, "ids": [self.token_id(code)], "tokens": [code]}
        return Tokenizer.from_str(json.dumps(data))


def _is_code(token: str) -> bool:
    return any(p.match(token) for p in _CODE_PATTERNS)


def task_defaults(
    config: dict[str, Any], summarize: bool, source_lang: str | None, target_lang: str | None
) -> tuple[dict[str, Any], str | None]:
    """The entry of config.json's `task_specific_params` the command uses (T5), and its key.

    summarize -> "summarization"; translate -> "translation_{src}_to_{tgt}" for the languages given,
    or the only translation entry there is. Several entries and no languages is a usage error.
    """
    params = config.get("task_specific_params") or {}
    if summarize:
        return dict(params.get("summarization") or {}), ("summarization" if "summarization" in params else None)
    pairs = sorted(k for k in params if k.startswith("translation_"))
    if not pairs:
        return {}, None
    if source_lang or target_lang:
        matches = [
            k
            for k in pairs
            if (not source_lang or k.split("_")[1] == source_lang)
            and (not target_lang or k.rsplit("_", 1)[1] == target_lang)
        ]
    else:
        matches = pairs
    if len(matches) != 1:
        known = ", ".join(k[len("translation_") :].replace("_to_", "->") for k in pairs)
        raise UsageError(
            "this model translates " + known + ("" if matches else f", not {source_lang or '*'}->{target_lang or '*'}"),
            hint="pick one with --source-lang and --target-lang, or give --prefix",
        )
    return dict(params[matches[0]]), matches[0]


def base_generation_config(folder, config: dict[str, Any], special: dict[str, Any]) -> GenerationConfig:
    """generation_config.json, else config.json's generation entries; ids the export recorded fill gaps."""
    path = folder / "generation_config.json"
    gen = GenerationConfig.from_file(path) if path.is_file() else GenerationConfig.from_dict(config)
    if not gen.eos_token_id:
        eos = special.get("eos_token_id") or config.get("eos_token_id")
        gen.eos_token_id = list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])
    if gen.pad_token_id is None:
        gen.pad_token_id = special.get("pad_token_id", config.get("pad_token_id"))
    if gen.decoder_start_token_id is None:
        start = config.get("decoder_start_token_id", special.get("decoder_start_token_id"))
        gen.decoder_start_token_id = start if start is not None else gen.pad_token_id
    return gen


# --- the task ----------------------------------------------------------------------------------


@dataclass
class Seq2SeqResult:
    texts: list[str]  # n-best, best first
    token_ids: list[list[int]]
    scores: list[float | None]
    finish_reason: str
    source_tokens: int


class Seq2SeqTask:
    """translate / summarize on the streaming engine: records in, generated texts out."""

    task_names = FAMILIES["translate"].export_tasks  # the registry's

    def __init__(
        self,
        model: Any,
        *,
        summarize: bool = False,
        prefix: str | None = None,
        source_lang: str | None = None,
        target_lang: str | None = None,
        **overrides: Any,
    ):
        self.model = model
        self.summarize = summarize
        self.field = "summary" if summarize else "translation"
        self.runner = Seq2SeqRunner.from_model(model)
        config = model.config
        special = model.special_tokens
        self.model_type = config.get("model_type")

        tokenizer = model.tokenizer
        self.languages = Languages(tokenizer, model.tokenizer_config)
        params: dict[str, Any] = {}
        self.params_key: str | None = None
        if not self.languages:
            params, self.params_key = task_defaults(config, summarize, source_lang, target_lang)
        self.prefix = prefix if prefix is not None else params.pop("prefix", "") or ""
        params.pop("prefix", None)

        gen = base_generation_config(model.folder, config, special)
        gen = gen.update(**{k: v for k, v in GenerationConfig.from_dict(params).__dict__.items() if k in params})
        self.source_text_prefix = ""
        if self.languages:
            if source_lang is not None and not self.languages.marian:
                tokenizer = self.languages.with_source(self.languages.resolve(source_lang, "source"))
            elif source_lang is not None:
                raise UsageError("--source-lang: this model does not take a source language", hint="drop it")
            if target_lang is not None:
                code = self.languages.resolve(target_lang, "target")
                if self.languages.marian:
                    self.source_text_prefix = code + " "
                else:
                    gen = gen.update(forced_bos_token_id=self.languages.token_id(code))
            elif self.languages.marian or gen.forced_bos_token_id is None:
                raise UsageError(
                    f"{model.name} is multilingual: give --target-lang",
                    hint="known: " + ", ".join(self.languages.codes),
                )
        elif (source_lang or target_lang) and self.params_key is None:
            raise UsageError(
                f"{model.name} translates one language pair and takes no --source-lang/--target-lang", hint="drop them"
            )

        # Lengths: --max-new-tokens wins, then --max-length (the whole decoder sequence, start id included).
        max_length = overrides.pop("max_length", None)
        gen = gen.update(**overrides)
        requested = gen.max_new_tokens
        if overrides.get("max_new_tokens") is None and max_length is not None:
            requested = max(1, max_length - 1)
        elif requested is None:
            requested = gen.max_length - 1 if gen.max_length else DEFAULT_MAX_NEW_TOKENS
        gen = gen.update(max_new_tokens=requested)
        relative = self.model_type in _RELATIVE_POSITIONS
        positions = model.max_length if relative else config.get("max_position_embeddings")
        self.max_new_tokens = min(requested, positions - 1) if positions else requested
        # Records whose output stopped at that limit before max_new_tokens (the command says so once).
        self.requested_limit = f"max_new_tokens {requested}"
        self.position_limited = 0
        self.position_limit = (
            None
            if self.max_new_tokens >= requested
            else f"{self.model_type}'s limit of {positions - 1} decoder tokens"
            + (
                " (relative positions: onnxpipe's bound, the model's input length)"
                if relative
                else f" ({positions} positions, the start token included)"
            )
        )
        try:
            gen.validate()
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        self.generation_config = gen

        self.max_length = model.max_length
        tokenizer.enable_truncation(self.max_length)
        self.tokenizer = tokenizer
        self.target_tokenizer = model.target_tokenizer
        self.cleanup = bool(model.tokenizer_config.get("clean_up_tokenization_spaces"))
        self.pad_id = int(gen.pad_token_id if gen.pad_token_id is not None else 0)
        self.generated_tokens = 0

    @property
    def provider(self) -> str | None:
        return self.model.provider

    # --- the Task protocol ----------------------------------------------------------------
    def source_text(self, text: str) -> str:
        return self.source_text_prefix + self.prefix + text

    def encode(self, records: Sequence[Record]) -> list[Item]:
        cap = max(self.max_length * CHARS_PER_TOKEN_CAP, 4096)
        texts = []
        for record in records:
            text = self.source_text(record.text)
            if len(text) > cap:
                space = text.rfind(" ", cap - 256, cap)
                text = text[: space if space > 0 else cap]
            texts.append(text)
        items = []
        for record, text, encoding in zip(records, texts, self.tokenizer.encode_batch(texts)):
            if len(text) < len(self.source_text(record.text)) and not encoding.overflowing:
                encoding = self.tokenizer.encode(self.source_text(record.text))  # the cut was not needed
            items.append(
                Item(
                    record,
                    len(encoding.ids),
                    data=self.model.graph_ids(encoding.ids),
                    truncated=bool(encoding.overflowing),
                )
            )
        return items

    def run(self, batch: Sequence[Item]) -> list[Seq2SeqResult]:
        hyps = self.runner.generate(
            [item.data for item in batch],
            self.generation_config,
            self.pad_id,
            self.max_new_tokens,
            keys=[item.record.seq for item in batch],
        )
        self.generated_tokens += sum(len(nbest[0].token_ids) for nbest in hyps)
        if self.position_limit is not None:
            # At the limit, whether it ended there on length or on a forced eos (BART, Marian).
            self.position_limited += sum(len(nbest[0].token_ids) >= self.max_new_tokens for nbest in hyps)
        return [self._result(nbest, len(item.data)) for item, nbest in zip(batch, hyps)]

    def _result(self, nbest: list[Hypothesis], source_tokens: int) -> Seq2SeqResult:
        texts = [self.decode(h.token_ids) for h in nbest]
        return Seq2SeqResult(
            texts, [h.token_ids for h in nbest], [h.score for h in nbest], nbest[0].finish_reason, source_tokens
        )

    def decode(self, ids: Sequence[int]) -> str:
        text = self.target_tokenizer.decode(list(ids), skip_special_tokens=True)
        return _clean_up(text) if self.cleanup else text

    # --- formatters -------------------------------------------------------------------------
    def to_text(self, result: Seq2SeqResult) -> str:
        return result.texts[0]

    def to_fields(self, result: Seq2SeqResult | None) -> dict[str, Any]:
        if result is None:
            return {
                self.field: "",
                "finish_reason": None,
                "source_tokens": 0,
                "generated_tokens": 0,
                "provider": self.provider,
            }
        fields: dict[str, Any] = {
            self.field: result.texts[0],
            "finish_reason": result.finish_reason,
            "source_tokens": result.source_tokens,
            "generated_tokens": len(result.token_ids[0]),
        }
        if result.scores[0] is not None:
            fields["score"] = result.scores[0]
        if len(result.texts) > 1:
            fields["sequences"] = [
                {self.field: text, "generated_tokens": len(ids), "score": score}
                for text, ids, score in zip(result.texts, result.token_ids, result.scores)
            ]
        fields["provider"] = self.provider
        return fields

    def to_columns(self, result: Seq2SeqResult | None) -> list[str]:
        return [""] if result is None else [result.texts[0]]


def _clean_up(text: str) -> str:
    """transformers' `clean_up_tokenization` (for tokenizers saved with clean_up_tokenization_spaces)."""
    for a, b in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(a, b)
    return text
