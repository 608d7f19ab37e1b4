"""Decoder-only generation, the text side: prompts, chat templates, stop strings and results.

The graph is driven by runtime.decoder (`CausalDecoder`: the session, IO binding, the key/value cache,
prefill and decode steps); the search is `onnxpipe.decoding`. `CausalLM` puts the export's tokenizer,
generation defaults and chat template around that driver, and `GenerateTask` is `onnxpipe generate`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.decoding import DEFAULT_MAX_NEW_TOKENS, GenerationConfig, Hypothesis, generate
from onnxpipe.errors import OnnxpipeError, UsageError
from onnxpipe.registry import FAMILIES
from onnxpipe.runtime.decoder import CausalDecoder, CopyStats
from onnxpipe.runtime.model import ExportedModel
from onnxpipe.tasks.encoder import CHARS_PER_TOKEN_CAP

# --- text ------------------------------------------------------------------------------


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "eos" | "length" | "stop"; None for an empty prompt (not run)
    prompt_tokens: int
    score: float | None = None
    truncated: bool = False  # the prompt was cut to fit the model's positions
    position_limited: bool = False  # stopped at the model's last position, short of max_new_tokens


@dataclass
class CausalLM:
    """An export folder's decoder, tokenizer, generation defaults and chat template."""

    folder: Path
    decoder: CausalDecoder
    tokenizer: Any  # tokenizers.Tokenizer
    manifest: dict
    defaults: GenerationConfig
    max_positions: int | None = None
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)
    note: str | None = None  # a line for the command to print (the fused graph on CUDA)

    @classmethod
    def from_model(cls, model: ExportedModel) -> CausalLM:
        """The generator of an export opened by runtime.load_model (or onnxpipe.load), on the device its
        session really got: the one way to open one, with load_model's device checks."""
        folder, manifest = model.folder, model.manifest
        if manifest.get("family") != "decoder":
            raise UsageError(
                f"{manifest.get('name', folder.name)} is a {manifest.get('task')} export, not text-generation",
                hint="generate runs decoder-only exports; use translate/summarize for encoder-decoders",
            )
        decoder = CausalDecoder.from_model(model)
        tok_info = manifest.get("tokenizer") or {}
        tokenizer = model.tokenizer  # one line when broken
        special = manifest.get("special_tokens") or {}
        defaults = GenerationConfig.from_file(folder / "generation_config.json")
        if not defaults.eos_token_id:
            defaults.eos_token_id = list(special.get("eos_token_id") or [])
        if defaults.pad_token_id is None:
            defaults.pad_token_id = special.get("pad_token_id")
        if defaults.bos_token_id is None:
            defaults.bos_token_id = special.get("bos_token_id")
        config = model.config
        max_positions = config.get("n_positions") or config.get("max_position_embeddings")
        template, names = _chat_template(folder, tok_info)
        note = None
        if decoder.device.kind == "cuda" and (manifest.get("graph") or {}).get("builder") == "onnxpipe-fused":
            note = (
                f"{manifest.get('name', folder.name)} is onnxpipe's fused graph, built for the CPU: on "
                "CUDA its float32 attention runs on the CPU. Re-export with --graph optimum for the GPU, or with "
                "--device cuda for onnxpipe's fp16 CUDA graph"
            )
        return cls(folder, decoder, tokenizer, manifest, defaults, max_positions, template, names, note)

    # --- prompts ------------------------------------------------------------------------

    def render_chat(self, user: str, system: str | None = None) -> str:
        """The chat prompt for one user message, with the generation prompt (assistant turn) opened."""
        if not self.chat_template:
            raise UsageError(
                f"{self.manifest.get('name', self.folder.name)} has no chat template",
                hint="drop --chat, or export a model that ships one (chat_template.jinja or tokenizer_config.json)",
            )
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return render_chat_template(self.chat_template, messages, self.special_tokens)

    def encode(self, text: str, chat: bool = False) -> list[int]:
        # A rendered chat template already holds its special tokens (transformers tokenizes it that way).
        return self.tokenizer.encode(text, add_special_tokens=not chat).ids

    # --- generation ---------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        config: GenerationConfig,
        *,
        keys: Sequence[int] | None = None,
        stop: Sequence[str] = (),
        on_text: Callable[[int, str], None] | None = None,
    ) -> list[list[Completion]]:
        """Complete each prompt (token ids); n-best lists (num_return_sequences), best first.

        `keys` name each prompt's random stream (its record index). `on_text(key, chunk)` receives the
        text as it is produced (greedy and sampling). Generation stops at eos, at `max_new_tokens`, at
        the model's last position, or after a stop string, which is cut from the text.
        """
        keys = list(range(len(prompts))) if keys is None else list(keys)
        results: list[list[Completion] | None] = [None] * len(prompts)
        # Without max_new_tokens, an explicit max_length counts the prompt: each row gets what is left of it
        # after its own prompt (GenerateTask refuses a prompt that leaves nothing, as transformers does).
        by_length = config.max_length if config.max_new_tokens is None else None
        max_new = config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        if by_length is not None:
            max_new = max([max(1, by_length - len(p)) for p in prompts] or [1])
        run, run_prompts, limits, truncated = [], [], [], {}
        for i, ids in enumerate(prompts):
            ids = list(ids)
            if not ids:
                results[i] = [Completion("", [], None, 0)]
                continue
            if self.max_positions and len(ids) >= self.max_positions:
                truncated[i] = True
                ids = ids[len(ids) - self.max_positions + 1 :]  # keep the end: it is what gets continued
            run.append(i)
            run_prompts.append(ids)
            wanted = max(1, by_length - len(ids)) if by_length is not None else max_new
            limits.append(min(wanted, self.max_positions - len(ids)) if self.max_positions else wanted)
        if run:
            texts = _TextStreams(self.tokenizer, [keys[i] for i in run], stop, on_text) if (stop or on_text) else None
            beams = config.num_beams > 1
            pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_id or [0])[0]
            logits, step = self.decoder.prefill(run_prompts, pad, max_new_tokens=max(limits))
            hyps = generate(
                step,
                logits,
                run_prompts,
                config.update(max_new_tokens=max_new),
                max_new_tokens=limits,
                keys=[keys[i] for i in run],
                stop=texts.stop if texts is not None and not beams else None,
                on_token=texts.feed if texts is not None and not beams else None,
            )
            for j, (i, nbest) in enumerate(zip(run, hyps)):
                streamed = texts.text(keys[i]) if texts is not None and not beams else None
                done = [self._completion(h, len(run_prompts[j]), i in truncated, stop, streamed) for h in nbest]
                results[i] = done
                positions_left = self.max_positions - len(run_prompts[j]) if self.max_positions else None
                if positions_left is not None and limits[j] == positions_left and limits[j] < max_new:
                    # the prompt leaves fewer positions than max_new_tokens
                    for c in done:
                        c.position_limited = c.finish_reason != "stop" and len(c.token_ids) >= limits[j]
                if texts is not None:
                    texts.finish(keys[i], done[0].text)
        return results  # type: ignore[return-value]

    def _completion(
        self, hyp: Hypothesis, prompt_tokens: int, truncated: bool, stop: Sequence[str], streamed: str | None
    ) -> Completion:
        if hyp.finish_reason == "stop" and streamed is not None:
            text = streamed
        else:
            text = self.tokenizer.decode(hyp.token_ids, skip_special_tokens=True)
            cut = _cut_at_stop(text, stop)
            if cut is not None:  # beam search: stop strings are applied to the finished text
                text, hyp = cut, Hypothesis(hyp.token_ids, "stop", hyp.score)
        return Completion(text, hyp.token_ids, hyp.finish_reason, prompt_tokens, hyp.score, truncated)


