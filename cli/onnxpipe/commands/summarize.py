"""`onnxpipe summarize`: one summary per input line, with an encoder-decoder export."""

from __future__ import annotations

from typing import Any

import click

from onnxpipe.commands._decoding import decoding_options, decoding_overrides, prefix_option
from onnxpipe.commands._options import StreamOptions, model_option, stream_options
from onnxpipe.commands._seq2seq import run_seq2seq


@click.command("summarize")
@model_option
@stream_options(family="summarize")
@decoding_options("summarize")
@prefix_option
def summarize(model: str, stream: StreamOptions, prefix: str | None, **kw: Any) -> None:
    """Summarize each input line (a whole document per line) with an encoder-decoder export.

    The same engine as translate, with the model's summarization settings: its
    generation_config.json (BART-CNN: 4 beams, 56-142 tokens, no repeated trigram), then, for T5,
    the "summarization" entry of task_specific_params (with its "summarize: " prefix). Flags win.
    Documents longer than the model takes are truncated and counted.

    \b
      jq -r .article news.jsonl | onnxpipe summarize -m bart-cnn > summaries.txt
      onnxpipe summarize -m t5-small --field body --format jsonl posts.jsonl
    """
    run_seq2seq(model, stream, "summarize", prefix, None, None, decoding_overrides(kw))
