"""The export manifest, `onnxpipe.json`: what an export folder holds and how it was made.

The runtime reads only this file, the ONNX graphs and `tokenizer.json`; nothing here needs
torch or transformers. Keys (format 1):

    format            1
    name              the export's name (folder name)
    task              text-classification | token-classification | feature-extraction |
                      fill-mask | text-generation | text2text-generation
    family            encoder | decoder | seq2seq
    architecture      e.g. "BertForSequenceClassification"; model_type e.g. "bert"
    source            {"kind": "folder"|"gguf"|"hub", "path" or "id", "revision", "sha256"}
    files             {"model": "model.onnx"} (encoder, decoder) or
                      {"encoder": "encoder_model.onnx", "decoder": "decoder_model_merged.onnx"}
    tokenizer         {"file": "tokenizer.json", "target_file": null | "target_tokenizer.json",
                       "max_length": int, "chat_template": null | "chat_template.jinja"}
    special_tokens    {"bos_token_id", "eos_token_id" (list), "pad_token_id", "mask_token_id",
                       "unk_token_id", "decoder_start_token_id", "sep_token_id", "cls_token_id"}
    labels            list of label names by id (classifiers), else null
    problem_type      "single_label_classification" | "multi_label_classification" | null
    pooling           "mean" | "cls" | "max" | null   (feature-extraction default)
    normalize         bool (feature-extraction default)
    opset             int
    precision         "fp32" | "fp16" | "int8"
    optimization      null | "O1" | "O2" | "O3"
    graph             {"inputs": [...], "outputs": [...], "num_layers", "num_kv_heads", "head_dim"}
    validation        {"passed": bool, "tolerance": float, "inputs": str,
                       "outputs": {name: {"max_abs_diff": float}}, ...task-specific figures}
    versions          {"onnxpipe", "onnxruntime", "optimum", "transformers", "torch", "onnx"}
    created           ISO 8601 UTC timestamp
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from onnxpipe.errors import ModelNotFoundError
from onnxpipe.home import MANIFEST_NAME

FORMAT = 1


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelNotFoundError(f"{folder} has no {MANIFEST_NAME}", hint="re-run onnxpipe export") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelNotFoundError(f"{path} is not valid JSON: {exc}", hint="re-run onnxpipe export") from None
    if data.get("format") != FORMAT:
        raise ModelNotFoundError(
            f"{path} has manifest format {data.get('format')!r}, this onnxpipe reads {FORMAT}",
            hint="re-export with this version",
        )
    return data


def write_manifest(folder: Path, data: dict[str, Any]) -> Path:
    path = Path(folder) / MANIFEST_NAME
    data = {"format": FORMAT, **data}
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
