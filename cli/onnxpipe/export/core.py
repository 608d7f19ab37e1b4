"""checkpoint -> optimum export -> post-process -> validate -> atomic rename.

FIRST CUT (to be hardened): export_model() is the one entry point that the CLI and the tests call.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from onnxpipe.errors import ExportError, SourceError, UsageError
from onnxpipe.manifest import write_manifest

TASKS = (
    "text-classification",
    "token-classification",
    "feature-extraction",
    "fill-mask",
    "text-generation",
    "text2text-generation",
)
FAMILY = {
    "text-classification": "encoder",
    "token-classification": "encoder",
    "feature-extraction": "encoder",
    "fill-mask": "encoder",
    "text-generation": "decoder",
    "text2text-generation": "seq2seq",
}
# Architecture-name suffix -> task, most specific first.
_SUFFIX_TASK = (
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForMaskedLM", "fill-mask"),
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("MTModel", "text2text-generation"),
    ("Model", "feature-extraction"),
)


def infer_task(config: dict[str, Any]) -> str:
    for arch in config.get("architectures") or []:
        for suffix, task in _SUFFIX_TASK:
            if arch.endswith(suffix):
                return task
    raise UsageError(
        f"cannot infer the task from architectures {config.get('architectures')!r}",
        hint="pass --task, one of: " + ", ".join(sorted(TASKS)),
    )


def export_model(source: str | Path, output: str | Path, task: str | None = None, **options: Any) -> dict[str, Any]:
    """Export SOURCE into the folder OUTPUT and return the manifest written there."""
    from optimum.exporters.onnx import main_export

    source = Path(source)
    output = Path(output)
    config = json.loads((source / "config.json").read_text())
    task = task or infer_task(config)
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}", hint="one of: " + ", ".join(sorted(TASKS)))
    family = FAMILY[task]
    optimum_task = task + "-with-past" if family in ("decoder", "seq2seq") else task
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        main_export(str(source), tmp, task=optimum_task, do_validation=False)
        if family == "seq2seq":
            for f in ("decoder_model.onnx", "decoder_with_past_model.onnx"):
                (tmp / f).unlink(missing_ok=True)
            files = {"encoder": "encoder_model.onnx", "decoder": "decoder_model_merged.onnx"}
        else:
            files = {"model": "model.onnx"}
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(source)
        if not (tmp / "tokenizer.json").exists():
            tok.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        cfg = json.loads((tmp / "config.json").read_text())
        labels = None
        if task in ("text-classification", "token-classification"):
            id2label = cfg.get("id2label") or {}
            labels = [id2label[str(i)] for i in range(len(id2label))]
        eos = cfg.get("eos_token_id")
        manifest = {
            "name": output.name,
            "task": task,
            "family": family,
            "architecture": (cfg.get("architectures") or [None])[0],
            "model_type": cfg.get("model_type"),
            "source": {"kind": "folder", "path": str(source.resolve())},
            "files": files,
            "tokenizer": {
                "file": "tokenizer.json",
                "target_file": None,
                "max_length": int(min(tok.model_max_length, 1 << 20)),
                "chat_template": "chat_template.jinja" if (tmp / "chat_template.jinja").exists() else None,
            },
            "special_tokens": {
                "bos_token_id": cfg.get("bos_token_id"),
                "eos_token_id": eos if isinstance(eos, list) or eos is None else [eos],
                "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else cfg.get("pad_token_id"),
                "mask_token_id": tok.mask_token_id,
                "unk_token_id": tok.unk_token_id,
                "decoder_start_token_id": cfg.get("decoder_start_token_id"),
            },
            "labels": labels,
            "problem_type": cfg.get("problem_type"),
            "pooling": "mean" if task == "feature-extraction" else None,
            "normalize": False,
            "opset": None,
            "precision": "fp32",
            "optimization": None,
            "validation": {"passed": False, "note": "first cut: not validated"},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_manifest(tmp, manifest)
        if output.exists():
            if not options.get("force"):
                raise UsageError(f"{output} exists", hint="pass --force to replace it")
            shutil.rmtree(output)
        tmp.rename(output)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
