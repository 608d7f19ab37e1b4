"""Records/s of an encoder command at several --batch-size values, through the real CLI.

    python benchmarks/batch_sizes.py embed exports/minilm build/sentiment/heldout.txt
    python benchmarks/batch_sizes.py classify exports/sentiment build/sentiment/heldout.txt --sizes 1,8,32

Each size runs in a fresh `onnxpipe` process on the CPU; the figure is the engine's own summary
(records / seconds from the first read to the last write, so start-up and model load are
excluded) and the wall time of the whole process, best of --repeat runs.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time

SUMMARY = re.compile(r"([\d,]+) records in ([\d.]+)s")


def run(command: str, model: str, path: str, batch_size: int, threads: int | None) -> tuple[float, float, int]:
    args = [
        sys.executable,
        "-m",
        "onnxpipe",
        command,
        "-m",
        model,
        "--device",
        "cpu",
        "--batch-size",
        str(batch_size),
        path,
    ]
    if threads:
        args += ["--threads", str(threads)]
    start = time.perf_counter()
    proc = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True)
    wall = time.perf_counter() - start
    match = SUMMARY.search(proc.stderr)
    records, seconds = int(match.group(1).replace(",", "")), float(match.group(2))
    return records / seconds, wall, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command")
    parser.add_argument("model")
    parser.add_argument("input")
    parser.add_argument("--sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    print(f"{args.command} -m {args.model} {args.input} (CPU, best of {args.repeat})")
    print(f"{'batch':>6} {'records/s':>10} {'wall s':>8}")
    for size in (int(s) for s in args.sizes.split(",")):
        best = max(
            (run(args.command, args.model, args.input, size, args.threads) for _ in range(args.repeat)),
            key=lambda r: r[0],
        )
        print(f"{size:>6} {best[0]:>10,.0f} {best[1]:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
