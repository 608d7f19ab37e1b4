"""Continuous batching (serve.continuous): requests that join and leave a running batch at step boundaries
get exactly the ids they get alone.

The oracle is the request run alone: `CausalLM.generate` on a batch of one (itself checked against
transformers' generate in test_decoding.py and test_generate.py), and transformers' generate directly for
GPT-2. Joins are made deterministic by a batcher whose scheduler waits for the test before every step
(`Stepped`): the test submits requests between steps, so they really arrive mid-generation.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

import onnxpipe
from onnxpipe.errors import OnnxpipeError, UsageError
from onnxpipe.runtime.running import merge_caches
from onnxpipe.serve.continuous import (
    BatcherClosed,
    ContinuousBatcher,
    GenerationRequest,
    GenerationStream,
    QueueFull,
)

PROMPTS = [
    "The quick brown fox",
    "Paris is",
    "A good movie with a great cast and a moving story about",
    "Short.",
    "Numbers like 42 and 7 and more numbers",
    "I loved",
    "Machine translation turns English sentences into",
    "She said",
]
MAX_NEW = [24, 6, 17, 30, 9, 12, 20, 4]  # different lengths: rows leave at different steps
# When each request arrives: after this many scheduler steps (several join while others run; the longest
# prompt joins rows shorter than itself, so the running cache is the one padded).
ARRIVAL = [0, 0, 3, 0, 3, 5, 11, 12]


class Stepped(ContinuousBatcher):
    """A batcher whose scheduler runs a step only when the test allows it (`advance`)."""

    def __init__(self, *args, **kwargs):
        self.gate = threading.Semaphore(0)
        self.advanced = 0
        self.done = threading.Condition()
        super().__init__(*args, **kwargs)

    def _advance(self) -> None:
        assert self.gate.acquire(timeout=60), "the test never allowed the step"
        try:
            super()._advance()
        finally:
            with self.done:
                self.advanced += 1
                self.done.notify_all()

    def advance(self, steps: int) -> None:
        """Let STEPS steps run and wait until they did."""
        target = self.advanced + steps
        for _ in range(steps):
            self.gate.release()
        with self.done:
            assert self.done.wait_for(lambda: self.advanced >= target, timeout=60)

    def run_free(self) -> None:
        for _ in range(10_000):
            self.gate.release()


@pytest.fixture(scope="module")
def pipelines(exported):
    cache: dict = {}

    def get(arch: str, **options) -> onnxpipe.Pipeline:
        key = (arch, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = onnxpipe.load(exported(arch, **options), device="cpu", threads=1)
        return cache[key]

    return get


def lone(pipeline, ids, max_new_tokens, **settings):
    """The request alone: CausalLM.generate on a batch of one (ids, finish reason, text); `streamed` is the
    text its on_text pieces add up to (decode()'s text, except after bytes that form no valid UTF-8,
    which a random model produces and a byte-fallback decoder turns into U+FFFDs retroactively)."""
    lm = pipeline.task_for({}).lm
    config = lm.defaults.update(max_new_tokens=max_new_tokens, do_sample=False, **settings)
    pieces: list[str] = []
    (best,) = lm.generate([ids], config, on_text=lambda _key, chunk: pieces.append(chunk))[0]
    best.streamed = "".join(pieces)
    return best


def staggered(batcher: Stepped, requests, arrival):
    """Submit REQUESTS at their arrival steps; return each one's events."""
    streams = {}
    step = 0
    for t in sorted(set(arrival)):
        if t > step:
            batcher.advance(t - step)
            step = t
        for i, (request, at) in enumerate(zip(requests, arrival)):
            if at == t:
                streams[i] = batcher.submit(request)
    batcher.run_free()
    return [list(streams[i]) for i in range(len(requests))]


@pytest.fixture(scope="module")
def shared_buffer(shared_buffer_export):
    return onnxpipe.load(shared_buffer_export, device="cpu", threads=1)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "shared-buffer"])
