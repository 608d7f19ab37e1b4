"""Checkpoint -> validated ONNX export folder. The only place torch, transformers and optimum are imported.

Import `export_model` from here; importing this package is cheap (the heavy imports happen inside).
"""

from __future__ import annotations


def export_model(source, output, task=None, **options):
    from onnxpipe.export.core import export_model as _export_model

    return _export_model(source, output, task=task, **options)
