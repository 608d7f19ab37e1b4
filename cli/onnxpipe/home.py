"""Where exports live, and how `-m MODEL` finds one.

A reference is a path first (a folder holding `onnxpipe.json`), then a name in the export home.
The export home is `$ONNXPIPE_HOME`, else `$XDG_DATA_HOME/onnxpipe/exports`
(`~/.local/share/onnxpipe/exports`).
"""

from __future__ import annotations

import os
from pathlib import Path

from onnxpipe.errors import ModelNotFoundError, UsageError

MANIFEST_NAME = "onnxpipe.json"


def export_home() -> Path:
    env = os.environ.get("ONNXPIPE_HOME")
    if env:
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "onnxpipe" / "exports"


def list_exports(home: Path | None = None) -> list[Path]:
    """Export folders in the home, sorted by name.

    Folders without a manifest are skipped, and so are hidden ones: the temporaries of a running or
    killed export, which already hold a manifest before they are renamed into place.
    """
    home = home or export_home()
    try:
        if not home.is_dir():
            return []
        return sorted(p for p in home.iterdir() if not p.name.startswith(".") and _has_manifest_file(p))
    except OSError:  # an unreadable home, or a name too long for the file system
        return []


def resolve_model(ref: str | os.PathLike) -> Path:
    """Turn `-m REF` into an export folder, or fail with the names that exist."""
    text = str(ref)
    if not text.strip():  # not '.': an empty -m (an unset shell variable) is a mistake, not this folder
        raise UsageError("the model is empty: give an export name or folder", hint="onnxpipe models lists the exports")
    if len(text) > 1 and text.endswith(("/", os.sep)):  # `-m sentiment/` (shell completion adds the slash)
        text = text.rstrip("/" + os.sep) or text
    try:
        return _resolve(text)
    except OSError as exc:  # ENAMETOOLONG, ELOOP, EACCES...
        raise ModelNotFoundError(
            f"cannot use {str(ref)[:80]!r} as an export: {exc.strerror or exc}",
            hint="give a shorter path or an export name",
        ) from None


def _resolve(ref: str) -> Path:
    path = Path(ref).expanduser()
    if _has_manifest_file(path):
        return path
    named = export_home() / ref
    # A bare name that is also some folder here (the checkpoint `sentiment/` beside the export
    # `sentiment`) means the export: only an export folder wins over a name in the home.
    if os.sep not in ref and "/" not in ref and ref not in (".", "..") and _has_manifest_file(named):
        return named
    if path.exists():
        raise ModelNotFoundError(
            f"{path} is not an onnxpipe export (no {MANIFEST_NAME})",
            hint=f"create one with: onnxpipe export {path}",
        )
    names = [p.name for p in list_exports()]
    known = ", ".join(names) if names else "none yet"
    raise ModelNotFoundError(
        f"no export named {ref!r} in {export_home()} (known: {known})",
        hint="give a path, set ONNXPIPE_HOME, or run onnxpipe export",
    )


def _has_manifest_file(folder: Path) -> bool:
    """FOLDER holds a manifest (a link too: read_manifest then says where it leads). Never raises."""
    return os.path.lexists(folder / MANIFEST_NAME)
