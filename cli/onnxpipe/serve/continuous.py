"""Continuous batching for generation: requests join and leave one running batch at step boundaries.

One scheduler thread per decoder export drives its `CausalDecoder` (runtime.decoder) step by step. At
each step boundary it

1. admits waiting requests (up to `max_batch` rows): their prompts are prefilled together and their
   key/value cache rows join the running batch's cache. How depends on the graph (runtime.running):
   a growing cache (optimum's graph, onnxpipe's fused CPU graph) is merged left-padded with zeros that
   the attention mask hides; onnxpipe's CUDA graph, whose cache is one fixed buffer per tensor, takes the
   newcomers as more rows, each at its own length;
2. picks every row's next id from its logits, with that request's own settings: its logits processors
   see only its own ids (prompt and generated), and a sampled request draws from its own random stream
   seeded with `(seed, key)`, as `onnxpipe generate --seed` does for record `key`;
3. ends rows at eos, a stop string, `max_new_tokens` or the model's last position, and drops cancelled
   ones: the remaining rows' cache is gathered on its device (and a growing cache's left-padding that no
   remaining row uses any more is trimmed off);
4. runs one decoding step for the rows still running.

So a long generation does not hold up a short one, and a request's greedy ids are the ids it gets alone
(a row's logits do not depend on its batch-mates, as for `onnxpipe generate`'s batches). Seeded sampling
is reproducible for a request whatever its batch-mates for the same reason.

Use (from the server, or any thread):

    batcher = ContinuousBatcher(onnxpipe.load("smollm2"), max_batch=8, max_queue=64)
    ids = batcher.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    stream = batcher.submit(GenerationRequest(ids, max_new_tokens=64, temperature=0))  # QueueFull when full
    for event in stream:              # blocking; or `async for event in stream` inside an event loop
        print(event.text, end="")     # a text delta: never half a UTF-8 character, never part of a stop string
    event.finish_reason, event.usage  # on the last event: "stop" | "length", prompt/completion token counts
    stream.cancel()                   # the client went away: the row leaves the batch at the next step
    batcher.close()                   # finish what was accepted, refuse new requests

Every generated id gives one event (`token_id`, and the text it completes, maybe ""), then one last
event has `finish_reason`, `usage`, the text held back until then (a possible stop-string start) and
`full_text`, the whole completion as `onnxpipe generate` gives it (what `result()`/`aresult()` return).
A cancelled request's iteration ends without a last event; one cancelled while it waits leaves the
queue at the next step boundary. `async for` is fed with `loop.call_soon_threadsafe`, so an asyncio server awaits events without a
thread per request. Leaving a `for`/`async for` loop early cancels the request. If the model run
fails, every request in the batch ends with an `OnnxpipeError` raised by its iteration, and the
scheduler goes on with the next requests. n choices are n requests (keys 0..n-1 for their random
streams).

On CUDA the cache stays on the device between steps; admitting newcomers into a running batch takes a
host round trip (it happens only when requests arrive).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxpipe.decoding import DEFAULT_MAX_NEW_TOKENS, GenerationConfig
from onnxpipe.decoding.processors import History, build_processors, softmax, token_mask
from onnxpipe.decoding.search import row_rng, sample_rows
from onnxpipe.errors import OnnxpipeError, UsageError

__all__ = [
    "BatcherClosed",
    "ContinuousBatcher",
    "GenerationEvent",
    "GenerationOutput",
    "GenerationRequest",
    "GenerationStream",
    "QueueFull",
    "Usage",
]


class QueueFull(OnnxpipeError):
    """The batcher's queue of waiting requests is full (the server answers 429)."""


class BatcherClosed(OnnxpipeError):
    """The batcher is shutting down and takes no new requests (the server answers 503)."""


@dataclass
class GenerationRequest:
    """One completion to generate. None means the export's own default (its generation_config.json)."""

    prompt_ids: Sequence[int]
    max_new_tokens: int | None = None  # capped at the model's positions left after the prompt
    temperature: float | None = None  # 0: greedy; > 0: sampling at that temperature
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()  # stop strings: the text ends before the first one
    stop_token_ids: Sequence[int] | None = None  # None: the export's eos ids
    key: int = 0  # the random stream's index with `seed` (choice i of n uses key i)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class GenerationEvent:
    text: str = ""  # the new text since the previous event
    token_id: int | None = None  # the id generated at this step (None on the last event)
    finish_reason: str | None = None  # "stop" (eos or a stop string) | "length", on the last event only
    usage: Usage | None = None  # on the last event only
    # On the last event only: the whole completion as `onnxpipe generate` gives it (its ids decoded, cut
    # before a stop string). The texts of the events add up to it, unless the model produced bytes that
    # form no valid UTF-8: a byte-fallback decoder turns earlier bytes into U+FFFD once a later one
    # shows the sequence invalid, which a delta already sent cannot follow.
    full_text: str | None = None


