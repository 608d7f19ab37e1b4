"""An export folder opened for inference: manifest, config, tokenizer and lazily made sessions."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

from onnxpipe.errors import DeviceError, ExportFolderError, ModelNotFoundError, OnnxpipeError, UsageError
from onnxpipe.home import resolve_model
from onnxpipe.manifest import inside, read_manifest
from onnxpipe.runtime.device import CUDA, Device, cuda_failure_reason, parse_device
from onnxpipe.runtime.machine import cap_threads

# Position ids of these models start after the padding index, so `max_position_embeddings`
# counts `pad_token_id + 1` slots that no token can use (RoBERTa: 514 -> 512 tokens).
_POSITION_OFFSET_TYPES = {"roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod", "mpnet"}
_REEXPORT = "run onnxpipe verify to see what changed, or re-run onnxpipe export"


def read_json_file(folder: Path, name: str) -> dict[str, Any]:
    """FOLDER/NAME as a JSON object; {} when absent; one ExportFolderError line when broken or outside FOLDER."""
    path = inside(folder, name)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ExportFolderError(f"{path} is not valid JSON: {_first_line(exc)}", hint=_REEXPORT) from None
    if not isinstance(data, dict):
        raise ExportFolderError(f"{path} does not hold a JSON object", hint=_REEXPORT)
    return data


def load_tokenizer(folder: Path, name: str):
    """The `tokenizers` Tokenizer saved as FOLDER/NAME, without padding or truncation; one line when broken."""
    from tokenizers import Tokenizer

    path = inside(folder, name)
    if not path.is_file():
        raise ExportFolderError(f"{folder} has no {name}", hint="re-run onnxpipe export")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for any broken file
        raise ExportFolderError(f"{path} is not a usable tokenizer: {_first_line(exc)}", hint=_REEXPORT) from None
    tok.no_padding()  # the tasks pad each batch to its own longest row
    tok.no_truncation()
    return tok


def unk_remapped(ids: list[int], unk_remap: dict[str, int] | None) -> list[int]:
    """IDS with every id at or past unk_remap["from_id"] made unk_remap["unk_id"]: the manifest's record for
    SentencePiece pieces that the model's vocabulary lacks (Marian, M2M100; export.tokenizer.marian_side)."""
    if not unk_remap:
        return ids  # nearly every export: no copy per record on the encode path
    first, unk = unk_remap["from_id"], unk_remap["unk_id"]
    return [unk if i >= first else i for i in ids]


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


