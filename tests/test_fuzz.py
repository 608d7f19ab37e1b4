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
