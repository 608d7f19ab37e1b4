"""A base install (`pip install onnxpipe`, no extras) runs every runtime command.

The wheel is built from this checkout and installed into a fresh venv with its declared dependencies
only, from the package index (pip's cache makes reruns cheap). That venv has no torch, transformers
or optimum, so a runtime import the base dependency list forgot fails here, as it would for a user
(`generate --chat` once needed jinja2, `eval --references` sacrebleu, `doctor` packaging). The exports
it runs were made by the rest of the suite's fixtures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory) -> Path:
    """bin/ of a venv holding the onnxpipe wheel and its base dependencies, nothing else."""
    pytest.importorskip("setuptools")
    root = tmp_path_factory.mktemp("base-install")
    src = root / "src"  # a copy: building in the checkout would leave build/ and egg-info there
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "cli", src / "cli", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(REPO / "man", src / "man", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "wheel"), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (root / "wheel").glob("onnxpipe-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q", "install", str(wheel)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return venv / "bin"


def _run(bin_dir: Path, *args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    environment.update(env or {})
    environment["PATH"] = f"{bin_dir}{os.pathsep}{environment.get('PATH', '')}"
    return subprocess.run(
        [str(bin_dir / "onnxpipe"), *args], input=stdin, capture_output=True, text=True, timeout=300, env=environment
    )


def test_the_base_install_has_no_export_stack(base_venv):
    probe = (
        "import importlib.util as u; print([m for m in ('torch', 'transformers', 'optimum', 'onnx') if u.find_spec(m)])"
    )
    out = subprocess.run([str(base_venv / "python"), "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


def test_classify_runs_from_the_base_install(base_venv, exported):
    folder = exported("bert", "text-classification")
    done = _run(
        base_venv,
        "classify",
        "-m",
        str(folder),
        "--device",
        "cpu",
        "--format",
        "jsonl",
        stdin="good movie\n\nbad film\n",
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["good movie", "", "bad film"]
    assert rows[0]["label"] and rows[1]["label"] is None
    assert "Traceback" not in done.stderr


def test_generate_chat_runs_from_the_base_install(base_venv, exported):
    folder = exported("llama")
    assert json.loads((folder / "onnxpipe.json").read_text())["tokenizer"]["chat_template"]
    done = _run(
        base_venv,
        "generate",
        "-m",
        str(folder),
        "--device",
        "cpu",
        "--chat",
        "--max-new-tokens",
        "4",
        "-p",
        "hello there",
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1 and "needs jinja2" not in done.stderr


def test_eval_references_and_doctor_run_from_the_base_install(base_venv, checkpoint, tmp_path, tmp_path_factory):
    import tiny_seq2seq

    _, export = tiny_seq2seq.sharpened_export("marian", tmp_path_factory.mktemp("s2s"), checkpoint)
    (tmp_path / "src.txt").write_text("The quick brown fox.\nShort.\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("Der schnelle Fuchs.\nKurz.\n", encoding="utf-8")
    done = _run(
        base_venv,
        "eval",
        "-m",
        str(export),
        "--device",
        "cpu",
        "--max-new-tokens",
        "8",
        "--json",
        "--references",
        str(tmp_path / "ref.txt"),
        str(tmp_path / "src.txt"),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["scores"]["bleu"]["signature"].startswith("nrefs:1") and report["examples"] == 2
    doctor = _run(base_venv, "doctor")
    assert "Traceback" not in doctor.stderr and "packaging" not in doctor.stderr, doctor.stderr
