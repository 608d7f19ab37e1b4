"""`onnxpipe batch TASK`: a resumable job over files and folders, one output shard per input file.

Each task's subcommand takes the streaming command's own task options (copied from its click
parameters, so names, types, defaults and help are the same by construction) plus the batch options.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from onnxpipe.commands._options import _STREAM_KEYS

# The streaming command's parameters that batch takes as they are (besides the task's own options).
_COPIED = ("model", "batch_size", "max_batch_tokens", "on_error", "device", "threads")
# What the batch options are called, to tell them from a task option of the same name.
_BATCH_KEYS = ("inputs", "output_dir", "field", "column", "output_format", "workers", "force", "engine", "progress")
_PAIR_KEYS = ("pair_field", "pair_column")
# Streaming commands whose records can be text pairs (Record.pair): classify's --pair-field, answer's question.
_PAIRED = ("pair_field", "question_field")
_RAY_KEYS = ("actors", "cpus_per_actor", "gpus_per_actor", "ray_address")  # --engine ray's own options


def _families() -> list[str]:
    """The registry's families that have a streaming command, in the order of `onnxpipe --help`."""
    from onnxpipe.main import COMMANDS
    from onnxpipe.registry import FAMILIES

    return [name for name in COMMANDS if name in FAMILIES]


def _streaming_command(name: str) -> click.Command:
    import importlib

    from onnxpipe.main import COMMANDS

    module, attr = COMMANDS[name].split(":")
    command: click.Command = getattr(importlib.import_module(module), attr)
    return command


def _task_params(name: str) -> list[click.Parameter]:
    """The streaming command's parameters that batch copies: -m, batching, device, and the task's options."""
    from onnxpipe.commands._decoding import DECODING_FLAGS
    from onnxpipe.registry import family_named

    family = family_named(name)
    wanted = set(family.options) | {f for f in DECODING_FLAGS if f in family.options}
    out = []
    for param in _streaming_command(name).params:
        if param.name in _COPIED or (param.name in wanted and param.name not in _STREAM_KEYS):
            out.append(param)
    return out


def _batch_params() -> list[click.Parameter]:
    return [
        click.Argument(["inputs"], nargs=-1, required=True, metavar="INPUT..."),
        click.Option(
            ["--output-dir"],
            required=True,
            metavar="DIR",
            type=click.Path(file_okay=False),
            help="Write one output shard per input file here (DIR/<input path>.jsonl or .parquet), with "
            "the job's manifest (onnxpipe-batch.json) and, when every shard is done, _SUCCESS.",
        ),
        click.Option(
            ["--field"],
            metavar="NAME",
            help="JSONL inputs (.jsonl, .ndjson): take the text from field NAME; the other fields pass through.",
        ),
        click.Option(
            ["--column"],
            metavar="NAME|N",
            help="CSV, TSV and Parquet inputs: take the text from column NAME (or the N-th, 1-based); "
            "every column passes through.",
        ),
        click.Option(
            ["--output-format"],
            type=click.Choice(["jsonl", "parquet"]),
            default="jsonl",
            show_default=True,
            help="Output shards as JSON lines or Parquet (Parquet needs onnxpipe[parquet]).",
        ),
        click.Option(
            ["--workers"],
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            metavar="N",
            help="Worker processes (--engine local), each with its own session and --threads "
            "[default --threads with several workers: the usable CPUs shared out among them]. "
            "With --device cuda, worker i runs on GPU i mod the visible GPUs (cuda:N pins them all to N).",
        ),
        click.Option(
            ["--engine"],
            type=click.Choice(["local", "ray"]),
            default="local",
            show_default=True,
            help="local: worker processes on this machine. ray: Ray Data (needs onnxpipe[ray]).",
        ),
        *_ray_params(),
        click.Option(
            ["--force"],
            is_flag=True,
            help="Run even when DIR holds a job with another model or options (or other files), and redo every shard.",
        ),
        click.Option(
            ["--progress/--no-progress"],
            default=None,
            help="Show a progress bar on stderr. [default: when stderr is a terminal]",
        ),
    ]


