"""`onnxpipe translate`: one translation per input line, with an encoder-decoder export."""

from __future__ import annotations

from typing import Any

import click

from onnxpipe.commands._decoding import decoding_options, decoding_overrides, prefix_option
from onnxpipe.commands._options import StreamOptions, model_option, stream_options
from onnxpipe.commands._seq2seq import run_seq2seq


@click.command("translate")
@model_option
@stream_options(family="translate")
@click.option(
    "--source-lang",
    metavar="CODE",
    help="Source language of a multilingual model (mBART en_XX, NLLB eng_Latn, M2M100 en), "
    "or with --target-lang the pair of a T5 model (en).",
)
@click.option(
    "--target-lang", metavar="CODE", help="Target language: multilingual models need it (de_DE, deu_Latn, de, >>deu<<)."
)
@decoding_options("translate")
@prefix_option
def translate(
    model: str, stream: StreamOptions, source_lang: str | None, target_lang: str | None, prefix: str | None, **kw: Any
) -> None:
    """Translate each input line with an encoder-decoder export (Marian/opus-mt, T5, mBART, NLLB).

    Reads lines from FILEs or stdin and writes one translation per line, in input order
    (newlines in a result are written as \\n). --format jsonl gives the exact text, token counts,
    the beam score and, with --num-return-sequences, the n best. Settings not given come from the
    model's generation_config.json (opus-mt: 4-6 beams, pad banned, at most 512 tokens) and, for
    T5, from its task_specific_params. Lines longer than the model takes are truncated and counted.

    \b
      onnxpipe translate -m opus-mt-en-de < en.txt > de.txt
      onnxpipe translate -m nllb --source-lang eng_Latn --target-lang deu_Latn en.txt
      onnxpipe translate -m t5-small --source-lang en --target-lang fr --num-beams 4 en.txt
    """
    run_seq2seq(model, stream, "translate", prefix, source_lang, target_lang, decoding_overrides(kw))
