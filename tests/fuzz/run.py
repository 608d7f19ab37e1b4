"""Run the fuzz targets for a bounded time each: `python tests/fuzz/run.py --seconds 60 [TARGET]...`.

Each round is a fresh hypothesis run (new random seed) of max_examples inputs; rounds repeat until
the time is up. A failure prints hypothesis' minimal example and exits 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from targets import TARGETS  # noqa: E402


def run(name: str, seconds: float) -> int:
    target, rounds, end = TARGETS[name], 0, time.monotonic() + seconds
    while True:
        target()
        rounds += 1
        if time.monotonic() >= end:
            return rounds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="time per target")
    parser.add_argument("targets", nargs="*", default=list(TARGETS))
    args = parser.parse_args()
    for name in args.targets:
        rounds = run(name, args.seconds)
        print(f"{name}: {rounds} rounds of up to 200 inputs, no failure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
