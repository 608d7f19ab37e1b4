"""Supervised fine-tuning for text classification: labelled file -> Hugging Face checkpoint folder.

It needs the export stack (torch, transformers, accelerate), imported inside the functions. The
result is an ordinary checkpoint folder that `onnxpipe export` takes. Training is transformers'
Trainer; this module only prepares the data, saves, and reports through the `report` and `warn`
callbacks (it never prints). `--force` replaces only a folder that finetune itself wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.errors import InputError, SourceError, UsageError, import_extra, require_extra
from onnxpipe.measure.metrics import classification_metrics
from onnxpipe.stream.labelled import Labelled, apply_label_map, parse_label_map, read_labelled, sorted_labels

SUMMARY_NAME = "onnxpipe_finetune.json"
Report = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


@dataclass
class TrainingOptions:
    epochs: float = 3.0
    learning_rate: float = 5e-5
    batch_size: int = 32
    max_length: int = 128
    seed: int = 42
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    logging_steps: int = 10


def split_indices(labels: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A stratified, seeded split: the same labels, fraction and seed always give the same split.

    Each class gives round(fraction * its size) examples to validation (at least one when the
    fraction is positive), so a small or skewed set still validates every class.
    """
    if not 0 <= fraction < 1:
        raise UsageError(f"--validation-split must be in [0, 1), not {fraction}")
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    for label in sorted(by_label):
        idx = np.array(by_label[label])
        rng.shuffle(idx)
        k = int(round(fraction * len(idx)))
        if fraction > 0 and len(idx) > 1:
            k = min(max(k, 1), len(idx) - 1)
        val.extend(idx[:k].tolist())
        train.extend(idx[k:].tolist())
    return sorted(train), sorted(val)


def _subset(data: Labelled, idx: list[int]) -> Labelled:
    return Labelled(
        [data.texts[i] for i in idx], [data.labels[i] for i in idx], [data.lines[i] for i in idx], data.source
    )


def _stack() -> tuple[Any, Any]:
    """torch and transformers, with accelerate (Trainer needs it): the [export] extra's, or one line saying so."""
    what = "onnxpipe finetune"
    require_extra("export", what, "accelerate")
    return import_extra("export", what, "torch"), import_extra("export", what, "transformers")


def prepare_data(
    data_path: str | Path,
    text_column: str,
    label_column: str,
    label_map: str | None,
    validation_split: float | None,
    validation_file: str | Path | None,
    seed: int,
    data_format: str | None = None,
    warn: Report = _quiet,
) -> tuple[Labelled, Labelled | None, list[str], list[str]]:
    """Read, map and split. Returns (train, validation or None, raw labels by id, label names by id)."""
    mapping = parse_label_map(label_map)
    data = read_labelled(data_path, text_column, label_column, data_format)
    raw_labels = sorted_labels(data.labels)
    if len(raw_labels) < 2:
        raise InputError(
            f"every example in {data.source} has the label {raw_labels[0]!r}: a classifier needs at least two classes"
            f" (is --label-column {label_column!r} the right column?)"
        )
    if mapping:
        apply_label_map(data, mapping)  # fails on an unmapped label, naming its line
        for unused in sorted(set(mapping) - set(raw_labels)):
            warn(f"--label-map entry {unused!r} matches no label in {data.source}")
    names = [mapping.get(r, r) for r in raw_labels]
    to_name = dict(zip(raw_labels, names))
    data = Labelled(data.texts, [to_name[r] for r in data.labels], data.lines, data.source)

    if validation_file is not None:
        if validation_split:
            raise UsageError("give --validation-split or --validation-file, not both")
        val = read_labelled(validation_file, text_column, label_column, data_format)
        val = apply_label_map(val, mapping) if mapping else val
        known = set(names)
        for label, line in zip(val.labels, val.lines):
            if label not in known:
                raise InputError(
                    f"label {label!r} does not occur in the training data ({', '.join(names)})",
                    line=line,
                    source=val.source,
                )
        return data, val, raw_labels, names
    fraction = 0.1 if validation_split is None else validation_split
    train_idx, val_idx = split_indices(data.labels, fraction, seed)
    train = _subset(data, train_idx)
    held_out = _subset(data, val_idx) if val_idx else None
    return train, held_out, raw_labels, names


