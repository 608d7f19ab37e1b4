"""Score an export on labelled data through ONNX Runtime: what users run is what gets measured.

No torch, no transformers, no scikit-learn: the predictions come from the export's ONNX graph and
`tokenizer.json`, the figures from `onnxpipe.metrics`. Nothing here prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from onnxpipe.errors import InputError, UsageError
from onnxpipe.home import resolve_model
from onnxpipe.labelled import Labelled, apply_label_map, parse_label_map, read_labelled
from onnxpipe.manifest import read_manifest
from onnxpipe.metrics import agreement, classification_metrics

CLASSIFICATION = "text-classification"



@dataclass
class Prediction:
    labels: list[int | None]  # a label id per text; None for an empty text (not scored)
    provider: str  # the execution provider that really ran
    device_note: str | None = None  # the runtime's line saying what ran where
    truncated: int = 0  # texts cut to the model's maximum length


# (export folder, manifest, labelled data, device, batch_size) -> Prediction
Predictor = Callable[[Path, dict, Labelled, str, int], Prediction]


def load_classifier(ref: str | Path) -> tuple[Path, dict[str, Any]]:
    folder = resolve_model(ref)
    manifest = read_manifest(folder)
    if manifest.get("task") != CLASSIFICATION:
        raise UsageError(
            f"{folder.name} is a {manifest.get('task')} export; eval scores text-classification exports",
            hint="translation and summarisation scores are not there yet",
        )
    if manifest.get("problem_type") == "multi_label_classification":
        raise UsageError(f"{folder.name} is multi-label; eval scores single-label classifiers")
    if not manifest.get("labels"):
        raise UsageError(f"{folder.name}'s manifest has no labels", hint="re-export it")
    return folder, manifest


def label_ids(data: Labelled, labels: list[str]) -> list[int]:
    """The data's labels as the model's ids; a label the model does not know names its line."""
    index = {name: i for i, name in enumerate(labels)}
    ids = []
    for label, line in zip(data.labels, data.lines):
        if label not in index:
            raise InputError(
                f"label {label!r} is not one of the model's labels ({', '.join(labels)}); "
                "pass --label-map to translate the file's labels",
                line=line, source=data.source,
            )
        ids.append(index[label])
    return ids


def evaluate_classification(model: str | Path, data_path: str | Path, *, text_column: str = "text",
                            label_column: str = "label", label_map: str | None = None,
                            data_format: str | None = None, against: str | Path | None = None,
                            device: str = "auto", batch_size: int = 64,
                            predictor: Predictor | None = None) -> dict[str, Any]:
    """Accuracy, macro and per-class P/R/F1 and the confusion matrix of MODEL on DATA_PATH.

    With `against`, the second export runs on the same texts: its own figures plus how often
    the two agree (e.g. an int8 export against its fp32 original).
    """
    predictor = predictor or predict_onnx
    folder, manifest = load_classifier(model)
    labels = list(manifest["labels"])
    data = read_labelled(data_path, text_column, label_column, data_format)
    data = apply_label_map(data, parse_label_map(label_map))
    y_true = label_ids(data, labels)
    pred = predictor(folder, manifest, data, device, batch_size)
    scored = [i for i, p in enumerate(pred.labels) if p is not None]
    y_true = [y_true[i] for i in scored]
    y_pred = [pred.labels[i] for i in scored]
    report: dict[str, Any] = {
        "model": folder.name,
        "path": str(folder),
        "precision": manifest.get("precision"),
        "provider": pred.provider,
        "data": str(data_path),
        "skipped_empty": len(data) - len(scored),
        "truncated": pred.truncated,
        "metrics": classification_metrics(y_true, y_pred, labels),
    }
    notes = [pred.device_note] if pred.device_note else []
    if against is not None:
        other_folder, other_manifest = load_classifier(against)
        if list(other_manifest["labels"]) != labels:
            raise UsageError(
                f"{other_folder.name} has labels {other_manifest['labels']}, {folder.name} has {labels}: "
                "their predictions cannot be compared"
            )
        other = predictor(other_folder, other_manifest, data, device, batch_size)
        other_pred = [other.labels[i] for i in scored]
        report["against"] = {
            "model": other_folder.name,
            "path": str(other_folder),
            "precision": other_manifest.get("precision"),
            "provider": other.provider,
            "metrics": classification_metrics(y_true, other_pred, labels),
            "agreement": agreement(y_pred, other_pred),
        }
        if other.device_note:
            notes.append(other.device_note)
    report["notes"] = notes
    return report


class _Collect:
    """A writer for the engine that keeps each record's best label id instead of writing it."""

    def __init__(self, count: int, labels: list[str]):
        self.index = {name: i for i, name in enumerate(labels)}
        self.predictions: list[int | None] = [None] * count

    def write(self, record, result, error=None) -> None:
        if result is not None and result.labels:
            self.predictions[record.seq] = self.index.get(result.labels[0])

    def write_partial(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def predict_onnx(folder: Path, manifest: dict, data: Labelled, device: str, batch_size: int) -> Prediction:
    """Label ids for the texts of DATA exactly as `onnxpipe classify` makes them: same runtime, task and batcher.

    An empty text gets no prediction (None), as classify gives it an empty result.
    """
    from onnxpipe.runtime import load_model
    from onnxpipe.stream.engine import Engine, EngineOptions
    from onnxpipe.stream.records import Record
    from onnxpipe.tasks.classify import ClassifyTask

    model = load_model(folder, device=device)
    task = ClassifyTask(model)
    collect = _Collect(len(data), list(manifest["labels"]))
    records = (Record(seq=i, text=text, source=data.source, line=line, nbytes=len(text) + 1)
               for i, (text, line) in enumerate(zip(data.texts, data.lines)))
    summary = Engine(task, collect, EngineOptions(batch_size=batch_size)).run_records(records)
    return Prediction(collect.predictions, model.provider or "", model.device_note, summary.truncated)
