"""Score an export on labelled data through ONNX Runtime: what users run is what gets measured.

No torch, no transformers, no scikit-learn: the predictions come from the export's ONNX graph and
`tokenizer.json`, the figures from `onnxpipe.measure.metrics` (classification) or sacrebleu (BLEU and chrF of
translations and summaries). Nothing here prints.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from onnxpipe.errors import InputError, UsageError
from onnxpipe.home import resolve_model
from onnxpipe.manifest import read_manifest
from onnxpipe.measure.metrics import agreement, classification_metrics, squad_metrics
from onnxpipe.registry import FAMILIES
from onnxpipe.stream.labelled import Labelled, apply_label_map, parse_label_map, read_labelled

CLASSIFICATION = FAMILIES["classify"].export_tasks[0]
SEQ2SEQ = FAMILIES["translate"].export_tasks[0]
QUESTION_ANSWERING = FAMILIES["answer"].export_tasks[0]


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
            f"{folder.name} is a {manifest.get('task')} export; eval scores text-classification exports "
            f"(labels) and {SEQ2SEQ} exports (BLEU and chrF)",
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
                line=line,
                source=data.source,
            )
        ids.append(index[label])
    return ids


def evaluate_classification(
    model: str | Path,
    data_path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    label_map: str | None = None,
    data_format: str | None = None,
    against: str | Path | None = None,
    device: str = "auto",
    threads: int | None = None,
    batch_size: int = 64,
    predictor: Predictor | None = None,
) -> dict[str, Any]:
    """Accuracy, macro and per-class P/R/F1 and the confusion matrix of MODEL on DATA_PATH.

    With `against`, the second export runs on the same texts: its own figures plus how often
    the two agree (e.g. an int8 export against its fp32 original).
    """
    predictor = predictor or functools.partial(predict_onnx, threads=threads)
    folder, manifest = load_classifier(model)
    labels = list(manifest["labels"])
    data = read_labelled(data_path, text_column, label_column, data_format)
    data = apply_label_map(data, parse_label_map(label_map))
    y_true = label_ids(data, labels)
    pred = predictor(folder, manifest, data, device, batch_size)
    scored = [i for i, p in enumerate(pred.labels) if p is not None]
    y_true = [y_true[i] for i in scored]
    y_pred = _at(pred.labels, scored)
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
        other_pred = _at(other.labels, scored)
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


_T = TypeVar("_T")


def _at(values: Sequence[_T | None], scored: Sequence[int]) -> list[_T]:
    """VALUES at the SCORED indexes: the non-empty texts, which every export gives a value."""
    out: list[_T] = []
    for i in scored:
        value = values[i]
        if value is None:  # only an empty text gets none, and empty texts are not in SCORED
            raise ValueError(f"text {i + 1} got no output, though it is not empty")
        out.append(value)
    return out


class _Collect:
    """A writer for the engine that keeps value_of(result) per record instead of writing it."""

    def __init__(self, count: int, value_of: Callable[[Any], Any]):
        self.value_of = value_of
        self.values: list[Any] = [None] * count

    def write(self, result) -> None:
        if result.value is not None:
            self.values[result.record.seq] = self.value_of(result.value)

    def write_partial(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _run_texts(task: Any, data: Labelled, value_of: Callable[[Any], Any], options: Any) -> tuple[list[Any], Any]:
    """value_of(result) for each text of DATA, through the streaming engine as the task commands run it
    (an empty text gets None), and the engine's summary."""
    from onnxpipe.stream.engine import Engine
    from onnxpipe.stream.records import Record

    collect = _Collect(len(data), value_of)
    records = (
        Record(seq=i, text=text, source=data.source, line=line, nbytes=len(text) + 1)
        for i, (text, line) in enumerate(zip(data.texts, data.lines))
    )
    summary = Engine(task, collect, options).run_records(records)
    return collect.values, summary


