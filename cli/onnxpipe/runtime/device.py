"""`--device auto|cpu|cuda[:N]` -> ONNX Runtime providers, and the check of what a session really got.

onnxruntime-gpu lists CUDAExecutionProvider among the available providers even where the CUDA
libraries cannot load; the session then silently runs on CPU. So the truth is read back from
`session.get_providers()` after the session exists, and the C++ loader's multi-line complaints on
fd 2 are captured and boiled down to one line.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from onnxpipe.errors import DeviceError, UsageError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class Device:
    kind: str  # "auto" | "cpu" | "cuda"
    index: int = 0

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else self.kind


def parse_device(value: str | None) -> Device:
    """'auto', 'cpu', 'cuda', 'cuda:1', 'gpu' -> Device; anything else is a usage error."""
    text = (value or "auto").strip().lower()
    if text in ("auto", "cpu"):
        return Device(text)
    match = re.fullmatch(r"(?:cuda|gpu)(?::([0-9]+))?", text)  # ASCII digits: int() also reads '١' as 1
    if not match:
        raise UsageError(f"unknown device {value!r}", hint="use auto, cpu, cuda or cuda:N")
    return Device("cuda", int(match.group(1) or 0))


def providers_for(device: Device, available: list[str]) -> list:
    """The providers list to ask a session for (CPU always last, as the fallback ORT needs)."""
    if device.kind == "cpu" or (device.kind == "auto" and CUDA not in available):
        return [CPU]
    if device.kind == "cuda" and CUDA not in available:
        raise DeviceError(
            f"--device cuda: this onnxruntime build has no CUDA provider (available: {', '.join(available)})",
            hint="install onnxruntime-gpu, or use --device cpu",
        )
    if device.kind == "cuda":
        from onnxpipe.runtime.gpus import cuda_device_count

        visible = cuda_device_count()  # 0: no driver to ask; the session then says what is wrong
        if visible and device.index >= visible:
            raise DeviceError(
                f"--device {device}: there is no such GPU here ({visible} visible: "
                f"{', '.join(f'cuda:{i}' for i in range(visible))})",
                hint="pick one of those, or check CUDA_VISIBLE_DEVICES",
            )
    # use_tf32 0: ONNX Runtime's CUDA provider computes float32 MatMul/Gemm in TF32 (10-bit mantissa) by
    # default, so an fp32 export would neither match its CPU run (embeddings within 1e-3, the same greedy
    # ids) nor be the fp32 its manifest says; speed on a GPU is what the --fp16/--bf16 exports are for.
    return [(CUDA, {"device_id": device.index, "use_tf32": 0}), CPU]


@contextmanager
def captured_stderr_fd() -> Iterator[list[str]]:
    """Redirect fd 2 (where ORT's C++ logger writes) into a buffer for the duration of the block.

    Yields a list that holds the captured text once the block has ended.
    """
    captured: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield captured
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read().decode("utf-8", "replace"))


@functools.cache
def preload_cuda_libraries() -> None:
    """Load the CUDA/cuDNN libraries of the `nvidia-*` pip packages (`onnxruntime-gpu[cuda,cudnn]`), once.

    The provider finds them only on the loader's path; `onnxruntime.preload_dlls()` loads them from
    site-packages first. What it says on failure is moot: the session's providers tell the truth.
    """
    import importlib.util

    try:
        if importlib.util.find_spec("nvidia") is None:
            return
    except (ImportError, ValueError):
        return
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception:  # a broken CUDA install: the session reports it in its own words
            pass


@contextmanager
def loading_providers() -> Iterator[list[str]]:
    """The block that makes a session which may load a GPU provider: the CUDA pip libraries preloaded,
    and what the loaders say captured (yields a list holding that text once the block has ended).

    Two channels: ORT's C++ logger writes to fd 2, and onnxruntime print()s its "EP Error ... Falling
    back" banner (and preload_dlls its complaints) to Python's stdout, which is for results only.
    """
    said = io.StringIO()
    with captured_stderr_fd() as log:
        try:
            with contextlib.redirect_stdout(said):
                preload_cuda_libraries()
                yield log
        finally:
            log.append(said.getvalue())


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def cuda_failure_reason(log: str) -> str:
    """One line out of ORT's CUDA loader noise: the missing library, or the first error message."""
    text = _ANSI.sub("", log)
    missing = re.search(r"(lib[\w.+-]+\.so[\w.]*): cannot open shared object file", text)
    if missing:
        return f"{missing.group(1)} not found"
    need = re.search(r"Require (cuDNN [^.]+\.\* and CUDA [^.]+\.\*)", text)
    if need:
        return f"needs {need.group(1)}"
    for line in text.splitlines():
        line = line.strip()
        if "CUDA" in line or "cuda" in line:
            return line.rsplit("] ", 1)[-1][:200]
    return "the CUDA provider did not load"
