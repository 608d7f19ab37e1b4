"""`onnxpipe translate`: one translation per input line, with an encoder-decoder export."""

from __future__ import annotations

from typing import Any, Callable

import click

from onnxpipe.commands._options import StreamOptions, check_beams_option, model_option, stream_options


def generation_options(f: Callable) -> Callable:
    """The decoding flags translate and summarize share; unset ones come from the model's files."""
    options = [
        click.option("--num-beams", type=click.IntRange(min=1), metavar="N", callback=check_beams_option,
                     help="Beam search with N beams (1: greedy; at most 64). [default: the model's generation_config]"),
        click.option("--length-penalty", type=float, metavar="X",
                     help="Beam search: scores are divided by length**X (>0 favours longer output). [default: 1.0]"),
        click.option("--max-length", type=click.IntRange(min=2), metavar="N",
                     help="At most N decoder tokens, the start token included (transformers' max_length). "
                          "[default: the model's, else 257]"),
        click.option("--max-new-tokens", type=click.IntRange(min=1), metavar="N",
                     help="At most N generated tokens (wins over --max-length)."),
        click.option("--min-length", type=click.IntRange(min=0), metavar="N",
                     help="No end of text before N decoder tokens, the start token included."),
        click.option("--no-repeat-ngram-size", type=click.IntRange(min=0), metavar="N", help="Never repeat an N-gram."),
        click.option("--early-stopping", type=click.Choice(["true", "false", "never"]),
                     help="Beam search: stop when N hypotheses are done (true), by transformers' heuristic "
                          "(false), or only when no beam can improve (never)."),
        click.option("--num-return-sequences", type=click.IntRange(min=1), metavar="N", callback=check_beams_option,
                     help="The N best outputs of the beam search (--format jsonl: field 'sequences')."),
        click.option("--prefix", metavar="TEXT",
                     help="Put TEXT before every input line (T5: \"translate English to German: \"). "
                          "[default: the model's task_specific_params]"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def generation_overrides(kw: dict[str, Any]) -> dict[str, Any]:
    """The options' values, named as GenerationConfig names them (None: not given)."""
    early = kw.pop("early_stopping", None)
    overrides = {k: kw.pop(k, None) for k in ("num_beams", "length_penalty", "max_length", "max_new_tokens",
                                              "min_length", "no_repeat_ngram_size", "num_return_sequences")}
    overrides["early_stopping"] = {"true": True, "false": False, "never": "never"}.get(early or "")
    return overrides


def run_seq2seq(model: str, stream: StreamOptions, summarize: bool, prefix: str | None, source_lang: str | None,
                target_lang: str | None, overrides: dict[str, Any]) -> None:
    """Stream the inputs through a Seq2SeqTask; report generated tokens per second at the end."""
    from onnxpipe import console
    from onnxpipe.errors import UsageError
    from onnxpipe.stream.run import run_stream_command
    from onnxpipe.tasks.seq2seq import Seq2SeqTask

    if (overrides.get("num_return_sequences") or 1) > 1 and stream.format != "jsonl":
        raise UsageError("--num-return-sequences needs --format jsonl (text output has one line per input)")
    tasks: list[Seq2SeqTask] = []

    def make_task(m):
        tasks.append(Seq2SeqTask(m, summarize=summarize, prefix=prefix, source_lang=source_lang,
                                 target_lang=target_lang, **overrides))
        return tasks[0]

    summary = run_stream_command(model, stream, make_task, tasks=Seq2SeqTask.task_names)
    if tasks and summary.seconds > 0:
        task = tasks[0]
        console.info(f"{task.generated_tokens:,} tokens generated "
                     f"({task.generated_tokens / summary.seconds:,.1f} tokens/s)")


@click.command("translate")
@model_option
@stream_options(batch_size=32, max_batch_tokens=8192)
@click.option("--source-lang", metavar="CODE",
              help="Source language of a multilingual model (mBART en_XX, NLLB eng_Latn, M2M100 en), "
                   "or with --target-lang the pair of a T5 model (en).")
@click.option("--target-lang", metavar="CODE",
              help="Target language: multilingual models need it (de_DE, deu_Latn, de, >>deu<<).")
@generation_options
def translate(model: str, stream: StreamOptions, source_lang: str | None, target_lang: str | None,
              prefix: str | None, **kw: Any) -> None:
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
    run_seq2seq(model, stream, False, prefix, source_lang, target_lang, generation_overrides(kw))