def predict_onnx(
    folder: Path, manifest: dict, data: Labelled, device: str, batch_size: int, threads: int | None = None
) -> Prediction:
    """Label ids for the texts of DATA exactly as `onnxpipe classify` makes them: same runtime, task and batcher.

    An empty text gets no prediction (None), as classify gives it an empty result.
    """
    from onnxpipe.runtime import load_model
    from onnxpipe.stream.engine import EngineOptions

    model = load_model(folder, device=device, threads=threads)
    index = {name: i for i, name in enumerate(manifest["labels"])}
    task = FAMILIES["classify"].make_task(model, {})
    labels, summary = _run_texts(
        task, data, lambda r: index.get(r.labels[0]) if r.labels else None, EngineOptions(batch_size=batch_size)
    )
    return Prediction(labels, model.provider or "", model.device_note, summary.truncated)


# --- translation and summarisation ---------------------------------------------------------


def load_seq2seq(ref: str | Path) -> tuple[Path, dict[str, Any]]:
    folder = resolve_model(ref)
    manifest = read_manifest(folder)
    if manifest.get("task") != SEQ2SEQ:
        raise UsageError(
            f"{folder.name} is a {manifest.get('task')} export, not {SEQ2SEQ}",
            hint="--against needs an export of the same task",
        )
    return folder, manifest


def read_references(data_path: str | Path, references: str | Path) -> Labelled:
    """DATA as plain text (one source per line) and REFERENCES with one reference per line."""
    sources, refs = _plain_lines(Path(data_path)), _plain_lines(Path(references))
    if len(sources) != len(refs):
        raise UsageError(
            f"{data_path} has {len(sources)} line(s) and {references} has {len(refs)}",
            hint="one reference per source line, in the same order",
        )
    for number, ref in enumerate(refs, 1):
        if not ref.strip():
            raise InputError("empty reference", line=number, source=str(references))
    return Labelled([s.strip() for s in sources], refs, list(range(1, len(refs) + 1)), str(data_path))


def _plain_lines(path: Path) -> list[str]:
    from onnxpipe.stream.readers import read_text_lines

    lines = read_text_lines(path, strict=True)
    if not lines:
        raise InputError(f"{path} is empty")
    return lines


@dataclass
class Generated:
    texts: list[str | None]  # the output per source; None for an empty source (not scored)
    provider: str
    device_note: str | None = None
    truncated: int = 0
    position_note: str | None = None  # outputs that stopped at the decoder's limit before max_new_tokens


# (export folder, data, device, batch_size, task options) -> Generated
Generator = Callable[[Path, Labelled, str, int, dict], Generated]


def evaluate_generation(
    model: str | Path,
    data_path: str | Path,
    *,
    text_column: str = "text",
    reference_column: str = "reference",
    references: str | Path | None = None,
    data_format: str | None = None,
    against: str | Path | None = None,
    device: str = "auto",
    threads: int | None = None,
    batch_size: int = 32,
    task_options: dict | None = None,
    generator: Generator | None = None,
) -> dict[str, Any]:
    """Corpus BLEU and chrF (sacrebleu, with its signatures) of MODEL's outputs against references.

    The outputs are made as `onnxpipe translate` (or `summarize`, task_options summarize=True) makes
    them. With `against`, a second export runs on the same sources: its scores and how often the two
    produce the same text.
    """
    metrics = _sacrebleu()
    generator = generator or functools.partial(generate_onnx, threads=threads)
    task_options = dict(task_options or {})
    folder, manifest = load_seq2seq(model)
    if references is not None:
        data = read_references(data_path, references)
    else:
        data = read_labelled(data_path, text_column, reference_column, data_format, label_option="--reference-column")
    out = generator(folder, data, device, batch_size, task_options)
    scored = [i for i, t in enumerate(out.texts) if t is not None]
    refs = [data.labels[i] for i in scored]
    hyps = _at(out.texts, scored)
    report: dict[str, Any] = {
        "model": folder.name,
        "path": str(folder),
        "precision": manifest.get("precision"),
        "provider": out.provider,
        "data": str(data_path),
        "task": SEQ2SEQ,
        "examples": len(scored),
        "skipped_empty": len(data) - len(scored),
        "truncated": out.truncated,
        "scores": metrics(hyps, refs),
    }
    notes = [out.device_note] if out.device_note else []
    report["warnings"] = [w.position_note for w in (out,) if w.position_note]
    if against is not None:
        other_folder, other_manifest = load_seq2seq(against)
        other = generator(other_folder, data, device, batch_size, task_options)
        other_hyps = _at(other.texts, scored)
        same = sum(a == b for a, b in zip(hyps, other_hyps))
        report["against"] = {
            "model": other_folder.name,
            "path": str(other_folder),
            "precision": other_manifest.get("precision"),
            "provider": other.provider,
            "scores": metrics(other_hyps, refs),
            "agreement": {
                "examples": len(scored),
                "same": same,
                "differ": len(scored) - same,
                "agreement": same / len(scored) if scored else 0.0,
            },
        }
        if other.device_note:
            notes.append(other.device_note)
        if other.position_note:
            report["warnings"].append(f"{other_folder.name}: {other.position_note}")
    report["notes"] = notes
    return report