class ExportedModel:
    """What the tasks need from an export. Sessions are made on first use and then reused."""

    def __init__(self, folder: Path, device: Device | str = "auto", threads: int | None = None):
        self.folder = Path(folder)
        self.device = device if isinstance(device, Device) else parse_device(device)  # a usage error comes first
        self.manifest: dict[str, Any] = read_manifest(self.folder)
        for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
            read_json_file(self.folder, name)  # a broken one fails here, in one line, not deep inside a task
        self.threads = cap_threads(threads)  # the CLI warned already; the API warns in load()
        self.provider: str | None = None  # set by the first session
        self.device_note: str | None = None  # one line for stderr saying what runs where, and why
        self._sessions: dict[str, Any] = {}
        self._options = None
        # arrays that the sessions read in place (SessionOptions.add_initializer): they live as long as the model
        self.session_arrays: list[Any] = []

    # --- what the export declares -----------------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest.get("name") or self.folder.name

    @property
    def task(self) -> str | None:
        return self.manifest.get("task")

    @cached_property
    def config(self) -> dict[str, Any]:
        return read_json_file(self.folder, "config.json")

    @property
    def special_tokens(self) -> dict[str, Any]:
        return self.manifest.get("special_tokens") or {}

    @property
    def labels(self) -> list[str]:
        labels = self.manifest.get("labels")
        if labels:
            return list(labels)
        id2label = self.config.get("id2label") or {}
        return [id2label[str(i)] for i in range(len(id2label))]

    @cached_property
    def tokenizer(self):
        return self._load_tokenizer((self.manifest.get("tokenizer") or {}).get("file") or "tokenizer.json")

    @cached_property
    def target_tokenizer(self):
        """The target-side tokenizer (seq2seq exports whose source and target vocabularies differ)."""
        name = (self.manifest.get("tokenizer") or {}).get("target_file")
        return self._load_tokenizer(name) if name else self.tokenizer

    def _load_tokenizer(self, name: str):
        return load_tokenizer(self.folder, name)

    def graph_ids(self, ids: list[int]) -> list[int]:
        """tokenizer.json's IDS as the graph takes them: an id past the vocabulary (a piece that vocab.json
        lacks, which the slow tokenizer writes as <unk>) would index out of the embedding table."""
        return unk_remapped(ids, (self.manifest.get("tokenizer") or {}).get("unk_remap"))

    @cached_property
    def tokenizer_config(self) -> dict[str, Any]:
        return read_json_file(self.folder, "tokenizer_config.json")

    @cached_property
    def max_length(self) -> int:
        """The longest input in tokens: the tokenizer's limit, capped by the position embeddings."""
        limits = []
        declared = (self.manifest.get("tokenizer") or {}).get("max_length")
        if isinstance(declared, int) and 0 < declared < (1 << 20):
            limits.append(declared)
        cfg = self.config
        positions = cfg.get("max_position_embeddings") or cfg.get("n_positions") or cfg.get("max_seq_len")
        if isinstance(positions, int) and positions > 0:
            if cfg.get("model_type") in _POSITION_OFFSET_TYPES:
                positions -= (cfg.get("pad_token_id") or 0) + 1
            limits.append(positions)
        return min(limits) if limits else 512

    # --- sessions ---------------------------------------------------------------------------
    def session(self, name: str = "model"):
        """The ONNX Runtime session for the graph the manifest lists under `files[name]`."""
        if name not in self._sessions:
            files = self.manifest.get("files") or {}
            if name not in files:
                raise ModelNotFoundError(
                    f"export {self.name} has no {name!r} graph (it has: {', '.join(files) or 'none'})",
                    hint="is this the right model for this command?",
                )
            if self.device.kind == "cpu":
                self._check_graph_device("cpu")  # before the session: a CUDA graph is not tried on the CPU
            session = self._make_session(inside(self.folder, files[name]))
            self._check_graph_device("cuda" if self.provider == CUDA else "cpu")
            self._sessions[name] = session
        return self._sessions[name]

    def _check_graph_device(self, runs_on: str) -> None:
        """Refuse a graph made for another device than RUNS_ON: onnxpipe's CUDA graph (fp16, one key/value
        buffer) anywhere but on CUDA, and its fused CPU graph on CUDA when --device cuda asked for it
        (its float32 GroupQueryAttention would run on the CPU, with copies at every layer)."""
        from onnxpipe.manifest import graph_device

        made_for = graph_device(self.manifest)
        if made_for in ("any", runs_on) or (made_for == "cpu" and self.device.kind != "cuda"):
            return  # --device auto that lands a CPU graph on CUDA: CausalLM notes it
        source = self.manifest.get("source") or {}
        origin = source.get("path") or source.get("id") or "SOURCE"
        what = "onnxpipe's CUDA graph (fp16)" if made_for == "cuda" else "onnxpipe's fused CPU graph (float32)"
        raise DeviceError(
            f"{self.name} is {what}, made for {made_for.upper()}, not for the {runs_on.upper()} it would run on here",
            hint=f"export it for this device: onnxpipe export {origin} --device {runs_on} --name {self.name}-{runs_on}"
            + (", or run it with --device cuda on a GPU" if made_for == "cuda" else ", or run it with --device cpu"),
        )

    def session_options(self):
        """One SessionOptions for every session of this model (threads, quiet logging)."""
        if self._options is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.log_severity_level = 3
            if self.threads:
                so.intra_op_num_threads = int(self.threads)
            self._options = so
        return self._options

    def _make_session(self, path: Path):
        from onnxpipe.runtime.sessions import make_session

        if not path.is_file():
            raise ModelNotFoundError(f"{path} is missing", hint="re-run onnxpipe export")
        if path.stat().st_size == 0:
            raise ExportFolderError(f"{path} is empty", hint=_REEXPORT)
        fell_back: list[str] = []
        try:
            session = make_session(path, self.device, options=self.session_options(), on_fallback=fell_back.append)
        except OnnxpipeError:  # --device cuda where CUDA cannot run
            raise
        except Exception as exc:  # onnxruntime's own exception types: truncated protobuf, data outside the folder...
            if self.manifest.get("precision") == "bf16" and "NOT_IMPLEMENTED" in str(exc):
                raise DeviceError(  # ONNX Runtime's CPU provider has no bfloat16 kernels
                    f"{self.name} is a bf16 export, which runs on CUDA only (this session is on the CPU)",
                    hint="run it with --device cuda on a GPU, or export the checkpoint again without --bf16",
                ) from None
            raise ExportFolderError(f"ONNX Runtime cannot load {path}: {_first_line(exc)}", hint=_REEXPORT) from None
        got = session.get_providers()[0]
        if fell_back:
            self.device_note = f"CUDA not usable ({cuda_failure_reason(fell_back[0])}); running {self.name} on CPU"
        elif self.provider is None:
            where = f"CUDA device {self.device.index}" if got == CUDA else "CPU"
            self.device_note = f"running {self.name} on {where}"
        self.provider = got
        return session

    @property
    def runs_on(self) -> Device | None:
        """The device the sessions really run on (CUDA device N, or the CPU); None before the first session."""
        if self.provider is None:
            return None
        return Device("cuda", self.device.index) if self.provider == CUDA else Device("cpu")

    def check_task(self, *tasks: str) -> None:
        """Refuse an export made for another task, naming the command that fits it."""
        if self.task not in tasks:
            name = self.folder.name  # what -m finds it by (the manifest's name may be an older one)
            raise UsageError(
                f"{name} is a {self.task} export; this command needs a {' or '.join(tasks)} export",
                hint=f"run onnxpipe {_commands_for(self.task)} -m {name}, "
                f"or export the checkpoint again with --task {tasks[0]}",
            )


def _commands_for(task: str | None) -> str:
    """The commands that run TASK's exports (the registry's), for messages that say what to do next."""
    from onnxpipe.registry import FAMILIES

    return " or onnxpipe ".join(f.name for f in FAMILIES.values() if task in f.export_tasks) or "info"


def load_model(ref: str | Path, device: Device | str = "auto", threads: int | None = None) -> ExportedModel:
    """`-m REF` (a path or a name in the export home) -> ExportedModel. Sessions come later, on use."""
    return ExportedModel(resolve_model(ref), device=device, threads=threads)
