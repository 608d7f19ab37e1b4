"""The export manifest, `onnxpipe.json`: what an export folder holds and how it was made.

An export folder is untrusted input (downloaded, shared, tampered with), so `read_manifest` is the
one door: it parses the file, checks it against the schema below, and checks that every path it
names stays inside the folder, before anything else is opened. Whatever is wrong ends as one
`ExportFolderError` naming the file and the problem.

The runtime reads only this file, the ONNX graphs and `tokenizer.json`; nothing here needs
torch or transformers. Keys (format 1):

    format            1
    name              the export's name (folder name)
    task              text-classification | token-classification | feature-extraction |
                      fill-mask | question-answering | text-generation | text2text-generation
    family            encoder | decoder | seq2seq (must be the task's family)
    architecture      e.g. "BertForSequenceClassification"; model_type e.g. "bert"
    source            {"kind": "folder"|"gguf"|"hub", "path" or "id", "revision", "sha256"}
    files             {"model": "model.onnx"} (encoder, decoder) or
                      {"encoder": "encoder_model.onnx", "decoder": "decoder_model_merged.onnx"}
    tokenizer         {"file": "tokenizer.json", "target_file": null | "target_tokenizer.json",
                       "max_length": int, "chat_template": null | "chat_template.jinja",
                       "unk_remap", "target_unk_remap": absent | {"from_id": int, "unk_id": int}: ids >= from_id
                       are SentencePiece pieces vocab.json lacks, given to the graph as unk_id (Marian, M2M100)}
    special_tokens    {"bos_token_id", "eos_token_id" (list), "pad_token_id", "mask_token_id",
                       "unk_token_id", "decoder_start_token_id", "sep_token_id", "cls_token_id"}
    labels            list of label names by id (classifiers), else null
    problem_type      "single_label_classification" | "multi_label_classification" | null
    pooling           "mean" | "cls" | "max" | null   (feature-extraction default)
    normalize         bool (feature-extraction default)
    opset             int
    precision         "fp32" | "fp16" | "bf16" | "int8"
    optimization      null | "O1" | "O2" | "O3"
    device            "cpu" | "cuda" | "any": the device the graph is made for (onnxpipe's fused CPU graph,
                      its CUDA graph, or one that runs on both). Absent (older exports): "cpu" for the fused
                      graph, else "any" (graph_device)
    graph             {"inputs": [...], "outputs": [...], "num_layers", "num_kv_heads", "head_dim"}
    validation        {"passed": bool, "tolerance": float, "inputs": str,
                       "outputs": {name: {"max_abs_diff": float}}, ...task-specific figures}
    versions          {"onnxpipe", "onnxruntime", "optimum", "transformers", "torch", "onnx"}
    created           ISO 8601 UTC timestamp
    checksums         {relative path: {"size": int, "sha256": hex}} for every file of the folder
                      but the manifest (absent in exports of onnxpipe before 0.x: `verify` says so)

Unknown keys are kept: a newer onnxpipe may add some.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from onnxpipe.errors import ExportFolderError, ModelNotFoundError
from onnxpipe.export.tasks import FAMILY
from onnxpipe.home import MANIFEST_NAME

FORMAT = 1
MAX_MANIFEST_BYTES = 16 << 20  # ours are a few KB; a bigger one is not ours
# The graphs each family needs under `files`.
GRAPHS = {"encoder": ("model",), "decoder": ("model",), "seq2seq": ("encoder", "decoder")}
# Files the runtime opens by fixed name: they must not lead out of the folder either.
FIXED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "modules.json",
    "1_Pooling/config.json",
)
DEVICES = ("cpu", "cuda", "any")  # what `device` may say
_NO_CHECKSUMS = "no checksums recorded (exported by an older onnxpipe)"


def read_manifest(folder: Path) -> dict[str, Any]:
    """The validated manifest of the export FOLDER, or ExportFolderError naming the file and the problem."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    try:
        if not path.is_file() and not path.is_symlink():
            raise ModelNotFoundError(f"{folder} has no {MANIFEST_NAME}", hint="re-run onnxpipe export")
        inside(folder, MANIFEST_NAME)
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ExportFolderError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ExportFolderError(
            f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MB: not an onnxpipe manifest",
            hint="re-run onnxpipe export",
        )
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ExportFolderError(f"{path} is not valid JSON: {_one_line(exc)}", hint="re-run onnxpipe export") from None
    return validate_manifest(data, folder)


def graph_device(manifest: dict[str, Any]) -> str:
    """The device a (schema-checked) manifest's graph is for: cpu, cuda or any (see `device` above)."""
    device = manifest.get("device")
    if device in DEVICES:
        return str(device)
    return "cpu" if (manifest.get("graph") or {}).get("builder") == "onnxpipe-fused" else "any"