def _cut_at_stop(text: str, stop: Sequence[str]) -> str | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return text[: min(hits)] if hits else None


class _TextStreams:
    """Per-record incremental detokenisation: for streaming output and for stop strings."""

    def __init__(self, tokenizer, keys: Sequence[int], stop: Sequence[str], on_text):
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop if s]
        self.longest = max((len(s) for s in self.stop_strings), default=0)
        self.on_text = on_text
        self.streams: dict[int, Any] = {k: DecodeStream(skip_special_tokens=True) for k in keys}
        self.ids: dict[int, list[int]] = {k: [] for k in keys}
        self.texts = {k: "" for k in keys}
        self.stopped: dict[int, bool] = {}
        self.emitted = {k: 0 for k in keys}

    def _step(self, key: int, token: int) -> str | None:
        """The text TOKEN completes (None: not a whole character yet)."""
        self.ids[key].append(token)
        stream = self.streams[key]
        if stream is not None:
            try:
                chunk: str | None = stream.step(self.tokenizer, token)
                if not chunk or "\ufffd" not in chunk:
                    return chunk
            except Exception:  # noqa: BLE001 - tokenizers raises a bare Exception
                pass
            # Bytes that form no valid UTF-8 (a random or confused model) decode to other U+FFFDs in
            # DecodeStream's window than in the whole text, or make it refuse the window: from here on
            # this record decodes its whole ids, so the pieces add up to the text decode() gives.
            self.streams[key] = None
        whole = self.tokenizer.decode(self.ids[key], skip_special_tokens=True)
        done = self.texts[key]
        if whole.endswith("\ufffd") or not whole.startswith(done) or len(whole) == len(done):
            return None  # an incomplete character, or nothing new
        return whole[len(done) :]

    def feed(self, keys: np.ndarray, tokens: np.ndarray) -> None:
        for key, token in zip(keys.tolist(), tokens.tolist()):
            chunk = self._step(key, token)
            if not chunk:
                continue
            before = len(self.texts[key])
            self.texts[key] += chunk
            if self.stop_strings:
                tail_from = max(0, before - self.longest + 1)
                cut = _cut_at_stop(self.texts[key][tail_from:], self.stop_strings)
                if cut is not None:
                    self.texts[key] = self.texts[key][:tail_from] + cut
                    self.stopped[key] = True
            self._emit(key)

    def _emit(self, key: int) -> None:
        if self.on_text is None:
            return
        text = self.texts[key]
        # Hold back what could be the start of a stop string, so a stop string is never printed.
        safe = (
            len(text)
            if self.stopped.get(key) or not self.longest
            else max(self.emitted[key], len(text) - self.longest + 1)
        )
        if safe > self.emitted[key]:
            self.on_text(key, text[self.emitted[key] : safe])
            self.emitted[key] = safe

    def finish(self, key: int, final_text: str) -> None:
        """Emit what was held back (or, for beam search, everything) once the record is done."""
        if self.on_text is not None and len(final_text) > self.emitted[key]:
            self.on_text(key, final_text[self.emitted[key] :])
            self.emitted[key] = len(final_text)

    def stop(self, keys: np.ndarray, generated: np.ndarray) -> np.ndarray:
        return np.array([self.stopped.get(k, False) for k in keys.tolist()], dtype=bool)

    def text(self, key: int) -> str:
        return self.texts[key]


