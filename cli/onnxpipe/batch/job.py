"""The job manifest in the output folder: what a job runs, so that a rerun resumes it or refuses.

DIR/onnxpipe-batch.json is written (atomically) before any shard, with the task, the model, the export's
checksum, the task options and how the inputs are read; `_SUCCESS` appears when every shard of the
plan is done. A rerun with the same settings skips the shards whose output exists (a shard is renamed
into place only when complete) and redoes the others; a rerun with other settings refuses, naming what
differs, unless --force, which redoes every shard. One run at a time per DIR (a lock file).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from onnxpipe.batch.plan import Plan, Shard
from onnxpipe.batch.shards import remove_temporaries
from onnxpipe.errors import UsageError

MANIFEST = "onnxpipe-batch.json"
SUCCESS = "_SUCCESS"
LOCK = ".onnxpipe-batch.lock"
FORMAT = 1
_COMPARED = ("task", "export_checksum", "options", "input")


@dataclass
class Job:
    """What a job runs. `options` are the task's options (the API's names), `input` how inputs are
    read and written (field, column, output format). Engine settings (workers, threads, device,
    batch size) are not part of it: they do not change the records."""

    task: str
    model: str
    export: str
    export_checksum: str
    options: dict[str, Any]
    input: dict[str, Any]
    engine: str = "local"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self, status: str, shards: int) -> dict[str, Any]:
        return _plain(
            {
                "format": FORMAT,
                "status": status,
                "task": self.task,
                "model": self.model,
                "export": self.export,
                "export_checksum": self.export_checksum,
                "options": self.options,
                "input": self.input,
                "engine": self.engine,
                "shards": shards,
                **self.extra,
            }
        )


def _plain(value: Any) -> Any:
    """As JSON holds it (tuples are lists), so that a manifest read back compares equal."""
    return json.loads(json.dumps(value, sort_keys=True))


def export_checksum(folder: Path) -> str:
    """sha256 over every regular file of the export (its name and bytes), in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(path.relative_to(folder).as_posix().encode("utf-8", "surrogateescape") + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


class JobRun:
    """One run of a job in its output folder: holds the lock while it lasts (a context manager).

    `done` are the keys of the shards whose output already exists (after a --force: none)."""

    def __init__(self, plan: Plan, job: Job, force: bool = False):
        self.plan = plan
        self.job = job
        self.force = force
        self.done: set[str] = set()
        self._lock: IO[bytes] | None = None

    def __enter__(self) -> JobRun:
        out = self.plan.output_dir
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot make --output-dir {out}: {exc.strerror or exc}") from None
        self._lock = open(out / LOCK, "ab")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise UsageError(f"another onnxpipe batch is running on {out}") from None
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the lock (so does any death of the process)
            self._lock = None

    def _start(self) -> None:
        out = self.plan.output_dir
        manifest = out / MANIFEST
        previous = _read(manifest)
        if previous is None and not self.force:
            foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name != MANIFEST)
            if foreign:
                raise UsageError(
                    f"--output-dir {out} holds files but no {MANIFEST} (not a batch job's folder)",
                    hint="give an empty or new folder, or --force to write into it",
                )
        if previous is not None and not self.force:
            differs = _differences(previous, self.job.to_json("running", 0))
            if differs:
                raise UsageError(
                    f"{out} holds a job with other settings: {'; '.join(differs)}",
                    hint="rerun with --force to redo every shard, or give another --output-dir",
                )
        remove_temporaries(out)
        _remove(out / SUCCESS)
        _write_atomic(manifest, self.job.to_json("running", len(self.plan.shards)))
        if not self.force:
            self.done = {s.key for s in self.plan.shards if s.output.is_file()}

    def todo(self) -> list[Shard]:
        return [s for s in self.plan.shards if s.key not in self.done]

    def finish(self) -> None:
        """Every shard is done: the manifest says so, and _SUCCESS appears (last)."""
        out = self.plan.output_dir
        _write_atomic(out / MANIFEST, self.job.to_json("done", len(self.plan.shards)))
        _write_atomic(out / SUCCESS, {"shards": len(self.plan.shards)})


def _differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    out = []
    for key in _COMPARED:
        a, b = before.get(key), now.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    out.append(f"{key}.{name} was {_show(a.get(name))}, now {_show(b.get(name))}")
        elif key == "export_checksum":
            out.append(f"the export differs (was {before.get('export')}, checksum {str(a)[:12]}; now {str(b)[:12]})")
        else:
            out.append(f"{key} was {_show(a)}, now {_show(b)}")
    return out


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {exc}", hint="--force starts the job again") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a batch job manifest", hint="--force starts the job again")
    return data


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    temp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(temp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
