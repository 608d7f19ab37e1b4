"""Keep torch, transformers and optimum from talking on stderr (and stdout) unless -v."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

from onnxpipe.console import VERBOSITY

_LOGGERS = ("transformers", "optimum", "torch", "torch.onnx", "onnx", "onnxruntime", "root", "huggingface_hub")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[io.StringIO]:
    """Silence library logging, warnings and prints; with -v let them through."""
    buffer = io.StringIO()
    if VERBOSITY["level"] >= 1:
        yield buffer
        return
    levels = {}
    for name in _LOGGERS:
        logger = logging.getLogger(name if name != "root" else None)
        levels[name] = logger.level
        logger.setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    except ImportError:
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            try:
                yield buffer
            finally:
                for name, level in levels.items():
                    logging.getLogger(name if name != "root" else None).setLevel(level)
