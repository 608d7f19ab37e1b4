"""`onnxpipe answer`: extractive question answering, one answer span of the context per input record."""

from __future__ import annotations

import click

from onnxpipe.commands._options import StreamOptions, model_option, run_family, stream_options


@click.command("answer")
@model_option
@stream_options(family="answer")
@click.option(
    "--question",
    metavar="TEXT",
    help="Ask TEXT of every input line: each line (or --field / --column) is a context.",
)
@click.option(
    "--question-field",
    metavar="NAME",
    help="Input is JSONL: the question is in field NAME. [default with --context-field: question]",
)
@click.option(
    "--context-field",
    metavar="NAME",
    help="Input is JSONL: the context is in field NAME. [default with --question-field: context]",
)
@click.option(
    "--question-column",
    type=click.IntRange(min=1),
    metavar="N",
    help="Input is TSV: the question is in column N. [default: 1]",
)
@click.option(
    "--context-column",
    type=click.IntRange(min=1),
    metavar="N",
    help="Input is TSV: the context is in column N. [default: 2]",
)
@click.option(
    "-k",
    "--top-k",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="K",
    help="Give the K best answers (fewer where the context has fewer).",
)
@click.option(
    "--max-answer-length",
    "--max-answer-len",
    "max_answer_len",
    type=click.IntRange(min=1),
    default=15,
    show_default=True,
    metavar="N",
    help="Answers are at most N tokens long.",
)
@click.option(
    "--max-seq-len",
    type=click.IntRange(min=1),
    metavar="N",
    help="Tokens per window (question, context and special tokens); a longer context is split into "
    "overlapping windows. [default: the model's limit, at most 384]",
)
@click.option(
    "--stride",
    "--doc-stride",
    "doc_stride",
    type=click.IntRange(min=0),
    metavar="N",
    help="Context tokens that consecutive windows share, as transformers' doc_stride. "
    "[default: half the window, at most 128]",
)
@click.option(
    "--handle-impossible",
    "handle_impossible_answer",
    is_flag=True,
    help="Allow the empty answer (SQuAD 2.0 models): it wins when the model scores 'no answer' highest.",
)
@click.option(
    "--align-to-words/--no-align-to-words",
    default=True,
    show_default=True,
    help="Widen answers to whole words (off for languages without spaces between words, such as Chinese).",
)
def answer(
    model: str,
    stream: StreamOptions,
    question: str | None,
    question_field: str | None,
    context_field: str | None,
    question_column: int | None,
    context_column: int | None,
    top_k: int,
    max_answer_len: int,
    max_seq_len: int | None,
    doc_stride: int | None,
    handle_impossible_answer: bool,
    align_to_words: bool,
) -> None:
    """Answer a question from each context with a question-answering export.

    Three ways in: TSV lines of QUESTION<TAB>CONTEXT (the default; --question-column and
    --context-column pick other columns), JSONL records with --question-field and
    --context-field (the other fields pass through), or plain lines of context with one
    --question asked of each. A context longer than the model's window is read in
    overlapping windows (--max-seq-len, --stride), and the best answer of all windows wins,
    as in transformers' question-answering pipeline.

    Writes one result per record, in input order: the answer (text; with --top-k, the answers
    separated by tabs), or the answer, its start and end character offsets in the context and
    its score (--format jsonl, with an `answers` list under --top-k; --format tsv adds them as
    columns). An empty context gets an empty result; an empty question is a record error.

    \b
      printf 'Where is Paris?\\tParis is the capital of France.\\n' | onnxpipe answer -m squad
      onnxpipe answer -m squad --question "Who wrote it?" reviews.txt
      onnxpipe answer -m squad --question-field q --context-field text --top-k 3 qa.jsonl
    """
    from onnxpipe.errors import UsageError

    jsonl = question_field is not None or context_field is not None
    tsv = question_column is not None or context_column is not None
    if question is not None:
        if jsonl or tsv:
            raise UsageError("--question asks one question of every line: not with --question-field/-column")
        if question == "":
            raise UsageError("--question is empty")
    elif jsonl:
        if tsv or stream.column is not None:
            raise UsageError("JSONL input (--question-field/--context-field) takes no TSV columns")
        stream.field = context_field or stream.field or "context"
        stream.pair_field = question_field or "question"
    else:
        if stream.field is not None:
            raise UsageError("--field needs --question TEXT, or give --question-field and --context-field")
        if stream.output_format is None and not tsv and stream.column is None:
            stream.output_format = "text"  # the default two-column input answers in plain text
        stream.column = context_column or stream.column or 2
        stream.pair_column = question_column or 1
        if stream.column == stream.pair_column:
            raise UsageError(f"question and context are both in column {stream.column}")
    options = {
        "top_k": top_k,
        "max_answer_len": max_answer_len,
        "max_seq_len": max_seq_len,
        "doc_stride": doc_stride,
        "handle_impossible_answer": handle_impossible_answer,
        "align_to_words": align_to_words,
        "question": question,
    }
    run_family("answer", model, stream, options)