def test_staggered_greedy_requests_equal_each_request_alone(pipelines, arch, request):
    """8 greedy requests of different prompt lengths and max_new_tokens, arriving while others run, on
    onnxpipe's fused graph (llama: GroupQueryAttention), optimum's (gpt2, qwen2) and onnxpipe's CUDA graph
    (its shared key/value buffer, run on the CPU: rows join at their own lengths, and the buffer grows
    when a newcomer needs more positions). The tiny Llama and Qwen2 have sharpened q/k projections, so
    their ids depend on which positions attend to which (a misplaced mask or length changes them); the
    tiny GPT-2's barely do."""
    from onnxpipe.runtime.decoder import SharedBufferDecoder

    pipeline = pipelines(arch) if arch in ("llama", "gpt2") else request.getfixturevalue(arch.replace("-", "_"))
    if arch == "qwen2":
        pipeline = pipeline[1]
    graph = pipeline.model.manifest["graph"]["builder"]
    expected = {"llama": "onnxpipe-fused", "shared-buffer": "onnxpipe-fused-cuda"}.get(arch, "optimum")
    assert graph == expected
    batcher = Stepped(pipeline, max_batch=8)
    assert isinstance(batcher.decoder, SharedBufferDecoder) == (arch == "shared-buffer")
    lengths: list[int] = []  # the shared buffer's length at each step
    if arch == "shared-buffer":  # a buffer length step of 8 positions: several regrowths with these prompts
        request.getfixturevalue("monkeypatch").setattr("onnxpipe.runtime.running.LENGTH_STEP", 8)
        step = batcher._batch.step
        batcher._batch.step = lambda tokens: lengths.append(batcher._batch.length) or step(tokens)
    try:
        ids = [batcher.encode_text(p) for p in PROMPTS]
        requests = [GenerationRequest(i, max_new_tokens=m, temperature=0) for i, m in zip(ids, MAX_NEW)]
        results = staggered(batcher, requests, ARRIVAL)
    finally:
        batcher.close()
    assert len(ids[2]) > max(len(ids[i]) for i in (0, 1, 3)) + ARRIVAL[2]  # longer than the batch it joins
    assert batcher.prefills >= 5  # the later requests were prefilled while the first ones ran
    assert batcher.max_rows >= 5  # and ran in one batch with them
    for prompt_ids, max_new, events in zip(ids, MAX_NEW, results):
        alone = lone(pipeline, prompt_ids, max_new)
        got = [e.token_id for e in events if e.token_id is not None]
        assert got == alone.token_ids
        last = events[-1]
        assert last.finish_reason == ("length" if alone.finish_reason == "length" else "stop")
        assert last.usage.prompt_tokens == len(prompt_ids) and last.usage.completion_tokens == len(got)
        assert "".join(e.text for e in events) == alone.streamed
        assert last.full_text == alone.text  # what `onnxpipe generate` and result() give
        if arch == "gpt2":  # byte-level BPE: the pieces add up to decode()'s text
            assert alone.streamed == alone.text
    assert len({len(e) for e in results}) >= 6  # the rows left the batch at different steps
    if arch == "shared-buffer":  # the buffer grew as longer requests joined, never past what they need
        assert lengths[0] < max(lengths) and lengths == sorted(lengths)
        assert len(set(lengths)) >= 3 and max(lengths) <= max(len(i) + m for i, m in zip(ids, MAX_NEW)) + 7


