"""Chat and text completions on a decoder export, on its continuous batcher (serve.continuous).

Each choice of each prompt is one request to the export's `ContinuousBatcher` (choice j uses random
stream j), so concurrent requests share decoding steps and a long generation does not hold up short
ones. A request whose client went away, or whose time ran out, is cancelled: its rows leave the batch
at the next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from onnxpipe.api import Pipeline
from onnxpipe.decoding import DEFAULT_MAX_NEW_TOKENS
from onnxpipe.serve.continuous import (
    BatcherClosed,
    ContinuousBatcher,
    GenerationEvent,
    GenerationOutput,
    GenerationRequest,
    GenerationStream,
    QueueFull,
)

__all__ = ["BatcherClosed", "Generator", "QueueFull", "Sampling"]


@dataclass
class Sampling:
    """A request's decoding settings (None: the export's own default)."""

    max_new_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()


class Generator:
    """A decoder export's generation for the server; `lm` is its CausalLM (tokenizer, template, defaults)."""

    def __init__(self, pipeline: Pipeline, max_queue: int = 256, max_batch: int | None = None):
        self.batcher = ContinuousBatcher(pipeline, max_batch=max_batch or pipeline.batch_size, max_queue=max_queue)
        self.lm = self.batcher.lm
        self.requests = 0  # HTTP requests that generated

    @property
    def context(self) -> int | None:
        """The model's positions (prompt + completion), when its config says."""
        return self.batcher.max_positions

    @property
    def default_max_new_tokens(self) -> int:
        return self.lm.defaults.max_new_tokens or DEFAULT_MAX_NEW_TOKENS

    def describe(self) -> dict[str, Any]:
        b = self.batcher
        return {
            "requests": self.requests,
            "cancelled": getattr(b, "cancelled", None),  # choices stopped early: client gone, timeout
            "running": b.running,
            "waiting": b.waiting,
            "prefills": b.prefills,
            "steps": b.steps,
            "max_rows": b.max_rows,
        }

    def submit(self, prompts: Sequence[Sequence[int]], n: int, sampling: Sampling) -> list[GenerationStream]:
        """One stream per choice, choice `i * n + j` for prompt i's j-th. QueueFull, BatcherClosed, UsageError."""
        streams: list[GenerationStream] = []
        try:
            for ids in prompts:
                for j in range(n):
                    request = GenerationRequest(
                        list(ids),
                        max_new_tokens=sampling.max_new_tokens,
                        temperature=sampling.temperature,
                        top_p=sampling.top_p,
                        seed=sampling.seed,
                        stop=list(sampling.stop),
                        key=j,
                    )
                    streams.append(self.batcher.submit(request))
        except Exception:
            self.cancel(streams)
            raise
        self.requests += 1
        return streams

    def cancel(self, streams: Sequence[GenerationStream]) -> None:
        for stream in streams:
            stream.cancel()

    async def complete(self, streams: list[GenerationStream]) -> list[GenerationOutput]:
        """The whole completions; cancelling this coroutine (timeout, client gone) cancels the streams."""
        try:
            return list(await asyncio.gather(*(s.aresult() for s in streams)))
        finally:
            self.cancel(streams)

    def events(self, streams: list[GenerationStream]) -> ChoiceEvents:
        """The choices' events as they come (`await events.next()`); `events.close()` cancels what still runs."""
        return ChoiceEvents(self, streams)

    def close(self) -> None:
        self.batcher.close(timeout=0)


class ChoiceEvents:
    """The events of several choices merged in arrival order. Awaiting `next()` can be cancelled at any time
    (a timeout, a client gone) without harm; `close()` is synchronous, so it runs even inside a cancelled task."""

    def __init__(self, generator: Generator, streams: list[GenerationStream]):
        self.generator = generator
        self.streams = streams
        self.left = len(streams)
        self._queue: asyncio.Queue[tuple[int, GenerationEvent | None, BaseException | None]] = asyncio.Queue()
        self._tasks = [asyncio.ensure_future(self._pump(i, s)) for i, s in enumerate(streams)]

    async def _pump(self, choice: int, stream: GenerationStream) -> None:
        try:
            async for event in stream:
                self._queue.put_nowait((choice, event, None))
            self._queue.put_nowait((choice, None, None))
        except Exception as exc:  # a failed model run: next() raises it
            self._queue.put_nowait((choice, None, exc))

    async def next(self) -> tuple[int, GenerationEvent] | None:
        """The next (choice, event); None once every choice has ended."""
        while self.left:
            choice, event, error = await self._queue.get()
            if error is not None:
                raise error
            if event is None:
                self.left -= 1
                continue
            return choice, event
        return None

    def close(self) -> None:
        self.generator.cancel(self.streams)
        for task in self._tasks:
            task.cancel()
