"""Where an encoder command's time goes: tokens and padding, the Python side, and ONNX Runtime's operators.

    python benchmarks/profile_encoders.py                        # exports/sentiment on the held-out sentences
    python benchmarks/profile_encoders.py exports/sentiment-int8 exports/minilm --threads 2

For each export:
- tokens per sentence, and the padded tokens a batch of 32 computes when the batches are cut from
  length-sorted input (what onnxpipe does) and from input order (what a pipeline with batch_size=32 does);
- real and padded tokens/s of `task.run` over the sorted batches (the session and the post-processing);
- cProfile of the whole command in this process (`onnxpipe classify|embed FILE -o /dev/null`): the share
  of the session run against tokenizing, output and start-up;
- ONNX Runtime's own profile: time per operator type.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import json
import pstats
import tempfile
import time
from pathlib import Path

import harness  # noqa: F401  (puts cli/ on sys.path)
from harness import REPO

TEXTS = REPO / "build" / "sentiment" / "heldout.txt"


def profile(folder: Path, threads: int, batch_size: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    from onnxpipe.runtime import load_model
    from onnxpipe.runtime.sessions import make_session
    from onnxpipe.stream.records import Record

    model = load_model(folder, device="cpu", threads=threads)
    if model.task == "text-classification":
        from onnxpipe.tasks.classify import ClassifyTask as Task

        command = "classify"
    else:
        from onnxpipe.tasks.embed import EmbedTask as Task

        command = "embed"
    task = Task(model)
    texts = TEXTS.read_text(encoding="utf-8").splitlines()
    items = task.encode([Record(i, t) for i, t in enumerate(texts)])
    lengths = np.array([item.cost for item in items])

    def padded(costs) -> int:
        return int(
            sum(
                len(costs[i : i + batch_size]) * max(costs[i : i + batch_size])
                for i in range(0, len(costs), batch_size)
            )
        )

    ordered = sorted(items, key=lambda item: item.cost)
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    for batch in batches[:2]:
        task.run(batch)
    start = time.perf_counter()
    for batch in batches:
        task.run(batch)
    seconds = time.perf_counter() - start
    sorted_padded = padded(sorted(lengths.tolist()))
    report = {
        "export": str(folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder),
        "precision": model.manifest.get("precision"),
        "tokens_per_sentence": {
            "mean": float(lengths.mean()),
            "median": float(np.median(lengths)),
            "max": int(lengths.max()),
        },
        "real_tokens": int(lengths.sum()),
        "padded_tokens_sorted": sorted_padded,
        "padded_tokens_input_order": padded(lengths.tolist()),
        "task_run_seconds": seconds,
        "records_per_s": len(items) / seconds,
        "real_tokens_per_s": float(lengths.sum()) / seconds,
        "padded_tokens_per_s": sorted_padded / seconds,
    }

    # The whole command, in this process.
    from onnxpipe.main import cli

    profiler = cProfile.Profile()
    argv = [command, "-m", str(folder), "--device", "cpu", "--threads", str(threads), "-o", "/dev/null", str(TEXTS)]
    profiler.enable()
    try:
        cli.main(argv, prog_name="onnxpipe", standalone_mode=False)
    finally:
        profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    total = sum(v[2] for v in stats.stats.values())  # tottime over every function
    by_name = collections.Counter()
    for (path, _, name), value in stats.stats.items():
        by_name[f"{Path(path).name}:{name}" if path != "~" else name] += value[2]
    report["cprofile_total_seconds"] = total
    report["cprofile_top"] = [{"function": k, "seconds": v, "share": v / total} for k, v in by_name.most_common(8)]

    # ONNX Runtime's operator profile over the same sorted batches.
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "onnxpipe-ort-profile")
    session = make_session(folder / (model.manifest.get("files") or {}).get("model", "model.onnx"), options=options)
    for batch in batches:
        feed, _ = task.feed(batch)
        session.run(None, feed)
    trace = Path(session.end_profiling())
    ops = collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            ops[event["args"]["op_name"]] += event["dur"]
    trace.unlink()
    total_ops = sum(ops.values()) or 1
    report["ort_operator_share"] = {k: v / total_ops for k, v in ops.most_common(10)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="*", type=Path, default=[REPO / "exports" / "sentiment"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path, default=harness.RESULTS / "profile_encoders.json")
    args = parser.parse_args()
    reports = []
    for folder in args.exports:
        r = profile(folder.resolve(), args.threads, args.batch_size)
        reports.append(r)
        t = r["tokens_per_sentence"]
        print(f"### {r['export']} ({r['precision']})\n")
        print(
            f"- tokens per sentence: mean {t['mean']:.1f}, median {t['median']:.0f}, max {t['max']}; "
            f"{r['real_tokens']:,} in all"
        )
        print(
            f"- tokens computed at batch {args.batch_size}, padding included: {r['padded_tokens_sorted']:,} "
            f"length-sorted ({r['padded_tokens_sorted'] / r['real_tokens']:.2f}x the real tokens), "
            f"{r['padded_tokens_input_order']:,} in input order ({r['padded_tokens_input_order'] / r['real_tokens']:.2f}x)"
        )
        print(
            f"- task.run over the sorted batches: {r['records_per_s']:,.0f} records/s, "
            f"{r['real_tokens_per_s']:,.0f} real tokens/s, {r['padded_tokens_per_s']:,.0f} padded tokens/s"
        )
        print(
            f"- cProfile of the whole command ({r['cprofile_total_seconds']:.2f}s): "
            + ", ".join(f"{e['function']} {e['share']:.1%}" for e in r["cprofile_top"][:5])
        )
        print(
            "- ONNX Runtime operators: " + ", ".join(f"{k} {v:.1%}" for k, v in r["ort_operator_share"].items()) + "\n"
        )
    harness.write_json(
        args.json, {"date": harness.now(), "machine": harness.machine(), "threads": args.threads, "reports": reports}
    )


if __name__ == "__main__":
    main()
