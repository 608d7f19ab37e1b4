"""A batch job's plan: the input files (expanded from files, folders and globs) and the output shard of each.

Every engine runs the same plan. A shard's output is named after its input's path relative to the inputs'
common folder, so two `a.txt` in different folders never collide, and nothing is written outside DIR.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from onnxpipe.errors import UsageError

KINDS = ("text", "jsonl", "csv", "tsv", "parquet")
_KIND_OF_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
OUTPUT_FORMATS = ("jsonl", "parquet")
_GLOB_MAGIC = set("*?[")


@dataclass(frozen=True)
class Shard:
    """One input file and its output shard.

    `source` is the input path as the user gave it (a folder's files joined to the folder as given):
    what the output records' `_source` says. `kind` is how it is read (by extension: .jsonl/.ndjson,
    .csv, .tsv, .parquet, anything else text). `key` is the path relative to the inputs' common folder
    (unique in the plan, POSIX separators); `output` the final output file, DIR/key + .jsonl or .parquet.
    """

    source: Path
    kind: str
    output: Path
    key: str

    @property
    def temp_prefix(self) -> str:
        """The start of this shard's temporary file names in DIR (`.tmp-<hash of key>-`)."""
        return f".tmp-{hashlib.sha256(self.key.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}-"


@dataclass(frozen=True)
class Plan:
    """The shards of a job, sorted by key, and the folder their outputs go to."""

    output_dir: Path
    output_format: str
    shards: tuple[Shard, ...]

    @property
    def kinds(self) -> set[str]:
        return {s.kind for s in self.shards}


def kind_of(path: Path) -> str:
    return _KIND_OF_SUFFIX.get(path.suffix.lower(), "text")


def expand_inputs(inputs: Sequence[str], output_dir: Path) -> list[Path]:
    """INPUTS (files, folders, globs) as files: folders recursively and sorted, hidden files and folders
    (a name starting with '.') and OUTPUT_DIR itself skipped; each file once, in the order first met."""
    out_dir = output_dir.resolve()
    files: list[Path] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        real = path.resolve()
        if real not in seen:
            seen.add(real)
            files.append(path)

    for given in inputs:
        if given == "-":
            raise UsageError("batch reads files, not stdin: give files, folders or globs")
        path = Path(given)
        if not os.path.lexists(given) and _GLOB_MAGIC & set(given):
            matches = sorted(glob.glob(given, recursive=True))
            if not matches:
                raise UsageError(f"no file matches {given}")
            paths = [Path(m) for m in matches]
        elif not path.exists():
            raise UsageError(f"no such file or folder: {given}")
        else:
            paths = [path]
        for p in paths:
            if p.is_dir():
                for f in _walk(p, out_dir):
                    add(f)
            elif p.is_file():
                if _inside(p.resolve(), out_dir):
                    raise UsageError(f"input {p} is inside the output folder {output_dir}")
                add(p)
            elif not p.is_dir():
                raise UsageError(f"{p} is not a regular file or a folder")
    return files


def _walk(folder: Path, out_dir: Path) -> list[Path]:
    if folder.resolve() == out_dir:
        raise UsageError(f"the input folder {folder} is the output folder")
    found: list[Path] = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and Path(root, d).resolve() != out_dir)
        for name in sorted(names):
            p = Path(root, name)
            if not name.startswith(".") and p.is_file():
                found.append(p)
    return found


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def plan_job(inputs: Sequence[str], output_dir: str | Path, output_format: str = "jsonl") -> Plan:
    """The plan for INPUTS into OUTPUT_DIR: one Shard per input file, sorted by key.

    Refused (UsageError): no input file, an input inside OUTPUT_DIR, the output folder being an input
    folder, an unknown output format.
    """
    if output_format not in OUTPUT_FORMATS:
        raise UsageError(f"unknown output format {output_format!r}", hint="one of: " + ", ".join(OUTPUT_FORMATS))
    out_dir = Path(output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--output-dir {out_dir} is a file, not a folder")
    files = expand_inputs(inputs, out_dir)
    if not files:
        raise UsageError("no input files (folders hold only hidden files, or nothing)")
    absolute = [Path(os.path.abspath(f)) for f in files]  # symlinks keep the names they were given under
    root = Path(os.path.commonpath([str(a.parent) for a in absolute]))
    suffix = "." + output_format
    shards = []
    for given, path in zip(files, absolute):
        key = path.relative_to(root).as_posix()
        shards.append(Shard(source=given, kind=kind_of(path), output=out_dir / (key + suffix), key=key))
    shards.sort(key=lambda s: s.key)
    return Plan(output_dir=out_dir, output_format=output_format, shards=tuple(shards))
