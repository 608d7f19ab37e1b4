"""Generation one request at a time: the stand-in for serve.continuous's ContinuousBatcher.

Same surface as the continuous batcher (submit a request, get a stream of text events, cancel it), so
that serve.generation swaps one for the other in one import. Requests run one after another on one
thread per export through CausalLM.generate, the code path of `onnxpipe generate`: correct, not
concurrent. A cancelled request stops at its next decoding step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from onnxpipe.decoding import DEFAULT_MAX_NEW_TOKENS
from onnxpipe.errors import OnnxpipeError, UsageError


class QueueFull(OnnxpipeError):
    """More requests are waiting for this export than allowed (the server answers 429)."""


class BatcherClosed(OnnxpipeError):
    """Shutting down: no new requests (the server answers 503)."""


class _Cancelled(Exception):
    pass


@dataclass
class GenerationRequest:
    prompt_ids: Sequence[int]
    max_new_tokens: int | None = None
    temperature: float | None = None  # 0: greedy
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    key: int = 0  # the random stream's index with `seed` (choice i of n uses key i)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class GenerationEvent:
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length", on the last event only
    usage: Usage | None = None


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage


class GenerationStream:
    """One request's events, pushed by the worker thread, read with `async for` (or `aresult()`)."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self._lock = threading.Lock()
        self._events: deque[GenerationEvent] = deque()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._ended = False
        self._error: str | None = None
        self._cancelled = threading.Event()
        self.token_ids: list[int] = []
        self.text: str | None = None  # the whole completion's text (its decode), once done

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()
        self._push(None, end=True)

    def _push(self, event: GenerationEvent | None, end: bool = False, error: str | None = None) -> None:
        with self._lock:
            if self._ended:
                return
            if event is not None:
                self._events.append(event)
            self._ended = end or error is not None or (event is not None and event.finish_reason is not None)
            self._error = error
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, ready = waiter
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the consumer's loop is closed
                pass

    async def _iterate(self) -> AsyncIterator[GenerationEvent]:
        loop = asyncio.get_running_loop()
        try:
            while True:
                ready = None
                with self._lock:
                    event = self._events.popleft() if self._events else None
                    if event is None and not self._ended:
                        ready = asyncio.Event()
                        self._waiter = (loop, ready)
                if ready is not None:
                    await ready.wait()
                    continue
                if event is None:
                    if self._error is not None:
                        raise OnnxpipeError(self._error)
                    return
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if not self._ended:
                self.cancel()

    def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        return self._iterate()

    async def aresult(self) -> GenerationOutput:
        events = [e async for e in self]
        last = events[-1] if events else GenerationEvent()
        if last.finish_reason is None or last.usage is None:
            raise OnnxpipeError("the request was cancelled")
        text = self.text if self.text is not None else "".join(e.text for e in events)
        return GenerationOutput(text, self.token_ids, last.finish_reason, last.usage)


class SerialGenerator:
    """Generation requests on one decoder export, one at a time on a worker thread."""

    def __init__(self, pipeline: Any, max_batch: int = 1, max_queue: int = 64):
        self.pipeline = pipeline
        self.lm = pipeline.task_for({}).lm
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"onnxpipe-generate-{pipeline.name}")
        self._waiting = 0
        self._running = 0
        self._closing = False
        self.prefills = self.steps = self.max_rows = 0
        self.cancelled = 0  # requests stopped before their end (client gone, timeout)

    @property
    def max_positions(self) -> int | None:
        positions: int | None = self.lm.max_positions
        return positions

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(self, request: GenerationRequest) -> GenerationStream:
        config = self._config(request)
        if not request.prompt_ids:
            raise UsageError("the prompt is empty")
        if self._closing:
            raise BatcherClosed("the server is shutting down")
        if self._waiting >= self.max_queue:
            raise QueueFull(f"{self._waiting} requests are waiting", hint="retry later")
        stream = GenerationStream(request)
        self._waiting += 1
        self._executor.submit(self._run, stream, config)
        return stream

    def close(self, timeout: float | None = None) -> None:
        self._closing = True
        self._executor.shutdown(wait=False)

    def _config(self, request: GenerationRequest) -> Any:
        config = self.lm.defaults.update(top_p=request.top_p, seed=request.seed)
        if request.temperature is not None:
            sampling = request.temperature > 0
            config = config.update(do_sample=sampling, temperature=request.temperature if sampling else None)
        config = config.update(max_new_tokens=request.max_new_tokens or config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
        config.num_beams, config.num_return_sequences = 1, 1
        try:
            config.validate()
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        return config

    def _run(self, stream: GenerationStream, config: Any) -> None:
        self._waiting -= 1
        if stream.cancelled:
            self.cancelled += 1
            return
        self._running += 1
        request = stream.request
        lm = dataclasses.replace(self.lm, decoder=_CancellableDecoder(self.lm.decoder, stream._cancelled, self))
        try:
            (best, *_), *_ = lm.generate(
                [list(request.prompt_ids)],
                config,
                keys=[request.key],
                stop=request.stop,
                on_text=lambda _key, text: stream._push(GenerationEvent(text=text)),
            )
            stream.token_ids, stream.text = list(best.token_ids), best.text
            reason = "length" if best.finish_reason == "length" or best.position_limited else "stop"
            usage = Usage(best.prompt_tokens, len(best.token_ids))
            stream._push(GenerationEvent(finish_reason=reason, usage=usage))
        except _Cancelled:
            self.cancelled += 1
        except Exception as exc:
            stream._push(None, error=f"generation failed: {str(exc).splitlines()[0] if str(exc) else type(exc)}")
        finally:
            self._running -= 1


class _CancellableDecoder:
    """A CausalDecoder whose decoding steps stop (raise) once the request is cancelled."""

    def __init__(self, decoder: Any, cancelled: threading.Event, counts: SerialGenerator):
        self._decoder = decoder
        self._cancelled = cancelled
        self._counts = counts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._decoder, name)

    def prefill(self, prompts: Any, pad_id: int = 0) -> Any:
        logits, step = self._decoder.prefill(prompts, pad_id)
        self._counts.prefills += 1
        self._counts.max_rows = max(self._counts.max_rows, len(prompts))

        def checked(*args: Any) -> Any:
            if self._cancelled.is_set():
                raise _Cancelled()
            self._counts.steps += 1
            return step(*args)

        return logits, checked