def _ray_params() -> list[click.Parameter]:
    return [
        click.Option(
            ["--actors"],
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            metavar="N",
            help="--engine ray: Ray actors, each holding the model once (its own session and --threads).",
        ),
        click.Option(
            ["--cpus-per-actor"],
            type=click.FloatRange(min=0, min_open=True),
            default=1.0,
            show_default=True,
            metavar="X",
            help="--engine ray: CPUs Ray reserves for each actor; without --threads, each actor runs that many threads.",
        ),
        click.Option(
            ["--gpus-per-actor"],
            type=click.FloatRange(min=0),
            default=0.0,
            show_default=True,
            metavar="X",
            help="--engine ray: GPUs for each actor, fractions allowed (0.5: two actors share a GPU); "
            "above 0, each actor runs on CUDA.",
        ),
        click.Option(
            ["--ray-address"],
            metavar="ADDRESS",
            help="--engine ray: the Ray cluster to run on (host:port, or ray://...). "
            "[default: RAY_ADDRESS, else a local Ray started for the job and stopped after it]",
        ),
    ]


_SUB_HELP = """{summary}

Reads INPUT files, folders (recursively, hidden files skipped) and globs, and writes one output
shard per input file under --output-dir: each record is what `onnxpipe {name} --format jsonl`
writes for that line, plus "_source" (the input file) and "_line" (text, JSONL) or "_row" (CSV,
TSV, Parquet: the 1-based data row). A rerun skips the shards already done. See onnxpipe-batch(1).
"""


def _task_command(name: str) -> click.Command:
    streaming = _streaming_command(name)
    summary = (streaming.help or "").strip().split("\n\n")[0].replace("\n", " ")

    def callback(**kw: Any) -> None:
        run_batch(name, kw)

    pairs = []
    if any(p.name in _PAIRED for p in streaming.params):
        pairs = [
            click.Option(
                ["--pair-field"],
                metavar="NAME",
                help="JSONL inputs: each record is a text pair, its second text in field NAME"
                + (" (answer: the question)." if name == "answer" else "."),
            ),
            click.Option(
                ["--pair-column"],
                metavar="NAME|N",
                help="CSV, TSV and Parquet inputs: each row is a text pair, its second text in column NAME (or N)"
                + (" (answer: the question)." if name == "answer" else "."),
            ),
        ]
    return click.Command(
        name,
        callback=callback,
        params=[*_task_params(name), *_batch_params(), *pairs],
        help=_SUB_HELP.format(summary=summary, name=name),
        short_help=f"{summary.split('. ')[0].rstrip('.')}, as a batch job.",
    )


class BatchGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return _families()

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _families():
            return None
        return _task_command(name)


@click.group("batch", cls=BatchGroup)
def batch() -> None:
    """Run a task over files and folders as a resumable job, one output shard per input file.

    INPUT is files, folders (recursive) and globs: text (one record per line), JSONL (.jsonl,
    .ndjson; --field), CSV and TSV (.csv, .tsv; a header row; --column) and Parquet (.parquet;
    --column). Each output record is the streaming command's --format jsonl record for that
    line (the input's fields or columns, then the task's result), plus "_source" and "_line"
    (or "_row"), in input order. A shard is written to a temporary file and renamed when
    complete; a rerun skips the shards already done and redoes the others, and refuses a job
    whose model or options differ (--force redoes everything). Every task takes the same task
    options as its streaming command.

    \b
      onnxpipe batch classify -m sentiment reviews/ --output-dir labels/
      onnxpipe batch embed -m minilm --field text --workers 2 'corpus/*.jsonl' --output-dir vectors/
    """


