"""`onnxpipe rerank`: score each input line against a query with a cross-encoder; --sort ranks them."""

from __future__ import annotations

import functools
from typing import Any

import click

from onnxpipe.commands._options import StreamOptions, model_option, run_family, stream_options, truncation_option


@click.command("rerank")
@model_option
@stream_options(family="rerank")
@click.option("--query", required=True, metavar="TEXT", help="The query each line is scored against.")
@click.option(
    "--sort",
    is_flag=True,
    help="Write the lines best first (equal scores keep their input order) instead of in input order. "
    "Reads the whole input first; text output is then the lines themselves.",
)
@click.option(
    "-k",
    "--top-k",
    type=click.IntRange(min=1),
    metavar="K",
    help="With --sort: write only the K best lines (as CrossEncoder.rank's top_k).",
)
@click.option(
    "--activation",
    type=click.Choice(("sigmoid", "identity", "softmax")),
    help="The function on the model's logits. [default: the model's (sentence-transformers config), else "
    "sigmoid for a one-label model and identity (raw logits) otherwise, as CrossEncoder.predict]",
)
@click.option(
    "--label",
    metavar="NAME|N",
    help="For a model with several labels: the label whose score ranks. [default: the second of two]",
)
@truncation_option()
def rerank(
    model: str,
    stream: StreamOptions,
    query: str,
    sort: bool,
    top_k: int | None,
    activation: str | None,
    label: str | None,
    truncation: str,
) -> None:
    """Score each input line's relevance to --query with a cross-encoder export.

    Each line is paired with the query as (query, line), the order sentence-transformers'
    CrossEncoder uses, and scored as CrossEncoder.predict scores it. Writes one score per
    line in input order (text), the record with its "score" (--format jsonl), or the row with
    the score as a last column (--format tsv). An empty line gets an empty result. With
    --sort, the whole input is read and written best first: the lines (text), or the records
    and rows with their scores; empty and failed records come last.

    \b
      onnxpipe rerank -m ms-marco --query "how do unix pipes work" passages.txt
      onnxpipe rerank -m ms-marco --query "unix pipes" --sort -k 3 passages.txt
      jq -c '{id, text: .body}' docs.jsonl | onnxpipe rerank -m ms-marco --query "pipes" --field text --sort
    """
    options: dict[str, Any] = {"query": query, "activation": activation, "label": label, "truncation": truncation}
    wrap = None
    if top_k is not None and not sort:
        from onnxpipe.errors import UsageError

        raise UsageError("--top-k needs --sort (without it, every line gets its score in input order)")
    if sort:
        from onnxpipe.stream.sorted_output import SortedWriter

        wrap = functools.partial(SortedWriter.by_score, limit=top_k)
    run_family("rerank", model, stream, options, wrap_writer=wrap)
