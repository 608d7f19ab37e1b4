"""Score an export on labelled data through ONNX Runtime: what users run is what gets measured.

No torch, no transformers, no scikit-learn: the predictions come from the export's ONNX graph and
`tokenizer.json`, the figures from `onnxpipe.metrics`. Nothing here prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from onnxpipe.errors import InputError, UsageError
from onnxpipe.home import resolve_model
from onnxpipe.labelled import Labelled, apply_label_map, parse_label_map, read_labelled
from onnxpipe.manifest import read_manifest
from onnxpipe.metrics import agreement, classification_metrics

CLASSIFICATION = "text-classification"

# (export folder, manifest, texts, device, batch_size) -> (predicted label ids, provider that ran)
Predictor = Callable[[Path, dict, Sequence[str], str, int], "tuple[list[int], str]"]


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
    y_pred, provider = predictor(folder, manifest, data.texts, device, batch_size)
    report: dict[str, Any] = {
        "model": folder.name,
        "path": str(folder),
        "precision": manifest.get("precision"),
        "provider": provider,
        "data": str(data_path),
        "metrics": classification_metrics(y_true, y_pred, labels),
    }
    if against is not None:
        other_folder, other_manifest = load_classifier(against)
        if list(other_manifest["labels"]) != labels:
            raise UsageError(
                f"{other_folder.name} has labels {other_manifest['labels']}, {folder.name} has {labels}: "
                "their predictions cannot be compared"
            )
        other_pred, other_provider = predictor(other_folder, other_manifest, data.texts, device, batch_size)
        report["against"] = {
            "model": other_folder.name,
            "path": str(other_folder),
            "precision": other_manifest.get("precision"),
            "provider": other_provider,
            "metrics": classification_metrics(y_true, other_pred, labels),
            "agreement": agreement(y_pred, other_pred),
        }
    return report


def predict_onnx(folder: Path, manifest: dict, texts: Sequence[str], device: str, batch_size: int) -> tuple[list[int], str]:
    """Label ids for TEXTS from the export's graph (batched by length, returned in input order)."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from onnxpipe.errors import DeviceError

    tok_info = manifest.get("tokenizer") or {}
    tokenizer = Tokenizer.from_file(str(folder / tok_info.get("file", "tokenizer.json")))
    max_length = int(tok_info.get("max_length") or 512)
    tokenizer.enable_truncation(max_length)
    pad_id = (manifest.get("special_tokens") or {}).get("pad_token_id") or 0
    tokenizer.no_padding()

    providers = ["CPUExecutionProvider"]
    if device != "cpu":
        wanted_id = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers = [("CUDAExecutionProvider", {"device_id": wanted_id}), "CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(folder / manifest["files"]["model"]), options, providers=providers)
    ran = session.get_providers()[0]  # onnxruntime-gpu lists CUDA as available even where it cannot load
    if device.startswith("cuda") and ran != "CUDAExecutionProvider":
        raise DeviceError(f"--device {device}: CUDA is not usable here (the session got {ran})",
                          hint="use --device cpu or auto")
    names = {i.name for i in session.get_inputs()}

    encodings = tokenizer.encode_batch(list(texts))
    order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
    predictions = [0] * len(texts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(encodings[i].ids) for i in batch)
        ids = np.full((len(batch), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        types = np.zeros((len(batch), width), dtype=np.int64)
        for row, i in enumerate(batch):
            enc = encodings[i]
            ids[row, : len(enc.ids)] = enc.ids
            mask[row, : len(enc.ids)] = 1
            types[row, : len(enc.ids)] = enc.type_ids
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        logits = session.run(None, {k: v for k, v in feeds.items() if k in names})[0]
        for row, i in enumerate(batch):
            predictions[i] = int(np.argmax(logits[row]))
    return predictions, ran
