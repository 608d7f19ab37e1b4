"""The fuzz targets (tests/fuzz/targets.py) for a few seconds each; `make fuzz` runs them longer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fuzz"))

from run import run  # noqa: E402
from targets import TARGETS  # noqa: E402


@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz_target_briefly(name):
    assert run(name, float(os.environ.get("FUZZ_SECONDS", "3"))) >= 1


@pytest.mark.parametrize("name", list(TARGETS))
def test_atheris_target_briefly(name, tmp_path):
    """The coverage-guided driver (make fuzz) starts, fuzzes its seeds and finds nothing in a few seconds."""
    import subprocess

    pytest.importorskip("atheris")
    driver = Path(__file__).resolve().parent / "fuzz" / "atheris_run.py"
    seconds = os.environ.get("FUZZ_SECONDS", "3")
    done = subprocess.run(
        [sys.executable, str(driver), name, f"-max_total_time={seconds}", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Done " in done.stderr and " runs in " in done.stderr
