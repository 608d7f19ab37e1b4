"""Whole-process time to the first result of a 1-line and a 1,000-line classify job: onnxpipe vs a transformers
pipeline script.

    python benchmarks/startup.py                  # 10 runs of each, interleaved
    python benchmarks/startup.py --runs 20 --json benchmarks/results/startup.json

The 1-line job is `echo "good movie" | onnxpipe classify -m sentiment`, as a shell pipeline runs it: a fresh
process that imports, loads the export, classifies one line and exits. The 1,000-line job is
`onnxpipe classify -m sentiment build/sentiment/heldout.txt`: its first result should not wait for the
first window's sorted pass, so its first result is compared with the 1-line job's (the "x 1-line" column).
The peer is the smallest script that does the same with transformers (pipeline("text-classification") on
build/sentiment/model, PyTorch, CPU), and the floor of a streaming loop is a plain script over the same
export (tokenizers + one onnxruntime session, one line at a time, no onnxpipe). Rows:

- python -c pass: the interpreter alone, the floor under any Python tool;
- onnxpipe --help;
- onnxpipe classify with the default --device auto (on a machine without a GPU this includes asking the
  CUDA provider and falling back) and with --device cpu;
- the transformers script;
- the 1,000-line job: onnxpipe classify --device cpu, the onnxruntime loop, the transformers script
  (each reads the file by its path; a pipe written by this script would hold back their first result).

Figures: seconds from spawn to the first byte of the result on stdout, and to exit; best and mean of
--runs; peak RSS of the process. Each system gets the same --threads.
"""

from __future__ import annotations

import argparse
import statistics
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
for line in open(sys.argv[1], encoding="utf-8") if sys.argv[1:] else sys.stdin:
    print(classify(line.rstrip("\\n"))[0]["label"], flush=True)
"""
ORT_LOOP_SCRIPT = """\
import json, sys
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer
options = ort.SessionOptions()
options.intra_op_num_threads = {threads}
session = ort.InferenceSession({folder!r} + "/model.onnx", options, providers=["CPUExecutionProvider"])
tokenizer = Tokenizer.from_file({folder!r} + "/tokenizer.json")
tokenizer.enable_truncation(512)
labels = json.load(open({folder!r} + "/config.json"))["id2label"]
names = [i.name for i in session.get_inputs()]
for line in open(sys.argv[1], encoding="utf-8") if sys.argv[1:] else sys.stdin:
    enc = tokenizer.encode(line.rstrip("\\n"))
    feed = {{"input_ids": [enc.ids], "attention_mask": [enc.attention_mask], "token_type_ids": [enc.type_ids]}}
    logits = session.run(None, {{n: np.array(feed[n], dtype=np.int64) for n in names}})[0]
    print(labels[str(int(logits[0].argmax()))], flush=True)
