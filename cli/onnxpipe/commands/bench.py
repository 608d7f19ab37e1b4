"""`onnxpipe bench`: how fast an export runs on this machine, as mean ± sd over repeated runs."""

from __future__ import annotations

import click

from onnxpipe.commands._options import device_options, model_option


class IntList(click.ParamType):
    """'1,8,32' -> (1, 8, 32)."""

    name = "N[,N...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            numbers = tuple(int(part) for part in str(value).split(",") if part.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)
        if not numbers or min(numbers) < 1:
            self.fail(f"{value!r}: give positive integers", param, ctx)
        return numbers


@click.command("bench")
@model_option
@click.option(
    "-i",
    "--input",
    "input_path",
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False, allow_dash=True),
    help="Use the lines of FILE ('-': stdin) as the records/prompts instead of generated text.",
)
@click.option(
    "-b",
    "--batch-sizes",
    type=IntList(),
    metavar="N[,N...]",
    help="Records per run. [default: 1,8,32 for encoders; 1,8 for generators]",
)
@click.option(
    "-s",
    "--seq-lens",
    type=IntList(),
    metavar="N[,N...]",
    help="Encoders: tokens per record, special tokens included. [default: 16,64,128]",
)
@click.option(
    "-p", "--prompt-tokens", type=IntList(), metavar="N[,N...]", help="Generators: tokens per prompt. [default: 128]"
)
@click.option(
    "-n",
    "--new-tokens",
    type=IntList(),
    metavar="N[,N...]",
    help="Generators: new tokens per prompt, forced (greedy, no early end). [default: 64]",
)
@click.option(
    "-r",
    "--repeat",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    metavar="N",
    help="Timed runs per figure.",
)
@click.option(
    "-w",
    "--warmup",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    metavar="N",
    help="Untimed runs before them.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (every run's seconds included).")
@click.option("--markdown", is_flag=True, help="Print the report as a Markdown table.")
@device_options
def bench(
    model: str,
    input_path: str | None,
    batch_sizes: tuple[int, ...] | None,
    seq_lens: tuple[int, ...] | None,
    prompt_tokens: tuple[int, ...] | None,
    new_tokens: tuple[int, ...] | None,
    repeat: int,
    warmup: int,
    as_json: bool,
    markdown: bool,
    device: str,
    threads: int | None,
) -> None:
    """Measure an export's speed on this machine.

    Encoders (classify, embed, tag, fill-mask): records/s for every batch size and sequence
    length, tokenizing and post-processing included. Generators: prompt-processing tokens/s
    (pp) and generation tokens/s (tg, greedy, --new-tokens forced, one token per row per
    forward pass; prefill excluded). Each figure is the mean ± sd over --repeat runs after
    --warmup runs, like llama-bench. Inputs of an exact token length are cut from plain prose
    with the export's tokenizer, or taken from --input. The report says which provider ran, the
    precision, the threads and the machine. Progress goes to stderr, the report to stdout.

    \b
      onnxpipe bench -m sentiment --device cpu --threads 4
      onnxpipe bench -m minilm -b 1,32,128 -s 32 --markdown >> BENCHMARKS.md
      onnxpipe bench -m smollm2 -b 1,8 -p 128 -n 64 --json > smollm2.json
    """
    import json

    from onnxpipe import console
    from onnxpipe.errors import UsageError
    from onnxpipe.measure.speed import BenchOptions, read_lines, run_bench

    if as_json and markdown:
        raise UsageError("--json and --markdown cannot be used together")
    options = BenchOptions(
        batch_sizes=batch_sizes,
        seq_lens=seq_lens,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        warmup=warmup,
        repeat=repeat,
    )
    if input_path is not None:
        options.input_lines = read_lines(input_path, max(batch_sizes or (32,)))
        options.input_name = input_path

    def progress(m) -> None:
        console.info(f"{_test_name(m)} batch {m.batch_size}: {m.mean:,.1f} ± {m.sd:,.1f} {m.unit}")

    report = run_bench(model, options, device=device, threads=threads, on_result=progress)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, ensure_ascii=False))
    elif markdown:
        click.echo(to_markdown(report))
    else:
        print_table(report)


def _test_name(m) -> str:
    if m.test == "encode":
        return f"{m.seq_len} tokens"
    return f"pp{m.seq_len}" if m.test == "pp" else f"tg{m.new_tokens}"


def _figure(m) -> str:
    return f"{m.mean:,.1f} ± {m.sd:,.1f}"


def _header(report) -> list[tuple[str, str]]:
    machine = report.machine
    cpu = f"{machine.get('cpu') or 'unknown CPU'} ({machine.get('cores')} cores, {machine.get('logical_cpus')} threads"
    cpu += f", {machine['memory_gib']} GiB)" if machine.get("memory_gib") else ")"
    precision = report.precision or "?"
    if report.optimization:
        precision += f", {report.optimization}"
    return [
        ("model", f"{report.model} ({report.task})"),
        ("precision", precision),
        ("provider", f"{report.provider} (--device {report.device})"),
        ("threads", str(report.threads)),
        ("machine", cpu + (f"; GPU {', '.join(machine['gpu'])}" if machine.get("gpu") else "")),
        ("input", report.input),
        ("runs", f"{report.repeat} timed after {report.warmup} warm-up; mean ± sd"),
        ("versions", ", ".join(f"{k} {v}" for k, v in report.versions.items())),
    ]


def _columns(report) -> list[str]:
    encoder = all(m.test == "encode" for m in report.results)
    if encoder:
        return ["test", "batch", "seq len", "records/s"]
    return ["test", "batch", "prompt", "new", "tokens/s"]


def _row(m, encoder: bool) -> list[str]:
    if encoder:
        return ["encode", str(m.batch_size), str(m.seq_len), _figure(m)]
    return [m.test, str(m.batch_size), str(m.seq_len), str(m.new_tokens or ""), _figure(m)]


def print_table(report) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False, soft_wrap=True)
    about = Table(show_header=False, box=None, pad_edge=False)
    about.add_column(style="bold")
    about.add_column()
    for key, value in _header(report):
        about.add_row(key, value)
    out.print(about)
    columns = _columns(report)
    encoder = columns[-1] == "records/s"
    table = Table()
    for name in columns:
        table.add_column(name, justify="left" if name == "test" else "right")
    for m in report.results:
        table.add_row(*_row(m, encoder))
    out.print(table)


def to_markdown(report) -> str:
    lines = [f"- {key}: {value}" for key, value in _header(report)]
    columns = _columns(report)
    encoder = columns[-1] == "records/s"
    lines += [
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if c == "test" else "---:" for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(_row(m, encoder)) + " |" for m in report.results]
    return "\n".join(lines)