class _Encoded:
    """A torch-style map dataset of tokenized examples, padded later per batch by the collator."""

    def __init__(self, encodings: dict[str, list], label_ids: list[int]):
        self.encodings = encodings
        self.label_ids = label_ids

    def __len__(self) -> int:
        return len(self.label_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.encodings.items()}
        item["labels"] = self.label_ids[i]
        return item


def _encode(tokenizer, data: Labelled, label2id: dict[str, int], max_length: int) -> tuple[_Encoded, int]:
    enc = tokenizer(data.texts, truncation=True, max_length=max_length)
    full = tokenizer(data.texts, truncation=False)["input_ids"]
    truncated = sum(len(ids) > max_length for ids in full)
    return _Encoded(dict(enc), [label2id[l] for l in data.labels]), truncated


def check_output(output: Path, force: bool, *inputs: str | Path | None) -> None:
    """Refuse an OUTPUT that --force must not replace: only a folder that finetune wrote (it holds
    onnxpipe_finetune.json) or an empty one is replaced; never a link, another folder, or a folder
    that is or holds the base checkpoint or the data."""
    if os.path.islink(output):
        raise UsageError(
            f"{output} is a symbolic link; refusing to replace it or what it points to",
            hint="give the folder itself as --output",
        )
    out = os.path.realpath(output)
    for item in inputs:
        if item is None or not os.path.exists(item):
            continue
        src = os.path.realpath(item)
        if os.path.commonpath([out, src]) == out:
            raise UsageError(
                f"the output {output} {'is' if out == src else 'holds'} {item}; refusing to write there",
                hint="choose another --output",
            )
    if not os.path.lexists(output):
        return
    if not output.is_dir():
        raise UsageError(f"{output} exists and is not a folder", hint="choose another --output")
    entries = sorted(os.listdir(output))
    if entries and not (output / SUMMARY_NAME).is_file():
        shown = ", ".join(entries[:3]) + (f", and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise UsageError(
            f"{output} holds {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} that onnxpipe "
            f"finetune did not write ({shown}); refusing to replace it",
            hint="--force replaces only a folder made by onnxpipe finetune: choose another --output",
        )
    if not force:
        raise UsageError(f"{output} exists", hint="pass --force to replace it")