def test_gpt2_requests_equal_transformers_generate(pipelines, checkpoint):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    folder = checkpoint("gpt2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    batcher = ContinuousBatcher(pipelines("gpt2"), max_batch=4)
    try:
        streams = [
            batcher.submit(GenerationRequest(batcher.encode_text(p), max_new_tokens=m, temperature=0))
            for p, m in zip(PROMPTS, MAX_NEW)
        ]
        outputs = [s.result() for s in streams]
    finally:
        batcher.close()
    for prompt, max_new, out in zip(PROMPTS, MAX_NEW, outputs):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            theirs = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        assert out.token_ids == theirs[0, ids.shape[1] :].tolist()
        assert out.text == tokenizer.decode(theirs[0, ids.shape[1] :], skip_special_tokens=True)


def test_a_cancelled_request_leaves_and_the_others_are_unaffected(pipelines):
    pipeline = pipelines("llama")
    batcher = Stepped(pipeline, max_batch=4)
    try:
        ids = [batcher.encode_text(p) for p in PROMPTS[:3]]
        streams = [batcher.submit(GenerationRequest(i, max_new_tokens=20, temperature=0)) for i in ids]
        batcher.advance(4)
        assert batcher.running == 3
        events = iter(streams[1])
        seen = [next(events) for _ in range(4)]  # the four steps' ids
        streams[1].cancel()
        assert list(events) == []  # the iteration ends at once, with no last event
        batcher.advance(1)
        assert batcher.running == 2 and batcher.cancelled == 1  # the row left at the next step
        batcher.run_free()
        results = [streams[0].result(), streams[2].result()]
        with pytest.raises(OnnxpipeError, match="cancelled"):
            streams[1].result()
    finally:
        batcher.close()
    assert [e.token_id for e in seen] == lone(pipeline, ids[1], 20).token_ids[:4]
    assert [r.token_ids for r in results] == [
        lone(pipeline, ids[0], 20).token_ids,
        lone(pipeline, ids[2], 20).token_ids,
    ]


def test_leaving_the_loop_early_cancels(pipelines):
    batcher = Stepped(pipelines("gpt2"), max_batch=2)
    try:
        stream = batcher.submit(GenerationRequest(batcher.encode_text("Paris is"), max_new_tokens=30, temperature=0))
        batcher.advance(2)
        for _event in stream:
            break
        assert stream.cancelled
        batcher.advance(1)
        assert batcher.running == 0
    finally:
        batcher.run_free()
        batcher.close()


def test_seeded_sampling_is_the_same_whatever_the_batch_mates(pipelines):
    """A sampled request draws from its own (seed, key) stream: the same ids alone, among other requests
    (greedy and sampled ones, joining at other steps), and as `CausalLM.generate` gives record `key`."""
    pipeline = pipelines("llama")
    batcher = ContinuousBatcher(pipeline, max_batch=8)
    prompt = batcher.encode_text("The quick brown fox")
    request = GenerationRequest(prompt, max_new_tokens=20, temperature=0.9, top_p=0.95, seed=7, key=3)
    try:
        alone = batcher.submit(request).result().token_ids
        stepped = Stepped(pipeline, max_batch=8)
        try:
            others = [
                GenerationRequest(batcher.encode_text(p), max_new_tokens=m, temperature=t, seed=1)
                for p, m, t in zip(PROMPTS[1:5], MAX_NEW[1:5], [0, 1.3, 0, 0.5])
            ]
            crowd = staggered(stepped, [*others, request], [0, 0, 2, 2, 5])
        finally:
            stepped.close()
    finally:
        batcher.close()
    in_crowd = [e.token_id for e in crowd[-1] if e.token_id is not None]
    assert in_crowd == alone
    lm = pipeline.task_for({}).lm
    config = lm.defaults.update(max_new_tokens=20, do_sample=True, temperature=0.9, top_p=0.95, seed=7)
    assert lm.generate([prompt], config, keys=[3])[0][0].token_ids == alone
    greedy = lone(pipeline, prompt, 20).token_ids
    assert alone != greedy  # it really sampled
    other_seed = ContinuousBatcher(pipeline)
    try:
        assert other_seed.submit(GenerationRequest(prompt, 20, 0.9, 0.95, seed=8, key=3)).result().token_ids != alone
    finally:
        other_seed.close()


def test_the_exports_generation_defaults_apply_to_each_row_as_alone(pipelines):
    """Processors that read a row's history (repetition penalty, no-repeat n-grams) see only its own ids."""
    pipeline = pipelines("llama")
    batcher = Stepped(pipeline, max_batch=4)
    defaults = batcher.lm.defaults
    batcher.lm.defaults = defaults.update(repetition_penalty=1.8, no_repeat_ngram_size=2)
    try:
        ids = [batcher.encode_text(p) for p in PROMPTS[:4]]
        requests = [GenerationRequest(i, max_new_tokens=16, temperature=0) for i in ids]
        results = staggered(batcher, requests, [0, 0, 3, 6])
        alone = [lone(pipeline, i, 16, repetition_penalty=1.8, no_repeat_ngram_size=2).token_ids for i in ids]
    finally:
        batcher.lm.defaults = defaults
        batcher.close()
    assert [[e.token_id for e in r if e.token_id is not None] for r in results] == alone
    assert alone != [lone(pipeline, i, 16).token_ids for i in ids]  # the settings changed the ids


def test_stop_strings_and_text_deltas(pipelines):
    pipeline = pipelines("gpt2")
    prompt_ids = pipeline.task_for({}).lm.encode("The quick brown fox")
    full = lone(pipeline, prompt_ids, 24)
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert stop.strip() and stop in full.text
    lm = pipeline.task_for({}).lm
    config = lm.defaults.update(max_new_tokens=24, do_sample=False)
    expected = lm.generate([prompt_ids], config, stop=[stop])[0][0]
    batcher = ContinuousBatcher(pipeline)
    try:
        events = list(batcher.submit(GenerationRequest(prompt_ids, 24, temperature=0, stop=[stop])))
    finally:
        batcher.close()
    assert events[-1].finish_reason == "stop" and expected.finish_reason == "stop"
    text = "".join(e.text for e in events)
    assert text == expected.text == full.text[: full.text.find(stop)]
    assert all(stop not in e.text for e in events)
    assert [e.token_id for e in events if e.token_id is not None] == expected.token_ids


def test_utf8_deltas_are_never_half_a_character(pipelines):
    """Byte-level BPE ids of a multi-byte character are held back until the character is whole."""
    pipeline = pipelines("gpt2")
    lm = pipeline.task_for({}).lm
    ids = lm.encode("née café ☕ 日本")
    batcher = ContinuousBatcher(pipeline)
    try:
        # A tiny random model would not generate these ids: feed them to a row's text stream directly.
        row = batcher._new_row(GenerationStream(GenerationRequest(ids, 1)))
        pieces = []
        for token in ids:
            row.texts.feed(np.zeros(1, dtype=np.int64), np.array([token]))
            pieces.append("".join(row.pending))
            row.pending.clear()
    finally:
        batcher.close()
    assert "".join(pieces) == "née café ☕ 日本"
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if not p) >= 1  # some ids completed no character on their own


