"""What this machine is: CPUs and cores, NVIDIA GPUs. Read from /proc and nvidia-smi, nothing imported.

Shared by `onnxpipe doctor` (what can run here) and `onnxpipe bench` (the machine beside the figures).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any


def nvidia_gpus() -> dict[str, Any]:
    """The NVIDIA GPUs nvidia-smi sees: {nvidia_smi: its path or None, devices: [...], error: why none}."""
    smi = shutil.which("nvidia-smi")
    out: dict[str, Any] = {"nvidia_smi": smi, "devices": [], "error": None}
    if not smi:
        return out
    query = "index,name,memory.total,memory.used,driver_version"
    try:
        proc = subprocess.run(
            [smi, f"--query-gpu={query}", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        out["error"] = str(exc)
        return out
    if proc.returncode != 0:
        out["error"] = (
            (proc.stdout + proc.stderr).strip().splitlines()[0]
            if (proc.stdout + proc.stderr).strip()
            else f"nvidia-smi exited with {proc.returncode}"
        )
        return out
    for line in proc.stdout.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) == 5:
            index, name, total, used, driver = cells
            out["devices"].append(
                {
                    "index": int(index) if index.isdigit() else index,
                    "name": name,
                    "memory_total_mib": _int(total),
                    "memory_used_mib": _int(used),
                    "driver": driver,
                }
            )
    return out


def _int(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def cpuinfo() -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per logical CPU ([] where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    cpus = []
    for block in text.strip().split("\n\n"):
        entry = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            entry[key.strip()] = value.strip()
        cpus.append(entry)
    return cpus


def physical_cores() -> int | None:
    """Distinct (package, core) pairs: what ONNX Runtime counts for its default intra-op threads."""
    cores = {(c.get("physical id"), c.get("core id")) for c in cpuinfo() if "core id" in c}
    return len(cores) or None


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, a container's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def cap_threads(threads: int | None) -> int | None:
    """THREADS at most usable_cpus() (None stays None: ONNX Runtime's default).

    More intra-op threads than CPUs buy nothing: they spin and wait on each other, and 10**6 of them
    exhaust the machine before the first batch.
    """
    return None if threads is None else min(int(threads), usable_cpus())