def read_json_object(folder: Path) -> dict[str, Any] | None:
    """FOLDER's manifest as parsed JSON, unchecked; None when it is absent, a link, unreadable or not an object."""
    path = Path(folder) / MANIFEST_NAME
    try:
        if os.path.islink(path) or not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def looks_like_export(folder: Path) -> bool:
    """FOLDER holds a manifest that parses as ours (it may be broken otherwise): what --force may replace."""
    data = read_json_object(folder)
    return data is not None and data.get("format") == FORMAT and "task" in data


def validate_manifest(data: Any, folder: Path) -> dict[str, Any]:
    """DATA if it is a format-1 manifest whose paths stay inside FOLDER, else ExportFolderError."""
    path = Path(folder) / MANIFEST_NAME
    problem = _schema_problem(data)
    if problem:
        raise ExportFolderError(f"{path}: {problem}", hint="re-run onnxpipe export")
    for what, rel in manifest_paths(data):
        inside(folder, rel, what=what)
    for rel in FIXED_FILES:
        if os.path.lexists(Path(folder) / rel):
            inside(folder, rel, what=rel)
    for key, rel in data["files"].items():
        if not (Path(folder) / rel).is_file():
            raise ExportFolderError(f"{path}: files.{key} names {rel}, which is missing", hint="re-run onnxpipe export")
    return data


