"""decoding/ and tasks/causal.py against transformers: processors on random logits, generated ids on tiny models.

The oracle is transformers' own code: each numpy logits processor is compared with its torch
counterpart, and the ids of greedy and beam search on the ONNX exports of tiny GPT-2 and Llama are
compared with `model.generate` on the PyTorch checkpoints.

Random tiny models rarely produce their real eos, so the comparisons that must exercise finishing
(rows cut at eos, finished beams, early stopping, dropped rows) declare a token the model produces
often as eos, for both sides. `_nontrivial` asserts that each comparison covers many tokens and,
where it matters, rows that ended on eos and rows that ran to the length limit.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxpipe.decoding import GenerationConfig, History, generate
from onnxpipe.decoding import processors as P


def _torch():
    """torch, or skip: only the comparisons with transformers need it (the search tests are numpy)."""
    return pytest.importorskip("torch")


def _hf():
    _torch()
    return pytest.importorskip("transformers.generation.logits_process")


PROMPTS = [
    "The quick brown fox",
    "Paris is",
    "A good movie with a great cast and a moving story about",
    "Short.",
    "Numbers like 42",
    "I loved",
    "Machine translation turns English sentences into",
    "She said: hello",
]


# --- processors against transformers' torch implementation ----------------------------------


def _random_case(rows=6, length=12, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 8, size=(rows, length))  # few distinct ids: repeats and n-grams happen
    ids[:, ::3] = rng.integers(0, vocab, size=ids[:, ::3].shape)
    scores = rng.normal(size=(rows, vocab)).astype(np.float32) * 3
    return ids.astype(np.int64), scores


def _ours(proc, ids, scores, prompt_width=None):
    history = History(ids, np.zeros(len(ids), dtype=np.int64), ids.shape[1] if prompt_width is None else prompt_width)
    return proc(history, scores.copy())


def _theirs(proc, ids, scores):
    torch = _torch()
    return proc(torch.from_numpy(ids), torch.from_numpy(scores.copy())).numpy()


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (P.RepetitionPenalty(1.7), ("RepetitionPenaltyLogitsProcessor", (1.7))),
        (P.RepetitionPenalty(0.6), ("RepetitionPenaltyLogitsProcessor", (0.6))),
        (P.NoRepeatNGram(1), ("NoRepeatNGramLogitsProcessor", (1))),
        (P.NoRepeatNGram(2), ("NoRepeatNGramLogitsProcessor", (2))),
        (P.NoRepeatNGram(3), ("NoRepeatNGramLogitsProcessor", (3))),
        (P.NoRepeatNGram(13), ("NoRepeatNGramLogitsProcessor", (13))),
        (
            P.NoBadWords([[3], [5, 1], [2, 2, 7], [9]], [9]),
            ("NoBadWordsLogitsProcessor", ([[3], [5, 1], [2, 2, 7], [9]], 9)),
        ),
        (P.MinLength(13, [4, 7]), ("MinLengthLogitsProcessor", (13, [4, 7]))),
        (P.MinLength(12, [4]), ("MinLengthLogitsProcessor", (12, [4]))),
        (P.ForcedBOS(6), ("ForcedBOSTokenLogitsProcessor", (6))),
        (P.Temperature(0.7), ("TemperatureLogitsWarper", (0.7))),
        (P.TopK(5), ("TopKLogitsWarper", (5))),
        (P.TopK(1, min_tokens_to_keep=3), ("TopKLogitsWarper", (1,), {"min_tokens_to_keep": 3})),
        (P.TopP(0.8), ("TopPLogitsWarper", (0.8))),
        (P.TopP(0.05, min_tokens_to_keep=2), ("TopPLogitsWarper", (0.05,), {"min_tokens_to_keep": 2})),
        (P.SuppressTokens([1, 4]), ("SuppressTokensLogitsProcessor", ([1, 4]))),
    ],
    ids=lambda p: type(p).__name__ if not isinstance(p, tuple) else p[0],
)
def test_processor_matches_transformers(ours, theirs):
    name, args, *kwargs = theirs
    args = args if isinstance(args, tuple) else (args,)
    theirs = getattr(_hf(), name)(*args, **(kwargs[0] if kwargs else {}))
    for seed in range(5):
        ids, scores = _random_case(seed=seed)
        np.testing.assert_array_equal(_ours(ours, ids, scores), _theirs(theirs, ids, scores))
    if isinstance(ours, (P.MinLength, P.ForcedBOS)):  # the length condition both ways
        ids1 = ids[:, :1]
        np.testing.assert_array_equal(_ours(ours, ids1, scores), _theirs(theirs, ids1, scores))


def test_min_new_tokens_and_forced_eos_match_transformers():
    hf = _hf()
    ids, scores = _random_case()
    for generated in (0, 3, 4, 5):
        width = ids.shape[1] - generated
        theirs = hf.MinNewTokensLengthLogitsProcessor(width, 4, [2, 5])
        np.testing.assert_array_equal(
            _ours(P.MinNewTokens(4, [2, 5]), ids, scores, width), _theirs(theirs, ids, scores)
        )
        # transformers forces eos at max_length - 1, i.e. generated == max_new_tokens - 1
        theirs = hf.ForcedEOSTokenLogitsProcessor(width + 5, [2, 5])
        np.testing.assert_array_equal(_ours(P.ForcedEOS(5, [2, 5]), ids, scores, width), _theirs(theirs, ids, scores))


def test_processors_ignore_left_padding():
    """A padded row is processed as that row alone: pads are not history."""
    ids, scores = _random_case(rows=1, length=9)
    pad = 3  # id 3 is not in the row below, so a processor that saw the pads would differ
    row = ids[0][ids[0] != pad]
    padded = np.concatenate([np.full(4, pad), row])[None, :]
    procs = [P.RepetitionPenalty(1.5), P.NoRepeatNGram(2), P.MinLength(len(row) + 1, [pad]), P.NoBadWords([[pad, 1]])]
    for proc in procs:
        alone = proc(History(row[None, :], np.zeros(1, np.int64), len(row)), scores.copy())
        batched = proc(History(padded, np.array([4]), padded.shape[1]), scores.copy())
        np.testing.assert_array_equal(alone, batched, err_msg=type(proc).__name__)


def test_build_processors_follows_transformers_order():
    config = GenerationConfig(
        repetition_penalty=1.2,
        no_repeat_ngram_size=2,
        min_new_tokens=3,
        do_sample=True,
        temperature=0.5,
        top_k=10,
        top_p=0.9,
        eos_token_id=[1],
        bad_words_ids=[[4]],
    )
    names = [type(p).__name__ for p in P.build_processors(config)]
    assert names == ["RepetitionPenalty", "NoRepeatNGram", "NoBadWords", "MinNewTokens", "Temperature", "TopK", "TopP"]
    assert [type(p).__name__ for p in P.build_processors(GenerationConfig(top_k=10, temperature=0.5))] == []


# --- search on a stand-in model --------------------------------------------------------------


class _TableModel:
    """A fake model whose next logits depend only on the last id: enough to test the search bookkeeping."""

    def __init__(self, vocab=40, seed=0):
        self.table = np.random.default_rng(seed).normal(size=(vocab, vocab)).astype(np.float32)
        self.rows_computed = []

    def start(self, prompts):
        last = np.array([p[-1] for p in prompts])
        state = {"last": last}

        def step(tokens, parents):
            if parents is not None:
                assert len(parents) <= len(state["last"])
            state["last"] = tokens
            self.rows_computed.append(len(tokens))
            return self.table[tokens].copy()

        return self.table[last].copy(), step


def test_sampling_is_seeded_and_independent_of_batching():
    model = _TableModel()
    prompts = [[1, 2], [3], [4, 5, 6], [7], [8, 9]]
    config = GenerationConfig(do_sample=True, top_k=0, temperature=1.5, seed=7, max_new_tokens=30, eos_token_id=[0])

    def run(indices, seed=7):
        logits, step = model.start([prompts[i] for i in indices])
        out = generate(step, logits, [prompts[i] for i in indices], config.update(seed=seed), keys=indices)
        return {i: h[0].token_ids for i, h in zip(indices, out)}

    together = run([0, 1, 2, 3, 4])
    assert together == run([0, 1, 2, 3, 4])
    assert together == {**run([4, 2]), **run([0]), **run([3, 1])}  # other batches, other order
    assert together != run([0, 1, 2, 3, 4], seed=8)
    assert sum(len(t) for t in together.values()) > 40
    assert len({tuple(t) for t in together.values()}) == 5


def test_finished_rows_leave_the_batch():
    model = _TableModel()
    eos = int(np.argmax(model.table[5]))  # row [.., 5] ends at once, the others later or never
    prompts = [[5], [1], [2], [3]]
    logits, step = model.start(prompts)
    out = generate(step, logits, prompts, GenerationConfig(max_new_tokens=12, eos_token_id=[eos]))
    assert out[0][0].token_ids == [eos] and out[0][0].finish_reason == "eos"
    assert max(model.rows_computed) <= 3  # the finished row was never run again
    assert [h[0].finish_reason for h in out].count("length") >= 1


# --- ids identical to transformers' generate on the tiny exports ----------------------------


@pytest.fixture(scope="module")
def one_torch_thread():
    # Two cores shared by several runs: torch's second thread spins and makes generate ~10x slower.
    torch = _torch()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The exports under test: GPT-2 (optimum's graph), Llama in onnxpipe's fused graph (the default) and in
# optimum's, and a Llama whose weights are GGUF blocks, which the fused graph keeps as 4-bit MatMulNBits.
TINY = {
    "gpt2": ("gpt2", {}, {}),
    "llama": ("llama", {}, {}),
    "llama-optimum": ("llama", {}, {"graph": "optimum"}),
    "llama-blocks": ("llama", {"blocks": True}, {}),
}


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request, exported, checkpoint, one_torch_thread):
    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.causal import CausalLM

    transformers = pytest.importorskip("transformers")
    arch, checkpoint_kw, options = TINY[request.param]
    folder = checkpoint(arch, **checkpoint_kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = CausalLM.from_model(
        load_model(exported(arch, checkpoint_kw=checkpoint_kw, **options), device="cpu", threads=1)
    )
    return request.param, model, tokenizer, lm


def _frequent_tokens(model, tokenizer, n=30, **kw) -> list[int]:
    """Ids that many rows produce with these settings and no eos, most frequent first."""
    kw = {k: v for k, v in kw.items() if k not in ("num_return_sequences", "min_new_tokens")}
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with _torch().no_grad():
        out = model.generate(**enc, pad_token_id=tokenizer.pad_token_id, eos_token_id=None, **kw)
    counts = {}
    for row in out[:, enc.input_ids.shape[1] :].tolist():
        for t in set(row[6:]):  # after min_new_tokens, not only at the very end
            counts[t] = counts.get(t, 0) + 1
    return sorted(counts, key=lambda t: (-counts[t], t))[:n]


_EOS: dict = {}


def _eos_for(tiny, case) -> list[int]:
    """An eos for this model and case such that, at batch 8, some hypotheses end on it and some run to the
    length limit (a frequent id declared eos: the tiny models seldom produce their own)."""
    arch, model, tokenizer, lm = tiny
    if (arch, case) not in _EOS:
        kw = CASES[case]
        for token in _frequent_tokens(model, tokenizer, **kw):
            ref = _reference(model, tokenizer, PROMPTS, [token], **kw)
            ended = [bool(ids) and ids[-1] == token for nbest in ref for ids in nbest]
            if 1 <= sum(ended) <= len(ended) - 1:
                _EOS[arch, case] = [token]
                break
        else:
            pytest.fail(f"no frequent id of {arch} ends some but not all rows in case {case}")
    return _EOS[arch, case]


def _reference(model, tokenizer, prompts, eos, **kw):
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with _torch().no_grad():
        out = model.generate(**enc, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, **kw)
    width = enc.input_ids.shape[1]
    n = kw.get("num_return_sequences", 1)
    result = []
    for row in out.tolist():
        gen = row[width:]
        cut = next((k + 1 for k, t in enumerate(gen) if t in eos), len(gen))
        result.append(gen[:cut])
    return [result[i : i + n] for i in range(0, len(result), n)]


def _ours_ids(lm, tokenizer, prompts, eos, **kw):
    config = lm.defaults.update(eos_token_id=eos, **kw)
    out = lm.generate([tokenizer(p).input_ids for p in prompts], config)
    return [[c.token_ids for c in nbest] for nbest in out], out


def _nontrivial(ours, eos, need_eos=True, need_length=True, min_tokens=100):
    flat = [ids for nbest in ours for ids in nbest]
    assert sum(len(ids) for ids in flat) >= min_tokens
    ended = [bool(ids) and ids[-1] in eos for ids in flat]
    if need_eos:
        assert any(ended), "no row ended on eos: the comparison does not test finishing"
    if need_length:
        assert not all(ended), "every row ended on eos: the comparison does not test the length limit"


GREEDY = dict(do_sample=False, max_new_tokens=40)
BEAM = dict(do_sample=False, num_beams=4, max_new_tokens=24, num_return_sequences=4)  # the whole finished set
CASES = {
    "greedy": GREEDY,
    "greedy-processors": {**GREEDY, "repetition_penalty": 1.3, "no_repeat_ngram_size": 3, "min_new_tokens": 6},
    "beam": BEAM,
    "beam-early-stopping": {**BEAM, "early_stopping": True, "length_penalty": 0.6},
    "beam-never": {**BEAM, "early_stopping": "never", "length_penalty": 1.5},
    "beam-processors": {
        **BEAM,
        "repetition_penalty": 1.2,
        "no_repeat_ngram_size": 2,
        "min_new_tokens": 5,
        "num_return_sequences": 2,
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_ids_identical_to_transformers_at_batch_1(tiny, case):
    arch, model, tokenizer, lm = tiny
    kw = CASES[case]
    eos = _eos_for(tiny, case)
    ours_all = []
    for prompt in PROMPTS:
        ours, _ = _ours_ids(lm, tokenizer, [prompt], eos, **kw)
        theirs = _reference(model, tokenizer, [prompt], eos, **kw)
        assert ours == theirs, (arch, case, prompt)
        ours_all += ours
    _nontrivial(ours_all, eos, need_length=False)


@pytest.mark.parametrize("case", list(CASES))
def test_ids_identical_to_transformers_at_batch_8(tiny, case):
    """Batch 8, prompts of different lengths (left padding), rows finishing at different steps.

    Without processors transformers' batched output is the oracle. With history-based processors,
    transformers lets the pads of shorter prompts count as history (its batched output depends on the
    padding), so the oracle is transformers on each prompt alone, which is what every row gets here.
    """
    arch, model, tokenizer, lm = tiny
    kw = CASES[case]
    eos = _eos_for(tiny, case)
    ours, completions = _ours_ids(lm, tokenizer, PROMPTS, eos, **kw)
    if "processors" in case:
        theirs = [_reference(model, tokenizer, [p], eos, **kw)[0] for p in PROMPTS]
    else:
        theirs = _reference(model, tokenizer, PROMPTS, eos, **kw)
    assert ours == theirs, (arch, case)
    _nontrivial(ours, eos)
    for nbest in completions:
        for c in nbest:
            assert c.finish_reason == ("eos" if c.token_ids and c.token_ids[-1] in eos else "length")


def test_batch_composition_does_not_change_ids(tiny):
    arch, model, tokenizer, lm = tiny
    kw = {**CASES["greedy-processors"], "eos_token_id": _eos_for(tiny, "greedy-processors")}
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    config = lm.defaults.update(**kw)
    batched = [c[0].token_ids for c in lm.generate(prompts, config)]
    alone = [lm.generate([p], config)[0][0].token_ids for p in prompts]
    assert batched == alone


def test_cache_stays_bound_between_steps(tiny):
    """The KV cache is fed back, never recomputed: one run per new token, three small inputs and the
    logits cross per step, and rows that finish are gathered out of the cache."""
    arch, model, tokenizer, lm = tiny
    frequent = _eos_for(tiny, "greedy")
    lm.decoder.stats = type(lm.decoder.stats)()
    out = lm.generate([tokenizer(p).input_ids for p in PROMPTS], lm.defaults.update(eos_token_id=frequent, **GREEDY))
    stats = lm.decoder.stats
    longest = max(len(c[0].token_ids) for c in out)
    assert stats.steps == longest  # prefill + one run per further token
    assert stats.h2d == 3 * stats.steps and stats.d2h == stats.steps
    assert 1 <= stats.cache_gathers < stats.steps


def test_long_prompts_are_prefilled_in_chunks(tiny, monkeypatch):
    """optimum's graph makes logits for every prompt position; past a budget the prompt runs in chunks
    over the cache, with the same ids. The fused graph makes the last position's only: one run."""
    import onnxpipe.runtime.decoder as decoder

    arch, model, tokenizer, lm = tiny
    prompts = [tokenizer(p * 4).input_ids for p in PROMPTS[:3]]
    config = lm.defaults.update(**GREEDY)
    whole = [c[0].token_ids for c in lm.generate(prompts, config)]
    lm.decoder.stats = decoder.CopyStats()
    monkeypatch.setattr(decoder, "LOGITS_BUDGET", 1)  # chunks of 16 positions
    chunked = [c[0].token_ids for c in lm.generate(prompts, config)]
    assert max(len(p) for p in prompts) > 48
    fused = lm.manifest["graph"]["builder"] == "onnxpipe-fused"
    assert fused == (arch in ("llama", "llama-blocks"))
    assert lm.decoder.last_logits_only == fused
    if fused:
        assert lm.decoder.stats.steps == lm.decoder.stats.d2h  # every run is a step with logits
    else:
        assert lm.decoder.stats.steps > lm.decoder.stats.d2h  # prefill runs without fetching logits
    assert chunked == whole


