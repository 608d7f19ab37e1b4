"""Greedy search and sampling over a model-agnostic step function, and the `generate` entry point.

The model side is two things (see `Step`): the logits for the prompt rows, computed by the caller
(a causal model's prefill; an encoder-decoder's encoder plus its first decoder step), and a step
function that, given the parent row of every hypothesis and the id it appends, reorders its state
(key/value cache, encoder states) and returns the logits for the next id. Dropping a finished row and
following a beam are the same operation, a gather by `parents`, so one search serves every model.

Sampling draws from one numpy random stream per input record, seeded with `(seed, key)` where `key` is
the record's index in the input: the same seed gives the same text whatever the batch size or the
order of the batch. It does not reproduce torch's random numbers, so sampled text is not the text
transformers would sample with the same seed; greedy and beam search are identical to transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from onnxpipe.decoding.config import GenerationConfig
from onnxpipe.decoding.processors import History, ProcessorList, build_processors, softmax, token_mask


class Step(Protocol):
    def __call__(self, tokens: np.ndarray, parents: np.ndarray | None) -> np.ndarray:
        """Append `tokens[i]` to the state of previous row `parents[i]`; return logits (rows, vocab) float32.

        `parents` indexes the rows of the previous call (or of the prompt logits); None means unchanged
        (row i continues row i). Fewer parents than previous rows means rows were dropped: their state
        must be freed, not computed. The returned array belongs to the search, which may change it.
        """


# stop(keys, generated) -> bool mask: which live rows end now (e.g. a stop string was produced).
StopCheck = Callable[[np.ndarray, np.ndarray], np.ndarray]
# on_token(keys, tokens): called after every step with the id each live row just produced.
TokenCallback = Callable[[np.ndarray, np.ndarray], None]


@dataclass
class Hypothesis:
    token_ids: list[int]  # generated ids, the final eos included when it ended on one
    finish_reason: str  # "eos" | "length" | "stop"
    score: float | None = None  # beam search: length-penalised sum of log-probabilities


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (ids (rows, width) int64 left-padded with pad_id, start (rows,) first real position)."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    start = np.empty(len(prompts), dtype=np.int64)
    for r, p in enumerate(prompts):
        start[r] = width - len(p)
        ids[r, start[r] :] = p
    return ids, start


def generate(
    step: Step,
    logits: np.ndarray,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    max_new_tokens: Sequence[int] | int | None = None,
    keys: Sequence[int] | None = None,
    stop: StopCheck | None = None,
    on_token: TokenCallback | None = None,
    log_probs: bool = False,
    encoder_ids: Sequence[Sequence[int]] | None = None,
) -> list[list[Hypothesis]]:
    """Decode every prompt row; return its hypotheses (num_return_sequences of them, best first).

    `logits[i]` are the next-token logits after `prompts[i]`. `max_new_tokens` may be given per row (a
    model's position limit minus the prompt), else `config.max_new_tokens`. `keys` name each row's
    random stream (default: its position here). `stop` and `on_token` apply to greedy and sampling.
    `log_probs`: the step returns log-probabilities already (a graph's LogSoftmax), so beam search skips
    its own log_softmax. Beam search only: greedy and sampling apply their processors to raw logits
    (a repetition penalty is not shift-invariant). `encoder_ids`: an encoder-decoder's source ids per
    row, for `encoder_no_repeat_ngram_size`.
    """
    if log_probs and config.num_beams <= 1:
        raise ValueError("log_probs is for beam search; greedy and sampling need raw logits")
    rows = len(prompts)
    if max_new_tokens is None:
        max_new_tokens = config.max_new_tokens
    if max_new_tokens is None:
        raise ValueError("max_new_tokens is not set")
    limits = np.broadcast_to(np.asarray(max_new_tokens, dtype=np.int64), (rows,)).copy()
    if (limits < 1).any():
        raise ValueError("every row needs room for at least one new token")
    keys_arr = np.arange(rows, dtype=np.int64) if keys is None else np.asarray(keys, dtype=np.int64)
    ids, start = left_pad(prompts, config.pad_token_id or 0)
    processors = build_processors(config, int(limits.max()), encoder_ids, ids.shape[1])
    if config.num_beams > 1:
        from onnxpipe.decoding.beam import beam_search

        return beam_search(step, logits, ids, start, config, processors, limits, keys_arr, log_probs)
    return [
        [h] for h in _greedy_or_sample(step, logits, ids, start, config, processors, limits, keys_arr, stop, on_token)
    ]


def row_rng(seed: int | None, key: int) -> np.random.Generator:
    """The random stream of input record `key`: independent of batching, reproducible with a seed."""
    return np.random.default_rng(None if seed is None else [int(seed), int(key)])


def sample_rows(probs: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """One id per row from its probabilities, with one uniform draw from that row's stream."""
    cdf = np.cumsum(probs, axis=1, dtype=np.float64)
    u = np.array([rng.random() for rng in rngs]) * cdf[:, -1]
    picks = (cdf <= u[:, None]).sum(axis=1)
    return np.minimum(picks, probs.shape[1] - 1)


def _greedy_or_sample(
    step: Step,
    logits: np.ndarray,
    prompt_ids: np.ndarray,
    start: np.ndarray,
    config: GenerationConfig,
    processors: ProcessorList,
    limits: np.ndarray,
    keys: np.ndarray,
    stop: StopCheck | None,
    on_token: TokenCallback | None,
) -> list[Hypothesis]:
    rows, width = prompt_ids.shape
    ids = np.zeros((rows, width + int(limits.max())), dtype=np.int64)
    ids[:, :width] = prompt_ids
    live = np.arange(rows)  # original row of each live row
    rngs = [row_rng(config.seed, k) for k in keys] if config.do_sample else []
    is_eos = token_mask(tuple(config.eos_token_id or ()), logits.shape[1])
    results: list[Hypothesis | None] = [None] * rows
    t = 0
    while True:
        history = History(ids[:, : width + t], start, width, live)
        scores = processors(history, logits)
        if config.do_sample:
            tokens = sample_rows(softmax(scores), rngs)
        else:
            tokens = scores.argmax(axis=1)
        ids[:, width + t] = tokens
        t += 1
        if on_token is not None:
            on_token(keys[live], tokens)
        reason = np.full(len(live), "", dtype=object)
        reason[t >= limits[live]] = "length"
        if stop is not None:
            reason[stop(keys[live], ids[:, width : width + t])] = "stop"
        reason[is_eos[tokens]] = "eos"
        done = reason != ""
        for r in np.flatnonzero(done):
            results[live[r]] = Hypothesis(ids[r, width : width + t].tolist(), str(reason[r]))
        if done.all():
            return results  # type: ignore[return-value]
        parents = None
        if done.any():
            parents = np.flatnonzero(~done)
            ids, start, live, tokens = ids[parents], start[parents], live[parents], tokens[parents]
            rngs = [rngs[i] for i in parents] if rngs else rngs
        logits = step(tokens, parents)
