"""SmolLM2-135M's fused graph with each weight quantisation: time a step, a prefill, and the quality.

    python benchmarks/quantize.py                       # every variant, speed and quality
    python benchmarks/quantize.py --variants exact-acc1,exact-acc4 --no-quality

The variants are built straight from build/smollm2-hf (the Q4_1 GGUF dequantized to float32, made by
benchmarks/generate.py) with export.fused.build into build/quantize/NAME/model.onnx, without the export's
validation (onnxpipe export --quantize does that):

    exact-acc1      the GGUF blocks kept exactly, float32 compute (what `make models` builds today)
    exact-acc4      the same blocks (Q8_0 output layer as 8 bits), int8 compute: --quantize int4 on a GGUF
    rtn4-acc4       every matrix rounded to 4 bits again (RTN, uint8 zero points), output layer 8-bit:
                    --quantize int4 on a float32 checkpoint
    rtn4-out4-acc4  the same with a 4-bit output layer
    int8-acc4       every matrix 8-bit (RTN symmetric), int8 compute: --quantize int8
    float32         the same weights' values as plain float32 MatMuls (what a float32 checkpoint gets)
    nooff-acc4      exact-acc4 without Q4_1's offset remainders (m + d z): timing only, wrong numbers
    q8zp-acc4       Q4_1 blocks as 8-bit with zero points, no offsets term: w = d q + m ~ (d / 16)(q8 - z8),
                    q8 = 16 q + a + z8, a = round(16 m / d) (an error of at most d / 32 a weight)

Speed: one process, 2 threads, the variants interleaved round by round (the machine is shared, so only
ratios within a run compare). ms per decoding step at batch 1 and 8 (past of 64 tokens), prompt
tokens per second for a 128- and a 1,024-token prefill at batch 1.

Quality: measure.lm_quality.lm_agreement, teacher-forced over held-out text (onnxpipe's own, or --text,
windows of --context tokens): top-1 agreement with the float32 model (exact-acc1 computes with the float32
weights' values) and perplexity over the float32 model's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "cli"))

VARIANTS = {  # name: (block_weights, quantize, output bits for int4, matrices kept at accuracy level 1)
    "exact-acc1": (True, None, None, ()),
    "exact-acc4": (True, "int4", 8, ()),
    "rtn4-acc4": (False, "int4", 8, ()),
    "rtn4-out4-acc4": (False, "int4", 4, ()),
    "int8-acc4": (True, "int8", None, ()),
    "exact-acc4-down1": (True, "int4", 8, (".down",)),
    "exact-acc4-down1-head1": (True, "int4", 8, (".down", "lm_head")),
    "exact-acc4-head1": (True, "int4", 8, ("lm_head",)),
    "exact-zp-acc4": (True, "int4", 8, ()),  # exact-acc4 after Q4_1 was centred (nbits.from_gguf)
    "exact-zp-acc4-down1": (True, "int4", 8, (".down",)),
    "exact-zp-acc4-head1": (True, "int4", 8, ("lm_head",)),
    "int8-acc4-head1": (True, "int8", None, ("lm_head",)),
    "float32": (False, None, None, ()),
    "nooff-acc4": (True, "int4", 8, ()),
    "q8zp-acc4": (True, "int4", 8, ()),
}


def _without_offsets(p):
    """nooff-acc4: a centred Q4_1 operand without its remainder m + d z."""
    from onnxpipe.export.nbits import Operand

    return Operand(p.q, p.scales, 4, p.zero, None)


def _as_8bit(p):
    """q8zp-acc4: a centred Q4_1 operand as 8-bit with zero points, no offsets term."""
    from onnxpipe.export.nbits import Operand

    d = p.scales.astype(np.float64)
    m = (p.offsets - p.scales * p.zero.astype(np.float32)).astype(np.float64)
    a = np.clip(np.rint(16 * m / np.where(d > 0, d, 1.0)), -255, 15)
    z8 = np.clip(-a, 0, 255)
    q8 = (16 * p.q.astype(np.int32) + (a + z8)[..., None]).astype(np.uint8)
    return Operand(q8, (p.scales / np.float32(16)).astype(np.float32), 8, z8.astype(np.uint8))


Q41_FORMS = {"nooff-acc4": _without_offsets, "q8zp-acc4": _as_8bit}  # applied to every centred Q4_1 operand


def build_variant(hf: Path, name: str, out: Path) -> Path:
    path = out / name / "model.onnx"
    if path.is_file():
        return path
    import torch
    from transformers import AutoModelForCausalLM

    from onnxpipe.export import fused, nbits

    block_weights, quantize, out_bits, float_compute = VARIANTS[name]
    model = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    saved = dict(nbits.OUTPUT_BITS), nbits.FLOAT_COMPUTE
    original_from_gguf, form = nbits.from_gguf, Q41_FORMS.get(name)
    if form is not None:

        def from_gguf(found, centred: bool = False):
            kind, parts = original_from_gguf(found, centred)
            return kind, [form(p) if centred and p.offsets is not None else p for p in parts]

        nbits.from_gguf = from_gguf
    if out_bits:
        nbits.OUTPUT_BITS["int4"] = out_bits
    nbits.FLOAT_COMPUTE = float_compute
    try:
        tmp = out / (name + ".tmp")
        _, weights = fused.build(model, tmp, block_weights=block_weights, quantize=quantize)
    finally:
        nbits.OUTPUT_BITS.update(saved[0])
        nbits.FLOAT_COMPUTE = saved[1]
        nbits.from_gguf = original_from_gguf
    os.replace(tmp, out / name)
    (out / name / "weights.json").write_text(json.dumps(weights))
    print(f"built {name}: {weights}", file=sys.stderr, flush=True)
    return path


def session(model, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def feeds(sess, ids: np.ndarray, past: int) -> dict:
    batch, n = ids.shape
    out = {
        "input_ids": ids,
        "attention_mask": np.ones((batch, past + n), np.int64),
        "position_ids": np.broadcast_to(np.arange(past, past + n, dtype=np.int64), (batch, n)).copy(),
    }
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            _, kv_heads, _, head_dim = i.shape
            out[i.name] = np.zeros((batch, kv_heads, past, head_dim), np.float32)
    return out


def step_times(sessions: dict, batch: int, past: int, steps: int, rounds: int) -> dict[str, float]:
    """Median ms of one decoding step (one new token per row after PAST cached ones), interleaved."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 40000, (batch, past)).astype(np.int64)
    states = {}
    for name, sess in sessions.items():
        names = [o.name for o in sess.get_outputs()]
        result = dict(zip(names, sess.run(None, feeds(sess, prompt, 0))))
        states[name] = {k.replace("present.", "past_key_values."): v for k, v in result.items() if k != "logits"}
    times: dict[str, list[float]] = {n: [] for n in sessions}
    token = np.full((batch, 1), 1000, np.int64)
    for _ in range(rounds):
        for name, sess in sessions.items():
            f = feeds(sess, token, past)
            f.update(states[name])
            sess.run(None, f)  # warm
            for _ in range(steps):
                start = time.perf_counter()
                sess.run(None, f)
                times[name].append((time.perf_counter() - start) * 1000)
    return {n: statistics.median(t) for n, t in times.items()}


