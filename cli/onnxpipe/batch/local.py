"""The local engine: the parent reads the shards and writes their outputs; worker processes run the model.

Rows go to the workers in chunks (a few batches of one shard each) and come back rendered, in the order
they were sent, so one big file is spread over every worker and each shard is written in input order.
Each worker opens the export once (`onnxpipe.load`) with its own session and --threads; with `--device
cuda`, worker i runs on cuda:(i mod visible GPUs). With one worker the model runs in this process.
Ctrl-C or SIGTERM stops the workers and removes this run's temporary files; the shards already renamed
into place stay, and a rerun skips them.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from onnxpipe.batch.job import JobRun
from onnxpipe.batch.plan import Shard
from onnxpipe.batch.shards import InputSpec, ShardWriter, read_rows, remove_temporaries
from onnxpipe.batch.worker import Worker, WorkerOptions
from onnxpipe.errors import ExitStatus, OnnxpipeError
from onnxpipe.stream.records import Record

_WAIT = 0.25  # seconds: the longest the parent blocks on a worker before it looks at signals


@dataclass(frozen=True)
class LocalOptions(WorkerOptions):
    """The worker options, and how many worker processes run them."""

    workers: int = 1


@dataclass
class BatchSummary:
    records: int = 0
    seconds: float = 0.0
    errors: int = 0
    truncated: int = 0
    replaced: int = 0
    shards_done: int = 0
    shards_skipped: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ChunkResult:
    """A chunk's outputs (JSONL lines or dicts), in input order, and what the engine counted."""

    outputs: list[Any]
    errors: int = 0
    truncated: int = 0
    replaced: int = 0
    failure: str | None = None  # an error that stops the run: its one line
    failure_status: int = int(ExitStatus.ERROR)


# --- the worker side --------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(
    options: LocalOptions, quiet_signals: bool = True, devices: list[str] | None = None, slot: Any = None
) -> None:
    """Open the export once for this process. Workers leave Ctrl-C and SIGTERM to the parent.

    With DEVICES (one --device per worker) and SLOT (a shared counter), each worker takes the next
    slot's device: `--device cuda` puts worker i on cuda:(i mod visible GPUs).

    In a worker, a failure (a --device that cannot run, a broken export) is kept and every chunk
    answers with it, so the parent stops with its one line (a raising initializer would only break
    the pool)."""
    if devices and slot is not None:
        import dataclasses

        with slot.get_lock():
            index = slot.value
            slot.value += 1
        options = dataclasses.replace(options, device=devices[index % len(devices)])
    if not quiet_signals:
        _open_pipeline(options)
        return
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from onnxpipe.console import VERBOSITY

    VERBOSITY["level"] = -1
    try:
        _open_pipeline(options)
    except OnnxpipeError as exc:
        _WORKER.update(failure=(str(exc), int(exc.exit_status)))
    except Exception as exc:
        _WORKER.update(failure=(f"a worker could not open the export: {type(exc).__name__}: {exc}", 1))


def _open_pipeline(options: LocalOptions) -> None:
    _WORKER.update(worker=Worker(options))


def _run_chunk(shard: Shard, records: list[Record]) -> ChunkResult:
    """Run RECORDS (one shard's, in order) through the worker's task; render each as its output record."""
    if "failure" in _WORKER:
        message, status = _WORKER["failure"]
        return ChunkResult([], failure=message, failure_status=status)
    try:
        outputs, counts = _WORKER["worker"].run(records, lambda record: shard)
        return ChunkResult(outputs, counts.errors, counts.truncated, counts.replaced)
    except OnnxpipeError as exc:
        return ChunkResult([], failure=str(exc), failure_status=int(exc.exit_status))
    except Exception as exc:  # a bug: the parent says so in one line
        detail = str(exc).splitlines()[0] if str(exc) else ""
        return ChunkResult([], failure=f"unexpected {type(exc).__name__} in a worker: {detail}")


# --- the parent side --------------------------------------------------------------------------


def _chunks(shards: list[Shard], spec: InputSpec, size: int) -> Iterator[tuple[Shard, list[Record], bool]]:
    """(shard, rows, last) in plan order; every shard ends with a chunk whose `last` is True (maybe empty)."""
    for shard in shards:
        chunk: list[Record] = []
        for record in read_rows(shard, spec):
            chunk.append(record)
            if len(chunk) >= size:
                yield shard, chunk, False
                chunk = []
        yield shard, chunk, True