def _sacrebleu() -> Callable[[list[str], list[str]], dict[str, Any]]:
    from sacrebleu.metrics import BLEU, CHRF  # a base dependency (the [export] extra no longer carries it)

    def score(hyps: list[str], refs: list[str]) -> dict[str, Any]:
        if not hyps:
            raise UsageError("no non-empty sources to score")
        bleu, chrf = BLEU(), CHRF()
        b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
        return {
            "bleu": {
                "score": b.score,
                "precisions": list(b.precisions),
                "bp": b.bp,
                "sys_len": b.sys_len,
                "ref_len": b.ref_len,
                "signature": str(bleu.get_signature()),
                "text": str(b),
            },
            "chrf": {"score": c.score, "signature": str(chrf.get_signature()), "text": str(c)},
        }

    return score


def generate_onnx(
    folder: Path, data: Labelled, device: str, batch_size: int, task_options: dict, threads: int | None = None
) -> Generated:
    """Outputs for the sources of DATA exactly as `onnxpipe translate`/`summarize` make them."""
    from onnxpipe.runtime import load_model
    from onnxpipe.stream.engine import EngineOptions

    options = dict(task_options)
    family = FAMILIES["summarize" if options.pop("summarize", False) else "translate"]
    if family.name == "summarize":  # no languages to choose: given ones are refused by make_task
        options = {k: v for k, v in options.items() if not (k in ("source_lang", "target_lang") and v is None)}
    model = load_model(folder, device=device, threads=threads)
    task = family.make_task(model, options)
    texts, summary = _run_texts(task, data, task.to_text, EngineOptions(batch_size=batch_size, max_batch_tokens=8192))
    note = None
    if getattr(task, "position_limited", 0):  # as run_stream_command reads it
        note = f"{task.position_limited} output(s) stopped at {task.position_limit}, before {task.requested_limit}"
    return Generated(texts, model.provider or "", model.device_note, summary.truncated, note)


# --- question answering (SQuAD) ---------------------------------------------------------------


@dataclass
class SquadData:
    questions: list[str]
    contexts: list[str]
    answers: list[list[str]]  # the gold answers of each example; empty: no answer (SQuAD 2.0)
    lines: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.questions)


def _gold_answers(value: Any) -> list[str] | None:
    """SQuAD's answers as datasets writes them ({"text": [...], "answer_start": [...]}), as the original JSON
    holds them ([{"text": ..., "answer_start": ...}, ...]), or a plain list of strings; None if none of these."""
    if isinstance(value, dict):
        value = value.get("text")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        texts = [v.get("text") if isinstance(v, dict) else v for v in value]
        if all(isinstance(t, str) for t in texts):
            return [str(t) for t in texts]
    return None


