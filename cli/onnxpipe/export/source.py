"""Where a checkpoint comes from: a local folder, a `.gguf` file or a Hugging Face Hub id.

Every source ends as a local Hugging Face folder plus a provenance record for the manifest.
A folder is checked before anything heavy runs, so a truncated or partial checkpoint fails with
one line naming the bad file instead of a traceback from deep inside torch.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxpipe.errors import SourceError

# A hub id: "name" or "owner/name", no path separators beyond one, nothing that looks like a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
# Loading a pickle runs whatever code it holds: onnxpipe reads safetensors only.
PICKLE_HINT = (
    "if you trust where it came from, load it with transformers and save it again with "
    "save_pretrained(DIR, safe_serialization=True)"
)
# What a hub export needs (and the safetensors weights).
_HUB_FILES = ["*.json", "*.txt", "*.model", "*.spm", "*.jinja", "*.tiktoken", "*.py"]


@dataclass
class Source:
    """A checkpoint folder ready for transformers, and where it came from."""

    folder: Path
    record: dict[str, Any] = field(default_factory=dict)
    weights: list[Path] = field(default_factory=list)

    @property
    def use_safetensors(self) -> bool:
        return any(p.suffix == ".safetensors" for p in self.weights)


def sha256_files(paths: list[Path]) -> str:
    """One digest over the files in order (a sharded checkpoint hashes as one)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def resolve_source(source: str | Path, workdir: Path, revision: str | None = None) -> Source:
    """Turn SOURCE into a checked local folder. WORKDIR receives what a .gguf converts into."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        src = check_folder(path)
        src.record = {"kind": "folder", "path": str(path.resolve()), "sha256": sha256_files(src.weights)}
        return src
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise SourceError(f"{path}: no such GGUF file")
        return _from_gguf(path, workdir)
    if path.exists():
        raise SourceError(
            f"{path} is neither a checkpoint folder nor a .gguf file",
            hint="give a Hugging Face folder (config.json + weights), a .gguf file or a hub id",
        )
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        return _from_hub(text, revision)
    raise SourceError(f"{text}: no such folder or file", hint="give a local folder, a .gguf file or a hub id")


def check_folder(folder: Path) -> Source:
    """Fail early, naming the file, on a folder transformers would choke on."""
    config = folder / "config.json"
    if not config.is_file():
        raise SourceError(f"{config} is missing: {folder} is not a Hugging Face checkpoint folder")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"{config} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{config} does not hold a JSON object")
    weights = find_weights(folder)
    for path in weights:
        if path.suffix == ".safetensors":
            check_safetensors(path)
        elif path.stat().st_size == 0:
            raise SourceError(f"{path} is empty")
    return Source(folder=folder, weights=weights)


def find_weights(folder: Path) -> list[Path]:
    """The weight files transformers would load: safetensors only.

    A pickled `pytorch_model.bin` runs code when it is loaded, so it is refused, never opened."""
    if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
        for name in ("pytorch_model.bin", "pytorch_model.bin.index.json"):
            if (folder / name).is_file():
                raise SourceError(
                    f"{folder / name}: unsafe pickle checkpoint; convert it to safetensors", hint=PICKLE_HINT
                )
    for index_name in ("model.safetensors.index.json",):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
                raise SourceError(f"{index} is not a valid weight index ({exc})") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise SourceError(f"{folder / missing[0]} is missing (listed in {index.name}): partial checkpoint")
            return [folder / s for s in shards]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise SourceError(
        f"{folder} has no weights (model.safetensors)",
        hint="copy the weights next to config.json",
    )


def check_safetensors(path: Path) -> None:
    """The header says how long the file must be; a truncated download is shorter."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path} is not a valid safetensors file ({exc})", hint="re-download it") from None
    if 8 + header_len + end != size:
        raise SourceError(
            f"{path} is truncated or corrupt ({size} bytes, the header promises {8 + header_len + end})",
            hint="re-download it",
        )


def _from_gguf(path: Path, workdir: Path) -> Source:
    from onnxpipe.export.gguf import gguf_to_checkpoint

    folder = gguf_to_checkpoint(path, workdir)
    src = check_folder(Path(folder))
    src.record = {"kind": "gguf", "path": str(path.resolve()), "sha256": sha256_files([path])}
    return src


def _from_hub(repo_id: str, revision: str | None) -> Source:
    """Fetch config, tokenizer and weights (safetensors when the repository has them)."""
    try:
        import huggingface_hub
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError:  # pragma: no cover - comes with transformers
        raise SourceError(f"{repo_id}: no such folder or file") from None

    offline_hint = f"download it where the hub is reachable and pass the local folder, e.g. onnxpipe export ./{repo_id.split('/')[-1]}"
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        # Offline mode still serves a complete cached snapshot.
        try:
            folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        except Exception:
            raise SourceError(
                f"{repo_id!r} is not a local folder and the Hugging Face Hub is offline (HF_HUB_OFFLINE is set)",
                hint=offline_hint,
            ) from None
    else:
        try:
            api = huggingface_hub.HfApi()
            files = api.list_repo_files(repo_id, revision=revision)
            if not any(f.endswith(".safetensors") for f in files):
                raise SourceError(
                    f"{repo_id!r} has only pickled weights (*.bin): unsafe pickle checkpoint; "
                    "convert it to safetensors",
                    hint=PICKLE_HINT,
                )
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_FILES + ["*.safetensors"]))
        except SourceError:
            raise
        except huggingface_hub.utils.RepositoryNotFoundError:
            raise SourceError(
                f"{repo_id!r} is not a local folder and no such repository on the Hugging Face Hub"
            ) from None
        except huggingface_hub.utils.RevisionNotFoundError:
            raise SourceError(f"{repo_id!r} has no revision {revision!r} on the Hugging Face Hub") from None
        except huggingface_hub.utils.GatedRepoError:
            raise SourceError(
                f"{repo_id!r} is gated on the Hugging Face Hub", hint="log in with `hf auth login`"
            ) from None
        except (HfHubHTTPError, OSError) as exc:
            raise SourceError(
                f"cannot fetch {repo_id!r} from the Hugging Face Hub ({type(exc).__name__})", hint=offline_hint
            ) from None
        except Exception as exc:  # requests/httpx connection errors differ between hub versions
            raise SourceError(
                f"cannot reach the Hugging Face Hub for {repo_id!r} ({type(exc).__name__})", hint=offline_hint
            ) from None
    src = check_folder(folder)
    src.record = {
        "kind": "hub",
        "id": repo_id,
        "revision": folder.name if len(folder.name) == 40 else revision,
        "sha256": sha256_files(src.weights),
    }
    return src
