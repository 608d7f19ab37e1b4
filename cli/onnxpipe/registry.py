"""The one list of task families: what each command runs, on which exports, with which options.

A family is registered once, with its Hugging Face task names (what `export --task` writes in the
manifest), its task class (imported when first used, so `--help` stays fast), the keyword options its
class takes and the batching defaults of its command. The Python API (`onnxpipe.load`) reads it;
adding a task family means one module under `onnxpipe.tasks` plus one entry here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from onnxpipe.errors import UsageError

# The decoding options, named as GenerationConfig names them: generate takes all of these, translate and
# summarize the search ones (SEQ2SEQ_DECODING); commands/_decoding.py defines their flags from these lists.
# For generate, max_length and min_length count the prompt, as transformers counts them at batch 1 (each row's
# own prompt: a record's result never depends on its batch-mates' lengths).
DECODING_OPTIONS: tuple[str, ...] = (
    "max_new_tokens",
    "max_length",
    "min_new_tokens",
    "min_length",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "num_beams",
    "length_penalty",
    "early_stopping",
    "num_return_sequences",
    "repetition_penalty",
    "no_repeat_ngram_size",
)
SEQ2SEQ_DECODING: tuple[str, ...] = (
    "num_beams",
    "length_penalty",
    "max_length",
    "max_new_tokens",
    "min_length",
    "min_new_tokens",
    "no_repeat_ngram_size",
    "num_return_sequences",
    "early_stopping",
)


def sampling_settings(overrides: dict[str, Any]) -> dict[str, Any]:
    """Asking for a sampling setting means sampling; temperature 0 means greedy (as generate's flags do)."""
    out = dict(overrides)
    top_p = out.get("top_p")
    if out.get("do_sample") is None and (
        out.get("temperature") or out.get("top_k") or (top_p is not None and top_p < 1.0)
    ):
        out["do_sample"] = True
    if out.get("temperature") == 0.0:
        out["do_sample"], out["temperature"] = False, None
    return out


@dataclass(frozen=True)
class TaskFamily:
    """One task family: `name` is the command (`classify`), `export_tasks` the manifest tasks it serves,
    `kind` the graphs its exports hold: "encoder" (one encoder pass), "decoder" (a decoder-only model with
    its KV cache) or "seq2seq" (an encoder and a merged decoder)."""

    name: str
    export_tasks: tuple[str, ...]
    kind: str
    task_class: str  # "module:Class", imported on first use
    options: tuple[str, ...]  # keyword options of the task, as the API takes them
    batch_size: int = 32
    max_batch_tokens: int = 16384
    fixed: Mapping[str, Any] = field(default_factory=dict)  # options this family always passes (summarize)

    def load_class(self) -> type:
        module, name = self.task_class.split(":")
        cls: type = getattr(importlib.import_module(module), name)
        return cls

    def make_task(self, model: Any, options: Mapping[str, Any]) -> Any:
        """The task object for MODEL (an opened export) with OPTIONS (unknown ones are a usage error)."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise UsageError(
                f"{self.name} takes no option {', '.join(map(repr, unknown))}",
                hint="its options: " + ", ".join(self.options),
            )
        return _FACTORIES.get(self.name, _keywords)(self, model, dict(options))


def _keywords(family: TaskFamily, model: Any, options: dict[str, Any]) -> Any:
    return family.load_class()(model, **family.fixed, **options)


def _generate(family: TaskFamily, model: Any, options: dict[str, Any]) -> Any:
    overrides = sampling_settings({k: options.pop(k) for k in list(options) if k in DECODING_OPTIONS})
    return family.load_class()(model, overrides, **options)


_FACTORIES: dict[str, Callable[[TaskFamily, Any, dict[str, Any]], Any]] = {"generate": _generate}

# In the order `export --task` lists them; where families share an export task, the first is its default.
FAMILIES: dict[str, TaskFamily] = {
    f.name: f
    for f in (
        TaskFamily(
            "classify",
            ("text-classification",),
            "encoder",
            "onnxpipe.tasks.classify:ClassifyTask",
            ("top_k", "threshold", "function", "candidate_labels", "hypothesis_template", "multi_label", "truncation"),
        ),
        TaskFamily(
            "rerank",
            ("text-classification",),
            "encoder",
            "onnxpipe.tasks.rerank:RerankTask",
            ("query", "activation", "label", "truncation"),
        ),
        TaskFamily(
            "tag",
            ("token-classification",),
            "encoder",
            "onnxpipe.tasks.tag:TagTask",
            ("aggregation", "truncation", "stride"),
        ),
        TaskFamily(
            "embed",
            ("feature-extraction",),
            "encoder",
            "onnxpipe.tasks.embed:EmbedTask",
            ("pooling", "normalize", "truncation"),
        ),
        TaskFamily(
            "fill-mask", ("fill-mask",), "encoder", "onnxpipe.tasks.fill_mask:FillMaskTask", ("top_k", "truncation")
        ),
        TaskFamily(
            "answer",
            ("question-answering",),
            "encoder",
            "onnxpipe.tasks.answer:AnswerTask",
            (
                "question",
                "top_k",
                "doc_stride",
                "max_answer_len",
                "max_seq_len",
                "handle_impossible_answer",
                "align_to_words",
            ),
        ),
        TaskFamily(
            "generate",
            ("text-generation",),
            "decoder",
            "onnxpipe.tasks.causal:GenerateTask",
            ("chat", "system", "stop", *DECODING_OPTIONS),
            batch_size=16,
        ),
        TaskFamily(
            "translate",
            ("text2text-generation",),
            "seq2seq",
            "onnxpipe.tasks.seq2seq:Seq2SeqTask",
            ("prefix", "source_lang", "target_lang", *SEQ2SEQ_DECODING),
            max_batch_tokens=8192,
        ),
        TaskFamily(
            "summarize",
            ("text2text-generation",),
            "seq2seq",
            "onnxpipe.tasks.seq2seq:Seq2SeqTask",
            ("prefix", *SEQ2SEQ_DECODING),
            batch_size=16,
            fixed={"summarize": True},
        ),
    )
}


def export_tasks(kind: str | None = None) -> tuple[str, ...]:
    """The export tasks onnxpipe runs (of KIND: encoder, decoder, seq2seq), each once, in registry order."""
    tasks = [t for f in FAMILIES.values() if kind is None or f.kind == kind for t in f.export_tasks]
    return tuple(dict.fromkeys(tasks))


def export_kind(export_task: str) -> str:
    """The graphs an export of EXPORT_TASK holds: "encoder", "decoder" or "seq2seq"."""
    return family_for_export(export_task).kind


def family_named(name: str) -> TaskFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UsageError(f"unknown task {name!r}", hint="one of: " + ", ".join(sorted(FAMILIES))) from None


def family_for_export(export_task: str | None, wanted: str | None = None) -> TaskFamily:
    """The family that runs an export of EXPORT_TASK: WANTED when given (and fitting), else the first listed."""
    if wanted is not None:
        family = family_named(wanted)
        if export_task not in family.export_tasks:
            raise UsageError(
                f"{wanted} needs a {' or '.join(family.export_tasks)} export, not {export_task}",
                hint=f"load it without task=, or export the model with --task {family.export_tasks[0]}",
            )
        return family
    for family in FAMILIES.values():
        if export_task in family.export_tasks:
            return family
    raise UsageError(
        f"no onnxpipe task runs {export_task!r} exports",
        hint="known export tasks: " + ", ".join(sorted({t for f in FAMILIES.values() for t in f.export_tasks})),
    )
