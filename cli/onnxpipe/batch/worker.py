"""What every batch worker does, whichever engine runs it: open the export once, then turn a chunk of one
shard's records into their output records (JSONL lines or dicts), in input order.

The local engine's worker processes and the Ray engine's actors both go through here, so a record gets
the same output bytes from either engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onnxpipe.batch.plan import Shard
from onnxpipe.batch.shards import output_record, render_jsonl
from onnxpipe.stream.records import Record

CHUNK_BATCHES = 32  # batches of rows per chunk sent to a worker: 1,024 rows at batch 32, the streaming
# engine's window, so a chunk's length-sorted batches pad as little as the streaming command's do


@dataclass(frozen=True)
class WorkerOptions:
    """What each worker needs to open the export and run the task. `model` is the export folder."""

    model: str
    family: str
    options: dict[str, Any]
    device: str = "auto"
    threads: int | None = None
    batch_size: int | None = None
    max_batch_tokens: int | None = None
    on_error: str = "fail"
    output_format: str = "jsonl"

    @property
    def chunk_rows(self) -> int:
        """Rows per chunk, from each shard's start: the same records meet in the same batches whichever
        engine runs them, so even a result that depends on its batch-mates in the last bits (a beam score
        next to longer padded rows) is the same."""
        return (self.batch_size or 32) * CHUNK_BATCHES


@dataclass
class ChunkCounts:
    """What the engine counted in a chunk."""

    errors: int = 0
    truncated: int = 0
    replaced: int = 0


class Worker:
    """One opened export and the task built from the job's options."""

    def __init__(self, options: WorkerOptions, device: str | None = None, threads: int | None = None):
        import warnings

        import onnxpipe

        self.options = options
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the parent already said when threads were capped
            self.pipeline = onnxpipe.load(
                options.model,
                device=device or options.device,
                threads=threads if threads is not None else options.threads,
                task=options.family,
                batch_size=options.batch_size,
                max_batch_tokens=options.max_batch_tokens,
                on_error=options.on_error,
            )
        self.task = self.pipeline.task_for(options.options)

    def run(self, records: list[Record], shard_of: Any) -> tuple[list[Any], ChunkCounts]:
        """RECORDS (one shard's, in order) -> their output records: JSONL lines (bytes) for a JSONL shard,
        dicts for Parquet. SHARD_OF(record) is the Shard a record's output names. OnnxpipeError (a record
        that stops the job) propagates."""
        from onnxpipe.api import _Collector
        from onnxpipe.stream.engine import Engine, EngineOptions

        if not records:
            return [], ChunkCounts()
        collector = _Collector()
        engine_options = EngineOptions(
            batch_size=self.pipeline.batch_size,
            max_batch_tokens=self.pipeline.max_batch_tokens,
            on_error=self.options.on_error,
            window=len(records),
        )
        summary = Engine(self.task, collector, engine_options).run_records(records)
        outputs: list[Any] = []
        for result in collector.take():
            obj = output_record(result.to_dict(), shard_of(result.record), result.record)
            outputs.append(
                render_jsonl(obj, result.record.raw_numbers) if self.options.output_format == "jsonl" else obj
            )
        return outputs, ChunkCounts(summary.errors, summary.truncated, summary.replaced)


def shard_named_by(record: Record) -> Shard:
    """What shards.output_record reads of a record's Shard (its source as given, and its kind), from the
    record alone: read_rows sets record.source to the shard's source."""
    from pathlib import Path

    from onnxpipe.batch.plan import kind_of

    source = Path(record.source)
    return Shard(source=source, kind=kind_of(source), output=source, key="")
