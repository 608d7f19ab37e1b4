"""`onnxpipe classify`: one label per input line (or text pair); zero-shot with --candidate-labels."""

from __future__ import annotations

from typing import Any

import click

from onnxpipe.commands._options import (
    StreamOptions,
    model_option,
    pair_options,
    run_family,
    stream_options,
    truncation_option,
)


@click.command("classify")
@model_option
@stream_options(family="classify")
@pair_options
@click.option(
    "-k",
    "--top-k",
    type=click.IntRange(min=1),
    metavar="K",
    help="Keep the K best labels. [default: 1, or all labels when --threshold or --candidate-labels is given]",
)
@click.option(
    "--threshold",
    type=click.FloatRange(0.0, 1.0),
    metavar="T",
    help="Keep only labels scoring at least T (a record may get none).",
)
@click.option(
    "--candidate-labels",
    metavar="LABELS",
    help="Zero-shot classification with an NLI export: score each line against these comma-separated "
    "labels (\\, for a comma inside a label).",
)
@click.option(
    "--hypothesis-template",
    metavar="TEMPLATE",
    help='With --candidate-labels: the hypothesis each label fills in at {}. [default: "This example is {}."]',
)
@click.option(
    "--multi-label",
    is_flag=True,
    help="With --candidate-labels: score each label on its own (entailment against contradiction) "
    "instead of one softmax across the labels.",
)
@truncation_option()
def classify(
    model: str,
    stream: StreamOptions,
    top_k: int | None,
    threshold: float | None,
    candidate_labels: str | None,
    hypothesis_template: str | None,
    multi_label: bool,
    truncation: str,
) -> None:
    """Classify each input line with a text-classification export.

    Reads lines from FILEs or stdin and writes one result per line, in input order: the top
    label (text), the labels with their scores and the provider (--format jsonl), or the line,
    labels and scores as columns (--format tsv). Scores are softmax probabilities, or
    independent sigmoids for multi-label models. With several labels kept, text output joins
    them with commas. An empty line gets an empty result.

    Text pairs (NLI premise and hypothesis, question and passage): --pair-field NAME (JSONL,
    with --field) or --pair-column N (TSV, with --column) gives each record its second text,
    encoded as the model's tokenizer pairs texts ([SEP] and token types).

    Zero-shot: with --candidate-labels, an NLI export (one of its labels starts with "entail")
    scores each line against every label's hypothesis, as transformers' zero-shot pipeline
    does, and writes all the labels best first (-k 1 for the best only).

    \b
      cat reviews.txt | onnxpipe classify -m sentiment
      onnxpipe classify -m sentiment --format jsonl --top-k 2 reviews.txt > labels.jsonl
      jq -c '{id, text: .body}' posts.jsonl | onnxpipe classify -m topics --field text --threshold 0.5
      onnxpipe classify -m nli --field premise --pair-field hypothesis pairs.jsonl
      onnxpipe classify -m nli --candidate-labels "sports,politics,tech" -k 1 news.txt
    """
    options: dict[str, Any] = {"top_k": top_k, "threshold": threshold, "truncation": truncation}
    if candidate_labels is not None:
        options.update(
            candidate_labels=candidate_labels, hypothesis_template=hypothesis_template, multi_label=multi_label
        )
    elif hypothesis_template is not None or multi_label:
        from onnxpipe.errors import UsageError

        raise UsageError("--hypothesis-template and --multi-label are for zero-shot: give --candidate-labels too")
    if candidate_labels is not None and (stream.pair_field is not None or stream.pair_column is not None):
        from onnxpipe.errors import UsageError

        raise UsageError("--candidate-labels makes the pairs itself: it takes no --pair-field or --pair-column")
    run_family("classify", model, stream, options)
