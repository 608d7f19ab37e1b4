"""The glue between a streaming command and the engine: model, task, input, output, progress, summary.

A command parses its own options, then calls `run_stream_command(model, stream, make_task, tasks=...)`.
All user-facing stderr (device line, warnings, summary) is printed here, not in the engine.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

import click

from onnxpipe import console
from onnxpipe.errors import ExitStatus, InputError, OnnxpipeError, UsageError
from onnxpipe.signals import is_closed
from onnxpipe.stream.engine import Engine, EngineOptions, Summary
from onnxpipe.stream.readers import STDIN, STDIN_CLOSED, LineSource, RecordParser, stdin_is_closed
from onnxpipe.stream.records import Record
from onnxpipe.stream.writers import make_writer


def run_stream_command(
    model_ref: str,
    stream: Any,
    make_task: Callable[[Any], Any],
    tasks: tuple[str, ...],
    engine_options: dict[str, Any] | None = None,
    records: Sequence[Record] | None = None,
    wrap_writer: Callable[[Any], Any] | None = None,
) -> Summary:
    """Load MODEL_REF, build its task with MAKE_TASK(model), stream the inputs through it, report.

    `stream` is the StreamOptions that `stream_options` built. RECORDS, when given, are the input
    instead of stream.inputs (prompts given on the command line). WRAP_WRITER, when given, wraps the
    output writer (rerank --sort holds the results and writes them sorted). Exits 3 when --on-error null
    let some records fail.
    """
    from onnxpipe.runtime import load_model

    if stream.field is not None and stream.column is not None:
        raise UsageError("--field (JSONL input) and --column (TSV input) cannot be used together")
    pair_field, pair_column = getattr(stream, "pair_field", None), getattr(stream, "pair_column", None)
    if pair_field is not None and stream.field is None:
        raise UsageError("--pair-field needs --field (JSONL input): the first text's field")
    if pair_column is not None and stream.column is None:
        raise UsageError("--pair-column needs --column (TSV input): the first text's column")
    # Closed standard streams are refused before the model loads (onnxpipe.signals fills them).
    if records is None and STDIN in stream.inputs and stdin_is_closed():
        raise InputError(STDIN_CLOSED)
    if stream.output in ("-", "") and is_closed(sys.stdout):
        raise OnnxpipeError("cannot write results: stdout is closed (give -o FILE, or redirect stdout)")
    options = EngineOptions(
        batch_size=stream.batch_size,
        max_batch_tokens=stream.max_batch_tokens,
        on_error=stream.on_error,
        **(engine_options or {}),
    )
    model = load_model(model_ref, device=stream.device, threads=stream.threads)
    model.check_task(*tasks)
    task = make_task(model)  # makes the sessions: a --device error comes before any input is read
    for note in getattr(task, "notes", ()):  # what the task found about the export on this device
        console.warn(note)
    if model.device_note:
        console.info(model.device_note)

    out, owned = _open_output(stream.output, stream.format)
    writer = make_writer(stream.format, out, task)
    if wrap_writer is not None:
        writer = wrap_writer(writer)
    source = LineSource(stream.inputs) if records is None else None
    parser = RecordParser(field=stream.field, column=stream.column, pair_field=pair_field, pair_column=pair_column)
    if records is None and "-" in stream.inputs and _isatty(sys.stdin):
        console.info("reading lines from the terminal (end with Ctrl-D)")
    progress = None
    show = stream.progress if stream.progress is not None else _isatty(sys.stderr)
    if show and console.VERBOSITY["level"] >= 0:
        from onnxpipe.stream.progress import Progress

        progress = Progress(source.total_bytes if source is not None else None)
    engine = Engine(task, writer, options, report=console.warn, progress=progress)
    try:
        summary = engine.run(source, parser) if source is not None else engine.run_records(records or ())
        writer.close()
    except BrokenPipeError:
        raise
    finally:
        if progress is not None:
            progress.stop()
        if owned:
            try:
                out.close()
            except OSError:
                pass
    if getattr(task, "position_limited", 0):  # generation tasks count what stopped at the model's limit
        console.warn(
            f"{task.position_limited} record(s) stopped at {task.position_limit}, before {task.requested_limit}"
        )
    _report(summary, getattr(task, "max_length", None) or model.max_length, getattr(task, "truncation_hint", None))
    if summary.errors:
        raise click.exceptions.Exit(int(ExitStatus.PARTIAL))
    return summary


def truncation_line(summary: Summary, max_length: int, hint: str | None = None) -> str:
    """The one end-of-run line about truncated records: how many of how many, the first few, what to do."""
    n = summary.truncated
    where = ", ".join(summary.truncated_where) + (", ..." if n > len(summary.truncated_where) else "")
    records = "record" if summary.records == 1 else "records"
    was = "was" if n == 1 else "were"
    return (
        f"{n} of {summary.records:,} {records} {was} longer than the model's {max_length} tokens and {was} truncated "
        f"({where})" + (f"; {hint}" if hint else "")
    )


def _open_output(path: str, fmt: str) -> tuple[IO[bytes], bool]:
    if path in ("-", ""):
        if fmt == "npy":
            raise UsageError("--format npy writes a file: give -o FILE.npy")
        return _binary(sys.stdout), False
    try:
        return open(path, "w+b" if fmt == "npy" else "wb"), True
    except OSError as exc:
        raise OnnxpipeError(f"cannot write {path}: {exc.strerror or exc}") from None


def _binary(stream) -> IO[bytes]:
    return getattr(stream, "buffer", stream)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _report(summary: Summary, max_length: int, hint: str | None = None) -> None:
    if summary.truncated:
        console.warn(truncation_line(summary, max_length, hint))
    if summary.replaced:
        console.warn(f"{summary.replaced} record(s) had invalid UTF-8, replaced with U+FFFD")
    if summary.errors:
        console.warn(f"{summary.errors} record(s) failed and got an empty result (--on-error null)")
    console.info(
        f"{summary.records:,} records in {summary.seconds:.2f}s ({summary.rate:,.0f} records/s), "
        f"{summary.truncated} truncated, {summary.errors} errors"
    )