def test_queue_full_raises_and_close_finishes_what_was_accepted(pipelines):
    pipeline = pipelines("gpt2")
    batcher = Stepped(pipeline, max_batch=1, max_queue=2)
    ids = batcher.encode_text("Paris is")
    first = batcher.submit(GenerationRequest(ids, max_new_tokens=5, temperature=0))
    batcher.advance(1)
    assert batcher.running == 1
    queued = [batcher.submit(GenerationRequest(ids, max_new_tokens=m, temperature=0)) for m in (3, 4)]
    with pytest.raises(QueueFull):
        batcher.submit(GenerationRequest(ids, max_new_tokens=3, temperature=0))
    closer = threading.Thread(target=batcher.close)
    closer.start()
    with pytest.raises(BatcherClosed):
        for _ in range(100):  # close() sets the flag at once; the thread may need a moment to run
            batcher.submit(GenerationRequest(ids, max_new_tokens=3, temperature=0))
            threading.Event().wait(0.01)
    batcher.run_free()
    closer.join(60)
    assert not closer.is_alive() and not batcher._thread.is_alive()
    expected = lone(pipeline, ids, 5).token_ids
    assert first.result().token_ids == expected
    assert [q.result().token_ids for q in queued] == [expected[:3], expected[:4]]


def test_a_request_cancelled_while_queued_frees_its_place(pipelines):
    pipeline = pipelines("gpt2")
    batcher = Stepped(pipeline, max_batch=1, max_queue=1)
    ids = batcher.encode_text("Paris is")
    try:
        first = batcher.submit(GenerationRequest(ids, max_new_tokens=6, temperature=0))
        batcher.advance(1)
        queued = batcher.submit(GenerationRequest(ids, max_new_tokens=3, temperature=0))
        with pytest.raises(QueueFull):
            batcher.submit(GenerationRequest(ids, max_new_tokens=4, temperature=0))
        queued.cancel()
        batcher.advance(1)  # at the next step boundary the queue drops it
        for _ in range(500):
            if not batcher.waiting:
                break
            threading.Event().wait(0.01)
        later = batcher.submit(GenerationRequest(ids, max_new_tokens=4, temperature=0))
        batcher.run_free()
        expected = lone(pipeline, ids, 6).token_ids
        assert first.result().token_ids == expected and later.result().token_ids == expected[:4]
        assert batcher.cancelled == 1 and batcher.prefills == 2  # the cancelled request never ran
    finally:
        batcher.run_free()
        batcher.close()


