"""fp32 encoder speed under ONNX Runtime session options, fused graphs and batch cuts, interleaved in one process.

    python benchmarks/encoder_options.py                              # exports/sentiment, heldout.txt, 2 threads
    python benchmarks/encoder_options.py --only batches --join 4      # long records: 4 held-out lines each
    python benchmarks/encoder_options.py --threads 1 --records 300    # CPU time is the steadier figure on a busy machine

Issue 19 asks where the fp32 classification speed stops. Each variant runs the same records, and the
variants take turns round by round (the order reversed every other round), so a busy neighbour slows
them alike. Three groups:

- session: the options onnxpipe's sessions use (ORT_ENABLE_ALL, intra-op spinning on) against intra-op
  spinning off, denormals as zero, and the EXTENDED and BASIC optimisation levels;
- graph: onnxruntime.transformers' BERT fusions on the export's graph, all of them (Attention,
  SkipLayerNormalization, BiasGelu, EmbedLayerNormalization: what `export --optimize O2` adds) and all
  but attention; needs the `onnx` package;
- batches: the length-sorted batches cut by --batch-size and --max-batch-tokens as the engine cuts
  them (and run in descending or input order), through the task's own run().

Figures: records/s of wall time, and records per CPU second of this process (steadier when other jobs
share the cores; spinning threads count as CPU), both as the median over --rounds and as a ratio to
the group's first row. Session and graph rows say how far their logits are from the plain session's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import harness
from harness import REPO

TEXTS = REPO / "build" / "sentiment" / "heldout.txt"
SESSION_VARIANTS = {
    "onnxpipe's options": {},
    "intra-op spinning off": {"session.intra_op.allow_spinning": "0"},
    "denormals as zero": {"session.set_denormal_as_zero": "1"},
    "ORT_ENABLE_EXTENDED": {"level": "extended"},
    "ORT_ENABLE_BASIC": {"level": "basic"},
}
# (--batch-size, --max-batch-tokens or 0 for none, order of the sorted batches)
BATCH_CUTS = [(32, 16384, "ascending"), (32, 16384, "descending"), (32, 16384, "input order")] + [
    (size, budget, "ascending") for size, budget in [(8, 0), (16, 0), (64, 0), (128, 768), (128, 1024), (256, 2048)]
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, default=REPO / "exports" / "sentiment")
    parser.add_argument("--file", type=Path, default=TEXTS)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--join", type=int, default=1, help="lines of --file joined into one record (longer inputs)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="session,graph,batches", help="comma-separated groups")
    parser.add_argument("--json", type=Path, default=harness.RESULTS / "encoder_options.json")
    args = parser.parse_args()
    if not (args.export / "onnxpipe.json").is_file() or not args.file.is_file():
        sys.exit(f"{args.export} or {args.file} is missing: run `make models` first")

    from onnxpipe.registry import family_for_export
    from onnxpipe.runtime import load_model
    from onnxpipe.stream.readers import RawChunk, RecordParser

    model = load_model(str(args.export), device="cpu", threads=args.threads)
    task = family_for_export(model.task).make_task(model, {})
    lines = args.file.read_bytes().split(b"\n")
    lines = [b" ".join(lines[i : i + args.join]) for i in range(0, len(lines), args.join) if lines[i]][: args.records]
    items = task.encode(RecordParser().parse(RawChunk(str(args.file), 1, lines, 0)))
    load_before = harness.load_average()
    report: dict = {
        "date": harness.now(),
        "machine": harness.machine(),
        "command": " ".join(["python", "benchmarks/encoder_options.py", *sys.argv[1:]]),
        "export": str(args.export),
        "records": len(items),
        "tokens_per_record": sum(i.cost for i in items) / len(items),
        "threads": args.threads,
        "rounds": args.rounds,
        "load_average_before": load_before,
        "groups": {},
    }
    groups = args.only.split(",")
    print("\n".join(harness.machine_lines(report["machine"], harness.versions("onnxruntime-gpu", "onnxruntime"))))
    print(
        f"- {len(items):,} records of {report['tokens_per_record']:.1f} tokens, {args.threads} threads, "
        f"{args.rounds} rounds, load average before {load_before}\n"
    )
    sorted_items = sorted(items, key=lambda item: item.cost)
    if "session" in groups or "graph" in groups:
        batches = _cut(task, sorted_items, 32, 16384)
        feeds = [task.feed(batch)[0] for batch in batches]
        with tempfile.TemporaryDirectory() as tmp:
            graph = args.export / "model.onnx"
            sessions: dict[str, Callable[[], object]] = {}
            if "session" in groups:
                for name, config in SESSION_VARIANTS.items():
                    sessions[name] = _session_maker(graph, args.threads, config)
            if "graph" in groups:
                if "session" not in groups:
                    sessions["onnxpipe's options"] = _session_maker(graph, args.threads, {})
                for name, fused in _fused_graphs(graph, model.config, Path(tmp)).items():
                    sessions[name] = _session_maker(fused, args.threads, {})
            report["groups"]["session and graph"] = _time_sessions(sessions, feeds, len(items), args.rounds)
    if "batches" in groups:
        runs = {}
        for size, budget, order in BATCH_CUTS:
            cut = _cut(task, items if order == "input order" else sorted_items, size, budget)
            name = f"--batch-size {size} --max-batch-tokens {budget or 'none'}, {order}"
            runs[name] = cut[::-1] if order == "descending" else cut
        report["groups"]["batches"] = _time_batches(task, runs, len(items), args.rounds)
    report["load_average_after"] = harness.load_average()
    print(f"- load average (1, 5, 15 min) before: {load_before}, after: {report['load_average_after']}")
    harness.write_json(args.json, report)
    print(f"\n(results in {args.json})", file=sys.stderr)


def _cut(task, items, size: int, budget: int) -> list:
    from onnxpipe.stream.engine import Engine, EngineOptions

    engine = Engine(task, None, EngineOptions(batch_size=size, max_batch_tokens=budget or None))  # type: ignore[arg-type]
    return list(engine._batches(items))


def _session_maker(graph: Path, threads: int, config: dict[str, str]) -> Callable[[], object]:
    def make():
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        level = config.get("level")
        if level is not None:
            options.graph_optimization_level = {
                "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            }[level]
        for key, value in config.items():
            if key != "level":
                options.add_session_config_entry(key, value)
        return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    return make


def _fused_graphs(graph: Path, config: dict, out: Path) -> dict[str, Path]:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    made = {}
    for name, attention in [("fused: all (as --optimize O2)", True), ("fused: all but attention", False)]:
        options = FusionOptions("bert")
        options.enable_attention = attention
        fused = optimize_model(
            str(graph),
            model_type="bert",
            num_heads=int(config.get("num_attention_heads", 0)),
            hidden_size=int(config.get("hidden_size", 0)),
            optimization_options=options,
            opt_level=0,
            use_gpu=False,
        )
        path = out / f"{'attention' if attention else 'no-attention'}.onnx"
        fused.save_model_to_file(str(path))
        made[name] = path
    return made


def _time_sessions(makers: dict[str, Callable[[], object]], feeds: list, n: int, rounds: int) -> dict:
    import numpy as np

    sessions = {name: make() for name, make in makers.items()}
    reference = [sessions["onnxpipe's options"].run(None, feed)[0] for feed in feeds]  # type: ignore[attr-defined]
    quality = {}
    for name, session in sessions.items():  # also the warm-up
        out = [session.run(None, feed)[0] for feed in feeds]  # type: ignore[attr-defined]
        quality[name] = {
            "max_abs_logit_diff": max(float(np.abs(a - b).max()) for a, b in zip(out, reference)),
            "same_label": sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(out, reference)),
        }

    def one_pass(name: str) -> None:
        session = sessions[name]
        for feed in feeds:
            session.run(None, feed)  # type: ignore[attr-defined]

    rows = _interleave(list(sessions), one_pass, n, rounds)
    for name, row in rows.items():
        row.update(quality[name])
    _print(rows, extra=lambda row: f"{row['max_abs_logit_diff']:.1e}, {row['same_label']:,}/{n:,}")
    return rows


def _time_batches(task, runs: dict[str, list], n: int, rounds: int) -> dict:
    def one_pass(name: str) -> None:
        for batch in runs[name]:
            task.run(batch)

    one_pass(next(iter(runs)))  # warm-up
    rows = _interleave(list(runs), one_pass, n, rounds)
    real = sum(item.cost for batch in next(iter(runs.values())) for item in batch)
    for name, row in rows.items():
        row["batches"] = len(runs[name])
        row["padded_tokens_x_real"] = sum(len(b) * max(i.cost for i in b) for b in runs[name]) / real
    _print(rows, extra=lambda row: f"{row['batches']} batches, padded {row['padded_tokens_x_real']:.2f}x real")
    return rows


def _interleave(names: list[str], one_pass: Callable[[str], None], n: int, rounds: int) -> dict:
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            one_pass(name)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    first = names[0]
    rows = {}
    for name in names:
        rows[name] = {
            "records_per_s": n / statistics.median(wall[name]),
            "records_per_cpu_s": n / statistics.median(cpu[name]),
            "x_first_wall": statistics.median(wall[first]) / statistics.median(wall[name]),
            "x_first_cpu": statistics.median(cpu[first]) / statistics.median(cpu[name]),
            "records_per_s_rounds": [n / w for w in wall[name]],
        }
    return rows


def _print(rows: dict, extra: Callable[[dict], str]) -> None:
    table = [
        [
            name,
            f"{row['records_per_s']:,.0f}",
            f"{row['x_first_wall']:.2f}x",
            f"{row['records_per_cpu_s']:,.0f}",
            f"{row['x_first_cpu']:.2f}x",
            ", ".join(f"{x:,.0f}" for x in row["records_per_s_rounds"]),
            extra(row),
        ]
        for name, row in rows.items()
    ]
    header = ["variant", "records/s", "x first", "records/CPU-s", "x first (CPU)", "records/s each round", ""]
    print(harness.markdown_table(header, table) + "\n")


if __name__ == "__main__":
    main()
