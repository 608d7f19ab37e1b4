"""Target tokens/s of encoder-decoder beam search: onnxpipe vs transformers, optimum and CTranslate2.

    python benchmarks/seq2seq.py build/opus-mt-shaped           # build (once), export, then time
    python benchmarks/seq2seq.py build/opus-mt-shaped --peers onnxpipe,transformers --batch-size 8
    python benchmarks/seq2seq.py build/opus-mt-shaped --peers onnxpipe,onnxpipe-int8,ctranslate2-int8
    python benchmarks/seq2seq.py build/opus-mt-shaped --peers onnxpipe,ctranslate2 --graph optimum
    python benchmarks/seq2seq.py build/t5-small-shaped --family t5 --peers onnxpipe,optimum,ctranslate2

The model is a random-weight MarianMTModel with Helsinki-NLP/opus-mt-en-de's dimensions (d_model 512,
6+6 layers, 8 heads, FFN 2048, vocabulary 58,101, tied embeddings), with a sentencepiece pair trained
on a few sentences and a vocab.json padded with synthetic pieces to the full size, so the output layer
and the beam search work on 58k logits as the real model does. --family t5 builds a random T5ForConditionalGeneration
with google-t5/t5-small's dimensions instead (d_model 512, 6+6 layers, 8 heads of 64, FFN 2048 relu,
vocabulary 32,128, tied, 32 relative-position buckets): its own encoder-decoder graph against optimum's. Outputs are forced to --new-tokens
tokens (min = max), so every engine does the same number of steps: figures are target tokens per
second (rows x new tokens / seconds), encoder and the first step included, model load excluded, the
best of --repeat timed runs. onnxpipe's float32 export is made with --graph (auto: onnxpipe's own
encoder-decoder graph, export.seq2seq_graph; optimum: optimum's merged decoder, which the optimum peer
always runs).
Every engine gets the same --threads on the CPU; each runs in its own process, one after another, so
its peak RSS (VmHWM) is its own.
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
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "cli"))

import harness  # noqa: E402  (benchmarks/, beside this script)

VOCAB = 58101
SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Machine translation turns English sentences into German ones, one line at a time.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Pipelines of small tools make the shell a pleasant place to work.",
    "She said hello and left the room before anyone could answer her question.",
    "Numbers like 42 and 2026 appear in text too.",
    "Short.",
    "Onnx runtime sessions run the exported graphs on the CPU or on the GPU when there is one.",
]


def build(folder: Path, family: str = "marian") -> Path:
    """The opus-mt-en-de-shaped (or t5-small-shaped) checkpoint in FOLDER/checkpoint (built once)."""
    ckpt = folder / "checkpoint"
    if (ckpt / "config.json").is_file():
        return ckpt
    if family == "t5":
        return _build_t5(ckpt)
    import sentencepiece as spm
    import torch
    import transformers
    from tiny_models import train_sentencepiece

    ckpt.mkdir(parents=True, exist_ok=True)
    for name in ("source", "target"):
        model = train_sentencepiece(ckpt, name, vocab_size=300, unk_id=1, eos_id=0, bos_id=-1, pad_id=-1)
        model.rename(ckpt / f"{name}.spm")
        (ckpt / f"{name}.vocab").unlink()
    vocab: dict[str, int] = {"</s>": 0, "<unk>": 1}
    for name in ("source.spm", "target.spm"):
        sp = spm.SentencePieceProcessor(model_file=str(ckpt / name))
        for i in range(sp.get_piece_size()):
            vocab.setdefault(sp.id_to_piece(i), len(vocab))
    while len(vocab) < VOCAB - 1:
        vocab[f"\u2581synthetic{len(vocab)}"] = len(vocab)
    vocab["<pad>"] = VOCAB - 1
    (ckpt / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tokenizer = transformers.MarianTokenizer(
        source_spm=str(ckpt / "source.spm"),
        target_spm=str(ckpt / "target.spm"),
        vocab=str(ckpt / "vocab.json"),
        model_max_length=512,
    )
    pad = VOCAB - 1
    config = transformers.MarianConfig(
        vocab_size=VOCAB,
        decoder_vocab_size=VOCAB,
        d_model=512,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        encoder_ffn_dim=2048,
        decoder_ffn_dim=2048,
        max_position_embeddings=512,
        activation_function="swish",
        scale_embedding=True,
        pad_token_id=pad,
        eos_token_id=0,
        decoder_start_token_id=pad,
        forced_eos_token_id=0,
        bad_words_ids=[[pad]],
        num_beams=4,
        max_length=512,
        share_encoder_decoder_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.MarianMTModel(config).eval()
    model.generation_config = transformers.GenerationConfig.from_model_config(config)
    model.save_pretrained(ckpt, safe_serialization=True)
    tokenizer.save_pretrained(ckpt)
    return ckpt


def _build_t5(ckpt: Path) -> Path:
    import torch
    import transformers
    from tiny_models import train_sentencepiece

    ckpt.mkdir(parents=True, exist_ok=True)
    spm_file = train_sentencepiece(ckpt, "spiece", vocab_size=300, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    (ckpt / "spiece.vocab").unlink()
    tokenizer = transformers.T5TokenizerFast(vocab_file=str(spm_file), extra_ids=100, from_slow=True)
    tokenizer.model_max_length = 512
    config = transformers.T5Config(
        vocab_size=32128,
        d_model=512,
        d_kv=64,
        d_ff=2048,
        num_layers=6,
        num_decoder_layers=6,
        num_heads=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    model.generation_config = transformers.GenerationConfig.from_model_config(config)
    model.save_pretrained(ckpt, safe_serialization=True)
    tokenizer.save_pretrained(ckpt)
    return ckpt


def export(folder: Path, ckpt: Path, quantize: str | None = None, graph: str = "auto") -> Path:
    suffix = "-" + quantize if quantize else "" if graph == "auto" else "-" + graph
    out = folder / ("export" + suffix)
    if not (out / "onnxpipe.json").is_file():
        from onnxpipe.export import export_model

        export_model(ckpt, out, quantize=quantize, graph=graph)
    return out


def texts(batch_size: int) -> list[str]:
    return [SENTENCES[i % len(SENTENCES)] for i in range(batch_size)]


def time_onnxpipe(out: Path, lines: list[str], beams: int, new: int, threads: int) -> float:
    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.seq2seq import Seq2SeqTask

    task = Seq2SeqTask(
        load_model(out, device="cpu", threads=threads), num_beams=beams, max_new_tokens=new, min_length=new + 1
    )
    sources = [task.tokenizer.encode(t).ids for t in lines]
    task.runner.generate(sources[:2], task.generation_config, task.pad_id, 4)  # warm-up

    def run() -> None:
        hyps = task.runner.generate(sources, task.generation_config, task.pad_id, task.max_new_tokens)
        assert all(len(h[0].token_ids) == new for h in hyps)

    return best_of(run)


def time_transformers(ckpt: Path, lines: list[str], beams: int, new: int, threads: int) -> float:
    import torch
    import transformers

    torch.set_num_threads(threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(ckpt).eval()
    batch = tokenizer(lines, return_tensors="pt", padding=True)
    with torch.no_grad():
        model.generate(**tokenizer(lines[:2], return_tensors="pt", padding=True), max_new_tokens=4)
        return best_of(lambda: model.generate(**batch, num_beams=beams, min_new_tokens=new, max_new_tokens=new))


def time_optimum(out: Path, ckpt: Path, lines: list[str], beams: int, new: int, threads: int) -> float:
    import onnxruntime as ort
    import transformers
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    model = ORTModelForSeq2SeqLM.from_pretrained(out, session_options=options, provider="CPUExecutionProvider")
    batch = tokenizer(lines, return_tensors="pt", padding=True)
    model.generate(**tokenizer(lines[:2], return_tensors="pt", padding=True), max_new_tokens=4)
    return best_of(lambda: model.generate(**batch, num_beams=beams, min_new_tokens=new, max_new_tokens=new))


def time_ctranslate2(
    folder: Path, ckpt: Path, lines: list[str], beams: int, new: int, threads: int, quantization: str
) -> float:
    import ctranslate2
    import transformers

    target = folder / f"ct2-{quantization}"
    if not (target / "model.bin").is_file():
        from ctranslate2.converters import TransformersConverter

        TransformersConverter(str(ckpt)).convert(str(target), quantization=quantization, force=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    translator = ctranslate2.Translator(str(target), device="cpu", inter_threads=1, intra_threads=threads)
    tokens = [tokenizer.convert_ids_to_tokens(tokenizer(t)["input_ids"]) for t in lines]
    translator.translate_batch(tokens[:2], max_decoding_length=4)

    def run() -> None:
        results = translator.translate_batch(
            tokens, beam_size=beams, min_decoding_length=new, max_decoding_length=new, max_batch_size=len(tokens)
        )
        assert all(len(r.hypotheses[0]) == new for r in results), [len(r.hypotheses[0]) for r in results]

    return best_of(run)


REPEAT = {"n": 3}


def best_of(run) -> float:
    """The fastest of REPEAT timed runs (after each system's own warm-up): noise only ever adds time."""
    times = []
    for _ in range(REPEAT["n"]):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--peers", default="onnxpipe,onnxpipe-int8,transformers,optimum,ctranslate2,ctranslate2-int8")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per system; the best counts")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--graph", choices=("auto", "fused", "optimum"), default="auto", help="onnxpipe's float32 export: who writes it"
    )
    parser.add_argument("--family", choices=("marian", "t5"), default="marian", help="the model built in FOLDER (once)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ckpt = build(args.folder, args.family)
    peers = args.peers.split(",")
    if "onnxpipe" in peers:  # exported here, before the timed processes start
        export(args.folder, ckpt, graph=args.graph)
    if "optimum" in peers:
        export(args.folder, ckpt, graph="optimum")
    if "onnxpipe-int8" in args.peers.split(","):
        export(args.folder, ckpt, "int8")
    lines = texts(args.batch_size)
    rows = args.batch_size
    runs = {
        "onnxpipe": lambda: time_onnxpipe(
            export(args.folder, ckpt, graph=args.graph), lines, args.num_beams, args.new_tokens, args.threads
        ),
        "onnxpipe-int8": lambda: time_onnxpipe(
            export(args.folder, ckpt, "int8"), lines, args.num_beams, args.new_tokens, args.threads
        ),
        "transformers": lambda: time_transformers(ckpt, lines, args.num_beams, args.new_tokens, args.threads),
        "optimum": lambda: time_optimum(
            export(args.folder, ckpt, graph="optimum"), ckpt, lines, args.num_beams, args.new_tokens, args.threads
        ),
        "ctranslate2": lambda: time_ctranslate2(
            args.folder, ckpt, lines, args.num_beams, args.new_tokens, args.threads, "float32"
        ),
        "ctranslate2-int8": lambda: time_ctranslate2(
            args.folder, ckpt, lines, args.num_beams, args.new_tokens, args.threads, "int8"
        ),
    }
    REPEAT["n"] = max(1, args.repeat)
    if args.child:
        seconds = runs[args.child]()
        print(json.dumps({"seconds": round(seconds, 4), "peak_rss_mb": round(harness.peak_rss_mb(), 1)}))
        return
    print(f"batch {rows}, {args.num_beams} beams, {args.new_tokens} forced tokens, CPU, {args.threads} threads")
    results = {}
    for name in [p for p in args.peers.split(",") if p]:
        if name not in runs:
            raise SystemExit(f"unknown peer {name} (known: {', '.join(runs)})")
        cmd = [
            sys.executable,
            __file__,
            str(args.folder),
            "--child",
            name,
            "--batch-size",
            str(rows),
            "--num-beams",
            str(args.num_beams),
            "--new-tokens",
            str(args.new_tokens),
            "--threads",
            str(args.threads),
            "--peers",
            name,
            "--repeat",
            str(args.repeat),
            "--graph",
            args.graph,
            "--family",
            args.family,
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            print(f"{name:>18}: skipped ({last[:200]})", flush=True)
            continue
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        seconds = child["seconds"]
        results[name] = {
            "tokens_per_s": round(rows * args.new_tokens / seconds, 2),
            "seconds": seconds,
            "peak_rss_mb": child["peak_rss_mb"],
        }
        if name == "onnxpipe-int8":  # the export's own gate: teacher-forced agreement with the float32 export
            quality = json.loads((export(args.folder, ckpt, "int8") / "onnxpipe.json").read_text())["validation"]
            quality = quality.get("quality") or {}
            results[name]["agreement_with_fp32"] = quality.get("agreement")
            print(
                f"{'':>18}  teacher-forced agreement with float32: {quality.get('agreement')} over "
                f"{quality.get('compared')} positions (threshold {quality.get('thresholds')})",
                flush=True,
            )
        rate = results[name]["tokens_per_s"]
        ratio = (
            f"  (onnxpipe: {results['onnxpipe']['tokens_per_s'] / rate:.2f}x)"
            if "onnxpipe" in results and name != "onnxpipe"
            else ""
        )
        print(
            f"{name:>18}: {rate:8.1f} target tokens/s ({seconds:.2f}s, peak RSS {child['peak_rss_mb']:,.0f} MB){ratio}",
            flush=True,
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "batch_size": rows,
                    "num_beams": args.num_beams,
                    "new_tokens": args.new_tokens,
                    "threads": args.threads,
                    "family": args.family,
                    "date": time.strftime("%Y-%m-%d"),
                    "results": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
