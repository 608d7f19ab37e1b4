"""The run that translate and summarize share: their registry family over the streaming engine."""

from __future__ import annotations

from typing import Any

from onnxpipe.commands._options import StreamOptions, run_family


def run_seq2seq(
    model: str,
    stream: StreamOptions,
    family: str,
    prefix: str | None,
    source_lang: str | None,
    target_lang: str | None,
    overrides: dict[str, Any],
) -> None:
    """Stream the inputs through FAMILY's task (translate or summarize); report generated tokens per second."""
    from onnxpipe import console
    from onnxpipe.errors import UsageError

    if (overrides.get("num_return_sequences") or 1) > 1 and stream.format != "jsonl":
        raise UsageError("--num-return-sequences needs --format jsonl (text output has one line per input)")
    options = {"prefix": prefix, **overrides}
    if family == "translate":
        options.update(source_lang=source_lang, target_lang=target_lang)
    summary, task = run_family(family, model, stream, options)
    if task is not None and summary.seconds > 0:
        console.info(
            f"{task.generated_tokens:,} tokens generated ({task.generated_tokens / summary.seconds:,.1f} tokens/s)"
        )
