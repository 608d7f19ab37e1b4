"""The Ray engine: the batch plan on Ray Data, on this machine or on a cluster.

The shards are read by Ray read tasks (`ray.data.read_datasource` over the plan, one read task per
shard). Each task reads its file with the local engine's own reader (shards.read_rows), not with Ray's
read_text/read_json/read_csv/read_parquet: those split lines on every Unicode break (read_text's
`splitlines`), refuse invalid UTF-8, infer CSV column types ("007" becomes 7) and give Parquet rows no
row number, so their records would differ from the streaming commands' on hostile input. A row carries
its shard index and its place in the shard (`seq`), and a read task ends each shard with an end row that
holds its row count, so the driver knows when a shard is complete.

`map_batches` runs a callable class on a fixed pool of actors (--actors), each of which opens the export
once (`onnxpipe.load`, with --cpus-per-actor, --gpus-per-actor: an actor with a GPU runs on CUDA) and
renders each record as the output record the local engine writes. The driver puts the rows of each shard
back in input order, whatever order Ray returns blocks in, writes them through the shard's ShardWriter
(a temporary, renamed into place when the shard is complete), and so keeps the local engine's resume
contract: a shard that exists is complete, and a rerun skips it.

`ray` is imported here only, and only when `--engine ray` runs. A Ray started for the job (no
--ray-address, no RAY_ADDRESS) is shut down when the job ends, however it ends.
"""

from __future__ import annotations

import math
import os
import pickle
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxpipe.batch.job import JobRun
from onnxpipe.batch.local import BatchSummary
from onnxpipe.batch.plan import Plan, Shard
from onnxpipe.batch.shards import InputSpec, ShardWriter, read_rows, remove_temporaries
from onnxpipe.batch.worker import Worker, WorkerOptions, shard_named_by
from onnxpipe.errors import ExitStatus, OnnxpipeError, UsageError
from onnxpipe.stream.records import Record

# What a row is (the `kind` column): a record, the end of its shard (seq = the shard's row count), a
# failure that stops the job (payload: the pickled (message, exit status)), or padding (a shard's last
# block is padded to the block size, so that map_batches' batches are the blocks themselves).
RECORD, END, FAILURE, PAD = 0, 1, 2, 3


# A Ray started for one job: no idle workers started ahead of the actors (each is a Python process that
# imports Ray, about 1.5 CPU seconds, with nothing to run), and no metrics collection, which nobody reads.
LOCAL_RAY_CONFIG = {"prestart_worker_first_driver": False, "enable_metrics_collection": False}


@dataclass(frozen=True)
class RayOptions(WorkerOptions):
    """The worker options (what each actor needs), and how the pool is sized and where it runs."""

    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    address: str | None = None  # None: RAY_ADDRESS, else a local Ray started for the job

    def __post_init__(self) -> None:
        from onnxpipe.runtime.device import parse_device

        if self.gpus_per_actor > 0 and parse_device(self.device).kind == "cpu":  # actor_device would be cuda
            raise UsageError(
                "--device cpu runs on the CPU only, and --gpus-per-actor gives each actor a GPU",
                hint="drop one of them",
            )

    @property
    def actor_device(self) -> str:
        """An actor with a GPU runs on it (Ray sets its CUDA_VISIBLE_DEVICES, so it is cuda:0 there)."""
        return "cuda" if self.gpus_per_actor > 0 else self.device

    @property
    def actor_threads(self) -> int:
        """--threads, else the CPUs an actor holds: actors never oversubscribe the cores Ray gave them."""
        return self.threads if self.threads is not None else max(1, math.floor(self.cpus_per_actor))


def run_ray(plan: Plan, job: Any, settings: dict[str, Any]) -> BatchSummary:
    """Run the shards of SETTINGS["run"] (a JobRun on PLAN) that are not done yet on Ray Data.

    SETTINGS are the batch command's values (the copied streaming options, the batch options, `run`,
    `spec`, `options`: the task's options); `on_progress(shard, records, nbytes, done)`, when given,
    is called as rows are written and as each shard is renamed into place.
    """
    run: JobRun = settings["run"]
    options = RayOptions(
        model=str(job.export),
        family=job.task,
        options=dict(settings["options"]),
        device=settings.get("device") or "auto",
        threads=settings.get("threads"),
        batch_size=settings.get("batch_size"),
        max_batch_tokens=settings.get("max_batch_tokens"),
        on_error=settings.get("on_error") or "fail",
        output_format=plan.output_format,
        actors=settings.get("actors") or 1,
        cpus_per_actor=_cpus(settings.get("cpus_per_actor")),
        gpus_per_actor=float(settings.get("gpus_per_actor") or 0.0),
        address=settings.get("ray_address"),
    )
    return run_shards(run, settings["spec"], options, settings.get("on_progress"))


