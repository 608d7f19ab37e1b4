"""`onnxpipe eval`: score an export on labelled data, through ONNX Runtime.

Classifiers get accuracy, P/R/F1 and the confusion matrix; encoder-decoders (translate, summarize)
get sacrebleu's corpus BLEU and chrF against references; question answering gets SQuAD exact match and F1;
text generation gets teacher-forced perplexity and next-token agreement (measure.lm_quality).
"""

from __future__ import annotations

from typing import Any

import click

from onnxpipe.commands._decoding import decoding_names, decoding_options, decoding_overrides, prefix_option
from onnxpipe.commands._options import complete_export_names, threads_option

# Options that only mean something for one kind of export (parameter names): the decoding ones are
# translate's, from the registry, so that a new decoding flag needs no entry here.
_CLASSIFY_ONLY = ("label_column", "label_map")
_SEQ2SEQ_ONLY = (
    "reference_column",
    "references",
    "summarize",
    "source_lang",
    "target_lang",
    "prefix",
    *decoding_names("translate"),
)
_QA_ONLY = (
    "question_field",
    "context_field",
    "answers_field",
    "handle_impossible_answer",
    "max_answer_len",
    "max_seq_len",
    "doc_stride",
)
_LM_ONLY = ("max_tokens", "context")


@click.command("eval")
@click.option(
    "-m",
    "--model",
    required=True,
    metavar="MODEL",
    shell_complete=complete_export_names,
    help="Export name (in the export home) or folder.",
)
@click.argument("data", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--text-column",
    default="text",
    show_default=True,
    help="Column (or JSONL field) holding the text (the source, for translations).",
)
@click.option(
    "--label-column",
    default="label",
    show_default=True,
    help="Classifiers: column (or JSONL field) holding the true label.",
)
@click.option(
    "--label-map",
    metavar="RAW=NAME,...",
    help="Classifiers: translate the file's labels to the model's, e.g. \"1=positive,-1=negative\".",
)
@click.option(
    "--reference-column",
    default="reference",
    show_default=True,
    help="Translations and summaries: column (or JSONL field) holding the reference.",
)
@click.option(
    "--references",
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    metavar="FILE",
    help="Translations and summaries: DATA is plain text, one source per line, and FILE holds one reference per line.",
)
@click.option("--summarize", is_flag=True, help="Use the model's summarization settings, as onnxpipe summarize does.")
@click.option("--source-lang", metavar="CODE", help="Source language of a multilingual model (as for translate).")
@click.option("--target-lang", metavar="CODE", help="Target language of a multilingual model (as for translate).")
@decoding_options("translate")
@prefix_option
@click.option(
    "--question-field",
    default="question",
    show_default=True,
    help="Question answering: JSONL field holding the question.",
)
@click.option(
    "--context-field",
    default="context",
    show_default=True,
    help="Question answering: JSONL field holding the context.",
)
@click.option(
    "--answers-field",
    default="answers",
    show_default=True,
    help='Question answering: JSONL field holding the gold answers, as SQuAD has them ({"text": [...]}, '
    "a list of {text} objects or of strings); none means no answer (SQuAD 2.0).",
)
@click.option(
    "--handle-impossible",
    "handle_impossible_answer",
    is_flag=True,
    help="Question answering: allow the empty answer, as onnxpipe answer --handle-impossible (SQuAD 2.0).",
)
@click.option(
    "--max-answer-length",
    "max_answer_len",
    type=click.IntRange(min=1),
    default=15,
    show_default=True,
    metavar="N",
    help="Question answering: answers are at most N tokens long.",
)
@click.option(
    "--max-seq-len",
    type=click.IntRange(min=1),
    metavar="N",
    help="Question answering: tokens per window, as onnxpipe answer. [default: the model's limit, at most 384]",
)
@click.option(
    "--stride",
    "doc_stride",
    type=click.IntRange(min=0),
    metavar="N",
    help="Question answering: tokens that consecutive windows share. [default: half the window, at most 128]",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=20000,
    show_default=True,
    metavar="N",
    help="Text generation: score the first N tokens of the text (each predicted from the true ones before it).",
)
@click.option(
    "--context",
    type=click.IntRange(min=2),
    metavar="N",
    help="Text generation: the text is scored in windows of N tokens, each run from an empty cache. "
    "[default: 512, or the model's positions where fewer]",
)
@click.option(
    "--format",
    "data_format",
    type=click.Choice(["csv", "tsv", "jsonl"]),
    help="Data format when the file name does not tell.",
)
@click.option(
    "--against",
    metavar="MODEL",
    shell_complete=complete_export_names,
    help="A second export to run on the same data: its figures and the agreement between the two.",
)
@click.option("--json", "as_json", is_flag=True, help="Write the figures as one JSON object on stdout.")
@click.option(
    "--brief", is_flag=True, help="Only the summary lines on stderr: no per-class table, no confusion matrix."
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    envvar="ONNXPIPE_DEVICE",
    metavar="auto|cpu|cuda[:N]",
    help="Where ONNX Runtime runs the model. [env: ONNXPIPE_DEVICE]",
)
@threads_option
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    metavar="N",
    help="Texts per batch. [default: 64 for classifiers, 32 for translations]",
)
def eval_command(
    model: str,
    data: str,
    data_format: str | None,
    against: str | None,
    as_json: bool,
    brief: bool,
    device: str,
    threads: int | None,
    batch_size: int | None,
    **kw: Any,
) -> None:
    """Score an export on a labelled file (a classifier, translation/summarisation, question answering), or a
    text-generation export on plain text (perplexity).

    DATA is .csv or .tsv with a header row, or .jsonl (plain text for text generation). The outputs come from the ONNX
    export, as `onnxpipe classify` or `onnxpipe translate` (with --summarize, `onnxpipe
    summarize`) makes them, with the same decoding options.

    Classifiers: accuracy, macro and per-class precision, recall and F1 and the confusion
    matrix, on stderr. Translations and summaries: corpus BLEU and chrF from sacrebleu
    against the reference column (or, with --references FILE, DATA is plain text with one
    source per line), with sacrebleu's signatures. Question answering: SQuAD exact match and
    F1 (the official script's normalisation, the best over each example's gold answers) on a
    SQuAD JSONL file, also split into examples with and without an answer (SQuAD 2.0, with
    --handle-impossible). Text generation: perplexity and top-1 accuracy, teacher-forced (every
    next token predicted from the true text before it), on DATA as plain text: each non-empty line a
    document followed by a newline, scored in windows of --context tokens (each starting with BOS
    where the tokenizer adds one), --max-tokens tokens in all; with --against (the float32 export of
    the same model) also the share of positions where the two predict the same next token, the
    perplexity ratio and the mean KL divergence: the measures that fit a quantised model, where
    greedy outputs diverge after one flipped token. Without the [export] extra (the onnx package),
    onnxpipe's fused graph is scored one token a run over its cache, several times slower, and a
    note says so. --json writes the figures to stdout as well. --against runs a second export and
    reports how often the two agree.

    \b
      onnxpipe eval -m sentiment --label-map "1=positive,-1=negative" heldout.tsv
      onnxpipe eval -m sentiment-int8 --against sentiment --json heldout.tsv | jq .against.agreement
      onnxpipe eval -m opus-mt-en-de newstest.en --references newstest.de
      onnxpipe eval -m opus-mt-en-de --reference-column de --text-column en --json pairs.tsv | jq .scores.bleu.score
      onnxpipe eval -m squad --handle-impossible squad-v2.jsonl
      onnxpipe eval -m smollm2-int4 --against smollm2 heldout.txt
    """
    from onnxpipe import console
    from onnxpipe.errors import UsageError
    from onnxpipe.home import resolve_model
    from onnxpipe.manifest import read_manifest
    from onnxpipe.measure.quality import (
        QUESTION_ANSWERING,
        SEQ2SEQ,
        evaluate_answers,
        evaluate_classification,
        evaluate_generation,
    )
    from onnxpipe.registry import FAMILIES

    TEXT_GENERATION = FAMILIES["generate"].export_tasks[0]
    folder = resolve_model(model)
    task = read_manifest(folder).get("task")
    seq2seq, qa, lm = task == SEQ2SEQ, task == QUESTION_ANSWERING, task == TEXT_GENERATION
    only = {
        "text-classification": _CLASSIFY_ONLY,
        SEQ2SEQ: _SEQ2SEQ_ONLY,
        QUESTION_ANSWERING: _QA_ONLY,
        TEXT_GENERATION: _LM_ONLY,
    }
    scored_as = task if task in only else "text-classification"  # load_classifier says what it cannot score
    wrong = tuple(name for kind, names in only.items() if kind != scored_as for name in names)
    ctx = click.get_current_context()
    flags = {p.name: max(p.opts, key=len) for p in ctx.command.params}
    given = [flags[name] for name in wrong if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    if given:
        meant = next(k for k, names in only.items() if k != scored_as and {flags[n] for n in names} & set(given))
        raise UsageError(f"{', '.join(given)}: only for {meant} exports ({folder.name} is a {task} export)")
    if lm:
        from onnxpipe.measure.lm_quality import evaluate_lm

        for name in ("text_column", "data_format", "batch_size"):
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
                raise UsageError(
                    f"{flags[name]}: not for text-generation exports",
                    hint="DATA is plain text, one document a line, scored one window at a time",
                )
        table = next((kind for kind in ("jsonl", "csv", "tsv") if data.lower().endswith("." + kind)), None)
        if table:  # its JSON or its columns would be scored as prose
            raise UsageError(
                f"{data}: a text-generation export is scored on plain text, one document a line, not {table}",
                hint="extract the text first, e.g. jq -r .text FILE.jsonl | onnxpipe eval -m MODEL -",
            )
        report = evaluate_lm(
            model,
            data,
            against=against,
            max_tokens=kw["max_tokens"],
            context=kw["context"],
            device=device,
            threads=threads,
        )
    elif qa:
        report = evaluate_answers(
            model,
            data,
            question_field=kw["question_field"],
            context_field=kw["context_field"],
            answers_field=kw["answers_field"],
            against=against,
            device=device,
            threads=threads,
            batch_size=batch_size or 32,
            task_options={
                k: kw[k] for k in ("handle_impossible_answer", "max_answer_len", "max_seq_len", "doc_stride")
            },
        )
    elif seq2seq:
        if (kw["num_return_sequences"] or 1) > 1:
            raise UsageError("--num-return-sequences: eval scores the best output of each source only")
        options = {
            "summarize": kw["summarize"],
            "prefix": kw["prefix"],
            "source_lang": kw["source_lang"],
            "target_lang": kw["target_lang"],
            **decoding_overrides(dict(kw)),
        }
        report = evaluate_generation(
            model,
            data,
            text_column=kw["text_column"],
            reference_column=kw["reference_column"],
            references=kw["references"],
            data_format=data_format,
            against=against,
            device=device,
            threads=threads,
            batch_size=batch_size or 32,
            task_options=options,
        )
    else:
        report = evaluate_classification(
            model,
            data,
            text_column=kw["text_column"],
            label_column=kw["label_column"],
            label_map=kw["label_map"],
            data_format=data_format,
            against=against,
            device=device,
            threads=threads,
            batch_size=batch_size or 64,
        )
    for note in report["notes"]:
        console.info(note)
    if report["skipped_empty"]:
        console.warn(f"{report['skipped_empty']} example(s) with an empty text were not scored")
    for warning in report.get("warnings", ()):
        console.warn(warning)
    if report["truncated"]:
        console.warn(f"{report['truncated']} text(s) longer than the model's maximum length were truncated")
    if console.VERBOSITY["level"] >= 0:
        if lm:
            _print_lm(report)
        elif qa:
            _print_answers(report)
        elif seq2seq:
            _print_generation(report)
        else:
            _print_report(report, tables=not brief)
    if as_json:
        import json

        click.echo(json.dumps(report, indent=2))


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _print_generation(report: dict) -> None:
    from onnxpipe.console import stderr

    out = stderr()
    runs = [report] + ([report["against"]] if "against" in report else [])
    for run in runs:
        s = run["scores"]
        out.print(
            f"[bold]{run['model']}[/bold] ({run.get('precision') or '?'}, {run['provider']}) on {report['data']}: "
            f"BLEU [bold]{s['bleu']['score']:.2f}[/bold], chrF [bold]{s['chrf']['score']:.2f}[/bold] "
            f"({report['examples']} sentences)"
        )
        out.print(f"  {s['bleu']['text']}", markup=False)
    out.print(f"BLEU signature: {report['scores']['bleu']['signature']}", markup=False)
    out.print(f"chrF signature: {report['scores']['chrf']['signature']}", markup=False)
    if "against" in report:
        a = report["against"]["agreement"]
        out.print(
            f"agreement {report['model']} vs {report['against']['model']}: [bold]{_pct(a['agreement'])}[/bold] "
            f"({a['same']}/{a['examples']} identical outputs, {a['differ']} differ)"
        )


def _print_lm(report: dict) -> None:
    from onnxpipe.console import stderr

    out = stderr()
    runs = [report] + ([report["against"]] if "against" in report else [])
    for run in runs:
        s = run["scores"]
        out.print(
            f"[bold]{run['model']}[/bold] ({run.get('precision') or '?'}, {run['provider']}) on {report['data']}: "
            f"perplexity [bold]{s['perplexity']:.4f}[/bold], top-1 accuracy {_pct(s['top1_accuracy'])} "
            f"({report['tokens']} tokens, teacher-forced, windows of {report['context']})"
        )
    if "against" in report:
        a = report["against"]
        out.print(
            f"agreement {report['model']} vs {a['model']}: [bold]{_pct(a['agreement']['agreement'])}[/bold] "
            f"of next tokens ({a['agreement']['same']}/{a['agreement']['tokens']} same top-1), "
            f"perplexity ratio [bold]{a['perplexity_ratio']:.4f}[/bold], "
            f"mean KL divergence {a['kl_divergence']:.4g} nats"
        )


def _print_answers(report: dict) -> None:
    from onnxpipe.console import stderr

    out = stderr()
    runs = [report] + ([report["against"]] if "against" in report else [])
    for run in runs:
        s = run["scores"]
        out.print(
            f"[bold]{run['model']}[/bold] ({run.get('precision') or '?'}, {run['provider']}) on {report['data']}: "
            f"exact match [bold]{s['exact_match']:.2f}[/bold], F1 [bold]{s['f1']:.2f}[/bold] ({s['total']} questions)"
        )
        for key, what in (("has_answer", "with an answer"), ("no_answer", "without an answer")):
            if s[key]["total"] and s[key]["total"] < s["total"]:
                part = s[key]
                out.print(f"  {what}: exact match {part['exact_match']:.2f}, F1 {part['f1']:.2f} ({part['total']})")
    if "against" in report:
        a = report["against"]["agreement"]
        out.print(
            f"agreement {report['model']} vs {report['against']['model']}: [bold]{_pct(a['agreement'])}[/bold] "
            f"({a['same']}/{a['examples']} same answer, {a['differ']} differ)"
        )


def _print_report(report: dict, tables: bool = True) -> None:
    from onnxpipe.console import stderr

    out = stderr()
    runs = [report] + ([report["against"]] if "against" in report else [])
    for run in runs:
        m = run["metrics"]
        out.print(
            f"[bold]{run['model']}[/bold] ({run.get('precision') or '?'}, {run['provider']}) on {report['data']}: "
            f"accuracy [bold]{_pct(m['accuracy'])}[/bold] ({m['correct']}/{m['examples']}), "
            f"macro precision {_pct(m['macro']['precision'])}, recall {_pct(m['macro']['recall'])}, "
            f"F1 {_pct(m['macro']['f1'])}"
        )
    m = report["metrics"]
    if tables:
        _print_tables(report["model"], m)
    if "against" in report:
        a = report["against"]["agreement"]
        out.print(
            f"agreement {report['model']} vs {report['against']['model']}: [bold]{_pct(a['agreement'])}[/bold] "
            f"({a['same']}/{a['examples']} same label, {a['differ']} differ)"
        )


def _print_tables(model: str, m: dict) -> None:
    from rich.table import Table

    from onnxpipe.console import stderr

    out = stderr()
    per_class = Table(title=f"{model}: per class", title_justify="left")
    for col in ("label", "precision", "recall", "F1", "support"):
        per_class.add_column(col, justify="left" if col == "label" else "right")
    for name, row in m["per_class"].items():
        per_class.add_row(name, _pct(row["precision"]), _pct(row["recall"]), _pct(row["f1"]), str(row["support"]))
    out.print(per_class)

    confusion = Table(title=f"{model}: confusion matrix (rows: true, columns: predicted)", title_justify="left")
    confusion.add_column("true \\ predicted")
    for name in m["labels"]:
        confusion.add_column(name, justify="right")
    for name, row in zip(m["labels"], m["confusion_matrix"]):
        confusion.add_row(name, *(str(v) for v in row))
    out.print(confusion)
