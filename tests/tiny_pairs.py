"""Tiny text-pair classifiers for the pair, zero-shot and rerank tests: NLI models and cross-encoders.

A tiny random classifier (weights drawn with std 0.02) gives every input nearly the same logits, so a
wrong choice (the pair order, the token types, the wrong logit column) would move its scores by less
than the parity tolerance. These checkpoints scale the weight matrices up (x6, the head's last projection x30), so the
logits depend on the input by tenths to units and such mistakes show up as large differences.

Exports are built once per test session under the session's base temp folder (shared by modules).
"""

from __future__ import annotations

import json
from pathlib import Path

import tiny_models

NLI_LABELS = ["entailment", "neutral", "contradiction"]
SHARPEN, HEAD = 6.0, 5.0


def _sharpen(folder: Path) -> None:
    import torch
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                continue
            final = name.endswith(("classifier.weight", "out_proj.weight"))  # the head's last projection
            param.mul_(SHARPEN * (HEAD if final else 1.0))
    model.save_pretrained(folder, safe_serialization=True)


def checkpoint(base: Path, arch: str, labels: list[str] | None = None, num_labels: int = 3, config: dict | None = None):
    """A sharpened tiny ARCH classifier with LABELS (or NUM_LABELS unnamed ones) and extra CONFIG keys."""
    name = f"{arch}-{'_'.join(labels) if labels else num_labels}-{'_'.join(sorted(config or {}))}"
    folder = base / "pair-checkpoints" / name
    if not (folder / "config.json").exists():
        tiny_models.build(arch, folder, task="text-classification", num_labels=len(labels) if labels else num_labels)
        _sharpen(folder)
        path = folder / "config.json"
        cfg = json.loads(path.read_text())
        if labels:
            cfg["id2label"] = {str(i): label for i, label in enumerate(labels)}
            cfg["label2id"] = {label: i for i, label in enumerate(labels)}
        cfg.update(config or {})
        path.write_text(json.dumps(cfg, indent=2))
    return folder


def export(base: Path, arch: str, labels: list[str] | None = None, num_labels: int = 3, config: dict | None = None):
    """The export of checkpoint(...), made once per session."""
    from onnxpipe.export import export_model

    source = checkpoint(base, arch, labels, num_labels, config)
    out = base / "pair-exports" / source.name
    if not (out / "onnxpipe.json").exists():
        export_model(source, out, task="text-classification")
    return out