def test_async_iteration_of_concurrent_requests(pipelines):
    pipeline = pipelines("llama")
    batcher = ContinuousBatcher(pipeline, max_batch=3)

    async def one(prompt: str, max_new: int):
        request = GenerationRequest(batcher.encode_text(prompt), max_new_tokens=max_new, temperature=0)
        return [event async for event in batcher.submit(request)]

    async def main():
        return await asyncio.gather(*(one(p, m) for p, m in zip(PROMPTS, MAX_NEW)))

    try:
        results = asyncio.run(main())
    finally:
        batcher.close()
    assert batcher.max_rows == 3  # more requests than rows: they queued and joined as rows left
    for prompt, max_new, events in zip(PROMPTS, MAX_NEW, results):
        alone = lone(pipeline, batcher.encode_text(prompt), max_new)
        assert [e.token_id for e in events if e.token_id is not None] == alone.token_ids
        assert events[-1].finish_reason is not None


def test_a_failed_run_ends_its_requests_with_an_error_and_the_next_ones_run(pipelines, monkeypatch):
    pipeline = pipelines("gpt2")
    batcher = ContinuousBatcher(pipeline)
    ids = batcher.encode_text("Paris is")
    try:
        real = batcher.decoder.decode
        monkeypatch.setattr(batcher.decoder, "decode", lambda *a: (_ for _ in ()).throw(RuntimeError("boom\nmore")))
        stream = batcher.submit(GenerationRequest(ids, max_new_tokens=5, temperature=0))
        with pytest.raises(OnnxpipeError, match="^generation failed: boom$"):
            stream.result()
        monkeypatch.setattr(batcher.decoder, "decode", real)
        assert (
            batcher.submit(GenerationRequest(ids, 5, temperature=0)).result().token_ids
            == lone(pipeline, ids, 5).token_ids
        )
    finally:
        batcher.close()


