"""`onnxpipe embed`: one vector per input line."""

from __future__ import annotations

import click

from onnxpipe.commands._options import StreamOptions, model_option, run_family, stream_options, truncation_option


@click.command("embed")
@model_option
@stream_options(formats=("text", "jsonl", "tsv", "npy"), family="embed")
@click.option(
    "--pooling",
    type=click.Choice(["mean", "cls", "max", "mean_sqrt_len", "weightedmean", "lasttoken"]),
    help="How token vectors become one vector (before any Dense layers the export carries). "
    "[default: what the export declares (its sentence-transformers pooling), else mean]",
)
@click.option(
    "--normalize/--no-normalize",
    default=None,
    help="Scale each vector to unit length. [default: what the export declares, else off]",
)
@truncation_option()
def embed(model: str, stream: StreamOptions, pooling: str | None, normalize: bool | None, truncation: str) -> None:
    """Embed each input line with a feature-extraction export.

    Writes one vector per line, in input order: space-separated numbers (text), an
    "embedding" list with the provider (--format jsonl), the line then one number per column
    (--format tsv), or a float32 matrix with one row per line (--format npy -o FILE.npy, for
    numpy.load). An empty line gets an empty result: an empty line, null, or a row of NaN.

    \b
      onnxpipe embed -m minilm --format npy -o vectors.npy sentences.txt
      jq -c '{id, text: .body}' posts.jsonl | onnxpipe embed -m minilm --field text > vectors.jsonl
    """
    run_family("embed", model, stream, {"pooling": pooling, "normalize": normalize, "truncation": truncation})
