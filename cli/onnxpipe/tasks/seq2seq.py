"""Encoder-decoder generation (translate, summarize) on an exported encoder and merged decoder.

The export holds `encoder_model.onnx` and optimum's merged `decoder_model_merged.onnx`, whose
`use_cache_branch` input picks one of two subgraphs:

- first step (False): the decoder start id per row, `encoder_hidden_states`, zero-length pasts. It
  returns the logits, the decoder self-attention keys/values and the cross-attention keys/values
  computed from the encoder states (`present.N.encoder.*`), once per batch;
- later steps (True): one id per row, `past_key_values.N.decoder.*` = the previous self-attention
  presents, `past_key_values.N.encoder.*` = the cross-attention keys/values of the first step. This
  branch does not read `encoder_hidden_states` (a (rows, 1, d) placeholder is bound), and its
  cross-attention presents, copies of the pasts, are not bound, so ONNX Runtime need not keep them.

The encoder runs once per batch and the first decoder step once per input (not per beam): the search
(`onnxpipe.decoding`, shared with `generate`) then asks for the rows it wants through `parents`. The
self-attention cache is gathered by parent row; the cross-attention cache only when the set of inputs
changes (a beam moving within its input keeps the same encoder), i.e. after the first step and when
finished inputs leave the batch. With IO binding the caches stay where the provider made them (GPU
memory on CUDA); only ids, masks and the logits cross to and from the host.

Languages, prefixes and generation defaults are read from the export's files (generation_config.json,
config.json, tokenizer_config.json, tokenizer.json), as transformers' tokenizers and pipelines use
them: see `Languages` and `task_defaults`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from onnxpipe.decoding import GenerationConfig, Hypothesis, generate
from onnxpipe.errors import ModelNotFoundError, UsageError
from onnxpipe.registry import FAMILIES
from onnxpipe.stream.records import Item, Record
from onnxpipe.tasks.kv_cache import CacheReorder

DEFAULT_MAX_NEW_TOKENS = 256  # when the model sets no max_length (transformers would stop at 20)
# Decoders with relative positions: no table to run out of, so onnxpipe states a bound of its own, the
# model's input limit (T5: 512, its pre-training length), as absolute models stop at their table
# (BART 1024, Marian 512): each decoder token keeps its keys/values in every layer for the rest of the run.
_RELATIVE_POSITIONS = {"t5", "mt5", "longt5", "umt5"}
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# A line longer than this many characters per allowed token is cut before tokenizing (see tasks.encoder).
_CHARS_PER_TOKEN_CAP = 32


# --- the graphs --------------------------------------------------------------------------

class Seq2SeqRunner:
    """The encoder and merged-decoder sessions, driven step by step through a `decoding.Step`."""

    def __init__(self, encoder, decoder, device: str = "cpu", device_id: int = 0):
        self.encoder = encoder
        self.decoder = decoder
        self.device = "cuda" if device.startswith("cuda") else "cpu"
        self.device_id = device_id
        inputs = {i.name: i for i in decoder.get_inputs()}
        self.encoder_output = encoder.get_outputs()[0].name
        self.encoder_inputs = [i.name for i in encoder.get_inputs()]
        pasts = [n for n in inputs if n.startswith("past_key_values.")]
        self.self_pasts = [n for n in pasts if ".encoder." not in n]
        self.cross_pasts = [n for n in pasts if ".encoder." in n]
        self.self_presents = ["present." + n[len("past_key_values."):] for n in self.self_pasts]
        self.cross_presents = ["present." + n[len("past_key_values."):] for n in self.cross_pasts]
        if "use_cache_branch" not in inputs or not self.self_pasts or not self.cross_pasts:
            raise ModelNotFoundError("this export has no merged decoder with past key values",
                                     hint="re-export it with onnxpipe export (task text2text-generation)")
        first = inputs[self.self_pasts[0]]
        self.kv_dtype = _ORT_TYPES.get(first.type)
        self.hidden_dtype = _ORT_TYPES.get(inputs["encoder_hidden_states"].type)
        if self.kv_dtype is None or self.hidden_dtype is None:
            raise ModelNotFoundError(f"unsupported key/value type {first.type}", hint="export in fp32 or fp16")
        self.heads, self.head_dim = first.shape[1], first.shape[3]
        self.hidden_size = inputs["encoder_hidden_states"].shape[2]
        if not all(isinstance(d, int) for d in (self.heads, self.head_dim, self.hidden_size)):
            raise ModelNotFoundError("the decoder graph does not declare its key/value and hidden sizes",
                                     hint="re-export it with onnxpipe export")
        self.steps = 0
        self.gathers = 0
        vocab = {o.name: o for o in decoder.get_outputs()}["logits"].shape[-1]
        self.vocab_size = vocab if isinstance(vocab, int) else None
        self._logits_buffers: list[np.ndarray] = []  # two flat float32 arrays, used in turn
        self.reorder = CacheReorder(decoder, self.kv_dtype, self.device, device_id)

    # --- values on the device -------------------------------------------------------------
    def _placeholder(self, shape: tuple, dtype) -> Any:
        """A tensor the graph needs bound but does not read (empty pasts, later encoder states)."""
        from onnxruntime import OrtValue

        if self.device == "cpu":
            return OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype))
        return OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", self.device_id)

    def gather(self, values: list, rows: np.ndarray) -> list:
        """VALUES' rows `rows` (in that order), on their device (see tasks.kv_cache)."""
        self.gathers += 1
        return self.reorder(values, rows)

    # --- running the graphs ---------------------------------------------------------------
    def encode(self, ids: np.ndarray, mask: np.ndarray) -> Any:
        """The encoder states (an OrtValue on the device) of right-padded ids."""
        binding = self.encoder.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        if "attention_mask" in self.encoder_inputs:
            binding.bind_cpu_input("attention_mask", mask)
        binding.bind_output(self.encoder_output, self.device, self.device_id)
        self.encoder.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def _decode(self, tokens: np.ndarray, hidden: Any, mask: np.ndarray, self_past: list, cross_past: list,
                first: bool) -> tuple[np.ndarray, list, list]:
        binding = self.decoder.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1, 1))
        binding.bind_cpu_input("encoder_attention_mask", mask)
        binding.bind_ortvalue_input("encoder_hidden_states", hidden)
        binding.bind_cpu_input("use_cache_branch", np.array([not first]))
        for name, value in zip(self.self_pasts, self_past):
            binding.bind_ortvalue_input(name, value)
        for name, value in zip(self.cross_pasts, cross_past):
            binding.bind_ortvalue_input(name, value)
        rows = len(tokens)
        buffer = self._logits_buffer(rows)
        if buffer is not None:  # ONNX Runtime writes the logits straight into an array the search may change
            binding.bind_output("logits", "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
        else:
            binding.bind_output("logits", "cpu")
        for name in self.self_presents:
            binding.bind_output(name, self.device, self.device_id)
        if first:  # computed once; the later steps only copy them through
            for name in self.cross_presents:
                binding.bind_output(name, self.device, self.device_id)
        self.decoder.run_with_iobinding(binding)
        self.steps += 1
        outputs = binding.get_outputs()
        if buffer is not None:
            logits = buffer[:, -1, :]
        else:
            logits = np.array(outputs[0].numpy()[:, -1, :], dtype=np.float32)  # a copy the search may change
        n = len(self.self_presents)
        return logits, outputs[1:1 + n], (outputs[1 + n:] if first else cross_past)

    def _logits_buffer(self, rows: int) -> np.ndarray | None:
        """A (rows, 1, vocab) float32 array for the next step's logits, or None (GPU, unknown vocabulary).

        Views of two flat arrays, used in turn and grown to the largest batch seen: the search is done
        with a step's logits before it asks for the next step's, and the second array keeps even a
        one-step-late reader safe. It saves copying the rows x vocabulary logits out of ONNX Runtime
        (30 MB a step for 128 beams of opus-mt).
        """
        if self.device != "cpu" or self.vocab_size is None:
            return None
        size = rows * self.vocab_size
        if not self._logits_buffers or self._logits_buffers[0].size < size:
            self._logits_buffers = [np.empty(size, np.float32) for _ in range(2)]
        self._logits_buffers.reverse()
        return self._logits_buffers[0][:size].reshape(rows, 1, self.vocab_size)

    def start(self, ids: np.ndarray, mask: np.ndarray, decoder_start: int):
        """Encode the batch and run the first decoder step; return its logits and the `Step` that continues."""
        rows = ids.shape[0]
        hidden = self.encode(ids, mask)
        empty = (rows, self.heads, 0, self.head_dim)
        pasts = [self._placeholder(empty, self.kv_dtype) for _ in self.self_pasts]
        crosses = [self._placeholder(empty, self.kv_dtype) for _ in self.cross_pasts]
        tokens = np.full(rows, decoder_start, dtype=np.int64)
        logits, self_past, cross_past = self._decode(tokens, hidden, mask, pasts, crosses, first=True)
        state = {"self": self_past, "cross": cross_past, "mask": mask, "inputs": np.arange(rows)}
        placeholders: dict[int, Any] = {}

        def step(tokens: np.ndarray, parents: np.ndarray | None) -> np.ndarray:
            n = len(tokens)
            if parents is not None and not (len(parents) == len(state["inputs"]) and (parents == np.arange(n)).all()):
                inputs = state["inputs"][parents]
                if np.array_equal(inputs, state["inputs"]):  # beams moved within their inputs
                    state["self"] = self.gather(state["self"], parents)
                else:
                    both = self.gather(state["self"] + state["cross"], parents)
                    state["self"], state["cross"] = both[:len(self.self_pasts)], both[len(self.self_pasts):]
                    state["mask"] = np.ascontiguousarray(state["mask"][parents])
                    state["inputs"] = inputs
            if n not in placeholders:
                placeholders[n] = self._placeholder((n, 1, self.hidden_size), self.hidden_dtype)
            logits, state["self"], state["cross"] = self._decode(
                tokens, placeholders[n], state["mask"], state["self"], state["cross"], first=False)
            return logits

        return logits, step

    def generate(self, sources: Sequence[Sequence[int]], config: GenerationConfig, pad_id: int,
                 max_new_tokens: int, keys: Sequence[int] | None = None) -> list[list[Hypothesis]]:
        """Decode each source (token ids); n-best lists (num_return_sequences), best first."""
        width = max(len(s) for s in sources)
        ids = np.full((len(sources), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(sources), width), dtype=np.int64)
        for r, source in enumerate(sources):
            ids[r, :len(source)] = source
            mask[r, :len(source)] = 1
        start = config.decoder_start_token_id
        logits, step = self.start(ids, mask, int(start))
        return generate(step, logits, [[start]] * len(sources), config.update(max_new_tokens=max_new_tokens),
                        keys=keys)


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
            codes = sorted(t.content for t in tokenizer.get_added_tokens_decoder().values()
                           if t.special and _is_code(t.content))
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
        for same in ([c for c in self.codes if c.lower() == code.lower()],
                     [c for c in self.codes if c.split("_")[0].lower() == code.lower()]):
            if len(same) == 1:
                return same[0]
        import difflib

        close = same or difflib.get_close_matches(code, self.codes, n=3, cutoff=0.5)
        raise UsageError(f"unknown {which} language {code!r}" + (f"; did you mean {', '.join(close)}?" if close else ""),
                         hint="known: " + ", ".join(sorted(self.codes)))

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
            raise UsageError("--source-lang: this model does not mark the source language",
                             hint="drop --source-lang")
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


def task_defaults(config: dict[str, Any], summarize: bool, source_lang: str | None,
                  target_lang: str | None) -> tuple[dict[str, Any], str | None]:
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
        matches = [k for k in pairs if (not source_lang or k.split("_")[1] == source_lang)
                   and (not target_lang or k.rsplit("_", 1)[1] == target_lang)]
    else:
        matches = pairs
    if len(matches) != 1:
        known = ", ".join(k[len("translation_"):].replace("_to_", "->") for k in pairs)
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

    def __init__(self, model: Any, *, summarize: bool = False, prefix: str | None = None,
                 source_lang: str | None = None, target_lang: str | None = None, **overrides: Any):
        self.model = model
        self.summarize = summarize
        self.field = "summary" if summarize else "translation"
        encoder, decoder = model.session("encoder"), model.session("decoder")
        provider = model.provider or "CPUExecutionProvider"
        device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
        self.runner = Seq2SeqRunner(encoder, decoder, device, model.device.index if device == "cuda" else 0)
        config = model.config
        special = model.special_tokens
        self.model_type = config.get("model_type")

        tokenizer = model.tokenizer
        self.languages = Languages(tokenizer, model.tokenizer_config)
        params, self.params_key = ({}, None)
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
                raise UsageError(f"{model.name} is multilingual: give --target-lang",
                                 hint="known: " + ", ".join(self.languages.codes))
        elif (source_lang or target_lang) and self.params_key is None:
            raise UsageError(f"{model.name} translates one language pair and takes no --source-lang/--target-lang",
                             hint="drop them")

        # Lengths: --max-new-tokens wins, then --max-length (the whole decoder sequence, start id included).
        max_length = overrides.pop("max_length", None)
        gen = gen.update(**overrides)
        if overrides.get("max_new_tokens") is None and max_length is not None:
            gen = gen.update(max_new_tokens=max(1, max_length - 1))
        elif gen.max_new_tokens is None:
            gen = gen.update(max_new_tokens=gen.max_length - 1 if gen.max_length else DEFAULT_MAX_NEW_TOKENS)
        relative = self.model_type in _RELATIVE_POSITIONS
        positions = model.max_length if relative else config.get("max_position_embeddings")
        self.max_new_tokens = min(gen.max_new_tokens, positions - 1) if positions else gen.max_new_tokens
        # Records whose output stopped at that limit before max_new_tokens (the command says so once).
        self.requested_max_new_tokens = gen.max_new_tokens
        self.position_limited = 0
        self.position_limit = (None if self.max_new_tokens >= gen.max_new_tokens else
                               f"{self.model_type}'s limit of {positions - 1} decoder tokens" +
                               (" (relative positions: onnxpipe's bound, the model's input length)" if relative
                                else f" ({positions} positions, the start token included)"))
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
        cap = max(self.max_length * _CHARS_PER_TOKEN_CAP, 4096)
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
            items.append(Item(record, len(encoding.ids), data=self.model.graph_ids(encoding.ids),
                              truncated=bool(encoding.overflowing)))
        return items

    def run(self, batch: Sequence[Item]) -> list[Seq2SeqResult]:
        hyps = self.runner.generate([item.data for item in batch], self.generation_config, self.pad_id,
                                    self.max_new_tokens, keys=[item.record.seq for item in batch])
        self.generated_tokens += sum(len(nbest[0].token_ids) for nbest in hyps)
        if self.position_limit is not None:
            # At the limit, whether it ended there on length or on a forced eos (BART, Marian).
            self.position_limited += sum(len(nbest[0].token_ids) >= self.max_new_tokens for nbest in hyps)
        return [self._result(nbest, len(item.data)) for item, nbest in zip(batch, hyps)]

    def _result(self, nbest: list[Hypothesis], source_tokens: int) -> Seq2SeqResult:
        texts = [self.decode(h.token_ids) for h in nbest]
        return Seq2SeqResult(texts, [h.token_ids for h in nbest], [h.score for h in nbest], nbest[0].finish_reason,
                             source_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        text = self.target_tokenizer.decode(list(ids), skip_special_tokens=True)
        return _clean_up(text) if self.cleanup else text

    # --- formatters -------------------------------------------------------------------------
    def to_text(self, result: Seq2SeqResult) -> str:
        return result.texts[0]

    def to_fields(self, result: Seq2SeqResult | None) -> dict[str, Any]:
        if result is None:
            return {self.field: "", "finish_reason": None, "source_tokens": 0, "generated_tokens": 0,
                    "provider": self.provider}
        fields: dict[str, Any] = {self.field: result.texts[0], "finish_reason": result.finish_reason,
                                  "source_tokens": result.source_tokens, "generated_tokens": len(result.token_ids[0])}
        if result.scores[0] is not None:
            fields["score"] = result.scores[0]
        if len(result.texts) > 1:
            fields["sequences"] = [{self.field: text, "generated_tokens": len(ids), "score": score}
                                   for text, ids, score in zip(result.texts, result.token_ids, result.scores)]
        fields["provider"] = self.provider
        return fields

    def to_columns(self, result: Seq2SeqResult | None) -> list[str]:
        return [""] if result is None else [result.texts[0]]


def _clean_up(text: str) -> str:
    """transformers' `clean_up_tokenization` (for tokenizers saved with clean_up_tokenization_spaces)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text
