"""`onnxpipe generate`: complete each input line (or -p PROMPT) with a decoder-only export."""

from __future__ import annotations

import sys
from typing import Any

import click

from onnxpipe.commands._decoding import decoding_options, decoding_overrides
from onnxpipe.commands._options import StreamOptions, model_option, run_family, stream_options


@click.command("generate")
@model_option
@stream_options(family="generate")
@click.option(
    "-p",
    "--prompt",
    "prompts",
    multiple=True,
    metavar="TEXT",
    help="Generate for TEXT instead of reading input lines (repeatable).",
)
@click.option("--chat", is_flag=True, help="Apply the model's chat template: each line is a user message.")
@click.option("--system", metavar="TEXT", help="With --chat: a system message before each user message.")
@decoding_options("generate")
@click.option(
    "--stop",
    "stop",
    multiple=True,
    metavar="TEXT",
    help="End a completion before TEXT (repeatable); TEXT is not part of the result.",
)
def generate(
    model: str,
    stream: StreamOptions,
    prompts: tuple[str, ...],
    chat: bool,
    system: str | None,
    stop: tuple[str, ...],
    **kw: Any,
) -> None:
    """Complete each input line with a text-generation export (GPT-2, Llama, SmolLM2, ...).

    Reads prompts from FILEs or stdin, one per line, or from -p, and writes one completion
    per prompt in input order. Text output keeps one line per prompt: newlines in a completion
    are written as \\n (and backslashes as \\\\). --format jsonl gives the exact text, the
    finish reason (eos, length or stop), token counts and the provider. With one -p prompt
    and a terminal on stdout, the text is printed as it is generated. Settings not given come
    from the model's generation_config.json. An empty line gets an empty completion.

    \b
      onnxpipe generate -m smollm2 --chat -p "Write a haiku about pipes"
      onnxpipe generate -m gpt2 --max-new-tokens 40 --do-sample --seed 1 < prompts.txt
      onnxpipe generate -m smollm2 --chat --format jsonl --stop "\\n\\n" questions.txt
    """
    from onnxpipe import console
    from onnxpipe.errors import UsageError
    from onnxpipe.stream.records import Record

    if prompts and stream.inputs != ("-",):
        raise UsageError("give prompts with -p or as input FILEs, not both")
    if system is not None and not chat:
        raise UsageError("--system needs --chat")
    overrides = decoding_overrides(kw)
    if (overrides["num_return_sequences"] or 1) > 1 and stream.format != "jsonl":
        raise UsageError("--num-return-sequences needs --format jsonl (text output has one line per prompt)")
    records = [Record(seq=i, text=p, source="--prompt", line=i + 1) for i, p in enumerate(prompts)] or None
    streaming = len(prompts) == 1 and stream.format == "text" and stream.output in ("-", "") and _isatty(sys.stdout)
    summary, task = run_family(
        "generate",
        model,
        stream,
        {**overrides, "chat": chat, "system": system, "stop": stop},
        engine_options={"streaming": streaming},
        records=records,
    )
    if task is not None:
        rate = task.generated_tokens / summary.seconds if summary.seconds > 0 else 0.0
        console.info(f"{task.generated_tokens:,} tokens generated ({rate:,.1f} tokens/s)")
        console.debug(f"decoding: {task.stats.as_dict()}")


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
