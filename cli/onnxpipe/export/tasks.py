"""The task families onnxpipe exports, how a task is inferred, and which models optimum can export.

Task names are Hugging Face pipeline names. Generators are always exported with past key values:
decoding without a KV cache is never what a user of this tool wants.
"""

from __future__ import annotations

from typing import Any

from onnxpipe.errors import SourceError, UsageError
from onnxpipe.registry import export_kind, export_tasks

# The registry's export tasks, and the graphs each exports (encoder, decoder or seq2seq).
TASKS: tuple[str, ...] = export_tasks()
FAMILY: dict[str, str] = {task: export_kind(task) for task in TASKS}
# Architecture-name suffix -> task, most specific first.
_SUFFIX_TASK = (
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("MTModel", "text2text-generation"),
    ("Model", "feature-extraction"),
)


def infer_task(config: dict[str, Any]) -> str:
    """The task from config.json's architectures, e.g. BertForSequenceClassification -> text-classification."""
    for arch in config.get("architectures") or []:
        for suffix, task in _SUFFIX_TASK:
            if arch.endswith(suffix):
                return task
    raise UsageError(
        f"cannot infer the task from architectures {config.get('architectures')!r}",
        hint="pass --task, one of: " + ", ".join(sorted(TASKS)),
    )


def check_task(task: str) -> str:
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}", hint="one of: " + ", ".join(sorted(TASKS)))
    return task


def optimum_task(task: str) -> str:
    """optimum's name for the export: generators always carry past key values."""
    return task + "-with-past" if FAMILY[task] in ("decoder", "seq2seq") else task


def _onnx_tasks(model_type: str) -> set[str]:
    from optimum.exporters.tasks import TasksManager

    try:
        return set(TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers"))
    except KeyError:
        return set()


def check_exportable(model_type: str | None, task: str) -> str:
    """optimum's spelling of MODEL_TYPE, or fail with the sorted list of model types it exports for TASK."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (fills the TasksManager registry)
    from optimum.exporters.tasks import TasksManager

    wanted = optimum_task(task)
    known = TasksManager._SUPPORTED_MODEL_TYPE
    for spelling in (model_type, (model_type or "").replace("_", "-")):
        if spelling and spelling in known:
            tasks = _onnx_tasks(spelling)
            if wanted in tasks:
                return spelling
            ours = sorted({t.replace("-with-past", "") for t in tasks} & set(TASKS))
            raise SourceError(
                f"optimum cannot export model type {model_type!r} for {task}; for {model_type} it supports: "
                + (", ".join(ours) or "none of onnxpipe's tasks")
                + _family_note(model_type, task),
                hint="pass --task with one of those",
            )
    supported = sorted(mt for mt in known if wanted in _onnx_tasks(mt))
    raise SourceError(
        f"optimum cannot export model type {model_type!r}"
        + _family_note(model_type, task)
        + f"; model types it exports for {task}: "
        + ", ".join(supported)
    )


def _family_note(model_type: str | None, task: str) -> str:
    """What the family registry (export/families.py, the README's table) says about MODEL_TYPE, as a clause."""
    from onnxpipe.export.families import failure_note

    note = failure_note(model_type, task)
    return f" ({note})" if note else ""


def load_model(folder, task: str, use_safetensors: bool, trust_remote_code: bool):
    """The PyTorch model for TASK, in fp32 and eval mode: the export's source and its oracle."""
    import torch
    from optimum.exporters.tasks import TasksManager

    cls = TasksManager.get_model_class_for_task(optimum_task(task), framework="pt", library="transformers")
    model = cls.from_pretrained(
        folder,
        use_safetensors=use_safetensors or None,
        trust_remote_code=trust_remote_code,
        torch_dtype=torch.float32,
        local_files_only=True,
    )
    model.eval()
    return model
