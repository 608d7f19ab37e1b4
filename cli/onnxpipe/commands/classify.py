"""`onnxpipe classify`: one label per input line."""

from __future__ import annotations

import click

from onnxpipe.commands._options import StreamOptions, model_option, run_family, stream_options


@click.command("classify")
@model_option
@stream_options(family="classify")
@click.option(
    "-k",
    "--top-k",
    type=click.IntRange(min=1),
    metavar="K",
    help="Keep the K best labels. [default: 1, or all labels when --threshold is given]",
)
@click.option(
    "--threshold",
    type=click.FloatRange(0.0, 1.0),
    metavar="T",
    help="Keep only labels scoring at least T (a record may get none).",
)
def classify(model: str, stream: StreamOptions, top_k: int | None, threshold: float | None) -> None:
    """Classify each input line with a text-classification export.

    Reads lines from FILEs or stdin and writes one result per line, in input order: the top
    label (text), the labels with their scores and the provider (--format jsonl), or the line,
    labels and scores as columns (--format tsv). Scores are softmax probabilities, or
    independent sigmoids for multi-label models. With several labels kept, text output joins
    them with commas. An empty line gets an empty result.

    \b
      cat reviews.txt | onnxpipe classify -m sentiment
      onnxpipe classify -m sentiment --format jsonl --top-k 2 reviews.txt > labels.jsonl
      jq -c '{id, text: .body}' posts.jsonl | onnxpipe classify -m topics --field text --threshold 0.5
    """
    run_family("classify", model, stream, {"top_k": top_k, "threshold": threshold})
