"""Beam search: transformers' vectorised `_beam_search` (4.57) in numpy, step for step.

Each input keeps `num_beams` running hypotheses and `num_beams` finished ones. Every step takes the
best `max(2, 1 + len(eos)) * num_beams` continuations over all beams of an input, moves those that end
(eos, or the length limit) into the finished set with their length-penalised score, and continues the
best that did not end. The scores, the -1e9 masks and the early-stopping heuristic are transformers'
own, in float32, so the ids are identical to `model.generate(num_beams=...)`.

Unlike transformers, an input whose result can no longer change (early stopping, or the heuristic says
no running beam can beat the finished ones) leaves the batch at once: its beams are dropped from the
model state instead of being computed until the whole batch is done. The prompt is run once per input,
not once per beam: the first step's beams all descend from that one row.
"""

from __future__ import annotations

import numpy as np

from onnxpipe.decoding.config import GenerationConfig
from onnxpipe.decoding.processors import History, ProcessorList, log_softmax
from onnxpipe.decoding.search import Hypothesis, Step, row_rng

MASK = np.float32(-1.0e9)  # transformers' "very large negative value" for beams that must not win


_CHUNKS = 64  # chunk maxima per row that bound the k-th largest value (wide rows)


def topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of each row, best first (ties: lower index first)."""
    if x.shape[1] >= 64 * _CHUNKS and 2 * k <= _CHUNKS:
        return _topk_wide(x, k)
    return _topk_partition(x, k)


def _topk_partition(x: np.ndarray, k: int) -> np.ndarray:
    n = x.shape[1]
    if k < n:
        cand = np.argpartition(-x, k - 1, axis=1)[:, :k]
    else:
        cand = np.broadcast_to(np.arange(n), x.shape)
    vals = np.take_along_axis(x, cand, axis=1)
    order = np.lexsort((cand, -vals), axis=1)
    return np.take_along_axis(cand, order, axis=1)


def _topk_wide(x: np.ndarray, k: int) -> np.ndarray:
    """topk for rows of beams x vocabulary, without partitioning them (argpartition was most of a step).

    The k-th largest of a row's chunk maxima is a floor that at least k values reach, so only the
    values at or above it are sorted, all ties at the floor included: the order is exactly topk's.
    Those values lie in the chunks whose maximum reaches the floor (about k of the 64) and in the
    few columns after the last whole chunk, so only these are scanned. Rows the floor does not thin
    out (mostly -inf) take the partition path.
    """
    rows, n = x.shape
    width = n // _CHUNKS
    # (rows, chunks, width) as a view: a reshape of x[:, :width * chunks] would copy the whole matrix.
    x = np.ascontiguousarray(x)
    body = np.lib.stride_tricks.as_strided(
        x, (rows, _CHUNKS, width), (x.strides[0], width * x.itemsize, x.itemsize), writeable=False
    )
    maxima = body.max(axis=2)
    floor = np.partition(maxima, _CHUNKS - k, axis=1)[:, _CHUNKS - k]
    kept = maxima >= floor[:, None]
    # A floor that many chunks reach (a row of mostly -inf: a forced token) thins nothing: such rows take
    # the partition path before their chunks are gathered (all of them, 10x the logits' bytes at once).
    wide = kept.sum(axis=1) > 4 * k
    kept[wide] = False
    chunk_r, chunk_c = np.nonzero(kept)
    in_chunk = body[chunk_r, chunk_c] >= floor[chunk_r, None]  # (chunks kept, width)
    hit_k, hit_j = np.nonzero(in_chunk)
    r = chunk_r[hit_k]
    c = chunk_c[hit_k] * width + hit_j
    tail_r, tail_c = np.nonzero(x[:, width * _CHUNKS :] >= floor[:, None])
    tail_kept = ~wide[tail_r]
    tail_r, tail_c = tail_r[tail_kept], tail_c[tail_kept]
    if len(tail_r):
        r = np.concatenate([r, tail_r])
        c = np.concatenate([c, tail_c + width * _CHUNKS])
    thin = (np.bincount(r, minlength=rows) <= 16 * _CHUNKS) & ~wide
    out = np.empty((rows, k), dtype=np.int64)
    if not thin.all():
        slow = np.flatnonzero(~thin)
        for lo in range(0, len(slow), 4):  # a few rows at a time: argpartition copies them twice over
            out[slow[lo : lo + 4]] = _topk_partition(x[slow[lo : lo + 4]], k)
        keep = thin[r]
        r, c = r[keep], c[keep]
    if thin.any():
        order = np.lexsort((c, -x[r, c], r))
        c = c[order]
        counts = np.bincount(r, minlength=rows)
        starts = np.cumsum(counts) - counts
        out[thin] = c[starts[thin][:, None] + np.arange(k)]
    return out


def _take(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """a[b, idx[b, j], ...] for every b, j (transformers' `_gather_beams`)."""
    return a[np.arange(a.shape[0])[:, None], idx]


def _length_norm(length: int, length_penalty: float) -> np.float32:
    return np.float32(length**length_penalty)


def beam_search(
    step: Step,
    logits: np.ndarray,
    prompt_ids: np.ndarray,
    start: np.ndarray,
    config: GenerationConfig,
    processors: ProcessorList,
    limits: np.ndarray,
    keys: np.ndarray,
    log_probs: bool = False,
) -> list[list[Hypothesis]]:
    """LOG_PROBS: the step's logits are log-probabilities already (no log_softmax here)."""
    batch, width = prompt_ids.shape
    beams = config.num_beams
    vocab = logits.shape[1]
    eos = np.asarray(config.eos_token_id or [], dtype=np.int64)
    keep = max(2, 1 + len(eos)) * beams
    top_beam_mask = np.arange(keep) < beams
    lp, early = config.length_penalty, config.early_stopping
    length = width + int(limits.max())

    run_ids = np.zeros((batch, beams, length), dtype=np.int64)
    run_ids[:, :, :width] = prompt_ids[:, None, :]
    run_scores = np.zeros((batch, beams), dtype=np.float32)
    run_scores[:, 1:] = MASK  # only the first beam's continuations count at the first step
    fin_ids = run_ids.copy()
    fin_len = np.zeros((batch, beams), dtype=np.int64)
    fin_scores = np.full((batch, beams), MASK, dtype=np.float32)
    fin_done = np.zeros((batch, beams), dtype=bool)
    improvable = np.ones(batch, dtype=bool)  # transformers' is_early_stop_heuristic_unsatisfied
    items = np.arange(batch)  # input row of each live item
    rngs = [row_rng(config.seed, k) for k in keys] if config.do_sample else []
    results: list[list[Hypothesis] | None] = [None] * batch

    # Model row holding the state of each running beam; at first every beam is its prompt's row.
    row_of = np.repeat(np.arange(batch), beams).reshape(batch, beams)
    logits = logits[row_of.ravel()]
    t = 0
    while True:
        live = len(items)
        history = History(
            run_ids[:, :, : width + t].reshape(live * beams, width + t),
            np.repeat(start, beams),
            width,
            np.repeat(items, beams),
        )
        # The step's logits are the search's own (a fresh array per step), so they are worked in place.
        scores = np.asarray(logits, dtype=np.float32)
        scores = processors(history, scores if log_probs else log_softmax(scores, inplace=True))
        flat: np.ndarray = scores.reshape(live, beams, vocab)  # (live, beams, vocab), then (live, beams * vocab)
        flat += run_scores[:, :, None]
        flat = flat.reshape(live, beams * vocab)

        if config.do_sample:
            # Sampling without replacement from softmax(flat), in draw order: Gumbel top-k.
            gumbel = np.stack([-np.log(-np.log(rng.random(flat.shape[1]))) for rng in rngs])
            cand = topk(np.where(np.isfinite(flat), flat + gumbel, -np.inf), keep)
        else:
            cand = topk(flat, keep)
        cand_scores = np.take_along_axis(flat, cand, axis=1)
        cand_beam = cand // vocab
        cand_tok = cand % vocab
        cand_ids = _take(run_ids, cand_beam)
        cand_ids[:, :, width + t] = cand_tok
        at_limit = (t + 1 >= limits[items])[:, None]
        hits = np.isin(cand_tok, eos) | at_limit

        # Running beams for the next step: the best candidates that did not end.
        running = cand_scores + hits.astype(np.float32) * MASK
        sel = topk(running, beams)
        run_ids = _take(cand_ids, sel)
        run_scores = np.take_along_axis(running, sel, axis=1)
        run_parent = np.take_along_axis(cand_beam, sel, axis=1)

        # Finished set: merge the candidates that just ended among the top num_beams, keep the best.
        just_done = hits & top_beam_mask[None, :]
        final = cand_scores / _length_norm(t + 1, lp)
        final = final + (fin_done.all(axis=1, keepdims=True) & (early is True)).astype(np.float32) * MASK
        final = final + (~improvable[:, None]).astype(np.float32) * MASK
        final = final + (~just_done).astype(np.float32) * MASK
        merged_scores = np.concatenate([fin_scores, final], axis=1)
        best = topk(merged_scores, beams)
        fin_scores = np.take_along_axis(merged_scores, best, axis=1)
        fin_ids = _take(np.concatenate([fin_ids, cand_ids], axis=1), best)
        fin_done = np.take_along_axis(np.concatenate([fin_done, just_done], axis=1), best, axis=1)
        fin_len = np.take_along_axis(
            np.concatenate([fin_len, np.full((live, keep), t + 1, dtype=np.int64)], axis=1), best, axis=1
        )

        parents = _take(row_of, run_parent).ravel()
        t += 1
        if early == "never" and lp > 0.0:
            best_possible = run_scores[:, 0] / np.array([_length_norm(int(m), lp) for m in limits[items]])
        else:
            best_possible = run_scores[:, 0] / _length_norm(t, lp)
        worst = np.where(fin_done, fin_scores.min(axis=1, keepdims=True), MASK)
        improvable &= (best_possible.astype(np.float32)[:, None] > worst).any(axis=1)

        done = ~improvable | (fin_done.all(axis=1) & (early is True)) | (t >= limits[items])
        for b in np.flatnonzero(done):
            results[items[b]] = [
                _hypothesis(fin_ids[b, j, width : width + fin_len[b, j]], fin_scores[b, j], eos)
                for j in range(config.num_return_sequences)
            ]
        if done.all():
            return results  # type: ignore[return-value]
        if done.any():
            alive = np.flatnonzero(~done)
            parents = parents.reshape(live, beams)[alive].ravel()
            run_ids, run_scores, start, items = run_ids[alive], run_scores[alive], start[alive], items[alive]
            fin_ids, fin_len, fin_scores, fin_done = fin_ids[alive], fin_len[alive], fin_scores[alive], fin_done[alive]
            improvable = improvable[alive]
            rngs = [rngs[i] for i in alive] if rngs else rngs
        row_of = np.arange(len(items) * beams).reshape(len(items), beams)
        logits = step(run_ids[:, :, width + t - 1].ravel(), parents)


def _hypothesis(ids: np.ndarray, score: np.float32, eos: np.ndarray) -> Hypothesis:
    tokens = ids.tolist()
    reason = "eos" if tokens and tokens[-1] in eos else "length"
    return Hypothesis(tokens, reason, float(score))
