"""The decoding flags, defined once: generate, translate, summarize and eval take them from here.

Each flag is named as transformers' `GenerationConfig` names the setting, with its meaning. Which
flags a command takes is the registry's list of its family's options (`onnxpipe.registry`), so the
command line and the Python API accept the same settings. Lengths have both of transformers'
spellings: `--max-new-tokens`/`--min-new-tokens` count generated tokens, `--max-length`/`--min-length`
the whole sequence (a decoder-only model's prompt and completion; an encoder-decoder's decoder start
token and output). Only click (and the import-light registry) is imported here, so `--help` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from onnxpipe.commands._options import check_beams_option

_EARLY_STOPPING = {"true": True, "false": False, "never": "never"}

# name -> the click option, in the order --help lists them.
DECODING_FLAGS: dict[str, Callable[[Callable], Callable]] = {
    "max_new_tokens": click.option(
        "--max-new-tokens",
        type=click.IntRange(min=1),
        metavar="N",
        help="Generate at most N tokens (wins over --max-length). [default: the model's generation_config, else 256]",
    ),
    "max_length": click.option(
        "--max-length",
        type=click.IntRange(min=2),
        metavar="N",
        help="At most N tokens in the whole sequence, as transformers' max_length counts them: the prompt and "
        "the completion (decoder-only), or the decoder start token and the output (encoder-decoder).",
    ),
    "min_new_tokens": click.option(
        "--min-new-tokens", type=click.IntRange(min=0), metavar="N", help="No end of text before N generated tokens."
    ),
    "min_length": click.option(
        "--min-length",
        type=click.IntRange(min=0),
        metavar="N",
        help="No end of text before the whole sequence has N tokens (counted as --max-length counts them).",
    ),
    "do_sample": click.option(
        "--do-sample/--greedy",
        "do_sample",
        default=None,
        help="Sample, or take the most likely token. [default: the model's generation_config; "
        "--temperature, --top-k or --top-p imply --do-sample]",
    ),
    "temperature": click.option(
        "--temperature",
        type=click.FloatRange(min=0.0),
        metavar="T",
        help="Sampling temperature (0 means --greedy). [default: 1.0]",
    ),
    "top_k": click.option(
        "--top-k",
        type=click.IntRange(min=0),
        metavar="K",
        help="Sample from the K most likely tokens (0: all). [default: 50]",
    ),
    "top_p": click.option(
        "--top-p",
        type=click.FloatRange(0.0, 1.0),
        metavar="P",
        help="Sample from the smallest set of tokens with probability P.",
    ),
    "seed": click.option(
        "--seed",
        type=int,
        metavar="N",
        help="Seed for sampling: the same seed gives the same text for a line, whatever the batch size.",
    ),
    "num_beams": click.option(
        "--num-beams",
        type=click.IntRange(min=1),
        metavar="N",
        callback=check_beams_option,
        help="Beam search with N beams (1: greedy; at most 64). [default: the model's generation_config]",
    ),
    "length_penalty": click.option(
        "--length-penalty",
        type=float,
        metavar="X",
        help="Beam search: scores are divided by length**X (>0 favours longer output). [default: 1.0]",
    ),
    "early_stopping": click.option(
        "--early-stopping",
        type=click.Choice(list(_EARLY_STOPPING)),
        help="Beam search: stop when N hypotheses are done (true), by transformers' heuristic (false), "
        "or only when no beam can improve (never). [default: false]",
    ),
    "num_return_sequences": click.option(
        "--num-return-sequences",
        type=click.IntRange(min=1),
        metavar="N",
        callback=check_beams_option,
        help="Beam search: the N best outputs (--format jsonl: field 'sequences').",
    ),
    "repetition_penalty": click.option(
        "--repetition-penalty",
        type=click.FloatRange(min=0.0, min_open=True),
        metavar="X",
        help="Penalise tokens already in the prompt or the output (>1 discourages repeats).",
    ),
    "no_repeat_ngram_size": click.option(
        "--no-repeat-ngram-size", type=click.IntRange(min=0), metavar="N", help="Never repeat an N-gram."
    ),
}

# Not decoding settings, but flags of the encoder-decoder families (translate, summarize, eval).
prefix_option = click.option(
    "--prefix",
    metavar="TEXT",
    help='Put TEXT before every input line (T5: "translate English to German: "). '
    "[default: the model's task_specific_params]",
)


def decoding_names(family: str) -> tuple[str, ...]:
    """The decoding settings FAMILY (a registry name: generate, translate, summarize) takes, in --help order."""
    from onnxpipe.registry import family_named

    options = set(family_named(family).options)
    return tuple(name for name in DECODING_FLAGS if name in options)


def decoding_options(family: str) -> Callable[[Callable], Callable]:
    """The decoding flags of FAMILY's registry entry, as one decorator; read them back with decoding_overrides."""

    def decorator(f: Callable) -> Callable:
        for name in reversed(decoding_names(family)):
            f = DECODING_FLAGS[name](f)
        return f

    return decorator


def decoding_overrides(kw: dict[str, Any]) -> dict[str, Any]:
    """Pop the decoding flags' values out of KW, named as GenerationConfig names them (None: not given).

    Sampling settings imply sampling and temperature 0 means greedy (registry.sampling_settings, which the
    Python API applies too); --early-stopping's words become transformers' True, False and "never".
    """
    from onnxpipe.registry import sampling_settings

    overrides = {name: kw.pop(name) for name in DECODING_FLAGS if name in kw}
    if "early_stopping" in overrides:
        overrides["early_stopping"] = _EARLY_STOPPING.get(overrides["early_stopping"] or "")
    return sampling_settings(overrides)