def read_squad(
    path: str | Path, question: str = "question", context: str = "context", answers: str = "answers"
) -> SquadData:
    """A SQuAD-style JSONL file: one example per line with QUESTION, CONTEXT and ANSWERS fields."""
    import json

    from onnxpipe.stream.readers import read_text_lines

    source = str(path)
    data = SquadData([], [], [], [], source)
    for number, line in enumerate(read_text_lines(path, strict=True), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise InputError(f"malformed JSON: {exc}", line=number, source=source) from None
        if not isinstance(obj, dict):
            raise InputError("not a JSON object", line=number, source=source)
        fields = []
        for name in (question, context):
            if not isinstance(obj.get(name), str):
                raise InputError(
                    f"no text field {name!r} (fields: {', '.join(obj) or 'none'})", line=number, source=source
                )
            fields.append(obj[name])
        gold = _gold_answers(obj.get(answers))
        if gold is None:
            raise InputError(
                f"field {answers!r} is not a list of answers ({{'text': [...]}}, [{{'text': ...}}] or [...])",
                line=number,
                source=source,
            )
        data.questions.append(fields[0])
        data.contexts.append(fields[1])
        data.answers.append(gold)
        data.lines.append(number)
    if not data.questions:
        raise InputError(f"{source} has no examples")
    return data


def load_question_answering(ref: str | Path) -> tuple[Path, dict[str, Any]]:
    folder = resolve_model(ref)
    manifest = read_manifest(folder)
    if manifest.get("task") != QUESTION_ANSWERING:
        raise UsageError(
            f"{folder.name} is a {manifest.get('task')} export, not {QUESTION_ANSWERING}",
            hint="--against needs an export of the same task",
        )
    return folder, manifest


def answer_onnx(
    folder: Path, data: SquadData, device: str, batch_size: int, task_options: dict, threads: int | None = None
) -> Generated:
    """The best answer to each question of DATA exactly as `onnxpipe answer` gives it ("" for none)."""
    from onnxpipe.runtime import load_model
    from onnxpipe.stream.engine import Engine, EngineOptions
    from onnxpipe.stream.records import Record

    model = load_model(folder, device=device, threads=threads)
    task = FAMILIES["answer"].make_task(model, task_options)
    collect = _Collect(len(data), lambda answers: answers[0]["answer"] if answers else "")
    records = (
        Record(seq=i, text=c, source=data.source, line=line, nbytes=len(c) + len(q) + 2, pair=q)
        for i, (q, c, line) in enumerate(zip(data.questions, data.contexts, data.lines))
    )
    Engine(task, collect, EngineOptions(batch_size=batch_size)).run_records(records)
    texts = [t if t is not None else "" for t in collect.values]  # an empty context answers nothing
    return Generated(list(texts), model.provider or "", model.device_note)


def evaluate_answers(
    model: str | Path,
    data_path: str | Path,
    *,
    question_field: str = "question",
    context_field: str = "context",
    answers_field: str = "answers",
    against: str | Path | None = None,
    device: str = "auto",
    threads: int | None = None,
    batch_size: int = 32,
    task_options: dict | None = None,
) -> dict[str, Any]:
    """SQuAD exact match and F1 (the official script's, in percent) of MODEL's answers on a SQuAD JSONL file.

    Every example is scored; one without gold answers (SQuAD 2.0) is right when the answer is empty, which
    needs task_options handle_impossible_answer. With `against`, a second export answers the same questions.
    """
    folder, manifest = load_question_answering(model)
    data = read_squad(data_path, question_field, context_field, answers_field)
    options = dict(task_options or {})
    out = answer_onnx(folder, data, device, batch_size, options, threads=threads)
    preds = [t or "" for t in out.texts]
    report: dict[str, Any] = {
        "model": folder.name,
        "path": str(folder),
        "precision": manifest.get("precision"),
        "provider": out.provider,
        "data": str(data_path),
        "task": QUESTION_ANSWERING,
        "examples": len(data),
        "skipped_empty": 0,
        "truncated": 0,
        "scores": squad_metrics(data.answers, preds),
    }
    notes = [out.device_note] if out.device_note else []
    if against is not None:
        other_folder, other_manifest = load_question_answering(against)
        other = answer_onnx(other_folder, data, device, batch_size, options, threads=threads)
        other_preds = [t or "" for t in other.texts]
        same = sum(a == b for a, b in zip(preds, other_preds))
        report["against"] = {
            "model": other_folder.name,
            "path": str(other_folder),
            "precision": other_manifest.get("precision"),
            "provider": other.provider,
            "scores": squad_metrics(data.answers, other_preds),
            "agreement": {
                "examples": len(data),
                "same": same,
                "differ": len(data) - same,
                "agreement": same / len(data),
            },
        }
        if other.device_note:
            notes.append(other.device_note)
    report["notes"] = notes
    return report