def prefill_rates(sessions: dict, length: int, rounds: int) -> dict[str, float]:
    """Prompt tokens per second for one LENGTH-token prefill at batch 1 (the best of ROUNDS), interleaved."""
    ids = np.random.default_rng(1).integers(100, 40000, (1, length)).astype(np.int64)
    best = {n: float("inf") for n in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            f = feeds(sess, ids, 0)
            start = time.perf_counter()
            sess.run(["logits"], f)
            best[name] = min(best[name], time.perf_counter() - start)
    return {n: length / s for n, s in best.items()}


def quality(paths: dict, reference: str, hf: Path, text: Path | None, max_tokens: int, context: int, threads: int):
    """measure.lm_quality.lm_agreement of each variant against REFERENCE (teacher-forced, every position)."""
    import shutil

    from onnxpipe.measure.lm_quality import lm_agreement

    texts = None
    if text is not None:
        texts = [line for line in text.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = {}
    for path in paths.values():
        for f in ("tokenizer.json", "config.json"):  # what lm_agreement reads beside an unfinished export's graph
            if not (path.parent / f).is_file():
                shutil.copy2(hf / f, path.parent / f)
    for name, path in paths.items():
        if name == reference:
            continue
        figures = lm_agreement(path.parent, paths[reference].parent, texts, max_tokens, context, threads=threads)
        out[name] = {
            k: figures[k] for k in ("tokens", "agreement", "perplexity", "reference_perplexity", "perplexity_ratio")
        }
        print(f"quality {name}: {out[name]}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", type=Path, default=REPO / "build" / "smollm2-hf")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "quantize")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--prefill", default="128,1024", help="prompt lengths to time")
    parser.add_argument("--text", type=Path, help="held-out text, a document a line (default: onnxpipe's own)")
    parser.add_argument("--max-tokens", type=int, default=20000)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = args.variants.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    paths = {n: build_variant(args.hf, n, args.out) for n in names}
    result: dict = {"variants": {}, "load": os.getloadavg()}
    for n, p in paths.items():
        size = sum(f.stat().st_size for f in p.parent.iterdir() if f.name.startswith("model.onnx"))
        result["variants"][n] = {
            "size_mb": size / 1e6,
            "weights": json.loads((p.parent / "weights.json").read_text()),
        }
    if not args.no_speed:
        sessions = {n: session(str(p), args.threads) for n, p in paths.items()}
        for batch in (1, 8):
            for n, ms in step_times(sessions, batch, 64, args.steps, args.rounds).items():
                result["variants"][n][f"ms_step_b{batch}"] = ms
                print(f"{n}: batch {batch} {ms:.2f} ms a step", file=sys.stderr, flush=True)
            print(f"steps at batch {batch} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
        for length in [int(x) for x in args.prefill.split(",") if x]:
            for n, rate in prefill_rates(sessions, length, args.rounds).items():
                result["variants"][n][f"prefill_{length}_tok_s"] = rate
                print(f"{n}: prefill {length} {rate:.1f} tokens/s", file=sys.stderr, flush=True)
        del sessions
    if not args.no_quality:
        reference = "exact-acc1"
        if reference not in paths:
            paths[reference] = build_variant(args.hf, reference, args.out)
        for n, q in quality(paths, reference, args.hf, args.text, args.max_tokens, args.context, args.threads).items():
            result["variants"].setdefault(n, {}).update(q)
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