class _Pending:
    """A chunk handed to a worker (or run here, with one worker)."""

    def __init__(self, shard: Shard, records: list[Record], last: bool, result: Any):
        self.shard = shard
        self.count = len(records)
        self.nbytes = sum(r.nbytes for r in records)
        self.last = last
        self._result = result

    def get(self) -> ChunkResult:
        if isinstance(self._result, ChunkResult):
            return self._result
        from concurrent.futures import TimeoutError as Timeout
        from concurrent.futures.process import BrokenProcessPool

        while True:
            try:
                result: ChunkResult = self._result.result(timeout=_WAIT)  # Ctrl-C and SIGTERM are seen in time
                return result
            except Timeout:
                continue
            except BrokenProcessPool:
                raise OnnxpipeError(
                    "a worker process died (killed, or out of memory: try fewer --workers or a smaller --batch-size)"
                ) from None


def run_local(
    run: JobRun,
    spec: InputSpec,
    options: LocalOptions,
    progress: Callable[[Shard, int, int, bool], None] | None = None,
) -> BatchSummary:
    """Run the shards of RUN that are not done yet; write each to a temporary, rename it when complete.

    PROGRESS(shard, records, nbytes, done) is called as each chunk is written, and with done=True
    when its shard is renamed into place.
    """
    summary = BatchSummary(shards_skipped=len(run.plan.shards) - len(run.todo()))
    start = time.perf_counter()
    todo = run.todo()
    if not todo:  # every shard is done: no model to open
        return summary
    size = options.chunk_rows
    pool = None
    if options.workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from onnxpipe.runtime.gpus import worker_devices

        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(
            options.workers,
            mp_context=context,
            initializer=_init_worker,
            initargs=(options, True, worker_devices(options.device, options.workers), context.Value("i", 0)),
        )
    else:
        _init_worker(options, quiet_signals=False)
        summary.notes = list(_WORKER["worker"].pipeline.notes)
    writers: dict[str, ShardWriter] = {}
    pending: deque[_Pending] = deque()
    ahead = 2 * options.workers  # chunks in flight: enough to keep every worker busy, memory bounded
    try:
        for shard, records, last in _chunks(todo, spec, size):
            if shard.key not in writers:
                writers[shard.key] = ShardWriter(shard, run.plan.output_dir, options.output_format)
            if pool is None:
                pending.append(_Pending(shard, records, last, _run_chunk(shard, records)))
            else:
                pending.append(_Pending(shard, records, last, pool.submit(_run_chunk, shard, records)))
            while len(pending) >= (1 if pool is None else ahead):
                _take(pending.popleft(), writers, summary, progress)
        while pending:
            _take(pending.popleft(), writers, summary, progress)
    except BaseException:
        if pool is not None:
            _stop(pool)
            pool = None
        for writer in writers.values():
            writer.abort()
        remove_temporaries(run.plan.output_dir, os.getpid())  # one opened as the signal came
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        _WORKER.clear()
    summary.seconds = time.perf_counter() - start
    return summary


def _stop(pool: Any) -> None:
    """Stop the workers now (Ctrl-C, SIGTERM, an error): what they were running is not needed."""
    processes = list(getattr(pool, "_processes", {}).values())  # the executor has no public kill
    for process in processes:
        if process.is_alive():
            process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.join(timeout=5)


def _take(
    item: _Pending,
    writers: dict[str, ShardWriter],
    summary: BatchSummary,
    progress: Callable[[Shard, int, int, bool], None] | None,
) -> None:
    result = item.get()
    if result.failure is not None:
        error = OnnxpipeError(result.failure)
        error.exit_status = ExitStatus(result.failure_status)
        raise error
    writer = writers[item.shard.key]
    if writer.fmt == "jsonl":
        for line in result.outputs:
            writer.write_line(line)
    else:
        for obj in result.outputs:
            writer.write_row(obj)
    summary.records += item.count
    summary.errors += result.errors
    summary.truncated += result.truncated
    summary.replaced += result.replaced
    if progress is not None:
        progress(item.shard, item.count, item.nbytes, False)
    if item.last:
        writer.commit()
        del writers[item.shard.key]
        summary.shards_done += 1
        if progress is not None:
            progress(item.shard, 0, 0, True)