"""
FILE = REPO / "build" / "sentiment" / "heldout.txt"
ONE_LINE, THOUSAND = "onnxpipe classify --device cpu", "onnxpipe classify --device cpu, 1,000 lines"


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
        THOUSAND: (
            [onnxpipe, "classify", "-m", "sentiment", "--device", "cpu", "--threads", str(threads), str(FILE)],
            None,
        ),
        "onnxruntime loop, 1,000 lines": (
            [
                sys.executable,
                "-c",
                ORT_LOOP_SCRIPT.format(threads=threads, folder=str(REPO / "exports" / "sentiment")),
                str(FILE),
            ],
            None,
        ),
        "transformers pipeline script, 1,000 lines": (
            [sys.executable, "-c", PIPELINE_SCRIPT.format(threads=threads, model=model), str(FILE)],
            None,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--no-long-peers",
        action="store_true",
        help="leave out the two peers' 1,000-line rows (the transformers script takes about 10 s a run)",
    )
    parser.add_argument("--json", type=Path, default=harness.RESULTS / "startup.json")
    args = parser.parse_args()
    if not (REPO / "exports" / "sentiment" / "onnxpipe.json").is_file() or not FILE.is_file():
        sys.exit("exports/sentiment or build/sentiment/heldout.txt is missing: run `make models` first")
    jobs = systems(args.threads)
    if args.no_long_peers:
        jobs = {name: job for name, job in jobs.items() if "1,000 lines" not in name or name == THOUSAND}
    load_before = harness.load_average()
    results: dict[str, list[harness.Process]] = {name: [] for name in jobs}
    harness.run(jobs[ONE_LINE][0], stdin=LINE)  # untimed runs: the page cache
    harness.run(jobs[THOUSAND][0])
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
    for name, procs in results.items():
        outputs = {p.stdout.decode().strip() for p in procs}
        first = [p.first_line if p.first_line is not None else p.wall for p in procs]  # no output: its exit
        walls = [p.wall for p in procs]
        stdin = jobs[name][1]
        if "1,000 lines" in name:
            shown_in, shown_out = str(FILE.relative_to(REPO)), f"{len(sorted(outputs)[0].splitlines()):,} lines"
        else:
            shown_in, shown_out = (stdin or b"").decode().strip() or None, sorted(outputs)[0][:40]
        report["systems"][name] = {
            "command": " ".join(_shown(jobs[name][0])),
            "stdin": shown_in,
            "output": shown_out if len(outputs) == 1 else f"{len(outputs)} different outputs over the runs",
            "first_result_best": min(first),
            "first_result_mean": harness.mean_sd(first)[0],
            "first_result_median": statistics.median(first),
            "exit_best": min(walls),
            "exit_mean": harness.mean_sd(walls)[0],
            "exit_sd": harness.mean_sd(walls)[1],
            "max_rss_mib": max(p.max_rss_mib for p in procs),
        }
    long_outputs = {results[name][0].stdout for name in results if "1,000 lines" in name}
    report["same_labels_on_1000_lines"] = len(long_outputs) == 1
    rows = []
    systems_ = report["systems"]
    for name, row in systems_.items():
        base = systems_.get("transformers pipeline script" + (", 1,000 lines" if "1,000 lines" in name else ""))
        if base and name.startswith(("onnxpipe classify", "onnxruntime loop")):
            row["x_faster_than_transformers"] = base["first_result_mean"] / row["first_result_mean"]
        if "1,000 lines" in name:
            row["x_one_line_job"] = row["first_result_mean"] / systems_[ONE_LINE]["first_result_mean"]
        rows.append(
            [
                name,
                f"{row['first_result_best']:.2f}",
                f"{row['first_result_mean']:.2f}",
                f"{row['x_one_line_job']:.2f}x" if "x_one_line_job" in row else "",
                f"{row['exit_best']:.2f}",
                f"{row['exit_mean']:.2f} ± {row['exit_sd']:.2f}",
                f"{row['max_rss_mib']:,.0f}",
                f"{row['x_faster_than_transformers']:.1f}x" if "x_faster_than_transformers" in row else "",
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
                "x 1-line job (mean)",
                "exit best s",
                "exit mean s",
                "peak RSS MiB",
                "transformers / this",
                "stdout",
            ],
            rows,
        )
    )
    ratio = systems_[THOUSAND]["x_one_line_job"]
    print(
        f"- the first result of the 1,000-line job came {ratio:.2f}x as late as the 1-line job's (mean; target <= 1.2x; "
        f"median {systems_[THOUSAND]['first_result_median'] / systems_[ONE_LINE]['first_result_median']:.2f}x)"
    )
    if len(results) > 1 and any("1,000 lines" in name and name != THOUSAND for name in results):
        same = "the same" if report["same_labels_on_1000_lines"] else "DIFFERENT"
        print(f"- the 1,000-line jobs wrote {same} labels")
    report["load_average_after"] = harness.load_average()
    print(f"- load average (1, 5, 15 min) before: {load_before}, after: {report['load_average_after']}")
    harness.write_json(args.json, report)
    print(f"\n(results in {args.json})", file=sys.stderr)


def _shown(command: list[str]) -> list[str]:
    if command[1:2] == ["-c"] and "pipeline" in command[2]:
        return ["python", "-c", "<transformers pipeline script>", *command[3:]]
    if command[1:2] == ["-c"] and "InferenceSession" in command[2]:
        return ["python", "-c", "<onnxruntime loop script>", *command[3:]]
    return [Path(c).name if i == 0 else c for i, c in enumerate(command)]


if __name__ == "__main__":
    main()