def run_batch(name: str, kw: dict[str, Any]) -> None:
    """Plan the job, check it against DIR's manifest, run it on the engine, report on stderr."""
    from onnxpipe import console
    from onnxpipe.batch.job import Job, JobRun, export_checksum
    from onnxpipe.batch.plan import plan_job
    from onnxpipe.batch.shards import InputSpec
    from onnxpipe.errors import ExitStatus
    from onnxpipe.home import resolve_model
    from onnxpipe.manifest import read_manifest
    from onnxpipe.registry import family_for_export

    batch_opts = {k: kw.pop(k) for k in (*_BATCH_KEYS, *_RAY_KEYS)}
    pairs = {k: kw.pop(k, None) for k in _PAIR_KEYS}
    common = {k: kw.pop(k) for k in _COPIED if k in kw}
    options = _task_options(name, kw)
    if batch_opts["output_format"] == "parquet":
        from onnxpipe.errors import require_extra

        require_extra("parquet", "--output-format parquet", "pyarrow", "pyarrow.parquet")
    plan = plan_job(batch_opts["inputs"], batch_opts["output_dir"], batch_opts["output_format"])
    spec = InputSpec(field=batch_opts["field"], column=batch_opts["column"], **pairs)
    spec.check(plan)
    folder = resolve_model(common["model"])
    manifest = read_manifest(folder)
    family_for_export(manifest.get("task"), name)  # the wrong kind of export fails before anything runs
    job = Job(
        task=name,
        model=str(common["model"]),
        export=str(folder.resolve()),
        export_checksum=export_checksum(folder),
        options=options,
        input={
            "field": spec.field,
            "column": spec.column,
            "pair_field": spec.pair_field,
            "pair_column": spec.pair_column,
            "output_format": plan.output_format,
        },
        engine=batch_opts["engine"],
    )
    engine = batch_opts["engine"]
    if engine == "ray":
        run_ray = _ray_engine()
    with JobRun(plan, job, force=batch_opts["force"]) as run:
        skipped = len(plan.shards) - len(run.todo())
        if skipped:
            console.info(f"skipped {skipped} shard(s) already done")
        if engine == "ray":
            settings = {**common, **batch_opts, "run": run, "spec": spec, "options": options}
            summary = _with_bar(
                run, batch_opts, lambda advance: run_ray(plan, job, {**settings, "on_progress": advance})
            )
        else:
            summary = _run_local(name, run, spec, folder, options, common, batch_opts)
        run.finish()
    for note in getattr(summary, "notes", ()):
        console.warn(note)
    if summary.truncated:
        console.warn(f"{summary.truncated} record(s) were longer than the model takes and were truncated")
    if summary.replaced:
        console.warn(f"{summary.replaced} record(s) had invalid UTF-8, replaced with U+FFFD")
    if summary.errors:
        console.warn(f"{summary.errors} record(s) failed and got an error result (--on-error null)")
    console.info(
        f"{summary.records:,} records in {summary.seconds:.2f}s ({summary.rate:,.0f} records/s), "
        f"{summary.errors} failed; {summary.shards_done} shard(s) done, {summary.shards_skipped} skipped"
    )
    if summary.errors:
        raise click.exceptions.Exit(int(ExitStatus.PARTIAL))


def _task_options(name: str, kw: dict[str, Any]) -> dict[str, Any]:
    """The task's options as onnxpipe.load's task takes them (the registry's names); None: not given."""
    from onnxpipe.commands._decoding import DECODING_FLAGS, decoding_overrides
    from onnxpipe.errors import UsageError
    from onnxpipe.registry import family_named

    family = family_named(name)
    options = dict(kw)
    if family.kind != "encoder" and any(f in options for f in DECODING_FLAGS):  # classify's --top-k is no decoding flag
        options.update(decoding_overrides(options))
    if options.get("system") is not None and not options.get("chat"):
        raise UsageError("--system needs --chat")
    unknown = sorted(set(options) - set(family.options))
    if unknown:  # a parameter copied from the streaming command that the registry does not know
        raise UsageError(f"batch {name} cannot map {', '.join(unknown)} to the task's options")
    return {k: v for k, v in options.items() if v is not None and v != ()}


def _ray_engine() -> Any:
    """Part B's engine: onnxpipe.batch.ray_engine.run_ray(plan, job, options)."""
    from onnxpipe.errors import require_extra

    require_extra("ray", "--engine ray", "ray", "ray.data")
    try:
        from onnxpipe.batch.ray_engine import run_ray
    except ImportError:
        from onnxpipe.errors import UsageError

        raise UsageError("--engine ray is not available in this version of onnxpipe") from None
    return run_ray