def _cpus(value: Any) -> float:
    return 1.0 if value is None else float(value)


def run_shards(
    run: JobRun,
    spec: InputSpec,
    options: RayOptions,
    progress: Callable[[Shard, int, int, bool], None] | None = None,
) -> BatchSummary:
    """The shards of RUN that are not done yet, through a pool of OPTIONS.actors actors; see the module."""
    todo = run.todo()
    summary = BatchSummary(shards_skipped=len(run.plan.shards) - len(todo))
    if not todo:
        return summary
    start = time.perf_counter()
    ray = _import_ray()
    started = _connect(ray, options)
    try:
        _check_resources(ray, options)
        dataset = _dataset(ray, todo, spec, options)
        _write(dataset, todo, run.plan, options, summary, progress)
    except OnnxpipeError:
        raise
    except Exception as exc:  # Ray's own failures (an actor died, a node went away): one line
        raise OnnxpipeError(f"the Ray job failed: {_first_line(exc)}") from exc
    finally:
        if started:
            ray.shutdown()
    summary.seconds = time.perf_counter() - start
    return summary


# --- Ray: connect, check, build the dataset ----------------------------------------------------


def _import_ray() -> Any:
    from onnxpipe.errors import require_extra

    require_extra("ray", "--engine ray", "ray", "ray.data")
    import ray

    return ray


def ray_address(given: str | None) -> str | None:
    """The cluster to join: --ray-address, else RAY_ADDRESS, else None (a local Ray for the job)."""
    return given or os.environ.get("RAY_ADDRESS") or None


def _connect(ray: Any, options: RayOptions) -> bool:
    """Join the cluster (or a Ray this process already runs); start a local Ray when there is none.
    True when this call started or joined it, so the job ends it (ray.shutdown only disconnects from a
    cluster that runs on its own)."""
    import logging

    _quiet_ray_data()
    if ray.is_initialized():  # a Ray this process started (a test session, a notebook): used as it is
        return False
    import signal
    import threading

    address = ray_address(options.address)
    common = {"log_to_driver": False, "logging_level": logging.ERROR, "include_dashboard": False}
    main_thread = threading.current_thread() is threading.main_thread()
    on_sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        if address is None:
            need = options.actors * options.cpus_per_actor + 1  # the read tasks' share
            ray.init(
                address="local",
                num_cpus=max(os.cpu_count() or 1, math.ceil(need)),
                _system_config=LOCAL_RAY_CONFIG,
                **common,
            )
        else:
            ray.init(address=address, **common)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise OnnxpipeError(f"cannot start or join {where}: {_first_line(exc)}") from None
    finally:
        if on_sigterm is not None:  # ray.init takes SIGTERM (a bare exit 15): onnxpipe's handling again
            signal.signal(signal.SIGTERM, on_sigterm)
    return True


def _quiet_ray_data() -> None:
    """No Ray Data progress bars, execution banners or warnings on stderr: onnxpipe reports itself."""
    import logging

    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_operator_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:  # its console handler; its log files keep everything
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)


def _check_resources(ray: Any, options: RayOptions) -> None:
    """Refuse a pool the cluster cannot hold: Ray would wait for it forever."""
    total = ray.cluster_resources()
    for what, per_actor in (("CPU", options.cpus_per_actor), ("GPU", options.gpus_per_actor)):
        need = options.actors * per_actor
        have = float(total.get(what, 0.0))
        if need > have + 1e-9:
            flag = "--cpus-per-actor" if what == "CPU" else "--gpus-per-actor"
            raise UsageError(
                f"{options.actors} actor(s) x {flag} {per_actor:g} need {need:g} {what}(s); the Ray cluster has {have:g}",
                hint=f"use fewer --actors or a smaller {flag}",
            )


