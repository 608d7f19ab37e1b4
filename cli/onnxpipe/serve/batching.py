"""Dynamic batching for the encoder and seq2seq exports: concurrent requests share session runs.

A request's texts wait in the export's queue; one worker takes the oldest request, then gathers the
requests that arrive within `wait_ms` and ask for the same options, up to the family's batch size and
token budget, and runs them as one `Pipeline` call in a thread (the engine sorts them by length and cuts
them into session runs by the same budget). Each request gets its own results back, in its own order:
batching never changes a result beyond float noise of padding.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from onnxpipe.api import Pipeline, _hashable
from onnxpipe.stream.records import Result


def _chars(value: Any) -> int:
    """An input's characters: a text, a (text, text_pair) pair, a {"question", "context"} object."""
    if isinstance(value, str):
        return len(value)
    items = value.values() if isinstance(value, dict) else value
    return sum(len(v) for v in items if isinstance(v, str))


class QueueFull(Exception):
    """More requests are waiting for this export than --max-queue allows."""


@dataclass
class _Request:
    texts: list[Any]  # what Pipeline takes: texts, pairs, question/context objects
    options: dict[str, Any]
    key: Any
    future: asyncio.Future
    cost: int  # texts' length in characters: a cheap upper bound of their tokens, for the budget


@dataclass
class BatchStats:
    requests: int = 0  # requests answered (or failed)
    inputs: int = 0  # texts run
    runs: int = 0  # Pipeline calls, each one shared by the requests gathered into it
    batch_sizes: list[int] = field(default_factory=list)  # texts per run, the last 1,000

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "inputs": self.inputs, "runs": self.runs}


class DynamicBatcher:
    """Gathers concurrent requests to one Pipeline into shared runs (one worker task per export)."""

    def __init__(self, pipeline: Pipeline, wait_ms: float = 5.0, max_queue: int = 256):
        self.pipeline = pipeline
        self.wait = wait_ms / 1000.0
        self.max_queue = max_queue
        self.batch_size = pipeline.batch_size
        self.max_batch_chars = pipeline.max_batch_tokens * 4  # see _Request.cost
        self.stats = BatchStats()
        self._pending: deque[_Request] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def submit(self, texts: list[Any], options: dict[str, Any]) -> list[Result]:
        """The Results of TEXTS with OPTIONS, once the run that took them is done."""
        if len(self._pending) >= self.max_queue:
            raise QueueFull()
        self._start()
        assert self._arrived is not None
        key = tuple(sorted((k, _hashable(v)) for k, v in options.items()))
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Request(texts, options, key, future, sum(_chars(t) for t in texts)))
        self._arrived.set()
        try:
            # shield: a client that went away (or timed out) does not cancel the shared run
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):
                self._pending.remove(next(r for r in self._pending if r.future is future))
            raise

    def _start(self) -> None:
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._work())

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def _work(self) -> None:
        assert self._arrived is not None
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            group = await self._gather()
            await self._run(group)

    async def _gather(self) -> list[_Request]:
        """The oldest request and those like it that arrive within the wait, up to the batch limits."""
        assert self._arrived is not None
        first = self._pending.popleft()
        group, size, cost = [first], len(first.texts), first.cost
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        while size < self.batch_size:
            for request in list(self._pending):
                if request.key != first.key:
                    continue
                if size + len(request.texts) > self.batch_size or cost + request.cost > self.max_batch_chars:
                    return group
                self._pending.remove(request)
                group.append(request)
                size, cost = size + len(request.texts), cost + request.cost
            left = deadline - loop.time()
            if left <= 0 or size >= self.batch_size:
                break
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
        return group

    def _call(self, texts: list[Any], options: dict[str, Any]) -> list[Result]:
        return self.pipeline(texts, **options)

    async def _run(self, group: list[_Request]) -> None:
        group = [r for r in group if not r.future.done()]  # cancelled while waiting
        if not group:
            return
        texts = [t for r in group for t in r.texts]
        self.stats.runs += 1
        self.stats.inputs += len(texts)
        self.stats.requests += len(group)
        self.stats.batch_sizes = [*self.stats.batch_sizes[-999:], len(texts)]
        try:
            results = await asyncio.to_thread(self._call, texts, group[0].options)
        except Exception as exc:  # every request of the run gets the error (a bad option is the same for all)
            for request in group:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        start = 0
        for request in group:
            if not request.future.done():
                request.future.set_result(results[start : start + len(request.texts)])
            start += len(request.texts)
