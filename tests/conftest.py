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


@pytest.fixture(scope="session")
def shared_buffer_export(exported, checkpoint, tmp_path_factory):
    """onnxpipe's CUDA graph of the tiny Llama as an export that loads on the CPU: `export --device cuda`'s
    folder with the graph's float32 form (its CPU twin, export.cuda_graph) in place of the fp16 one. Its
    cache is one fixed buffer per tensor, which the CPU provider's GroupQueryAttention writes in place too."""
    import json
    import shutil

    import transformers

    from onnxpipe.export import cuda_graph
    from onnxpipe.manifest import checksums

    folder = tmp_path_factory.mktemp("shared") / "llama-shared-buffer"
    shutil.copytree(exported("llama", device="cuda"), folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint("llama")).eval()
    name, _ = cuda_graph.build(model, folder, "float32")
    manifest = json.loads((folder / "onnxpipe.json").read_text())
    assert manifest["files"]["model"] == name
    manifest.update(device="cpu", precision="fp32", checksums=checksums(folder))
    manifest["graph"]["past_dtype"] = "float32"
    (folder / "onnxpipe.json").write_text(json.dumps(manifest))
    return folder


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests unless a CUDA session really runs here.

    onnxruntime-gpu lists CUDAExecutionProvider wherever it is installed, GPU or not, so the check
    makes a session and reads back its providers (export.variants.cuda_unusable_reason). It runs only
    when gpu tests were collected: a CPU run of the suite pays nothing for it.
    """
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    from onnxpipe.export.variants import cuda_unusable_reason

    reason = cuda_unusable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"no CUDA: {reason}")
    for item in gpu_items:
        item.add_marker(skip)