def _dataset(ray: Any, shards: list[Shard], spec: InputSpec, options: RayOptions) -> Any:
    from ray.data import ActorPoolStrategy

    source = _shard_source(shards, spec, options.chunk_rows)
    # Read tasks hold no CPU: the actors hold them all, and a read task waiting for a CPU that an
    # actor holds would wait forever (reading is light next to the model). Without a CPU to hold, Ray
    # would run every shard's read task at once, each in a Ray worker process of its own (a process
    # start costs as much CPU as a few hundred records); one reader feeds 4 actors.
    dataset = ray.data.read_datasource(source, num_cpus=0, concurrency=max(1, options.actors // 4))
    with warnings.catch_warnings():
        # max_restarts has no named parameter in Ray 2.60 (the pinned version): a plain remote argument,
        # which Ray warns about on stderr
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        return dataset.map_batches(
            _predictor_class(options),
            batch_size=options.chunk_rows,  # = the block size: each batch is one block, one chunk
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=options.actors),
            num_cpus=options.cpus_per_actor,
            num_gpus=options.gpus_per_actor or None,
            zero_copy_batch=True,
            # No actor restarts: Ray Data's default (restart forever) makes Ray's core log an error line
            # per actor on stderr, and loops on an actor that dies at every start. A job whose actor died
            # fails in one line; its rerun skips the shards already done.
            max_restarts=0,
        )


# --- reading: a Ray datasource over the plan ---------------------------------------------------


def _shard_source(shards: list[Shard], spec: InputSpec, rows: int) -> Any:
    """A ray.data Datasource with one read task per shard (the class is made here: Ray is imported now)."""
    import functools

    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ShardSource(Datasource):
        def __init__(self) -> None:
            super().__init__()
            # made here, in the driver: a Ray worker's working folder is not the driver's
            self._shards = [(_absolute(s), str(s.source)) for s in shards]
            self._sizes = [_size(s) for s in shards]

        def get_name(self) -> str:
            return "OnnxpipeShards"

        def estimate_inmemory_data_size(self) -> int | None:
            return sum(self._sizes)

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None):
            return [
                ReadTask(
                    functools.partial(read_shard, index, shard, spec, rows, given),
                    BlockMetadata(num_rows=None, size_bytes=size, exec_stats=None, input_files=(given,)),
                )
                for index, ((shard, given), size) in enumerate(zip(self._shards, self._sizes))
            ]

    return ShardSource()


def _absolute(shard: Shard) -> Shard:
    return Shard(Path(os.path.abspath(shard.source)), shard.kind, shard.output, shard.key)


def _size(shard: Shard) -> int:
    try:
        return os.path.getsize(shard.source)
    except OSError:
        return 0


_ROW_SCHEMA: Any = None


def _row_schema() -> Any:
    global _ROW_SCHEMA
    if _ROW_SCHEMA is None:
        import pyarrow as pa

        _ROW_SCHEMA = pa.schema(
            [
                ("shard", pa.int32()),
                ("seq", pa.int64()),
                ("kind", pa.int8()),
                ("nbytes", pa.int64()),
                ("payload", pa.large_binary()),
            ]
        )
    return _ROW_SCHEMA


def read_shard(index: int, shard: Shard, spec: InputSpec, rows: int, given: str) -> Iterator[Any]:
    """SHARD's records as Arrow blocks of (shard index, seq, kind, the record's bytes in the file, the
    pickled Record), then its END row (seq: the row count). Every block has ROWS rows (the last is
    padded), so that map_batches(batch_size=ROWS) cuts its batches at block edges. SHARD's source is
    an absolute path; the records and errors name the file as GIVEN. A file that cannot be read gives
    a FAILURE row (the error's message and exit status) instead of a Ray task error with its traceback."""
    import pyarrow as pa

    seqs: list[int] = []
    sizes: list[int] = []
    payloads: list[bytes] = []
    count = 0

    def block(kinds: list[int]) -> Any:
        columns = {"shard": [index] * len(seqs), "seq": seqs, "kind": kinds, "nbytes": sizes, "payload": payloads}
        return pa.table(columns, schema=_row_schema())

    try:
        for record in read_rows(shard, spec):
            record.source = given
            seqs.append(count)
            sizes.append(record.nbytes)
            payloads.append(pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))
            count += 1
            if len(seqs) >= rows:
                yield block([RECORD] * len(seqs))
                seqs, sizes, payloads = [], [], []
        kinds = [RECORD] * len(seqs) + [END] + [PAD] * (rows - len(seqs) - 1)
        seqs += [count] * (rows - len(seqs))
        sizes += [0] * (rows - len(sizes))
        payloads += [b""] * (rows - len(payloads))
        yield block(kinds)
    except OnnxpipeError as exc:
        message = str(exc).replace(str(shard.source), given)
        seqs, sizes, payloads = [count], [0], [pickle.dumps((message, int(exc.exit_status)))]
        yield block([FAILURE])


