"""Measure an export's speed on this machine: what `onnxpipe bench` runs. Never prints.

Like llama-bench, every figure is the mean ± sd of per-run rates over `repeat` timed runs, after
`warmup` untimed runs of the same shape (the first runs of a shape pay for ONNX Runtime's
allocations). A run goes through the same task objects the commands use, without the reader, the
batcher and the writer:

- encoder tasks (classify, embed, tag, fill-mask): one batch of `batch_size` records of exactly
  `seq_len` tokens, specials included: `task.encode` (tokenizing) + `task.run` (the session and the
  post-processing). Figure: records/s.
- text-generation: a batch of prompts of exactly `prompt_tokens` tokens. `pp` times the prefill
  (prompt tokens/s); `tg` times the greedy decoding loop after it with `new_tokens` forced
  (min = max) and counts one token per row per one-token forward pass, so N new tokens are N - 1
  passes (the first new token comes from the prefill's logits). Figure: tokens/s.
- text2text-generation: the same split; `pp` is the encoder plus the first decoder step.

Inputs of an exact token length are cut from ordinary English text with the export's own tokenizer,
so the figures are for real token ids, not a repeated single id.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe import __version__
from onnxpipe.errors import InputError, UsageError
from onnxpipe.registry import export_kind, export_tasks
from onnxpipe.runtime import machine
from onnxpipe.stream.records import Record

TASKS = export_tasks()  # every task family's exports bench, by the graphs they hold
ENCODER_TASKS = export_tasks("encoder")

DEFAULT_ENCODER_BATCH_SIZES = (1, 8, 32)
DEFAULT_GENERATOR_BATCH_SIZES = (1, 8)
DEFAULT_SEQ_LENS = (16, 64, 128)
DEFAULT_PROMPT_TOKENS = (128,)
DEFAULT_NEW_TOKENS = (64,)

# Plain prose for generated inputs: words of every length, punctuation, a number or two.
_PROSE = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lamp, a "
    "notebook and a flask of strong tea. From the top he could see the harbour, the fishing boats "
    "coming home, and the long grey line of the coast running north for almost 40 miles. He wrote "
    "down the weather, the ships that passed and anything unusual: a whale in 1987, a storm that "
    "tore the roof off the boathouse, a message in a bottle that nobody could read. Visitors asked "
    "whether he was lonely, and he always said that the sea was better company than most people "
    "he had met in town. "
)


@dataclass
class Measurement:
    """One row of the report: a test at one shape, timed `len(seconds)` times."""

    test: str  # "encode" | "pp" | "tg"
    batch_size: int
    seq_len: int  # tokens per record: the input (encoders) or the prompt (pp, tg); mean tokens with --input
    new_tokens: int | None  # tg: generated tokens per row
    unit: str  # "records/s" | "tokens/s"
    count: int  # what one run processes, in `unit`'s numerator (records, or tokens)
    seconds: list[float] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        return [self.count / s for s in self.seconds if s > 0]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.rates) if self.rates else 0.0

    @property
    def sd(self) -> float:
        return statistics.stdev(self.rates) if len(self.rates) > 1 else 0.0

    def as_dict(self) -> dict[str, Any]:
        runs = len(self.seconds)
        return {
            "test": self.test,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "new_tokens": self.new_tokens,
            "runs": runs,
            "records": self.batch_size * runs,
            "tokens": self.count * runs if self.unit == "tokens/s" else self.seq_len * self.batch_size * runs,
            "unit": self.unit,
            "mean": self.mean,
            "sd": self.sd,
            "seconds": list(self.seconds),
        }


@dataclass
class BenchReport:
    model: str
    path: str
    task: str
    precision: str | None
    optimization: str | None
    provider: str | None
    device: str
    threads: int
    machine: dict[str, Any]
    versions: dict[str, str]
    warmup: int
    repeat: int
    input: str  # "generated" or the --input path
    date: str
    results: list[Measurement] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["results"] = [m.as_dict() for m in self.results]
        return data


@dataclass
class BenchOptions:
    batch_sizes: Sequence[int] | None = None  # None: per task kind
    seq_lens: Sequence[int] | None = None  # encoders
    prompt_tokens: Sequence[int] | None = None  # generators
    new_tokens: Sequence[int] | None = None  # generators
    input_lines: Sequence[str] | None = None  # instead of generated text
    input_name: str = "generated"
    warmup: int = 1
    repeat: int = 5


def run_bench(
    model_ref: str | Path,
    options: BenchOptions,
    device: str = "auto",
    threads: int | None = None,
    on_result: Callable[[Measurement], None] | None = None,
) -> BenchReport:
    """Load MODEL_REF, measure it as OPTIONS say, and return the report. `on_result` sees each row when done."""
    from onnxpipe.runtime import load_model

    if options.repeat < 1:
        raise UsageError("--repeat must be at least 1")
    if options.warmup < 0:
        raise UsageError("--warmup must be at least 0")
    model = load_model(model_ref, device=device, threads=threads)
    if model.task not in TASKS:
        raise UsageError(f"cannot bench a {model.task} export", hint="supported: " + ", ".join(sorted(TASKS)))
    _check_options(model, options)
    bench: _Bench = _BENCHES[export_kind(model.task)](model, options)
    report = BenchReport(
        model=model.name,
        path=str(model.folder),
        task=str(model.task),
        precision=model.manifest.get("precision"),
        optimization=model.manifest.get("optimization"),
        provider=model.provider,
        device=str(model.device),
        threads=model.threads or physical_cores(),
        machine=machine_info(),
        versions=versions(),
        warmup=options.warmup,
        repeat=options.repeat,
        input=options.input_name,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    for measurement in bench.measurements():
        report.results.append(measurement)
        if on_result is not None:
            on_result(measurement)
    return report


def _check_options(model: Any, options: BenchOptions) -> None:
    encoder = model.task in ENCODER_TASKS
    flags = (
        ["--prompt-tokens" if options.prompt_tokens else None, "--new-tokens" if options.new_tokens else None]
        if encoder
        else ["--seq-lens" if options.seq_lens else None]
    )
    wrong = [w for w in flags if w]
    if wrong:
        kind = "generators" if encoder else "encoder tasks (--prompt-tokens sets a generator's input length)"
        raise UsageError(f"{' and '.join(wrong)} apply to {kind}; {model.name} is a {model.task} export")
    if options.input_lines is not None and (options.seq_lens or options.prompt_tokens):
        raise UsageError("--input gives the texts: drop --seq-lens/--prompt-tokens")
    for name, values in (
        ("--batch-sizes", options.batch_sizes),
        ("--seq-lens", options.seq_lens),
        ("--prompt-tokens", options.prompt_tokens),
        ("--new-tokens", options.new_tokens),
    ):
        if values is not None and (not values or min(values) < 1):
            raise UsageError(f"{name} takes positive integers")


# --- the benches ---------------------------------------------------------------------------------


class _Bench:
    def __init__(self, model: Any, options: BenchOptions):
        self.model = model
        self.options = options

    def measurements(self):  # pragma: no cover - each bench has its own
        raise NotImplementedError

    def timed(self, run: Callable[[], Any]) -> list[float]:
        for _ in range(self.options.warmup):
            run()
        seconds = []
        for _ in range(self.options.repeat):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        return seconds

    def texts(self, tokenizer: Any, batch: int, seq_len: int, limit: int, prefix: str = "") -> list[str]:
        """BATCH texts: given lines (cycled), or generated ones of exactly SEQ_LEN tokens."""
        if self.options.input_lines is not None:
            lines = self.options.input_lines
            return [lines[i % len(lines)] for i in range(batch)]
        if seq_len > limit:
            raise UsageError(f"{seq_len} tokens: {self.model.name} takes at most {limit}")
        return [text_of_length(tokenizer, seq_len, prefix=prefix)] * batch


class _EncoderBench(_Bench):
    def __init__(self, model: Any, options: BenchOptions):
        super().__init__(model, options)
        self.task = _encoder_task(model)

    def measurements(self):
        opts = self.options
        prefix = ""
        if self.model.task == "fill-mask":
            prefix = self.task.mask_token + " "  # a line without a mask is a record error
        for seq_len in opts.seq_lens or (DEFAULT_SEQ_LENS if opts.input_lines is None else (0,)):
            for batch in opts.batch_sizes or DEFAULT_ENCODER_BATCH_SIZES:
                texts = self.texts(self.task.tokenizer, batch, seq_len, self.task.max_length, prefix)
                question = "What is it?" if self.model.task == "question-answering" else None  # the text is its context
                records = [Record(seq=i, text=t, pair=question) for i, t in enumerate(texts)]
                lengths: list[int] = []

                def run() -> None:
                    items = self.task.encode(records)
                    bad = next((item.error for item in items if item.error), None)
                    if bad:
                        raise InputError(bad)
                    self.task.run(items)
                    lengths[:] = [item.cost for item in items]

                seconds = self.timed(run)
                tokens = round(sum(lengths) / len(lengths)) if lengths else seq_len
                yield Measurement("encode", batch, tokens, None, "records/s", batch, seconds)


def _encoder_task(model: Any) -> Any:
    """The task a command runs on this export, with its defaults (the registry knows which)."""
    from onnxpipe.registry import family_for_export

    return family_for_export(model.task).make_task(model, {})


class _GeneratorBench(_Bench):
    """pp and tg rows from the same runs: each run times the prompt part and the decoding loop apart."""

    tokenizer: Any
    max_positions: int | None
    room_counts_prompt = True  # prompt and new tokens share the positions (decoder-only)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def start(self, prompts: list[list[int]], new: int) -> tuple[Any, Any]:
        """Process the prompts; return (first logits, step function)."""
        raise NotImplementedError

    def loop(self, logits: Any, step: Any, prompts: list[list[int]], new: int) -> tuple[int, list]:
        """Run the decoding loop; return (one-token forward passes, hypotheses)."""
        raise NotImplementedError

    def check_new_tokens(self, new: int) -> None:
        pass

    def measurements(self):
        opts = self.options
        limit = self.max_positions or 1 << 30
        for prompt_tokens in opts.prompt_tokens or (DEFAULT_PROMPT_TOKENS if opts.input_lines is None else (0,)):
            for new in opts.new_tokens or DEFAULT_NEW_TOKENS:
                for batch in opts.batch_sizes or DEFAULT_GENERATOR_BATCH_SIZES:
                    self.check_new_tokens(new)
                    texts = self.texts(self.tokenizer, batch, prompt_tokens, limit, "")
                    prompts = [self.encode(t) for t in texts]
                    if self.room_counts_prompt and max(len(p) for p in prompts) + new > limit:
                        raise UsageError(
                            f"a prompt of {max(len(p) for p in prompts)} tokens and {new} new tokens "
                            f"do not fit the model's {limit} positions",
                            hint="use fewer tokens",
                        )
                    pp = Measurement(
                        "pp", batch, round(sum(map(len, prompts)) / batch), None, "tokens/s", sum(map(len, prompts))
                    )
                    tg = Measurement("tg", batch, pp.seq_len, new, "tokens/s", 0)
                    passes = 0

                    def run(record: bool) -> None:
                        nonlocal passes
                        t0 = time.perf_counter()
                        logits, step = self.start(prompts, new)
                        t1 = time.perf_counter()
                        passes, hyps = self.loop(logits, step, prompts, new)
                        t2 = time.perf_counter()
                        made = [len(nbest[0].token_ids) for nbest in hyps]
                        if made != [new] * batch:
                            raise InputError(f"asked for {new} forced new tokens, got {sorted(set(made))}")
                        if record:
                            pp.seconds.append(t1 - t0)
                            tg.seconds.append(t2 - t1)

                    for _ in range(opts.warmup):
                        run(False)
                    for _ in range(opts.repeat):
                        run(True)
                    tg.count = batch * passes
                    yield pp
                    yield tg


class _CausalBench(_GeneratorBench):
    def __init__(self, model: Any, options: BenchOptions):
        super().__init__(model, options)
        from onnxpipe.tasks.causal import GenerateTask

        self.task = GenerateTask(model)
        self.lm = self.task.lm
        self.tokenizer = self.lm.tokenizer
        self.max_positions = self.lm.max_positions
        defaults = self.lm.defaults
        self.pad = defaults.pad_token_id if defaults.pad_token_id is not None else (defaults.eos_token_id or [0])[0]

    def encode(self, text: str) -> list[int]:
        return self.lm.encode(text)

    def start(self, prompts, new: int):
        return self.lm.decoder.prefill(prompts, self.pad)

    def loop(self, logits, step, prompts, new):
        from onnxpipe.decoding import generate

        config = self.lm.defaults.update(
            do_sample=False, num_beams=1, num_return_sequences=1, min_new_tokens=new, max_new_tokens=new
        )
        before = self.lm.decoder.stats.steps
        hyps = generate(step, logits, prompts, config)
        return self.lm.decoder.stats.steps - before, hyps


class _Seq2SeqBench(_GeneratorBench):
    room_counts_prompt = False  # source and target positions are separate

    def __init__(self, model: Any, options: BenchOptions):
        super().__init__(model, options)
        from onnxpipe.tasks.seq2seq import Seq2SeqTask

        self.task = Seq2SeqTask(model, num_beams=1, do_sample=False, num_return_sequences=1)
        self.runner = self.task.runner
        self.tokenizer = self.task.tokenizer
        self.max_positions = self.task.max_length
        self.new_limit = self.task.max_new_tokens

    def encode(self, text: str) -> list[int]:
        return self.model.graph_ids(self.tokenizer.encode(text).ids)

    def start(self, prompts, new: int):
        ids = np.asarray(prompts, dtype=np.int64) if len({len(p) for p in prompts}) == 1 else None
        if ids is None:  # --input lines of different lengths: right-pad as the runner does
            width = max(map(len, prompts))
            ids = np.full((len(prompts), width), self.task.pad_id, dtype=np.int64)
            for r, p in enumerate(prompts):
                ids[r, : len(p)] = p
        mask = (np.arange(ids.shape[1])[None, :] < np.array([len(p) for p in prompts])[:, None]).astype(np.int64)
        start = self.task.generation_config.decoder_start_token_id
        assert start is not None  # Seq2SeqTask refuses a model without one
        return self.runner.start(ids, mask, int(start), max_rows=len(prompts), max_steps=new + 1, log_probs=False)

    def check_new_tokens(self, new: int) -> None:
        if new > self.new_limit:
            raise UsageError(f"--new-tokens {new}: {self.model.name} generates at most {self.new_limit}")

    def loop(self, logits, step, prompts, new):
        from onnxpipe.decoding import generate

        # min_length counts the whole decoder sequence, the start token included (as transformers does).
        config = self.task.generation_config.update(min_length=new + 1, min_new_tokens=new, max_new_tokens=new)
        start = int(config.decoder_start_token_id)
        before = self.runner.steps
        hyps = generate(step, logits, [[start]] * len(prompts), config)
        return self.runner.steps - before, hyps


# --- inputs ----------------------------------------------------------------------------------------


def text_of_length(tokenizer: Any, tokens: int, prefix: str = "") -> str:
    """Text that TOKENIZER encodes (special tokens included) into exactly TOKENS ids.

    Cut at a token boundary of plain prose; when the cut changes how the last word splits, the
    neighbouring boundaries are tried. Raises UsageError when no cut gives the length (e.g. fewer
    tokens than the special tokens alone).
    """
    words = _PROSE.split()
    source = prefix + " ".join(words[i % len(words)] for i in range(tokens + 8))  # a word is >= 1 token
    encoding = tokenizer.encode(source)
    specials = sum(encoding.special_tokens_mask)
    ends = [end for (_, end), special in zip(encoding.offsets, encoding.special_tokens_mask) if not special]
    target = tokens - specials - 1  # index of the last content token
    for delta in range(0, 8):
        for j in (target,) if delta == 0 else (target - delta, target + delta):
            if 0 <= j < len(ends):
                text = source[: ends[j]]
                if len(tokenizer.encode(text).ids) == tokens:
                    return text
    raise UsageError(
        f"cannot make an input of exactly {tokens} tokens with this tokenizer",
        hint=f"use at least {specials + 1} tokens",
    )


_BENCHES: dict[str, type[_Bench]] = {"encoder": _EncoderBench, "decoder": _CausalBench, "seq2seq": _Seq2SeqBench}


def read_lines(path: str, limit: int) -> list[str]:
    """The first LIMIT non-empty lines of PATH ('-': stdin), decoded with replacement."""
    from onnxpipe.stream.readers import read_text_lines

    lines = read_text_lines(path, skip_empty=True, limit=limit)
    if not lines:
        raise InputError(f"{path} has no non-empty lines")
    return lines


# --- the machine -----------------------------------------------------------------------------------


def physical_cores() -> int:
    """Physical cores, as ONNX Runtime counts them for its default intra-op threads."""
    return machine.physical_cores() or os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    import platform

    cpus = machine.cpuinfo()
    model = next((c.get("model name") for c in cpus if c.get("model name")), None) or platform.processor() or None
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) / (1 << 20), 1)  # kB -> GiB
    except (OSError, ValueError, IndexError):
        pass
    flags = next((c.get("flags", "") for c in cpus), "").split()
    return {
        "cpu": model,
        "cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": memory,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx2": "avx2" in flags,
        "gpu": gpu_names() or None,
        "platform": platform.platform(),
    }


def gpu_names() -> list[str]:
    """NVIDIA GPU names, from nvidia-smi or the driver's /proc entries; [] when there is none."""
    names = [gpu["name"] for gpu in machine.nvidia_gpus()["devices"]]
    for info in [] if names else sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("Model:"):
                names.append(line.split(":", 1)[1].strip())
    return names


def versions() -> dict[str, str]:
    import onnxruntime
    import tokenizers

    return {
        "onnxpipe": __version__,
        "onnxruntime": onnxruntime.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
    }