def _run_local(
    name: str,
    run: Any,
    spec: Any,
    folder: Any,
    options: dict[str, Any],
    common: dict[str, Any],
    batch_opts: dict[str, Any],
) -> Any:
    from onnxpipe.batch.local import LocalOptions, run_local

    local = LocalOptions(
        model=str(folder),
        family=name,
        options=options,
        device=common["device"],
        threads=_worker_threads(common["threads"], batch_opts["workers"]),
        batch_size=common["batch_size"],
        max_batch_tokens=common["max_batch_tokens"],
        on_error=common["on_error"],
        output_format=run.plan.output_format,
        workers=batch_opts["workers"],
    )
    show = batch_opts["progress"] if batch_opts["progress"] is not None else _isatty(sys.stderr)
    from onnxpipe.console import VERBOSITY

    bar = _Bar(run) if show and VERBOSITY["level"] >= 0 else None
    try:
        return run_local(run, spec, local, progress=bar.advance if bar else None)
    finally:
        if bar is not None:
            bar.stop()


def _worker_threads(threads: int | None, workers: int) -> int | None:
    """--threads for each worker: as given; else, with several workers, the usable CPUs shared out
    (each ONNX Runtime session would otherwise take every core, and the workers would fight over them)."""
    if threads is not None or workers <= 1:
        return threads
    from onnxpipe.runtime.machine import usable_cpus

    return max(1, usable_cpus() // workers)


def _with_bar(run: Any, batch_opts: dict[str, Any], job: Any) -> Any:
    """JOB(advance) with the progress bar's advance (None when there is no bar), as _run_local runs it."""
    from onnxpipe.console import VERBOSITY

    show = batch_opts["progress"] if batch_opts["progress"] is not None else _isatty(sys.stderr)
    bar = _Bar(run) if show and VERBOSITY["level"] >= 0 else None
    try:
        return job(bar.advance if bar else None)
    finally:
        if bar is not None:
            bar.stop()


class _Bar:
    """A rich progress bar on stderr: shards and records done, records/s, and (by bytes read) the ETA."""

    def __init__(self, run: Any):
        import os
        import time

        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

        from onnxpipe.console import stderr

        todo = run.todo()
        self._sizes: dict[str, int] = {}
        for shard in todo:
            try:
                self._sizes[shard.key] = os.path.getsize(shard.source)
            except OSError:
                self._sizes[shard.key] = 0
        self._progress = Progress(
            TextColumn("{task.fields[shards]}/{task.fields[shards_total]} shards"),
            TextColumn("{task.fields[records]:,} records"),
            TextColumn("{task.fields[rate]:,.0f}/s"),
            BarColumn(),
            TaskProgressColumn(),
            TimeRemainingColumn(),
            console=stderr(),
            transient=True,
            refresh_per_second=5,
        )
        self._task = self._progress.add_task(
            "", total=sum(self._sizes.values()) or None, shards=0, shards_total=len(todo), records=0, rate=0.0
        )
        self._records = 0
        self._shards = 0
        self._read: dict[str, int] = {}
        self._clock = time.perf_counter
        self._start = time.perf_counter()
        self._progress.start()

    def advance(self, shard: Any, records: int, nbytes: int, done: bool) -> None:
        self._records += records
        read = self._read.get(shard.key, 0)
        size = self._sizes.get(shard.key, 0)
        advance = max(min(nbytes, size - read), 0)
        if done:  # the rest of its bytes count now (CSV and Parquet rows do not say their size)
            self._shards += 1
            advance = max(size - read, 0)
        self._read[shard.key] = read + advance
        elapsed = self._clock() - self._start
        self._progress.update(
            self._task,
            advance=advance,
            shards=self._shards,
            records=self._records,
            rate=self._records / elapsed if elapsed > 0 else 0.0,
        )

    def stop(self) -> None:
        self._progress.stop()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