# --- chat templates ----------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _chat_template(folder: Path, tok_info: dict) -> tuple[str | None, dict[str, str]]:
    """The export's chat template (chat_template.jinja, else tokenizer_config.json) and the special-token
    strings templates use (bos_token, eos_token, ...)."""
    config = _read_json(folder / "tokenizer_config.json")
    names = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            names[key] = value
    template = None
    for name in (tok_info.get("chat_template"), "chat_template.jinja"):
        if name and (folder / name).is_file():
            template = (folder / name).read_text(encoding="utf-8")
            break
    if template is None:
        value = config.get("chat_template")
        if isinstance(value, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            value = named.get("default") or next(iter(named.values()), None)
        template = value if isinstance(value, str) else None
    return template, names


def render_chat_template(template: str, messages: list[dict], special_tokens: dict[str, str]) -> str:
    """Render a Hugging Face chat template the way transformers does (sandboxed jinja2, same options)."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # pragma: no cover - jinja2 is a base dependency
        raise OnnxpipeError("--chat needs jinja2: install onnxpipe again") from None

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special_tokens)
    except TemplateError as exc:
        raise UsageError(f"the chat template failed: {exc}") from None


# --- the engine task --------------------------------------------------------------------


class GenerateTask:
    """`onnxpipe generate` on the streaming engine: a record is a prompt, its result the n-best completions."""

    task_names = FAMILIES["generate"].export_tasks  # the registry's

    def __init__(
        self,
        model: Any,
        overrides: dict[str, Any] | None = None,
        chat: bool = False,
        system: str | None = None,
        stop: Sequence[str] = (),
    ):
        self.model = model
        self.lm = CausalLM.from_model(model)  # makes the session: a --device error comes first
        self.notes = [self.lm.note] if self.lm.note else []  # lines for the command to print
        overrides = dict(overrides or {})
        max_length = overrides.pop("max_length", None)  # only as asked: a model's own max_length stays unused
        self.config = self.lm.defaults.update(**overrides).update(max_length=max_length)
        if self.config.max_new_tokens is None and max_length is None:
            self.config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        elif max_length is None:
            self.config.max_length = None
        try:
            self.config.validate()
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if chat:
            self.lm.render_chat("", system)  # no template: fail now, before any input is read
        self.chat, self.system, self.stop = chat, system, [s for s in stop if s]
        self.generated_tokens = 0
        # Records that stopped at the model's last position before max_new_tokens (the command says so).
        self.requested_limit = (
            f"max_new_tokens {self.config.max_new_tokens}"
            if self.config.max_new_tokens
            else f"max_length {self.config.max_length} (prompt included)"
        )
        self.position_limited = 0
        positions = self.lm.max_positions
        self.position_limit = f"the model's {positions} positions (prompt + completion)" if positions else None

    @property
    def provider(self) -> str | None:
        return self.model.provider

    @property
    def stats(self) -> CopyStats:
        return self.lm.decoder.stats

    def encode(self, records: Sequence[Any]) -> list[Any]:
        from onnxpipe.stream.records import Item

        limit = self.lm.max_positions
        items = []
        for record in records:
            text = self.lm.render_chat(record.text, self.system) if self.chat else record.text
            cut = False
            if limit and len(text) > limit * CHARS_PER_TOKEN_CAP:  # no tokenizer makes fewer tokens
                text, cut = text[-limit * CHARS_PER_TOKEN_CAP :], True
            ids = self.lm.encode(text, chat=self.chat)
            if limit and len(ids) >= limit:  # keep the end, which is what gets continued
                ids, cut = ids[len(ids) - limit + 1 :], True
            item = Item(record, len(ids), data=ids, truncated=cut)
            max_length = self.config.max_length if self.config.max_new_tokens is None else None
            if max_length is not None and len(ids) >= max_length:  # transformers refuses it too
                item.error = (
                    f"the prompt has {len(ids)} tokens, not fewer than --max-length {max_length} "
                    "(which counts the prompt): raise it, or use --max-new-tokens"
                )
            items.append(item)
        return items

    def run(self, batch: Sequence[Any]) -> list[list[Completion]]:
        results = self.lm.generate(
            [item.data for item in batch], self.config, keys=[item.record.seq for item in batch], stop=self.stop
        )
        self.generated_tokens += sum(len(c.token_ids) for nbest in results for c in nbest)
        self.position_limited += sum(nbest[0].position_limited for nbest in results)
        return results

    def run_streaming(self, item: Any, emit: Callable[[str], None]) -> list[Completion]:
        results = self.lm.generate(
            [item.data], self.config, keys=[item.record.seq], stop=self.stop, on_text=lambda _key, chunk: emit(chunk)
        )
        self.generated_tokens += sum(len(c.token_ids) for c in results[0])
        self.position_limited += results[0][0].position_limited
        return results[0]

    # --- formatters ---------------------------------------------------------------------------
    def to_text(self, result: list[Completion]) -> str:
        return result[0].text

    def to_fields(self, result: list[Completion] | None) -> dict[str, Any]:
        if result is None:
            return {
                "generated_text": "",
                "finish_reason": None,
                "prompt_tokens": 0,
                "generated_tokens": 0,
                "provider": self.provider,
            }
        best = result[0]
        fields: dict[str, Any] = {
            "generated_text": best.text,
            "finish_reason": best.finish_reason,
            "prompt_tokens": best.prompt_tokens,
            "generated_tokens": len(best.token_ids),
        }
        if best.score is not None:
            fields["score"] = best.score
        if len(result) > 1:
            fields["sequences"] = [
                {
                    "generated_text": c.text,
                    "finish_reason": c.finish_reason,
                    "generated_tokens": len(c.token_ids),
                    "score": c.score,
                }
                for c in result
            ]
        fields["provider"] = self.provider
        return fields

    def to_columns(self, result: list[Completion] | None) -> list[str]:
        if result is None:
            return ["", ""]
        return [result[0].text, result[0].finish_reason or ""]