def test_cache_gather_graph(tiny):
    """The Gather graph that reorders the cache on CUDA (written without the onnx package) is a valid
    model and gives the same ids as numpy's gather; run here on CPU, the only device CI has."""
    onnx = pytest.importorskip("onnx")
    from onnxpipe.runtime.kv_cache import gather_model as _gather_model

    onnx.checker.check_model(onnx.load_from_string(_gather_model(3, 1)), full_check=True)
    arch, model, tokenizer, lm = tiny
    config = lm.defaults.update(eos_token_id=_eos_for(tiny, "beam"), **BEAM)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    by_numpy = lm.generate(prompts, config)
    lm.decoder.graph_gather = True
    try:
        by_graph = lm.generate(prompts, config)
    finally:
        lm.decoder.graph_gather = False
    assert [[c.token_ids for c in n] for n in by_graph] == [[c.token_ids for c in n] for n in by_numpy]


def test_reorder_rows_in_place_matches_a_gather():
    """The CPU cache reorder: same batch size -> rows moved in place (overlapping moves included),
    smaller batch -> a gather into new values; both equal numpy's x[rows]."""
    import onnxruntime as ort

    from onnxpipe.runtime.kv_cache import reorder_rows

    rng = np.random.default_rng(0)
    base = [rng.standard_normal((6, 2, 3, 4)).astype(np.float32) for _ in range(3)]
    for rows in ([0, 1, 2, 3, 4, 5], [1, 0, 0, 3, 5, 4], [5, 5, 5, 0, 0, 0], [2, 3, 4, 5, 0, 1], [4, 0, 2]):
        rows = np.array(rows)
        values = [ort.OrtValue.ortvalue_from_numpy(b.copy()) for b in base]
        out = reorder_rows(values, rows)
        for b, v in zip(base, out):
            np.testing.assert_array_equal(v.numpy(), b[rows])
        assert (out is values) == (len(rows) == 6)