@dataclass
class GenerationOutput:
    """A whole completion (`GenerationStream.result()`)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage


class GenerationStream:
    """The events of one request, pushed by the scheduler thread; read by one consumer, sync or async."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._events: deque[GenerationEvent] = deque()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._ended = False  # the last event (or an error) was pushed
        self._error: str | None = None
        self._cancelled = False

    # --- the consumer's side -------------------------------------------------------------
    def cancel(self) -> None:
        """Stop generating (the client went away): the row leaves the batch at the next step, and the
        iteration ends after the events already pushed (with no last event)."""
        with self._ready:
            self._cancelled = True
            self._ended = True
        self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def __iter__(self) -> Iterator[GenerationEvent]:
        try:
            while True:
                with self._ready:
                    while not self._events and not self._ended:
                        self._ready.wait()
                    event = self._events.popleft() if self._events else None
                if event is None:
                    self._raise_if_failed()
                    return
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self._cancel_unless_ended()

    def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        return self._events_async()

    async def _events_async(self) -> AsyncIterator[GenerationEvent]:
        loop = asyncio.get_running_loop()
        try:
            while True:
                waiter = None
                with self._lock:
                    event = self._events.popleft() if self._events else None
                    if event is None and not self._ended:
                        waiter = asyncio.Event()
                        self._waiters.append((loop, waiter))
                if waiter is not None:
                    await waiter.wait()
                    continue
                if event is None:
                    self._raise_if_failed()
                    return
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self._cancel_unless_ended()

    def result(self) -> GenerationOutput:
        """Wait for the whole completion."""
        return self._collect(list(self))

    async def aresult(self) -> GenerationOutput:
        """Await the whole completion."""
        return self._collect([event async for event in self])

    def _collect(self, events: list[GenerationEvent]) -> GenerationOutput:
        last = events[-1] if events else GenerationEvent()
        if last.finish_reason is None or last.usage is None:
            raise OnnxpipeError("the request was cancelled")
        ids = [e.token_id for e in events if e.token_id is not None]
        text = last.full_text if last.full_text is not None else "".join(e.text for e in events)
        return GenerationOutput(text, ids, last.finish_reason, last.usage)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise OnnxpipeError(self._error)

    def _cancel_unless_ended(self) -> None:
        with self._lock:
            if not self._ended:
                self._cancelled = True

    # --- the scheduler's side ------------------------------------------------------------
    def _push(self, event: GenerationEvent | None, error: str | None = None) -> None:
        with self._ready:
            if self._cancelled:
                return
            if event is not None:
                self._events.append(event)
                self._ended = self._ended or event.finish_reason is not None
            if error is not None:
                self._error, self._ended = error, True
        self._wake()

    def _wake(self) -> None:
        with self._ready:
            waiters, self._waiters = self._waiters, []
            self._ready.notify_all()
        for loop, waiter in waiters:
            try:
                loop.call_soon_threadsafe(waiter.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is waiting any more
                pass


@dataclass
class _Row:
    """A running request: its ids, settings, random stream and text stream."""

    stream: GenerationStream
    config: GenerationConfig
    processors: Any
    ids: np.ndarray  # (1, prompt + limit) int64: the prompt, then the generated ids
    prompt_len: int
    limit: int  # new tokens at most
    is_eos: np.ndarray
    texts: Any  # tasks.causal._TextStreams over one key (0)
    rng: np.random.Generator | None
    generated: int = 0
    pending: list[str] = field(default_factory=list)  # text the text stream emitted since the last event

    @property
    def token_ids(self) -> list[int]:
        return self.ids[0, self.prompt_len : self.prompt_len + self.generated].tolist()


class ContinuousBatcher:
    """Generation requests on one decoder export, batched continuously by a scheduler thread."""

    def __init__(self, pipeline: Any, max_batch: int = 8, max_queue: int = 64):
        if pipeline.family.kind != "decoder":
            raise UsageError(f"{pipeline.name} is a {pipeline.task} export, not text-generation")
        if max_batch < 1 or max_queue < 0:
            raise UsageError("max_batch must be at least 1 and max_queue at least 0")
        self.pipeline = pipeline
        self.lm = pipeline.task_for({}).lm  # tasks.causal.CausalLM: tokenizer, defaults, chat template, decoder
        self.decoder = self.lm.decoder
        self.max_batch, self.max_queue = max_batch, max_queue
        self._cond = threading.Condition()
        self._queue: deque[GenerationStream] = deque()
        self._closing = False
        self._rows: list[_Row] = []
        self._batch = self.decoder.running()  # the running rows' cache (runtime.running)
        self._logits: np.ndarray | None = None  # the next-token logits of every running row
        # Counters, for tests, benchmarks and the server's /health: model runs, the most rows one decoding
        # step ran, and the requests cancelled before their end (client gone, timeout).
        self.prefills = 0
        self.steps = 0
        self.max_rows = 0
        self.cancelled = 0
        self._thread = threading.Thread(target=self._loop, name=f"onnxpipe-generate-{pipeline.name}", daemon=True)
        self._thread.start()

    # --- prompts ---------------------------------------------------------------------------
    @property
    def max_positions(self) -> int | None:
        """The model's positions (prompt + completion)."""
        positions: int | None = self.lm.max_positions
        return positions

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.lm.defaults.eos_token_id or [])

    def encode_text(self, prompt: str) -> list[int]:
        """A plain prompt's ids (with the tokenizer's special tokens, as `onnxpipe generate` encodes it)."""
        ids: list[int] = self.lm.encode(prompt)
        return ids

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """MESSAGES rendered by the export's chat template, the assistant turn opened, as ids."""
        from onnxpipe.tasks.causal import render_chat_template

        self.lm.render_chat("")  # a UsageError when the export has no chat template
        text = render_chat_template(self.lm.chat_template, messages, self.lm.special_tokens)
        ids: list[int] = self.lm.encode(text, chat=True)
        return ids

    # --- requests ---------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> GenerationStream:
        """Queue REQUEST; its stream yields the events. Thread-safe. QueueFull when `max_queue` wait already."""
        row_config = self._config(request)  # a UsageError now, not in the scheduler
        self._limit(request, row_config)
        stream = GenerationStream(request)
        with self._cond:
            if self._closing:
                raise BatcherClosed("the server is shutting down", hint="retry on another instance")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting", hint="retry later")
            self._queue.append(stream)
            self._cond.notify_all()
        return stream

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish those accepted (running and queued), then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def running(self) -> int:
        """Requests in the running batch now."""
        return len(self._rows)

    @property
    def waiting(self) -> int:
        """Requests queued for the next step boundary."""
        return len(self._queue)

    def _config(self, request: GenerationRequest) -> GenerationConfig:
        config: GenerationConfig = self.lm.defaults.update(top_p=request.top_p, seed=request.seed)
        if request.temperature is not None:
            if request.temperature < 0:
                raise UsageError("temperature must be >= 0")
            sampling = request.temperature > 0
            config = config.update(do_sample=sampling, temperature=request.temperature if sampling else None)
        if request.stop_token_ids is not None:
            config.eos_token_id = [int(i) for i in request.stop_token_ids]
        config.num_beams, config.num_return_sequences = 1, 1
        try:
            config.validate()
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        return config

    def _limit(self, request: GenerationRequest, config: GenerationConfig) -> int:
        prompt = len(request.prompt_ids)
        if not prompt:
            raise UsageError("the prompt is empty")
        wanted = request.max_new_tokens or config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        if wanted < 1:
            raise UsageError("max_new_tokens must be at least 1")
        positions = self.max_positions
        if positions:
            if prompt >= positions:
                raise UsageError(f"the prompt has {prompt} tokens; the model has {positions} positions")
            wanted = min(wanted, positions - prompt)
        return int(wanted)

    # --- the scheduler thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._rows and not self._closing:
                    self._cond.wait()
                if not self._queue and not self._rows:
                    return  # closing, and nothing left
                if any(s.cancelled for s in self._queue):  # a client gone while waiting frees its place now
                    self.cancelled += sum(s.cancelled for s in self._queue)
                    self._queue = deque(s for s in self._queue if not s.cancelled)
                room = self.max_batch - len(self._rows)
                newcomers = [self._queue.popleft() for _ in range(min(room, len(self._queue)))]
            try:
                if newcomers:
                    self._admit(newcomers)
                if self._rows:
                    self._advance()
            except Exception as exc:  # a failed run: end this batch's requests, keep serving the next ones
                message = f"generation failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                for stream in [r.stream for r in self._rows] + newcomers:
                    if not stream._ended:
                        stream._push(None, error=message)
                self._reset()

    def _reset(self) -> None:
        self._rows, self._logits = [], None
        self._batch.reset()

    def _new_row(self, stream: GenerationStream) -> _Row:
        from onnxpipe.tasks.causal import _TextStreams

        request = stream.request
        config = self._config(request)
        limit = self._limit(request, config)
        prompt = np.asarray(list(request.prompt_ids), dtype=np.int64)
        ids = np.zeros((1, len(prompt) + limit), dtype=np.int64)
        ids[0, : len(prompt)] = prompt
        row = _Row(
            stream=stream,
            config=config,
            processors=build_processors(config, limit),
            ids=ids,
            prompt_len=len(prompt),
            limit=limit,
            is_eos=token_mask(tuple(config.eos_token_id or ()), self.decoder.vocab_size),
            texts=None,
            rng=row_rng(config.seed, request.key) if config.do_sample else None,
        )
        row.texts = _TextStreams(self.lm.tokenizer, [0], request.stop, lambda _key, chunk: row.pending.append(chunk))
        return row

    def _admit(self, streams: list[GenerationStream]) -> None:
        """Prefill STREAMS' prompts together and merge their cache rows into the running batch's."""
        rows = [self._new_row(s) for s in streams]
        defaults = self.lm.defaults
        pad = defaults.pad_token_id if defaults.pad_token_id is not None else (defaults.eos_token_id or [0])[0]
        prompts = [r.ids[0, : r.prompt_len] for r in rows]
        logits = self._batch.admit(prompts, pad, [r.prompt_len + r.limit for r in rows])
        self.prefills += 1
        self._logits = logits if self._logits is None else np.concatenate([self._logits, logits])
        self._rows += rows

    def _advance(self) -> None:
        """Pick every row's next id, end the rows that are done, run one step for the others."""
        assert self._logits is not None
        tokens = np.zeros(len(self._rows), dtype=np.int64)
        keep = np.ones(len(self._rows), dtype=bool)
        for r, row in enumerate(self._rows):
            if row.stream.cancelled:
                keep[r] = False
                self.cancelled += 1
                continue
            token = self._pick(row, self._logits[r : r + 1])
            tokens[r] = token
            reason = self._emit(row, token)
            if reason is not None:
                keep[r] = False
                self._finish(row, reason)
        if not keep.all():
            kept = np.flatnonzero(keep)
            self._rows = [self._rows[i] for i in kept]
            if not self._rows:
                self._reset()
                return
            tokens = tokens[kept]
            self._batch.keep(kept)
        self._logits = self._batch.step(tokens)
        self.steps += 1
        self.max_rows = max(self.max_rows, len(tokens))

    def _pick(self, row: _Row, logits: np.ndarray) -> int:
        """ROW's next id from its logits (1, vocab), exactly as the lone search picks it."""
        end = row.prompt_len + row.generated
        history = History(row.ids[:, :end], np.zeros(1, dtype=np.int64), row.prompt_len)
        scores = row.processors(history, logits.copy())
        if row.rng is not None:
            return int(sample_rows(softmax(scores), [row.rng])[0])
        return int(scores.argmax(axis=1)[0])

    def _emit(self, row: _Row, token: int) -> str | None:
        """Record TOKEN, push its event; the finish reason when the row ends with it."""
        row.ids[0, row.prompt_len + row.generated] = token
        row.generated += 1
        row.texts.feed(np.zeros(1, dtype=np.int64), np.array([token], dtype=np.int64))
        stopped = bool(row.texts.stopped.get(0))
        text, row.pending = "".join(row.pending), []
        row.stream._push(GenerationEvent(text=text, token_id=token))
        if row.is_eos[token]:
            return "eos"
        if stopped:
            return "stop"
        if row.generated >= row.limit:
            return "length"
        return None

    def _finish(self, row: _Row, reason: str) -> None:
        from onnxpipe.tasks.causal import _cut_at_stop

        if reason == "stop":
            final = row.texts.text(0)
        else:  # as CausalLM._completion: the whole decode, and a stop string found only there still ends it
            final = self.lm.tokenizer.decode(row.token_ids, skip_special_tokens=True)
            cut = _cut_at_stop(final, row.stream.request.stop)
            if cut is not None:
                final, reason = cut, "stop"
        row.texts.finish(0, final)
        usage = Usage(row.prompt_len, row.generated)
        text, row.pending = "".join(row.pending), []
        finish = "length" if reason == "length" else "stop"
        row.stream._push(GenerationEvent(text=text, finish_reason=finish, usage=usage, full_text=final))
