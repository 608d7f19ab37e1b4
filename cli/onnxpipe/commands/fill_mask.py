"""`onnxpipe fill-mask`: candidates for the mask token in each input line."""

from __future__ import annotations

import click

from onnxpipe.commands._options import StreamOptions, model_option, run_family, stream_options, truncation_option


@click.command("fill-mask")
@model_option
@stream_options(family="fill-mask")
@click.option(
    "-k",
    "--top-k",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    metavar="K",
    help="Candidates per mask token.",
)
@truncation_option()
def fill_mask(model: str, stream: StreamOptions, top_k: int, truncation: str) -> None:
    """Fill the mask token in each input line with a fill-mask export.

    Each line holds the model's mask token ([MASK] for BERT, <mask> for RoBERTa). Writes one
    result per line, in input order: the K best tokens separated by tabs (text; with several
    masks, each mask's group separated by a | cell), or the candidates with score, token id,
    token string and filled-in sequence, as transformers' fill-mask pipeline gives them
    (--format jsonl: a list, or one list per mask). A line without a mask token is a record
    error (see --on-error).

    \b
      echo "Paris is the [MASK] of France." | onnxpipe fill-mask -m bert-base
      onnxpipe fill-mask -m roberta --format jsonl -k 3 --on-error null cloze.txt
    """
    run_family("fill-mask", model, stream, {"top_k": top_k, "truncation": truncation})
