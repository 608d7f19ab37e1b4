"""What the peer benchmarks share: one process per system with its own peak RSS, the machine, the versions.

A system runs in a child process that the harness waits for with os.wait4, so the peak RSS is that
process's alone (RUSAGE_CHILDREN would be the maximum over every child so far).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(REPO / "cli"))

ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "ONNXPIPE_HOME": str(REPO / "exports"),
}


@dataclass
class Process:
    returncode: int
    stdout: bytes
    stderr: str
    wall: float  # seconds from spawn to exit
    first_line: float | None  # seconds from spawn to the first byte of stdout
    max_rss_mib: float


def run(args: list[str], stdin: bytes | None = None, stdout_path: Path | None = None, check: bool = True) -> Process:
    """Run ARGS to the end; its wall time, time to first output, stderr and peak RSS (MiB)."""
    env = {**os.environ, **ENV}
    out = open(stdout_path, "wb") if stdout_path else subprocess.PIPE
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.PIPE, env=env, cwd=REPO)
    first = None
    chunks = []
    errors: list[bytes] = []
    reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
    reader.start()
    try:
        if stdin is not None:
            proc.stdin.write(stdin)
        proc.stdin.close()
        if stdout_path is None:
            chunk = proc.stdout.read1(1 << 16)
            first = time.perf_counter() - start if chunk else None
            while chunk:
                chunks.append(chunk)
                chunk = proc.stdout.read1(1 << 16)
        reader.join()
        stderr = b"".join(errors).decode("utf-8", "replace")
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    finally:
        if stdout_path:
            out.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = Process(proc.returncode, b"".join(chunks), stderr, wall, first, usage.ru_maxrss / 1024)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:6])} ... exited {result.returncode}:\n{stderr[-2000:]}")
    return result


def child_json(args: list[str]) -> tuple[dict, Process]:
    """Run a child that prints one JSON object as its last stdout line."""
    proc = run(args)
    return json.loads(proc.stdout.decode().strip().splitlines()[-1]), proc


def machine() -> dict:
    from onnxpipe.measure.speed import machine_info

    return machine_info()


def peak_rss_mb() -> float:
    """This process's own high-water RSS (VmHWM), for a child to report about itself.

    Linux carries ru_maxrss over fork and exec, so `run`'s wait4 figure is the child's only while
    the parent stays smaller than it; a parent that loads a model first must let the child say.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages: on a shared machine, how busy the neighbours were."""
    return [round(x, 2) for x in os.getloadavg()]


def versions(*names: str) -> dict[str, str | None]:
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, report: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path


def mean_sd(values: list[float]) -> tuple[float, float]:
    import statistics

    if not values:
        return 0.0, 0.0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def generate_left_padded(
    model, prompts: list[list[int]], batch: int, new_tokens: int, pad: int, device=None, **extra
) -> int:
    """A transformers-style MODEL's generate (PyTorch, or optimum's ORTModel) over PROMPTS (token ids) in
    batches of BATCH rows, left-padded with PAD: greedy, exactly NEW_TOKENS new tokens a row (EXTRA goes to
    generate). Returns the new tokens made. generate.py and gpu_check.py time the same loop."""
    import torch

    made = 0
    for lo in range(0, len(prompts), batch):
        rows = prompts[lo : lo + batch]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                **extra,
            )
        made += (out.shape[1] - width) * len(rows)
    return made


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine_lines(info: dict, vers: dict) -> list[str]:
    gpu = ", ".join(info["gpu"]) if info.get("gpu") else "none"
    return [
        f"- machine: {info['cpu']}, {info['cores']} cores / {info['logical_cpus']} logical CPUs"
        f" ({info.get('affinity')} usable), {info['memory_gib']} GiB, AVX512-VNNI {'yes' if info.get('avx512_vnni') else 'no'},"
        f" GPU {gpu}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if v),
    ]
