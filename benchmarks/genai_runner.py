"""The onnxruntime-genai peer of benchmarks/generate.py, run in its own venv (build/venv-genai).

    build/venv-genai/bin/python benchmarks/genai_runner.py MODEL_DIR --mode decode|prefill|quality < job.json

onnxruntime-genai 0.18 needs transformers 5.x for its model builder and pulls its own onnxruntime, so it
cannot share onnxpipe's venv: generate.py starts this script in that venv and hands it token ids (the same
ids every system gets) as a JSON job on stdin. One JSON line on stdout is the result, with this process's
own peak RSS. Only numpy and onnxruntime_genai are imported here.

Jobs:
- decode  {"prompts": [[ids]], "batch": B, "new_tokens": N, "repeat": R}: greedy, exactly N new tokens
  per row (min_length = max_length), rows in batches of B, left-padded; new tokens/s over the whole job,
  best of R runs after a warm-up.
- prefill {"prompt": [ids], "repeat": R}: time to the first new token of one prompt, best of R.
- quality {"windows": [[ids, first]]}: teacher forcing; for every scored position (first..end of each
  window) the top-1 id of the logits before it and the negative log-likelihood of the true token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# onnxruntime-genai masks every input id equal to the config's pad_token_id. SmolLM2's pad is 2,
# <|im_end|>, which every chat prompt holds: padding with it would mask the prompts' own turn ends.
# Rows are left-padded with <|endoftext|> (0) instead, which no prompt here contains.
PAD = 0


def open_model(folder: Path, threads: int):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"pad_token_id": PAD, "decoder": {"session_options": options}}}))
    return og, og.Model(config)


def timed(job, repeat: int) -> dict:
    job()  # warm-up
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


def decode(og, model, job: dict) -> dict:
    prompts, batch, new_tokens = job["prompts"], job["batch"], job["new_tokens"]

    def run() -> int:
        made = 0
        for lo in range(0, len(prompts), batch):
            rows = prompts[lo : lo + batch]
            width = max(map(len, rows))
            ids = np.array([[PAD] * (width - len(r)) + list(r) for r in rows], dtype=np.int32)
            params = og.GeneratorParams(model)
            params.set_search_options(
                batch_size=len(rows), max_length=width + new_tokens, min_length=width + new_tokens, do_sample=False
            )
            generator = og.Generator(model, params)
            generator.append_tokens(ids)  # the prompt run; its logits give the first new token
            steps = 0
            while not generator.is_done():
                generator.generate_next_token()
                steps += 1
            made += steps * len(rows)
        return made

    return timed(run, job["repeat"])


def prefill(og, model, job: dict) -> dict:
    prompt = np.array([job["prompt"]], dtype=np.int32)

    def run() -> int:
        params = og.GeneratorParams(model)
        params.set_search_options(batch_size=1, max_length=prompt.shape[1] + 1, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        generator.generate_next_token()
        return prompt.shape[1]

    return timed(run, job["repeat"])


def quality(og, model, job: dict) -> dict:
    top1: list[int] = []
    nll: list[float] = []
    for window, first in job["windows"]:
        params = og.GeneratorParams(model)
        params.set_search_options(batch_size=1, max_length=len(window) + 1, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array([window], dtype=np.int32))
        logits = np.asarray(generator.get_output("logits"), dtype=np.float32)[0]  # (len(window), vocab)
        rows, targets = logits[first - 1 : -1], np.asarray(window[first:])
        top = rows.max(-1, keepdims=True)
        logp = rows - top - np.log(np.exp(rows - top).sum(-1, keepdims=True))
        top1 += rows.argmax(-1).tolist()
        nll += (-logp[np.arange(len(targets)), targets]).astype(np.float64).tolist()
    return {"top1": top1, "nll": nll}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="the folder the onnxruntime-genai builder wrote")
    parser.add_argument("--mode", choices=("decode", "prefill", "quality"), required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    job = json.load(sys.stdin)
    og, model = open_model(args.model, args.threads)
    result = {"decode": decode, "prefill": prefill, "quality": quality}[args.mode](og, model, job)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["version"] = og.__version__
    print(json.dumps(result))


if __name__ == "__main__":
    main()
