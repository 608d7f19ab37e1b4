"""Text classification: logits -> softmax (single-label) or sigmoid (multi-label) scores -> labels.

The choice of function follows transformers' TextClassificationPipeline: sigmoid for
`multi_label_classification` or a single output, none for regression, softmax otherwise.

A record with a second text (Record.pair: --pair-field, --pair-column, a (text, pair) tuple in the API)
is encoded as the tokenizer's pair ([SEP] between, token type ids), truncated longest-first as the
pipeline's tokenizer(text, text_pair, truncation=True) does. With `candidate_labels` it is zero-shot
classification on an NLI model, as transformers' ZeroShotClassificationPipeline does it: each record is
paired with the hypothesis of every candidate label (all of them in one model run) and the labels are
scored from the entailment logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxpipe.errors import UsageError
from onnxpipe.registry import FAMILIES
from onnxpipe.stream.records import Item, Record
from onnxpipe.tasks.encoder import CHARS_PER_TOKEN_CAP, EncoderTask, sigmoid, softmax

DEFAULT_HYPOTHESIS_TEMPLATE = "This example is {}."  # transformers' ZeroShotClassificationPipeline default


@dataclass
class Classification:
    labels: list[str]  # selected labels, best first (top-k, then --threshold)
    scores: list[float]


class ClassifyTask(EncoderTask):
    task_names = FAMILIES["classify"].export_tasks  # the registry's

    def __init__(
        self,
        model: Any,
        top_k: int | None = None,
        threshold: float | None = None,
        function: str | None = None,
        candidate_labels: str | Sequence[str] | None = None,
        hypothesis_template: str | None = None,
        multi_label: bool = False,
        truncation: str = "truncate",
    ):
        super().__init__(model, truncation)
        self.labels = model.labels or [f"LABEL_{i}" for i in range(self.session.get_outputs()[0].shape[-1] or 0)]
        self.function = function or default_function(
            model.manifest.get("problem_type") or model.config.get("problem_type"), len(self.labels)
        )
        self.threshold = threshold
        self.notes: list[str] = []
        self.zero_shot: ZeroShot | None = None
        if candidate_labels is not None:
            self.zero_shot = ZeroShot(
                parse_candidate_labels(candidate_labels),
                hypothesis_template if hypothesis_template is not None else DEFAULT_HYPOTHESIS_TEMPLATE,
                multi_label,
                entailment_id(_label2id(model)),
            )
            if self.zero_shot.entailment == -1:
                self.notes.append(
                    "no label of this model starts with 'entail' (config label2id): zero-shot scores use the "
                    "last label as entailment and the first as contradiction, as transformers does"
                )
            if top_k is None and threshold is None:
                top_k = len(self.zero_shot.labels)  # every candidate, best first, as the zero-shot pipeline
        elif hypothesis_template is not None or multi_label:
            raise UsageError("--hypothesis-template and --multi-label are for zero-shot: give --candidate-labels")
        # Without --top-k: the best label, or every label above --threshold when one is given.
        self.top_k = top_k if top_k is not None else (len(self.labels) if threshold is not None else 1)

    # --- text pairs and zero-shot ---------------------------------------------------------------
    def encode(self, records: Sequence[Record]) -> list[Item]:
        if self.zero_shot is not None:
            return [self._zero_shot_item(record, encodings) for record, encodings in self._hypotheses(records)]
        if all(record.pair is None for record in records):
            return super().encode(records)
        singles = [r for r in records if r.pair is None]
        pairs = [r for r in records if r.pair is not None]
        self.tokenizer.enable_truncation(self.max_length)  # the export's tokenizer is shared by its tasks
        encodings = encode_pairs(self.tokenizer, self.max_length, [(r.text, r.pair or "") for r in pairs])
        items = {item.record.seq: item for item in super().encode(singles)} if singles else {}
        items.update((r.seq, self.make_item(r, e)) for r, e in zip(pairs, encodings))
        return [items[r.seq] for r in records]

    def _hypotheses(self, records: Sequence[Record]) -> list[tuple[Record, list[Any] | str]]:
        """Each record with the encodings of its (record, hypothesis) pairs, or why it cannot be run.

        Truncation is only-first, as the zero-shot pipeline asks: the hypothesis is never cut.
        """
        assert self.zero_shot is not None
        hypotheses = self.zero_shot.hypotheses
        cap = max(self.max_length * CHARS_PER_TOKEN_CAP, 4096)
        out: list[tuple[Record, list[Any] | str]] = []
        self.tokenizer.enable_truncation(self.max_length, strategy="only_first")
        try:
            for record in records:
                if record.pair is not None:
                    out.append((record, "zero-shot classifies single texts: this record is a text pair"))
                    continue
                text = _cut(record.text, cap)
                try:
                    encodings = self.tokenizer.encode_batch([(text, h) for h in hypotheses])
                except Exception as exc:  # the Rust tokenizer: "Sequence to truncate too short ..."
                    if "too short" not in str(exc):
                        raise
                    out.append((record, "the hypotheses leave no room for the text within the model's length"))
                    continue
                if text is not record.text and not any(e.overflowing for e in encodings):
                    encodings = self.tokenizer.encode_batch([(record.text, h) for h in hypotheses])
                out.append((record, encodings))
        finally:
            self.tokenizer.enable_truncation(self.max_length)
        return out

    def _zero_shot_item(self, record: Record, encodings: list[Any] | str) -> Item:
        if isinstance(encodings, str):
            return Item(record, 0, error=encodings)
        longest = max(len(e) for e in encodings)
        truncated = any(e.overflowing for e in encodings)
        if truncated and self.truncation == "error":
            return Item(record, 0, error=self.too_long)
        return Item(record, longest * len(encodings), data=encodings, truncated=truncated)

    def run(self, batch: Sequence[Item]) -> list[Any]:
        if self.zero_shot is None:
            return super().run(batch)
        # All hypotheses of all records of the batch in one session run (the batcher budgeted them).
        rows = [Item(item.record, len(e), data=e) for item in batch for e in item.data]
        feed, _ = self.feed(rows)
        outputs = dict(zip(self.output_names, self.session.run(None, feed)))
        logits = outputs.get("logits", next(iter(outputs.values()))).astype(np.float32)
        n = len(self.zero_shot.labels)
        return [self._ranked(*self.zero_shot.scores(logits[i * n : (i + 1) * n])) for i in range(len(batch))]

    def _ranked(self, labels: list[str], scores: list[float]) -> Classification:
        labels, scores = labels[: self.top_k], scores[: self.top_k]
        if self.threshold is not None:
            kept = [k for k, v in enumerate(scores) if v >= self.threshold]
            labels, scores = [labels[k] for k in kept], [scores[k] for k in kept]
        return Classification(labels, scores)

    def postprocess(
        self, outputs: dict[str, np.ndarray], batch: Sequence[Item], lengths: list[int]
    ) -> list[Classification]:
        logits = outputs.get("logits", next(iter(outputs.values()))).astype(np.float32)
        if self.function == "softmax":
            scores = softmax(logits)
        elif self.function == "sigmoid":
            scores = sigmoid(logits)
        else:
            scores = logits
        order = np.argsort(-scores, axis=-1, kind="stable")[:, : self.top_k]
        top = np.take_along_axis(scores, order, axis=-1).tolist()
        results = []
        for indices, values in zip(order.tolist(), top):
            if self.threshold is not None:
                kept = [k for k, v in enumerate(values) if v >= self.threshold]
                indices, values = [indices[k] for k in kept], [values[k] for k in kept]
            results.append(Classification([self._label(i) for i in indices], values))
        return results

    def _label(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else f"LABEL_{index}"

    # --- formatters ---------------------------------------------------------------------------
    def to_text(self, result: Classification) -> str:
        return ",".join(result.labels)

    def to_fields(self, result: Classification | None) -> dict[str, Any]:
        if result is None:
            return {"label": None, "score": None, "labels": [], "scores": [], "provider": self.provider}
        return {
            "label": result.labels[0] if result.labels else None,
            "score": result.scores[0] if result.scores else None,
            "labels": result.labels,
            "scores": result.scores,
            "provider": self.provider,
        }

    def to_columns(self, result: Classification | None) -> list[str]:
        if result is None:
            return ["", ""]
        return [",".join(result.labels), ",".join(f"{s:.6g}" for s in result.scores)]


@dataclass
class ZeroShot:
    """Zero-shot settings, and the scoring of transformers' ZeroShotClassificationPipeline.postprocess."""

    labels: list[str]
    template: str
    multi_label: bool
    entailment: int  # the entailment column; -1 (the last) where no label starts with "entail"

    def __post_init__(self) -> None:
        try:
            filled = self.template.format(self.labels[0])
        except (IndexError, KeyError, ValueError) as exc:
            raise UsageError(f"--hypothesis-template {self.template!r} cannot be filled: {exc}") from None
        if filled == self.template:
            raise UsageError(
                f"--hypothesis-template {self.template!r} has no {{}} for the label",
                hint='e.g. --hypothesis-template "This text is about {}."',
            )
        self.hypotheses = [self.template.format(label) for label in self.labels]

    def scores(self, logits: np.ndarray) -> tuple[list[str], list[float]]:
        """The candidates best first with their scores, from one record's (candidates, labels) LOGITS."""
        if self.multi_label or len(self.labels) == 1:
            # Each candidate on its own: entailment against contradiction.
            contradiction = -1 if self.entailment == 0 else 0
            pair = np.exp(logits[:, [contradiction, self.entailment]])
            scores = (pair / pair.sum(-1, keepdims=True))[:, 1]
        else:
            entail = np.exp(logits[:, self.entailment])
            scores = entail / entail.sum(-1, keepdims=True)
        order = list(reversed(scores.argsort()))  # the pipeline's order, ties included
        return [self.labels[i] for i in order], [float(scores[i]) for i in order]


