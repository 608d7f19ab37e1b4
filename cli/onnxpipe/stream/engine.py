"""The engine: reader -> window -> length-sorted batches -> task -> writer, in input order.

A window of records (`window` records, or what arrived before the producer went quiet for
`idle` seconds, or what arrived within `max_wait` seconds) is encoded by the task, sorted by
token count, cut into batches of at most `batch_size` records and `max_batch_tokens` padded
tokens, and run batch by batch. After each batch, the records whose results are complete up to
the first missing one are written and flushed, so output starts before the window is done and
the order is always the input order. Empty records and records that could not be read never
reach the task; they get an empty result (and an error in JSONL).

The first result of a stream does not wait for the first window's sorted pass: as soon as more
than two batches' worth of records have arrived, the first `first_batch` of them (at most
`batch_size`) are encoded and run on their own, in input order, and written. The rest of the
window is then encoded, sorted and run as usual, so only those few records miss the sorting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from onnxpipe.errors import InputError, OnnxpipeError, UsageError
from onnxpipe.stream.readers import LineSource, RawChunk, RecordParser
from onnxpipe.stream.records import Item, Record, Result

ON_ERROR = ("fail", "null")


class Task(Protocol):
    """What a task gives the engine. See onnxpipe.stream's docstring for the contract."""

    def encode(self, records: Sequence[Record]) -> list[Item]: ...
    def run(self, batch: Sequence[Item]) -> list[Any]: ...
    def to_text(self, result: Any) -> str: ...
    def to_fields(self, result: Any) -> dict[str, Any]: ...
    def to_columns(self, result: Any) -> list[str]: ...


class ResultWriter(Protocol):
    """What the engine writes results to: a stream.writers.Writer, or a collector with its methods."""

    def write(self, result: Result) -> None: ...
    def write_partial(self, text: str) -> None: ...
    def flush(self) -> None: ...


@dataclass
class EngineOptions:
    batch_size: int = 32
    max_batch_tokens: int | None = 16384  # padded tokens per batch (rows x longest row)
    window: int = 1024
    idle: float = 0.1  # seconds of producer silence after which buffered records run
    max_wait: float = 1.0  # a record waits at most this long for its window to fill
    on_error: str = "fail"
    streaming: bool = False  # call task.run_streaming(item, emit) one record at a time
    first_batch: int = 4  # records run alone, unsorted, at a stream's start; 0: none (see the docstring)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise UsageError("--max-batch-tokens must be at least 1")
        if self.on_error not in ON_ERROR:
            raise UsageError(f"--on-error must be one of {', '.join(ON_ERROR)}")
        self.window = max(self.window, self.batch_size)


@dataclass
class Summary:
    records: int = 0
    seconds: float = 0.0
    truncated: int = 0
    errors: int = 0
    replaced: int = 0  # records whose invalid UTF-8 was replaced
    batches: int = 0
    truncated_where: list[str] = field(default_factory=list)  # the first few, "source:line"
    error_where: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


class _Failed:
    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


_KEEP_WHERE = 5


