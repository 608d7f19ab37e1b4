"""The one place that makes ONNX Runtime sessions: provider choice, the CUDA truth check, quiet logging.

Every session in onnxpipe comes from `make_session`: the exports' graphs (runtime.model), the
key/value cache's Gather graph (runtime.kv_cache), doctor's probes, the export's validation and
CUDA probe, the benchmarks and the tests. So a fix to how sessions are made (a provider's lie, a
library to preload, a log to silence) is made once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from onnxpipe.errors import DeviceError
from onnxpipe.runtime.device import (
    CPU,
    Device,
    cuda_failure_reason,
    loading_providers,
    providers_for,
)


def make_session(
    source: str | Path | bytes,
    device: Device | None = None,
    *,
    threads: int | None = None,
    options: Any = None,
    providers: Sequence[Any] | None = None,
    on_fallback: Callable[[str], None] | None = None,
    external_data_folder: Path | None = None,
) -> Any:
    """An `onnxruntime.InferenceSession` for SOURCE (a graph file, or a serialized ModelProto) on DEVICE.

    DEVICE (None: the CPU) picks the providers, as `--device` does; PROVIDERS, when given, is the list
    asked for as it is (doctor's probe of each provider, validation on a named provider). OPTIONS is a
    SessionOptions the caller prepared (profiling, no graph optimisation, shared by a model's sessions);
    without it the session logs errors only. THREADS sets the intra-op threads.

    onnxruntime-gpu lists CUDA as available even where its libraries cannot load, and then runs on the
    CPU without a word: when a GPU provider is asked for, the CUDA pip libraries are preloaded, what the
    loaders say is captured (it would land on stdout, which is for results), and the session's providers
    are read back. Had it fallen back, a `cuda` DEVICE raises DeviceError; otherwise ON_FALLBACK receives
    the loaders' text (`device.cuda_failure_reason` boils it down to one line). EXTERNAL_DATA_FOLDER is
    where a serialized SOURCE's external tensors live (a graph edited in memory, its weights left in
    the export folder). onnxruntime's own errors
    (a truncated graph, an unknown operator) are raised as they are: the caller knows what the file was.
    """
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    if options is None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
    if external_data_folder is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(external_data_folder)
        )
    if providers is None:
        providers = providers_for(device or Device("cpu"), ort.get_available_providers())
    first = providers[0]
    wanted = first if isinstance(first, str) else first[0]
    model = str(source) if isinstance(source, Path) else source
    loading: contextlib.AbstractContextManager[list[str]] = (
        loading_providers() if wanted != CPU else contextlib.nullcontext([])
    )
    with loading as log:
        session = ort.InferenceSession(model, sess_options=options, providers=list(providers))
    if wanted != CPU and session.get_providers()[0] != wanted:
        said = "".join(log)
        if device is not None and device.kind == "cuda":
            raise DeviceError(
                f"--device {device}: CUDA cannot run here ({cuda_failure_reason(said)})",
                hint="use --device cpu, or fix the CUDA/cuDNN install",
            )
        if on_fallback is not None:
            on_fallback(said)
    return session