def manifest_paths(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, relative path) for every path a (schema-checked) manifest names."""
    paths = [(f"files.{k}", v) for k, v in data["files"].items()]
    tok = data.get("tokenizer") or {}
    paths += [(f"tokenizer.{k}", tok[k]) for k in ("file", "target_file", "chat_template") if tok.get(k) is not None]
    paths += [("checksums", k) for k in (data.get("checksums") or {})]
    for i, layer in enumerate(data.get("dense") or []):  # sentence-transformers Dense layers (.npy files)
        paths += [(f"dense[{i}].{k}", layer[k]) for k in ("weight", "bias") if layer.get(k) is not None]
    return paths


def inside(folder: Path, rel: Any, what: str | None = None) -> Path:
    """FOLDER/REL, refused unless REL is a relative path that stays inside FOLDER, symlinks followed."""
    label = f"{Path(folder) / MANIFEST_NAME}: {what}" if what else str(Path(folder) / str(rel))
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise ExportFolderError(f"{label} is not a file name ({rel!r})", hint="re-run onnxpipe export")
    if os.path.isabs(rel) or rel.startswith("~") or ".." in Path(rel).parts:
        raise ExportFolderError(
            f"{label} = {rel!r} leads out of the export folder; refusing to open it",
            hint="only use export folders from a source you trust, or re-run onnxpipe export",
        )
    base = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(base, rel))
    if os.path.commonpath([base, target]) != base:
        raise ExportFolderError(
            f"{label} ({rel}) is a link to {target}, outside the export folder; refusing to open it",
            hint="copy the file into the folder, or re-run onnxpipe export",
        )
    return Path(folder) / rel


def _schema_problem(data: Any) -> str | None:
    """What makes DATA not a format-1 manifest, in a few words; None when it is one."""
    if not isinstance(data, dict):
        return f"the manifest is a JSON {_kind(data)}, not an object"
    fmt = data.get("format")
    if fmt != FORMAT or isinstance(fmt, bool):
        return f"manifest format {fmt!r}, this onnxpipe reads {FORMAT} (re-export with this version)"
    for key in ("task", "family", "files"):
        if key not in data:
            return f"the manifest has no {key!r}"
    task, family = data["task"], data["family"]
    if not isinstance(task, str) or task not in FAMILY:
        return f"unknown task {task!r} (known: {', '.join(FAMILY)})"
    if not isinstance(family, str) or family != FAMILY[task]:
        return f"family {family!r} does not fit task {task} (expected {FAMILY[task]!r})"
    types = {
        "name": (str,),
        "files": (dict,),
        "tokenizer": (dict,),
        "special_tokens": (dict, type(None)),
        "labels": (list, type(None)),
        "problem_type": (str, type(None)),
        "pooling": (str, type(None)),
        "normalize": (bool,),
        "opset": (int, type(None)),
        "precision": (str, type(None)),
        "optimization": (str, type(None)),
        "graph": (dict,),
        "validation": (dict, type(None)),
        "versions": (dict,),
        "source": (dict,),
        "architecture": (str, type(None)),
        "model_type": (str, type(None)),
        "checksums": (dict,),
        "dense": (list,),
        "max_seq_length": (int, type(None)),
        "device": (str,),
    }
    for key, allowed in types.items():
        if key in data and not isinstance(data[key], allowed):
            return f"{key!r} is a JSON {_kind(data[key])}, expected {' or '.join(_JSON_NAMES[t] for t in allowed)}"
    if "device" in data and data["device"] not in DEVICES:
        return f"device {data['device']!r} is not one of {', '.join(DEVICES)}"
    files = data["files"]
    for key, value in files.items():
        if not isinstance(value, str):
            return f"files.{key} is a JSON {_kind(value)}, expected a string"
    missing = [g for g in GRAPHS[family] if g not in files]
    if missing:
        return (
            f"a {task} export needs the graph{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)} under 'files' (it has: {', '.join(files) or 'none'})"
        )
    tok = data.get("tokenizer") or {}
    for key in ("file", "target_file", "chat_template"):
        if tok.get(key) is not None and not isinstance(tok[key], str):
            return f"tokenizer.{key} is a JSON {_kind(tok[key])}, expected a string"
    if (
        "max_length" in tok
        and tok["max_length"] is not None
        and (not isinstance(tok["max_length"], int) or isinstance(tok["max_length"], bool))
    ):
        return f"tokenizer.max_length is a JSON {_kind(tok['max_length'])}, expected an integer"
    for key in ("unk_remap", "target_unk_remap"):
        remap = tok.get(key)
        if remap is not None and not (
            isinstance(remap, dict)
            and set(remap) == {"from_id", "unk_id"}
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in remap.values())
            and remap["unk_id"] < remap["from_id"]
        ):
            return f'tokenizer.{key} must be {{"from_id": int, "unk_id": int}} (unk_id below from_id) or null'
    graph = data.get("graph") or {}
    for key in ("inputs", "outputs", "encoder_inputs", "encoder_outputs"):
        if key in graph and not (isinstance(graph[key], list) and all(isinstance(n, str) for n in graph[key])):
            return f"graph.{key} must be a list of names"
    for key in ("num_layers", "num_kv_heads", "head_dim"):
        if graph.get(key) is not None and not _is_count(graph[key]):
            return f"graph.{key} must be a positive integer or null"
    for i, layer in enumerate(data.get("dense") or []):
        if (
            not isinstance(layer, dict)
            or not isinstance(layer.get("weight"), str)
            or not isinstance(layer.get("bias"), (str, type(None)))
        ):
            return f'dense[{i}] must be an object with a "weight" file name (and a "bias" one or null)'
    labels = data.get("labels")
    if labels is not None and not all(isinstance(label, str) for label in labels):
        return "labels must be a list of strings"
    for id_key, value in (data.get("special_tokens") or {}).items():
        values = value if isinstance(value, list) else [value]
        if id_key.endswith("_token_id") and not all(_is_token_id(v) for v in values):
            return f"special_tokens.{id_key} must be a token id (an integer from 0), a list of them, or null"
    for rel, entry in (data.get("checksums") or {}).items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and not isinstance(entry["size"], bool)
            and isinstance(entry.get("sha256"), str)
        ):
            return f'checksums[{rel!r}] must be {{"size": int, "sha256": str}}'
    return None


_JSON_NAMES = {
    dict: "object",
    list: "array",
    str: "string",
    int: "integer",
    bool: "boolean",
    float: "number",
    type(None): "null",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return _is_int(value) and 0 < value < (1 << 31)


def _is_token_id(value: Any) -> bool:
    return value is None or (_is_int(value) and 0 <= value < (1 << 31))


def _kind(value: Any) -> str:
    return next((name for t, name in _JSON_NAMES.items() if type(value) is t), type(value).__name__)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# --- checksums --------------------------------------------------------------------------


def folder_files(folder: Path) -> list[str]:
    """Every regular file under FOLDER (relative, '/'-separated, sorted), the manifest excepted; links not followed."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel != MANIFEST_NAME:
                found.append(rel)
    return sorted(found)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} for every file of an export folder but the manifest."""
    return {
        rel: {"size": os.path.getsize(Path(folder) / rel), "sha256": sha256_file(Path(folder) / rel)}
        for rel in folder_files(folder)
    }


def file_problems(folder: Path, manifest: dict[str, Any], full: bool = False) -> list[str]:
    """How FOLDER's files differ from the manifest's record: sizes (cheap); with FULL, sha256 and extra files.

    An export without checksums gives one problem saying so.
    """
    recorded = manifest.get("checksums")
    if recorded is None:
        return [_NO_CHECKSUMS]
    problems = []
    for rel, entry in sorted(recorded.items()):
        path = Path(folder) / rel
        try:
            if os.path.islink(path) or not path.is_file():
                problems.append(f"{rel}: missing" if not os.path.lexists(path) else f"{rel}: not a regular file")
                continue
            size = path.stat().st_size
            if size != entry["size"]:
                problems.append(f"{rel}: {size} bytes, the manifest records {entry['size']}")
            elif full and sha256_file(path) != entry["sha256"]:
                problems.append(f"{rel}: sha256 differs from the manifest's")
        except OSError as exc:
            problems.append(f"{rel}: cannot be read ({exc.strerror or exc})")
    if full:
        problems += [f"{rel}: not in the manifest" for rel in folder_files(folder) if rel not in recorded]
    return problems


def write_manifest(folder: Path, data: dict[str, Any]) -> Path:
    path = Path(folder) / MANIFEST_NAME
    data = {"format": FORMAT, **data}
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
