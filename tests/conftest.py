"""Session fixtures: tiny random checkpoints and their exports, built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Each test gets its own export home, so nothing leaks between tests or from the user."""
    monkeypatch.setenv("ONNXPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ONNXPIPE_DEVICE", raising=False)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(arch, task=None, **kw) -> folder of a tiny random HF checkpoint (cached)."""
    cache: dict = {}

    def make(arch: str, task: str | None = None, **kw) -> Path:
        key = (arch, task, tuple(sorted(kw.items())))
        if key not in cache:
            name = "-".join([arch, task or "default", *(f"{k}={v}" for k, v in sorted(kw.items()))])
            cache[key] = tiny_models.build(arch, tmp_path_factory.mktemp("ckpt") / name, task=task, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def exported(tmp_path_factory, checkpoint):
    """exported(arch, task=None, **export_options) -> export folder of the tiny checkpoint (cached)."""
    cache: dict = {}

    def make(arch: str, task: str | None = None, checkpoint_kw: dict | None = None, **options) -> Path:
        key = (arch, task, tuple(sorted((checkpoint_kw or {}).items())), tuple(sorted(options.items())))
        if key not in cache:
            from onnxpipe.export import export_model

            source = checkpoint(arch, task, **(checkpoint_kw or {}))
            out = tmp_path_factory.mktemp("exports") / f"{arch}-{task or 'default'}"
            export_model(source, out, task=task, **options)
            cache[key] = out
        return cache[key]

    return make