# --- the actors ---------------------------------------------------------------------------------


def _predictor_class(options: RayOptions) -> type:
    """The callable class map_batches runs on each actor, with OPTIONS built in (no constructor
    arguments: Ray keeps those in its object store and warns on every actor start)."""

    class Predictor(ShardPredictor):
        def __init__(self) -> None:
            super().__init__(options)

    return Predictor


class ShardPredictor:
    """One actor: opens the export once, then renders each record as its output record."""

    def __init__(self, options: RayOptions):
        from onnxpipe.console import VERBOSITY

        VERBOSITY["level"] = -1
        self.options = options
        self.failure: tuple[str, int] | None = None
        self.worker: Worker | None = None
        try:
            self.worker = Worker(options, device=options.actor_device, threads=options.actor_threads)
        except OnnxpipeError as exc:  # e.g. --gpus-per-actor on a node whose CUDA does not load
            self.failure = (str(exc), int(exc.exit_status))

    def __call__(self, batch: Any) -> Any:
        """An Arrow table of rows in, the same rows out with each RECORD's payload the rendered output
        record (a JSONL line, or a pickled dict for Parquet) and the first row counting the batch's
        errors, truncations and replaced UTF-8."""
        import pyarrow as pa

        shards = batch.column("shard").to_pylist()
        seqs = batch.column("seq").to_pylist()
        kinds = batch.column("kind").to_pylist()
        sizes = batch.column("nbytes").to_pylist()
        payloads = batch.column("payload").to_pylist()
        counts = [0, 0, 0]  # errors, truncated, replaced
        try:
            if self.failure is not None:
                raise _Stop(*self.failure)
            chunks: dict[tuple[int, int], list[int]] = {}  # one engine run per local chunk, as local runs it
            for i, kind in enumerate(kinds):
                if kind == RECORD:
                    chunks.setdefault((shards[i], seqs[i] // self.options.chunk_rows), []).append(i)
            keep = [i for i, kind in enumerate(kinds) if kind != PAD]
            for places in chunks.values():
                outputs, counted = self._run([pickle.loads(payloads[i]) for i in places])
                for i, out in zip(places, outputs):
                    payloads[i] = out
                counts = [a + b for a, b in zip(counts, counted)]
            shards, seqs, kinds, sizes, payloads = (
                [column[i] for i in keep] for column in (shards, seqs, kinds, sizes, payloads)
            )
        except _Stop as stop:
            shards, seqs, kinds, sizes = [shards[0] if shards else -1], [0], [FAILURE], [0]
            payloads = [pickle.dumps((stop.message, stop.status))]
        columns = {"shard": shards, "seq": seqs, "kind": kinds, "nbytes": sizes, "payload": payloads}
        table = pa.table(columns, schema=_row_schema())
        for name, count in zip(("errors", "truncated", "replaced"), counts):
            table = table.append_column(name, pa.array([count] + [0] * (len(seqs) - 1) if seqs else [], pa.int64()))
        return table

    def _run(self, records: list[Record]) -> tuple[list[bytes], list[int]]:
        assert self.worker is not None
        try:
            outputs, counts = self.worker.run(records, shard_named_by)
        except OnnxpipeError as exc:
            raise _Stop(str(exc), int(exc.exit_status)) from None
        except Exception as exc:  # a bug: the driver says so in one line
            raise _Stop(f"unexpected {type(exc).__name__} in a Ray actor: {_first_line(exc)}", 1) from None
        if self.options.output_format != "jsonl":
            outputs = [pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) for obj in outputs]
        return outputs, [counts.errors, counts.truncated, counts.replaced]


class _Stop(Exception):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.message = message
        self.status = status


# --- the driver: rows back in order, one ShardWriter per shard ----------------------------------


class ShardAssembler:
    """Puts each shard's rendered rows back in input order and commits the shard when it is complete.

    Rows may come in any order, from any number of shards at once: those that follow the last one
    written are written at once, the others wait here (Ray returns a shard's blocks nearly in order,
    so few wait)."""

    def __init__(
        self,
        shards: list[Shard],
        plan: Plan,
        output_format: str,
        summary: BatchSummary,
        progress: Callable[[Shard, int, int, bool], None] | None = None,
    ):
        self.shards = shards
        self.plan = plan
        self.output_format = output_format
        self.summary = summary
        self.progress = progress
        self.writers: dict[int, ShardWriter] = {}
        self.next: dict[int, int] = {}
        self.waiting: dict[int, dict[int, tuple[bytes, int]]] = {}
        self.total: dict[int, int] = {}
        self.committed: set[int] = set()

    def add(self, shard: int, seq: int, kind: int, payload: bytes, nbytes: int = 0) -> None:
        if kind == PAD:
            return
        if kind == FAILURE:
            message, status = pickle.loads(payload)
            error = OnnxpipeError(message)
            error.exit_status = ExitStatus(status)
            raise error
        if shard in self.committed:
            raise OnnxpipeError(f"Ray returned a row of {self.shards[shard].source} after it was complete")
        if kind == END:
            self.total[shard] = seq
        else:
            self.waiting.setdefault(shard, {})[seq] = (payload, nbytes)
        self._advance(shard)

    def _writer(self, shard: int) -> ShardWriter:
        if shard not in self.writers:
            self.writers[shard] = ShardWriter(self.shards[shard], self.plan.output_dir, self.output_format)
            self.next[shard] = 0
        return self.writers[shard]

    def _advance(self, shard: int) -> None:
        writer = self._writer(shard)
        waiting = self.waiting.get(shard, {})
        start = self.next[shard]
        seq = start
        nbytes = 0
        while seq in waiting:
            payload, size = waiting.pop(seq)
            nbytes += size
            if self.output_format == "jsonl":
                writer.write_line(payload)
            else:
                writer.write_row(pickle.loads(payload))
            seq += 1
        self.next[shard] = seq
        if seq > start:
            self.summary.records += seq - start
            if self.progress is not None:
                self.progress(self.shards[shard], seq - start, nbytes, False)
        if self.total.get(shard) == seq:
            writer.commit()
            del self.writers[shard]
            self.waiting.pop(shard, None)
            self.committed.add(shard)
            self.summary.shards_done += 1
            if self.progress is not None:
                self.progress(self.shards[shard], 0, 0, True)

    def finish(self) -> None:
        """Every shard must be complete now: a shard that is not is a bug (or rows Ray lost), not output."""
        missing = [self.shards[i].source for i in range(len(self.shards)) if i not in self.committed]
        if missing:
            raise OnnxpipeError(f"the Ray job ended before {len(missing)} shard(s) were complete ({missing[0]}, ...)")

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()
        self.writers.clear()
        remove_temporaries(self.plan.output_dir, os.getpid())  # one opened as the signal came


def _write(
    dataset: Any,
    shards: list[Shard],
    plan: Plan,
    options: RayOptions,
    summary: BatchSummary,
    progress: Callable[[Shard, int, int, bool], None] | None,
) -> None:
    assembler = ShardAssembler(shards, plan, options.output_format, summary, progress)
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            summary.errors += sum(batch.column("errors").to_pylist())
            summary.truncated += sum(batch.column("truncated").to_pylist())
            summary.replaced += sum(batch.column("replaced").to_pylist())
            columns = [batch.column(name).to_pylist() for name in ("shard", "seq", "kind", "payload", "nbytes")]
            for shard, seq, kind, payload, nbytes in zip(*columns):
                assembler.add(shard, seq, kind, payload, nbytes)
        assembler.finish()
    except BaseException:
        assembler.abort()
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
