"""`onnxpipe finetune`: train a text classifier on a labelled file (needs the [export] extra)."""

from __future__ import annotations

import click


@click.command("finetune")
@click.argument("base", type=click.Path(file_okay=False, path_type=str))
@click.option(
    "--data",
    "data",
    required=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="Labelled examples: .csv or .tsv with a header row, or .jsonl.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(file_okay=False, path_type=str),
    help="Folder for the fine-tuned checkpoint (a normal Hugging Face folder).",
)
@click.option("--text-column", default="text", show_default=True, help="Column (or JSONL field) holding the text.")
@click.option("--label-column", default="label", show_default=True, help="Column (or JSONL field) holding the label.")
@click.option(
    "--label-map",
    metavar="RAW=NAME,...",
    help='Readable names for the labels in the file, e.g. "1=positive,-1=negative".',
)
@click.option(
    "--validation-split",
    type=float,
    metavar="FRACTION",
    help="Fraction of each class held out for validation (stratified, seeded by --seed)  [default: 0.1]",
)
@click.option(
    "--validation-file",
    type=click.Path(dir_okay=False, path_type=str),
    help="Validate on this file instead of a split of --data (same columns).",
)
@click.option("--epochs", type=float, default=3.0, show_default=True, help="Training epochs.")
@click.option(
    "--learning-rate", type=float, default=5e-5, show_default=True, help="Peak learning rate (AdamW, linear decay)."
)
@click.option("--batch-size", type=int, default=32, show_default=True, help="Training batch size.")
@click.option(
    "--max-length", type=int, default=128, show_default=True, help="Truncate longer inputs to this many tokens."
)
@click.option(
    "--seed", type=int, default=42, show_default=True, help="Seed for the split, the new head and the shuffling."
)
@click.option("--logging-steps", type=int, default=10, show_default=True, help="Print the loss every N steps.")
@click.option(
    "--format",
    "data_format",
    type=click.Choice(["csv", "tsv", "jsonl"]),
    help="Data format when the file name does not tell.",
)
@click.option(
    "--export",
    "export_name",
    metavar="NAME",
    help="Also export the result as NAME (in the export home; a path with / is used as is).",
)
@click.option("-f", "--force", is_flag=True, help="Replace --output (and the --export target) if it exists.")
def finetune(
    base: str,
    data: str,
    output: str,
    text_column: str,
    label_column: str,
    label_map: str | None,
    validation_split: float | None,
    validation_file: str | None,
    epochs: float,
    learning_rate: float,
    batch_size: int,
    max_length: int,
    seed: int,
    logging_steps: int,
    data_format: str | None,
    export_name: str | None,
    force: bool,
) -> None:
    """Fine-tune BASE for text classification on a labelled file.

    BASE is a Hugging Face checkpoint folder (an encoder such as BERT or MiniLM; a new
    classification head is added when it has none). Progress and the validation metrics
    (accuracy, macro precision, recall and F1) go to stderr.

    \b
      onnxpipe finetune ./minilm --data reviews.tsv --label-map "1=positive,-1=negative" \\
          --epochs 2 --output ./sentiment-hf --export sentiment
    """
    from pathlib import Path

    from onnxpipe.home import export_home
    from onnxpipe.training.finetune import TrainingOptions
    from onnxpipe.training.finetune import finetune as run_finetune

    target = None
    if export_name:
        target = Path(export_name) if "/" in export_name else export_home() / export_name
        if target.exists() and not force:
            from onnxpipe.errors import UsageError

            raise UsageError(f"export {target} exists", hint="pass --force to replace it")
    options = TrainingOptions(
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        logging_steps=logging_steps,
    )
    from onnxpipe import console

    run_finetune(
        base,
        data,
        output,
        text_column=text_column,
        label_column=label_column,
        label_map=label_map,
        validation_split=validation_split,
        validation_file=validation_file,
        options=options,
        data_format=data_format,
        force=force,
        report=console.info,
        warn=console.warn,
    )
    if target is not None:
        from onnxpipe.export import export_model

        console.info(f"exporting {output} to {target}")
        export_model(output, target, task="text-classification", force=force)
        console.info(f"exported {target}")
