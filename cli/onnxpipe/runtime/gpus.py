"""How many CUDA devices this process can see, and which one each of several workers gets.

The count comes from the CUDA driver itself (libcuda's cuDeviceGetCount), which honours
CUDA_VISIBLE_DEVICES and needs neither torch nor a CUDA toolkit: where the driver is missing the
count is 0. Whether ONNX Runtime can then *run* on a device is still read back from its session.
"""

from __future__ import annotations

import ctypes
import functools
import re

_SPREAD = re.compile(r"\s*(?:cuda|gpu)\s*", re.IGNORECASE)  # a --device with no index: workers may be spread


@functools.cache
def cuda_device_count() -> int:
    """CUDA devices visible to this process (0 without a driver or a GPU)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    try:
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
    except AttributeError:
        return 0
    return int(count.value)


def spreads(device: str) -> bool:
    """`--device cuda` (or gpu) with no index: several workers may go to several GPUs."""
    return _SPREAD.fullmatch(device or "") is not None


def worker_devices(device: str, workers: int, visible: int | None = None) -> list[str]:
    """The --device of each of WORKERS workers: worker i gets cuda:(i mod visible GPUs) when DEVICE is
    a bare `cuda`, else DEVICE as given (`cuda:1` pins them all; auto and cpu are left alone).

    With no GPU visible the bare `cuda` stays: each worker then fails with the session's own reason.
    """
    if not spreads(device):
        return [device] * workers
    visible = cuda_device_count() if visible is None else visible
    if visible <= 0:
        return [device] * workers
    return [f"cuda:{i % visible}" for i in range(workers)]