def parse_candidate_labels(labels: str | Sequence[str]) -> list[str]:
    """A list as given, or a string split on commas and trimmed as the zero-shot pipeline does ("\\," keeps
    a comma inside a label)."""
    if isinstance(labels, str):
        parts = labels.replace("\\,", "\x00").split(",")
        out = [p.strip().replace("\x00", ",") for p in parts if p.strip()]
    else:
        out = list(labels)
        if not all(isinstance(label, str) for label in out):
            raise UsageError("candidate_labels must be strings")
    if not out:
        raise UsageError("give at least one candidate label", hint='e.g. --candidate-labels "sports,politics"')
    return out


def _label2id(model: Any) -> dict[str, Any]:
    """config.json's label2id, or as transformers' PretrainedConfig makes it from id2label when absent."""
    config = model.config
    if isinstance(config.get("label2id"), dict) and config["label2id"]:
        return dict(config["label2id"])
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return {str(label): int(index) for index, label in id2label.items()}
    return {label: index for index, label in enumerate(model.labels)}


def entailment_id(label2id: dict[str, Any]) -> int:
    """The id of the first label starting with "entail" (any case), as the zero-shot pipeline finds it; else -1."""
    for label, index in label2id.items():
        if label.lower().startswith("entail"):
            return int(index)
    return -1