class Engine:
    """Runs one task over a stream of records. Never prints: `report` gets warnings, `progress` updates."""

    def __init__(
        self,
        task: Task,
        writer: ResultWriter,
        options: EngineOptions | None = None,
        report: Callable[[str], None] | None = None,
        progress: Any = None,
    ):
        self.task = task
        self.writer = writer
        self.options = options or EngineOptions()
        self.report = report or (lambda message: None)
        self.progress = progress
        self.summary = Summary()
        self._written = 0

    # --- entry points -------------------------------------------------------------------------
    def run(self, source: LineSource, parser: RecordParser) -> Summary:
        """Stream SOURCE through the task until it ends. The writer is flushed but not closed."""
        start = time.perf_counter()
        opts = self.options
        window: list[Record] = []
        opened = 0.0
        head = 0 if opts.streaming else min(opts.first_batch, opts.batch_size)
        try:
            for chunk in source.chunks(opts.idle):
                if not isinstance(chunk, RawChunk):  # IDLE: a quiet spell
                    if window:
                        self._process(window)
                        window = []
                    continue
                if not window:
                    opened = time.perf_counter()
                window.extend(parser.parse(chunk))
                if head and self.summary.records == 0 and len(window) > 2 * opts.batch_size:
                    # Nothing written yet and the window will take a few batches: the first
                    # records go ahead, so the first result is not held up by a whole sorted pass.
                    self._process(window[:head], sort=False)
                    window = window[head:]
                while len(window) >= opts.window:
                    self._process(window[: opts.window])
                    window = window[opts.window :]
                    opened = time.perf_counter()
                if window and time.perf_counter() - opened > opts.max_wait:
                    self._process(window)
                    window = []
            if window:
                self._process(window)
        finally:
            source.close()
            self.summary.replaced = parser.replaced
            self.summary.seconds = time.perf_counter() - start
        return self.summary

    def run_records(self, records: Iterable[Record]) -> Summary:
        """Run records that are already in memory (prompts given as arguments, a batch job's chunk, the
        API). Records whose invalid UTF-8 their reader replaced are counted, as run() counts its parser's."""
        start = time.perf_counter()
        window: list[Record] = []
        for record in records:
            self.summary.replaced += bool(record.replaced)
            window.append(record)
            if len(window) >= self.options.window:
                self._process(window)
                window = []
        if window:
            self._process(window)
        self.summary.seconds = time.perf_counter() - start
        return self.summary

    # --- one window ---------------------------------------------------------------------------
    def _process(self, records: list[Record], sort: bool = True) -> None:
        done: dict[int, tuple[Any, str | None]] = {}
        runnable: list[Item] = []
        for item in self._encode([r for r in records if r.error is None and r.text != ""]):
            if item.truncated:
                self.summary.truncated += 1
                if len(self.summary.truncated_where) < _KEEP_WHERE:
                    self.summary.truncated_where.append(item.record.where)
            if item.error is not None:
                done[item.record.seq] = (None, item.error)
            else:
                runnable.append(item)
        for record in records:
            if record.error is not None:
                done[record.seq] = (None, record.error)
            elif record.text == "":
                done[record.seq] = (None, None)
        cursor = self._emit(records, 0, done)
        if sort and not self.options.streaming:  # streamed pieces must come out in input order
            runnable.sort(key=lambda item: item.cost)
        for batch in self._batches(runnable):
            for item, result in zip(batch, self._run_batch(batch)):
                if isinstance(result, _Failed):
                    done[item.record.seq] = (None, result.message)
                else:
                    done[item.record.seq] = (result, None)
            self.summary.batches += 1
            cursor = self._emit(records, cursor, done)
        assert cursor == len(records), "every record of a window is written"

    def _encode(self, records: list[Record]) -> list[Item]:
        if not records:
            return []
        try:
            return list(self.task.encode(records))
        except (OnnxpipeError, KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:
            if len(records) == 1:
                return [Item(records[0], 0, error=f"cannot tokenize: {exc}")]
            return [item for record in records for item in self._encode([record])]

    def _batches(self, items: list[Item]) -> Iterable[list[Item]]:
        """Cut sorted ITEMS into batches: at most batch_size rows, at most max_batch_tokens padded tokens."""
        size, budget = self.options.batch_size, self.options.max_batch_tokens
        if self.options.streaming:
            size = 1
        batch: list[Item] = []
        longest = 0
        for item in items:
            cost = max(item.cost, 1)
            if batch and (len(batch) >= size or (budget and max(longest, cost) * (len(batch) + 1) > budget)):
                yield batch
                batch, longest = [], 0
            batch.append(item)
            longest = max(longest, cost)
        if batch:
            yield batch

    def _run_batch(self, batch: list[Item]) -> list[Any]:
        try:
            if self.options.streaming and hasattr(self.task, "run_streaming"):
                return [self.task.run_streaming(batch[0], self.writer.write_partial)]
            results = self.task.run(batch)
            if len(results) != len(batch):
                raise RuntimeError(f"task returned {len(results)} results for {len(batch)} records")
            return results
        except (OnnxpipeError, KeyboardInterrupt, MemoryError, BrokenPipeError):
            raise
        except Exception as exc:
            if len(batch) > 1:  # find the record that fails; the others still get results
                return [r for item in batch for r in self._run_batch([item])]
            message = f"model run failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if self.options.on_error == "fail":
                record = batch[0].record
                raise InputError(message, line=record.line or None, source=record.source) from exc
            return [_Failed(message)]

    def _emit(self, records: list[Record], cursor: int, done: dict[int, tuple[Any, str | None]]) -> int:
        """Write the complete prefix of RECORDS from CURSOR on; return the new cursor."""
        start = cursor
        nbytes = 0
        try:
            while cursor < len(records) and records[cursor].seq in done:
                record = records[cursor]
                result, error = done.pop(record.seq)
                if error is not None:
                    self._failed(record, error)
                self.writer.write(Result(record, result, error, self.task))
                nbytes += record.nbytes
                cursor += 1
        finally:
            if cursor > start:
                self.summary.records += cursor - start
                self.writer.flush()
                if self.progress is not None:
                    self.progress.advance(cursor - start, nbytes)
        return cursor

    def _failed(self, record: Record, error: str) -> None:
        if self.options.on_error == "fail":
            self.writer.flush()
            raise InputError(error, line=record.line or None, source=record.source)
        self.summary.errors += 1
        if len(self.summary.error_where) < _KEEP_WHERE:
            self.summary.error_where.append(record.where)
            self.report(f"{record.where}: {error}")
        elif len(self.summary.error_where) == _KEEP_WHERE:
            self.summary.error_where.append("...")
            self.report("more records failed; the count is in the summary")
