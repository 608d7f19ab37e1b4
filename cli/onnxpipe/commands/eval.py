"""`onnxpipe eval`: score a classification export on labelled data, through ONNX Runtime."""

from __future__ import annotations

import click

from onnxpipe.commands._options import complete_export_names


@click.command("eval")
@click.option("-m", "--model", required=True, metavar="MODEL", shell_complete=complete_export_names,
              help="Export name (in the export home) or folder.")
@click.argument("data", type=click.Path(dir_okay=False, path_type=str))
@click.option("--text-column", default="text", show_default=True, help="Column (or JSONL field) holding the text.")
@click.option("--label-column", default="label", show_default=True, help="Column (or JSONL field) holding the true label.")
@click.option("--label-map", metavar="RAW=NAME,...",
              help='Translate the file\'s labels to the model\'s, e.g. "1=positive,-1=negative".')
@click.option("--format", "data_format", type=click.Choice(["csv", "tsv", "jsonl"]),
              help="Data format when the file name does not tell.")
@click.option("--against", metavar="MODEL", shell_complete=complete_export_names,
              help="A second export to run on the same data: its figures and the agreement between the two.")
@click.option("--json", "as_json", is_flag=True, help="Write the figures as one JSON object on stdout.")
@click.option("--brief", is_flag=True, help="Only the summary lines on stderr: no per-class table, no confusion matrix.")
@click.option("--device", default="auto", show_default=True, envvar="ONNXPIPE_DEVICE", metavar="auto|cpu|cuda[:N]",
              help="Where ONNX Runtime runs the model. [env: ONNXPIPE_DEVICE]")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Texts per batch.")
def eval_command(model: str, data: str, text_column: str, label_column: str, label_map: str | None,
                 data_format: str | None, against: str | None, as_json: bool, brief: bool, device: str,
                 batch_size: int) -> None:
    """Score a text-classification export on a labelled file.

    DATA is .csv or .tsv with a header row, or .jsonl. The predictions come from the
    ONNX export, as `onnxpipe classify` makes them. Accuracy, macro and per-class
    precision, recall and F1 and the confusion matrix go to stderr; --json writes them
    to stdout as well. --against runs a second export and reports how often they agree.

    \b
      onnxpipe eval -m sentiment --label-map "1=positive,-1=negative" heldout.tsv
      onnxpipe eval -m sentiment-int8 --against sentiment --json heldout.tsv | jq .against.agreement
    """
    from onnxpipe import console
    from onnxpipe.evaluation import evaluate_classification

    report = evaluate_classification(
        model, data, text_column=text_column, label_column=label_column, label_map=label_map,
        data_format=data_format, against=against, device=device, batch_size=batch_size,
    )
    for note in report["notes"]:
        console.info(note)
    if report["skipped_empty"]:
        console.warn(f"{report['skipped_empty']} example(s) with an empty text were not scored")
    if report["truncated"]:
        console.warn(f"{report['truncated']} text(s) longer than the model's maximum length were truncated")
    if console.VERBOSITY["level"] >= 0:
        _print_report(report, tables=not brief)
    if as_json:
        import json

        click.echo(json.dumps(report, indent=2))


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


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
