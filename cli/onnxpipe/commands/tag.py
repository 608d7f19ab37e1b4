"""`onnxpipe tag`: named entities (token classification) per input line."""

from __future__ import annotations

import click

from onnxpipe.commands._options import StreamOptions, model_option, run_family, stream_options, truncation_option


@click.command("tag")
@model_option
@stream_options(family="tag")
@click.option(
    "--aggregation",
    type=click.Choice(["simple", "first", "average", "max", "none"]),
    default="simple",
    show_default=True,
    help="How word pieces become entities, as in transformers' token-classification pipeline: "
    "simple groups adjacent pieces with the same tag; first/average/max first make each "
    "word agree (its first piece, the mean, or the most confident piece); none gives one "
    "entry per piece.",
)
@truncation_option(windows=True)
@click.option(
    "--stride",
    type=click.IntRange(min=0),
    metavar="N",
    help="Tokens of overlap between the windows of a long line, as the stride of transformers' "
    "token-classification pipeline. [default: a quarter of the model's window, 128 of 512]",
)
def tag(model: str, stream: StreamOptions, aggregation: str, truncation: str | None, stride: int | None) -> None:
    """Find entities in each input line with a token-classification export.

    Writes one result per line, in input order: the entities as WORD/LABEL separated by tabs
    (text), a list of entities with label, score, word and character offsets into the line
    (--format jsonl), or the line followed by one WORD/LABEL/START-END cell per entity
    (--format tsv). Tokens tagged O are left out; a line without entities gets an empty result.
    A line longer than the model's window is tagged whole, in overlapping windows whose entities
    are merged as transformers' pipeline merges them with stride=.

    \b
      onnxpipe tag -m ner news.txt
      onnxpipe tag -m ner --format jsonl --aggregation first < news.txt | jq -c '.entities'
    """
    run_family("tag", model, stream, {"aggregation": aggregation, "truncation": truncation, "stride": stride})
