"""Options shared by the streaming commands, as decorators (one definition, same help everywhere).

    @click.command("classify")
    @model_option
    @stream_options()              # inputs, -o, --format, --field, --column, batching, errors, device
    @click.option("--top-k", ...)
    def classify(model: str, stream: StreamOptions, top_k: int): ...

`stream_options` collects its values into one StreamOptions passed as `stream`. Only click is
imported here, so `--help` stays fast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_BATCH_TOKENS = 16384


@dataclass
class StreamOptions:
    inputs: tuple[str, ...] = ("-",)
    output: str = "-"
    output_format: str | None = None  # None: jsonl with --field, tsv with --column, else text
    field: str | None = None
    column: int | None = None
    pair_field: str | None = None  # text pairs: the second text's JSONL field (needs field)
    pair_column: int | None = None  # ... or TSV column (needs column); commands set these, see pair_options
    batch_size: int = DEFAULT_BATCH_SIZE
    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS
    on_error: str = "fail"
    device: str = "auto"
    threads: int | None = None
    progress: bool | None = None  # None: when stderr is a terminal

    @property
    def format(self) -> str:
        if self.output_format:
            return self.output_format
        return "jsonl" if self.field is not None else "tsv" if self.column is not None else "text"


def complete_export_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    """Shell completion for MODEL: the exports in the export home (with their task), else folders."""
    import json

    from click.shell_completion import CompletionItem

    from onnxpipe.home import MANIFEST_NAME, list_exports

    if "/" in incomplete or incomplete.startswith((".", "~")):
        return [CompletionItem(incomplete, type="dir")]
    items = []
    try:
        folders = [p for p in list_exports() if p.name.startswith(incomplete)]
    except OSError:
        folders = []
    for folder in folders:
        try:
            task = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8")).get("task")
        except (OSError, ValueError):
            continue  # not an export
        items.append(CompletionItem(folder.name, help=task))
    return items or [CompletionItem(incomplete, type="dir")]


model_option = click.option(
    "-m",
    "--model",
    required=True,
    metavar="MODEL",
    shell_complete=complete_export_names,
    help="An export: a name in the export home (see onnxpipe export) or a path to an export folder.",
)


def cap_threads_option(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """--threads above the CPUs this process may use is capped to them, with one warning line."""
    if value is None:
        return None
    from onnxpipe.runtime.machine import usable_cpus

    usable = usable_cpus()
    if value > usable:
        from onnxpipe import console

        console.warn(f"--threads {value}: only {usable} CPU(s) usable here; using {usable} threads")
        return usable
    return value


def check_beams_option(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """--num-beams / --num-return-sequences: at most MAX_NUM_BEAMS, refused in one line before the model loads."""
    if value is None:
        return None
    from onnxpipe.decoding.config import MAX_NUM_BEAMS

    if value > MAX_NUM_BEAMS:
        from onnxpipe.errors import UsageError

        flag = max(param.opts, key=len)
        raise UsageError(
            f"{flag} {value}: at most {MAX_NUM_BEAMS} (each beam keeps its own cache and a "
            "vocabulary of scores per step)"
        )
    return value


threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1),
    metavar="N",
    callback=cap_threads_option,
    help="Intra-op threads for ONNX Runtime (default: one per physical core; at most the usable CPUs).",
)


def device_options(f: Callable) -> Callable:
    """--device and --threads, for any command that makes ONNX Runtime sessions."""
    f = threads_option(f)
    f = click.option(
        "--device",
        default="auto",
        show_default=True,
        envvar="ONNXPIPE_DEVICE",
        metavar="auto|cpu|cuda[:N]",
        help="Where to run. auto uses CUDA when it really works, else CPU; "
        "cuda fails rather than fall back to CPU. [env: ONNXPIPE_DEVICE]",
    )(f)
    return f


def truncation_option(windows: bool = False) -> Callable:
    """--truncation for the encoder commands: what a record longer than the model's window becomes.

    WINDOWS (tag) adds the choice `window`, its default: the whole line in overlapping windows.
    """
    window = (
        "window: tagged whole, in windows that overlap by --stride tokens, their entities merged "
        "(the default, except with --aggregation none). truncate: only the first window is tagged"
    )
    return click.option(
        "--truncation",
        type=click.Choice(("window", "truncate", "error") if windows else ("truncate", "error")),
        default=None if windows else "truncate",
        show_default=not windows,
        help="What a record longer than the model's window becomes. "
        + (window if windows else "truncate: cut to the window")
        + "; such records are counted and reported once on stderr at the end. error: an error record "
        "instead (see --on-error).",
    )


_STREAM_KEYS = (
    "inputs",
    "output",
    "output_format",
    "field",
    "column",
    "batch_size",
    "max_batch_tokens",
    "on_error",
    "device",
    "threads",
    "progress",
)


def stream_options(formats: tuple[str, ...] = ("text", "jsonl", "tsv"), family: str | None = None) -> Callable:
    """The options every streaming command has; the command receives them as `stream: StreamOptions`.

    FORMATS are the output formats the command can write (embed adds npy); FAMILY is the command's
    task family in the registry, whose batching defaults --batch-size and --max-batch-tokens show
    (generation wants smaller batches than encoders).
    """
    batch_size, max_batch_tokens = DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS
    if family is not None:
        from onnxpipe.registry import family_named

        entry = family_named(family)
        batch_size, max_batch_tokens = entry.batch_size, entry.max_batch_tokens

    def decorator(f: Callable) -> Callable:
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            values = {key: kwargs.pop(key) for key in _STREAM_KEYS}
            values["inputs"] = tuple(values["inputs"]) or ("-",)
            return f(*args, stream=StreamOptions(**values), **kwargs)

        options: list[Callable[[Callable], Callable]] = [
            click.argument(
                "inputs", nargs=-1, metavar="[FILE]...", type=click.Path(exists=True, dir_okay=False, allow_dash=True)
            ),
            click.option(
                "-o",
                "--output",
                default="-",
                metavar="FILE",
                type=click.Path(dir_okay=False, allow_dash=True),
                help="Write results to FILE instead of stdout.",
            ),
            click.option(
                "--format",
                "output_format",
                type=click.Choice(formats),
                help="Output format. [default: text; jsonl with --field; tsv with --column]",
            ),
            click.option(
                "--field",
                metavar="NAME",
                help="Input is JSONL: take the text from field NAME; the other fields pass through.",
            ),
            click.option(
                "--column",
                type=click.IntRange(min=1),
                metavar="N",
                help="Input is TSV: take the text from column N (1-based); the row passes through.",
            ),
            click.option(
                "--batch-size",
                type=click.IntRange(min=1),
                metavar="N",
                default=batch_size,
                show_default=True,
                help="Records per model run, at most.",
            ),
            click.option(
                "--max-batch-tokens",
                type=click.IntRange(min=1),
                metavar="N",
                default=max_batch_tokens,
                show_default=True,
                help="Padded tokens per model run, at most (rows x longest row).",
            ),
            click.option(
                "--on-error",
                type=click.Choice(["fail", "null"]),
                default="fail",
                show_default=True,
                help="fail: stop at the first bad record. null: write an empty/error result for it, "
                "go on, and exit with 3 at the end.",
            ),
            device_options,
            click.option(
                "--progress/--no-progress",
                default=None,
                help="Show a progress bar on stderr. [default: when stderr is a terminal]",
            ),
        ]
        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorator


def pair_options(f: Callable) -> Callable:
    """--pair-field and --pair-column: each record is a text pair (the second text in Record.pair).

    Apply it below `stream_options` (nearer the function): it moves its values into `stream`.
    """

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        stream = kwargs["stream"]
        stream.pair_field = kwargs.pop("pair_field")
        stream.pair_column = kwargs.pop("pair_column")
        return f(*args, **kwargs)

    wrapper = click.option(
        "--pair-column",
        type=click.IntRange(min=1),
        metavar="N",
        help="With --column: each row is a text pair, its second text in column N.",
    )(wrapper)
    wrapper = click.option(
        "--pair-field",
        metavar="NAME",
        help="With --field: each record is a text pair, its second text in field NAME.",
    )(wrapper)
    return wrapper


def run_family(family: str, model: str, stream: StreamOptions, options: dict[str, Any], **kw: Any) -> tuple[Any, Any]:
    """Stream the inputs through FAMILY's task (the registry's entry) made with OPTIONS: (summary, task).

    The export must be one of the family's export tasks; KW goes to run_stream_command (engine
    options, records). The task is None when the run stopped before the model loaded.
    """
    from onnxpipe.registry import family_named
    from onnxpipe.stream.run import run_stream_command

    entry = family_named(family)
    tasks: list[Any] = []

    def make_task(m: Any) -> Any:
        tasks.append(entry.make_task(m, options))
        return tasks[0]

    summary = run_stream_command(model, stream, make_task, tasks=entry.export_tasks, **kw)
    return summary, (tasks[0] if tasks else None)