def _progress_callback(report: Report, transformers: Any):
    base: Any = transformers.TrainerCallback

    class StderrProgress(base):
        """One compact line per logging step on stderr (stdout stays clean)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                report(
                    f"step {state.global_step}/{state.max_steps}  epoch {logs.get('epoch', state.epoch or 0):.2f}  "
                    f"loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.2e}"
                )

    return StderrProgress()


def finetune(
    base: str | Path,
    data: str | Path,
    output: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    label_map: str | None = None,
    validation_split: float | None = None,
    validation_file: str | Path | None = None,
    options: TrainingOptions | None = None,
    data_format: str | None = None,
    force: bool = False,
    report: Report = _quiet,
    warn: Report = _quiet,
) -> dict[str, Any]:
    """Fine-tune BASE on DATA into the checkpoint folder OUTPUT and return the training summary.

    REPORT gets the progress lines, WARN what went differently than asked (the command prints both).
    """
    options = options or TrainingOptions()
    output = Path(output)
    check_output(output, force, base, data, validation_file)
    for name in ("epochs", "learning_rate", "batch_size", "max_length", "logging_steps"):
        if getattr(options, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, not {getattr(options, name)}")
    train, val, raw_labels, names = prepare_data(
        data, text_column, label_column, label_map, validation_split, validation_file, options.seed, data_format, warn
    )
    if len(sorted_labels(train.labels)) < 2:
        raise InputError("after the validation split the training part has one class only; lower --validation-split")
    torch, transformers = _stack()  # one line naming the extra, not an ImportError

    base_path = Path(base)
    if not (base_path / "config.json").is_file():
        raise SourceError(f"{base} is not a checkpoint folder (no config.json)")
    transformers.set_seed(options.seed)
    id2label = dict(enumerate(names))
    label2id = {n: i for i, n in enumerate(names)}
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_path)
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "newly initialized weights" warning is expected here
    try:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            base_path,
            num_labels=len(names),
            id2label=id2label,
            label2id=label2id,
            problem_type="single_label_classification",
            ignore_mismatched_sizes=True,
        )
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot load {base} for sequence classification: {exc}") from None
    finally:
        transformers.logging.set_verbosity(previous)
    report(
        f"fine-tuning {base} ({model.config.model_type}) for {len(names)} labels: "
        + ", ".join(f"{i}={n}" for i, n in id2label.items())
    )
    report(f"{len(train)} training examples, " + (f"{len(val)} validation examples" if val else "no validation set"))

    train_ds, truncated = _encode(tokenizer, train, label2id, options.max_length)
    val_ds = _encode(tokenizer, val, label2id, options.max_length)[0] if val else None
    if truncated:
        warn(f"{truncated} training example(s) longer than --max-length {options.max_length} were truncated")

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        args = transformers.TrainingArguments(
            output_dir=str(tmp / "trainer"),
            num_train_epochs=options.epochs,
            learning_rate=options.learning_rate,
            per_device_train_batch_size=options.batch_size,
            per_device_eval_batch_size=max(options.batch_size, 64),
            weight_decay=options.weight_decay,
            warmup_ratio=options.warmup_ratio,
            seed=options.seed,
            data_seed=options.seed,
            logging_strategy="steps",
            logging_steps=options.logging_steps,
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        trainer = transformers.Trainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            data_collator=transformers.DataCollatorWithPadding(tokenizer),
            processing_class=tokenizer,
        )
        # The Trainer's own printers write dicts to stdout; stdout is for results only.
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.remove_callback(transformers.ProgressCallback)
        trainer.add_callback(_progress_callback(report, transformers))
        started = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - started
        report(f"trained {result.global_step} steps in {seconds:.1f}s (mean loss {result.training_loss:.4f})")

        metrics = None
        if val_ds is not None:
            logits = trainer.predict(val_ds).predictions
            if isinstance(logits, tuple):
                logits = logits[0]
            metrics = classification_metrics(val_ds.label_ids, np.argmax(logits, axis=-1).tolist(), names)
            report(
                f"validation ({metrics['examples']} examples): accuracy {metrics['accuracy']:.4f}  "
                f"macro precision {metrics['macro']['precision']:.4f}  recall {metrics['macro']['recall']:.4f}  "
                f"f1 {metrics['macro']['f1']:.4f}"
            )

        final = tmp / "model"
        trainer.save_model(str(final))
        tokenizer.save_pretrained(str(final))
        summary = {
            "base": str(base_path.resolve()),
            "data": str(Path(data).resolve()),
            "validation": str(Path(validation_file).resolve())
            if validation_file
            else {"split": 0.1 if validation_split is None else validation_split, "seed": options.seed},
            "labels": {"raw": raw_labels, "names": names},
            "examples": {"train": len(train), "validation": len(val) if val else 0, "truncated": truncated},
            "options": asdict(options),
            "train_seconds": round(seconds, 1),
            "train_loss": result.training_loss,
            "metrics": metrics,
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        }
        (final / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        check_output(output, force, base, data, validation_file)  # again: the folder may have changed meanwhile
        if output.is_dir() and any(output.iterdir()):
            old = tmp / "replaced"
            output.rename(old)  # removed with tmp, after the new folder is in place
        elif output.is_dir():
            output.rmdir()
        final.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(f"saved {output}")
    return summary
