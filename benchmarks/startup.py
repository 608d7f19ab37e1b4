"""Whole-process time to the first result of a 1-line classify job: onnxpipe vs a transformers pipeline script.

    python benchmarks/startup.py                  # 10 runs of each, interleaved
    python benchmarks/startup.py --runs 20 --json benchmarks/results/startup.json

The job is `echo "good movie" | onnxpipe classify -m sentiment`, as a shell pipeline runs it: a fresh
process that imports, loads the export, classifies one line and exits. The peer is the smallest script
that does the same with transformers (pipeline("text-classification") on build/sentiment/model, PyTorch,
CPU). Rows:

- python -c pass: the interpreter alone, the floor under any Python tool;
- onnxpipe --help;
- onnxpipe classify with the default --device auto (on a machine without a GPU this includes asking the
  CUDA provider and falling back) and with --device cpu;
- the transformers script.

Figures: seconds from spawn to the first byte of the result on stdout, and to exit; best and mean of
--runs; peak RSS of the process. Each system gets the same --threads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import harness
from harness import REPO

LINE = b"good movie\n"
PIPELINE_SCRIPT = """\
import sys
import torch
torch.set_num_threads({threads})
from transformers import pipeline
classify = pipeline("text-classification", model={model!r}, device=-1)
for line in sys.stdin:
    print(classify(line.rstrip("\\n"))[0]["label"], flush=True)
"""


def systems(threads: int) -> dict[str, tuple[list[str], bytes | None]]:
    onnxpipe = str(REPO / ".venv" / "bin" / "onnxpipe")
    if not Path(onnxpipe).exists():
        onnxpipe = "onnxpipe"
    model = str(REPO / "build" / "sentiment" / "model")
    return {
        "python -c pass": ([sys.executable, "-c", "pass"], None),
        "onnxpipe --help": ([onnxpipe, "--help"], None),
        "onnxpipe classify (--device auto)": (
            [onnxpipe, "classify", "-m", "sentiment", "--threads", str(threads)],
            LINE,
        ),
        "onnxpipe classify --device cpu": (
            [onnxpipe, "classify", "-m", "sentiment", "--device", "cpu", "--threads", str(threads)],
            LINE,
        ),
        "transformers pipeline script": (
            [sys.executable, "-c", PIPELINE_SCRIPT.format(threads=threads, model=model)],
            LINE,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=harness.RESULTS / "startup.json")
    args = parser.parse_args()
    if not (REPO / "exports" / "sentiment" / "onnxpipe.json").is_file():
        sys.exit("exports/sentiment is missing: run `make models` first")
    jobs = systems(args.threads)
    load_before = harness.load_average()
    results: dict[str, list[harness.Process]] = {name: [] for name in jobs}
    harness.run(jobs["onnxpipe classify --device cpu"][0], stdin=LINE)  # one untimed run: the page cache
    harness.run(jobs["transformers pipeline script"][0], stdin=LINE)
    for _ in range(args.runs):
        for name, (command, stdin) in jobs.items():
            results[name].append(harness.run(command, stdin=stdin))
    report = {
        "date": harness.now(),
        "machine": harness.machine(),
        "load_average_before": load_before,
        "threads": args.threads,
        "runs": args.runs,
        "versions": harness.versions(
            "onnxpipe", "onnxruntime-gpu", "onnxruntime", "tokenizers", "torch", "transformers"
        ),
        "command": " ".join(["python", "benchmarks/startup.py", *sys.argv[1:]]),
        "systems": {},
    }
    rows = []
    base = None
    for name, procs in results.items():
        outputs = {p.stdout.decode().strip() for p in procs}
        first = [p.first_line if p.first_line is not None else p.wall for p in procs]  # no output: its exit
        walls = [p.wall for p in procs]
        row = {
            "command": " ".join(_shown(jobs[name][0])),
            "stdin": (jobs[name][1] or b"").decode().strip() or None,
            "output": sorted(outputs)[0][:40] if len(outputs) == 1 else sorted(outputs),
            "first_result_best": min(first),
            "first_result_mean": harness.mean_sd(first)[0],
            "exit_best": min(walls),
            "exit_mean": harness.mean_sd(walls)[0],
            "exit_sd": harness.mean_sd(walls)[1],
            "max_rss_mib": max(p.max_rss_mib for p in procs),
        }
        report["systems"][name] = row
        if name == "transformers pipeline script":
            base = row
    for name, row in report["systems"].items():
        if base and "classify" in name:
            row["x_faster_than_transformers"] = base["first_result_mean"] / row["first_result_mean"]
        rows.append(
            [
                name,
                f"{row['first_result_best']:.2f}",
                f"{row['first_result_mean']:.2f}",
                f"{row['exit_best']:.2f}",
                f"{row['exit_mean']:.2f} ± {row['exit_sd']:.2f}",
                f"{row['max_rss_mib']:,.0f}",
                f"{row.get('x_faster_than_transformers', 0):.1f}x" if "x_faster_than_transformers" in row else "",
                str(row["output"]),
            ]
        )
    print("\n".join(harness.machine_lines(report["machine"], report["versions"])))
    print(f"- {args.runs} runs each, interleaved, {args.threads} threads, {report['date']}\n")
    print(
        harness.markdown_table(
            [
                "system",
                "first result best s",
                "first result mean s",
                "exit best s",
                "exit mean s",
                "peak RSS MiB",
                "transformers / this",
                "stdout",
            ],
            rows,
        )
    )
    report["load_average_after"] = harness.load_average()
    print(f"- load average (1, 5, 15 min) before: {load_before}, after: {report['load_average_after']}")
    harness.write_json(args.json, report)
    print(f"\n(results in {args.json})", file=sys.stderr)


def _shown(command: list[str]) -> list[str]:
    if command[1:2] == ["-c"] and "pipeline" in command[2]:
        return ["python", "-c", "<transformers pipeline script>"]
    return [Path(c).name if i == 0 else c for i, c in enumerate(command)]


if __name__ == "__main__":
    main()