def test_requests_that_cannot_run_are_refused_at_submit(pipelines):
    batcher = ContinuousBatcher(pipelines("gpt2"))
    try:
        with pytest.raises(UsageError, match="empty"):
            batcher.submit(GenerationRequest([]))
        with pytest.raises(UsageError, match="positions"):
            batcher.submit(GenerationRequest([5] * batcher.max_positions))
        with pytest.raises(UsageError, match="temperature"):
            batcher.submit(GenerationRequest([5], temperature=-1))
        with pytest.raises(UsageError, match="top_p"):
            batcher.submit(GenerationRequest([5], temperature=1, top_p=2))
        # max_new_tokens past the model's positions is capped to what is left
        out = batcher.submit(GenerationRequest([5] * (batcher.max_positions - 3), max_new_tokens=50, temperature=0))
        assert out.result().usage.completion_tokens <= 3
    finally:
        batcher.close()
    with pytest.raises(UsageError, match="text-generation"):
        ContinuousBatcher(
            type("P", (), {"family": type("F", (), {"kind": "encoder"})(), "name": "x", "task": "embed"})()
        )


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """Tiny Qwen2 (tests/tiny_decoders.py): a ChatML template, two eos ids, optimum's graph."""
    import tiny_decoders

    from onnxpipe.export import export_model

    root = tmp_path_factory.mktemp("qwen2")
    ckpt = tiny_decoders.build("qwen2", root / "ckpt")
    export_model(ckpt, root / "export", task="text-generation", graph="optimum")
    return ckpt, onnxpipe.load(root / "export", device="cpu", threads=1)


def test_chat_messages_use_the_exports_template(qwen2):
    transformers = pytest.importorskip("transformers")
    ckpt, pipeline = qwen2
    batcher = ContinuousBatcher(pipeline)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    try:
        ids = batcher.encode_chat(messages)
        out = batcher.submit(GenerationRequest(ids, max_new_tokens=8, temperature=0)).result()
    finally:
        batcher.close()
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    assert ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert out.token_ids == lone(pipeline, ids, 8).token_ids
    assert batcher.eos_token_ids == tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])


def test_merge_caches_pads_the_shorter_on_the_left(pipelines):
    from onnxruntime import OrtValue

    decoder = pipelines("gpt2").task_for({}).lm.decoder
    a = [OrtValue.ortvalue_from_numpy(np.full((1, 2, 3, 4), 1.0, np.float32))]
    b = [OrtValue.ortvalue_from_numpy(np.full((2, 2, 5, 4), 2.0, np.float32))]
    past, mask = merge_caches(decoder, a, np.ones((1, 3), np.int64), b, np.array([[0, 1, 1, 1, 1], [1] * 5]))
    merged = past[0].numpy()
    assert merged.shape == (3, 2, 5, 4)
    assert (merged[0, :, :2] == 0).all() and (merged[0, :, 2:] == 1).all() and (merged[1:] == 2).all()
    assert mask.tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]


SMOLLM2 = Path(__file__).resolve().parent.parent / "exports" / "smollm2"


@pytest.mark.real_model
@pytest.mark.skipif(not (SMOLLM2 / "onnxpipe.json").is_file(), reason="needs exports/smollm2: run make models")
def test_smollm2_concurrent_chats_equal_their_lone_greedy_outputs():
    pipeline = onnxpipe.load(SMOLLM2, device="cpu", threads=min(2, os.cpu_count() or 1))
    questions = [
        "What is the capital of France?",
        "Name three primary colors.",
        "Write a haiku about pipes.",
        "What is 12 times 12?",
    ]
    batcher = Stepped(pipeline, max_batch=4)
    try:
        ids = [batcher.encode_chat([{"role": "user", "content": q}]) for q in questions]
        requests = [GenerationRequest(i, max_new_tokens=m, temperature=0) for i, m in zip(ids, [40, 24, 32, 16])]
        results = staggered(batcher, requests, [0, 0, 4, 9])
    finally:
        batcher.close()
    assert batcher.max_rows >= 3
    for prompt_ids, max_new, events in zip(ids, [40, 24, 32, 16], results):
        alone = lone(pipeline, prompt_ids, max_new)
        assert [e.token_id for e in events if e.token_id is not None] == alone.token_ids
    assert "Paris" in "".join(e.text for e in results[0])
    assert json.loads((SMOLLM2 / "onnxpipe.json").read_text())["graph"]["builder"] == "onnxpipe-fused"