def encode_pairs(tokenizer: Any, max_length: int, pairs: Sequence[tuple[str, str]]) -> list[Any]:
    """The tokenizer's pair encodings of PAIRS, truncated longest-first to MAX_LENGTH (the truncation the
    encoder task set). A text far longer than the model allows is cut first, as EncoderTask.encode does."""
    cap = max(max_length * CHARS_PER_TOKEN_CAP, 4096)
    cut = [(_cut(a, cap), _cut(b, cap)) for a, b in pairs]
    encodings = tokenizer.encode_batch(cut)
    for i, ((a, b), (ca, cb), encoding) in enumerate(zip(pairs, cut, encodings)):
        if (ca is not a or cb is not b) and not encoding.overflowing:
            encodings[i] = tokenizer.encode(a, b)
    return list(encodings)


def _cut(text: str, cap: int) -> str:
    """TEXT, cut at a space before CAP characters when longer (the same object when not cut)."""
    if len(text) <= cap:
        return text
    space = text.rfind(" ", cap - 256, cap)
    return text[: space if space > 0 else cap]


def default_function(problem_type: str | None, num_labels: int) -> str:
    if problem_type == "regression":
        return "none"
    if problem_type == "multi_label_classification" or num_labels == 1:
        return "sigmoid"
    return "softmax"
