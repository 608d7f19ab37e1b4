"""onnxpipe: stream text through exported Transformer models with ONNX Runtime.

import onnxpipe
clf = onnxpipe.load("sentiment")     # see onnxpipe.api
clf(["great film", "dull"])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Pipeline", "Result", "__version__", "load"]

if TYPE_CHECKING:
    from onnxpipe.api import Pipeline, Result, load


def __getattr__(name: str) -> Any:
    # The API is imported on first use, so `onnxpipe --help` (which imports this package) stays fast.
    if name in ("load", "Pipeline", "Result"):
        from onnxpipe import api

        return getattr(api, name)
    raise AttributeError(f"module 'onnxpipe' has no attribute {name!r}")
