"""Logits processors on numpy scores, with the semantics of transformers' `LogitsProcessor`s (4.57).

Each processor takes the token history of the live rows and their scores `(rows, vocab)` (float32) and
returns the processed scores; it may change the array it is given. `build_processors` puts them in
the order `GenerationMixin._get_logits_processor` does, which matters (a penalty before temperature).

One deliberate difference: transformers hands its processors the left-padded batch, so the pad tokens
of shorter prompts count as history (repetition penalty, n-grams, min_length) and a batched result can
differ from the same prompt alone. Here a row's history starts at its first real token (`History.start`),
so every row gets what transformers gives it at batch size 1, whatever it is batched with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np

from onnxpipe.decoding.config import GenerationConfig

NEG_INF = np.float32(-np.inf)


@dataclass
class History:
    """The ids each live row has so far: a left-padded prompt of width `prompt_width`, then the generated ids.

    For a causal model the prompt is the user's prompt; for an encoder-decoder it is the decoder's
    start (`[decoder_start_token_id]`, plus any forced prefix).
    """

    ids: np.ndarray  # (rows, prompt_width + generated) int64
    start: np.ndarray  # (rows,) index of each row's first real token
    prompt_width: int
    inputs: np.ndarray | None = None  # (rows,) the input (prompt) each row decodes; None: row r is input r

    @property
    def generated(self) -> int:
        """Tokens generated so far; the same for every live row (rows advance together)."""
        return self.ids.shape[1] - self.prompt_width

    @property
    def lengths(self) -> np.ndarray:
        """Real length of each row (prompt + generated)."""
        return self.ids.shape[1] - self.start

    def row(self, r: int) -> np.ndarray:
        return self.ids[r, self.start[r] :]

    def unpadded_ids(self) -> np.ndarray:
        """`ids` with each pad replaced by a real id of its row (the last one): harmless for set-like uses."""
        if not self.start.any():
            return self.ids
        pos = np.arange(self.ids.shape[1])
        return np.where(pos[None, :] >= self.start[:, None], self.ids, self.ids[:, -1:])


class LogitsProcessor(Protocol):
    def __call__(self, history: History, scores: np.ndarray) -> np.ndarray: ...


def _eos_mask(eos_token_id: Sequence[int], vocab: int) -> np.ndarray:
    return token_mask(tuple(eos_token_id), vocab)


@lru_cache(maxsize=64)
def token_mask(token_ids: tuple[int, ...], vocab: int) -> np.ndarray:
    """A read-only boolean (vocab,) mask of `token_ids` (ids outside the vocabulary are ignored)."""
    mask = np.zeros(vocab, dtype=bool)
    mask[[i for i in token_ids if 0 <= i < vocab]] = True
    mask.flags.writeable = False
    return mask


class RepetitionPenalty:
    """Divide positive, multiply negative scores of every id already in the row (prompt included)."""

    def __init__(self, penalty: float):
        self.penalty = np.float32(penalty)

    def __call__(self, history: History, scores: np.ndarray) -> np.ndarray:
        ids = history.unpadded_ids()
        s = np.take_along_axis(scores, ids, axis=1)
        s = np.where(s < 0, s * self.penalty, s / self.penalty)
        np.put_along_axis(scores, ids, s, axis=1)
        return scores


class NoRepeatNGram:
    """Ban every id that would repeat an n-gram already in the row (fairseq's rule, as transformers has it)."""

    def __init__(self, ngram_size: int):
        self.n = int(ngram_size)

    def banned(self, row: np.ndarray) -> np.ndarray:
        n, length = self.n, len(row)
        if length < n:  # no complete n-gram yet
            return row[:0]
        if n == 1:
            return row
        prefix = row[length - n + 1 :]
        windows = np.lib.stride_tricks.sliding_window_view(row[:-1], n - 1)
        hits = np.flatnonzero((windows == prefix).all(axis=1))
        return row[hits + n - 1]

    def __call__(self, history: History, scores: np.ndarray) -> np.ndarray:
        if history.lengths.max() < self.n:
            return scores
        for r in range(scores.shape[0]):
            banned = self.banned(history.row(r))
            if banned.size:
                scores[r, banned] = NEG_INF
        return scores


def _banned_after(source: np.ndarray, row: np.ndarray, n: int) -> np.ndarray:
    """The ids that follow, in SOURCE, an occurrence of ROW's last n - 1 ids: those that would copy an
    n-gram of SOURCE."""
    if n == 1:
        return source
    if len(row) < n - 1 or len(source) < n:
        return source[:0]
    windows = np.lib.stride_tricks.sliding_window_view(source[:-1], n - 1)
    hits = np.flatnonzero((windows == row[len(row) - n + 1 :]).all(axis=1))
    return source[hits + n - 1]


class EncoderNoRepeatNGram:
    """Ban every id that would repeat an n-gram of the encoder's input (transformers'
    EncoderNoRepeatNGramLogitsProcessor; blenderbot ships it as 3).

    `encoder_ids[i]` are input i's encoder ids without padding (transformers counts the pads of a padded
    batch as n-grams too; they only ban pad after pad or after the last source id). Without them, each
    row's own prompt is the encoder input, as transformers does for a decoder-only model.
    """

    def __init__(self, ngram_size: int, encoder_ids: Sequence[Sequence[int]] | None = None):
        self.n = int(ngram_size)
        self.sources = None if encoder_ids is None else [np.asarray(s, dtype=np.int64) for s in encoder_ids]

    def __call__(self, history: History, scores: np.ndarray) -> np.ndarray:
        inputs = history.inputs if history.inputs is not None else np.arange(scores.shape[0])
        for r in range(scores.shape[0]):
            row = history.row(r)
            if self.sources is None:
                source = history.ids[r, history.start[r] : history.prompt_width]
            else:
                source = self.sources[int(inputs[r])]
            banned = _banned_after(source, row, self.n)
            if banned.size:
                scores[r, banned] = NEG_INF
        return scores


class NoBadWords:
    """Ban single ids always, and the last id of a longer sequence when the row ends with the rest of it.

    As in transformers, a one-id entry equal to an eos id is dropped (banning eos is min_length's job).
    """

    def __init__(self, bad_words_ids: Sequence[Sequence[int]], eos_token_id: Sequence[int] = ()):
        eos = {int(i) for i in eos_token_id}
        seqs = [tuple(int(t) for t in s) for s in bad_words_ids if s]
        seqs = [s for s in seqs if not (len(s) == 1 and s[0] in eos)]
        self.single = np.array(sorted({s[0] for s in seqs if len(s) == 1}), dtype=np.int64)
        self.multi = [(np.array(s[:-1], dtype=np.int64), s[-1]) for s in seqs if len(s) > 1]

    def __call__(self, history: History, scores: np.ndarray) -> np.ndarray:
        if self.single.size:
            scores[:, self.single] = NEG_INF
        lengths = history.lengths
        for prefix, last in self.multi:
            k = len(prefix)
            match = (history.ids[:, -k:] == prefix).all(axis=1) & (lengths > k)
            scores[match, last] = NEG_INF
        return scores


class MinLength:
    """No eos while a row (whole sequence, prompt included) is shorter than `min_length`."""

    def __init__(self, min_length: int, eos_token_id: Sequence[int]):
        self.min_length = int(min_length)
        self.eos = list(eos_token_id)

    def __call__(self, history: History, scores: np.ndarray) -> np.ndarray:
        short = history.lengths < self.min_length
        if short.any():
            scores[np.ix_(short, _eos_mask(self.eos, scores.shape[1]))] = NEG_INF
        return scores


class MinNewTokens:
    """No eos before `min_new_tokens` ids were generated."""

    def __init__(self, min_new_tokens: int, eos_token_id: Sequence[int]):
        self.min_new_tokens = int(min_new_tokens)
        self.eos = list(eos_token_id)

    def __call__(self, history: History, scores: np.ndarray) -> np.ndarray:
        if history.generated < self.min_new_tokens:
            scores[:, _eos_mask(self.eos, scores.shape[1])] = NEG_INF
        return scores


class ForcedBOS:
    """The first id after the decoder start is `bos_token_id` (multilingual target-language tokens)."""

    def __init__(self, bos_token_id: int):
        self.bos = int(bos_token_id)

    def __call__(self, history: History, scores: np.ndarray) -> np.ndarray:
        rows = history.lengths == 1
        if rows.any():
            scores[rows] = NEG_INF
            scores[rows, self.bos] = 0.0
        return scores


class ForcedEOS:
    """The last id allowed (`max_new_tokens`) is an eos id: transformers' `max_length - 1` rule."""

    def __init__(self, max_new_tokens: int, eos_token_id: Sequence[int]):
        self.max_new_tokens = int(max_new_tokens)
        self.eos = list(eos_token_id)

    def __call__(self, history: History, scores: np.ndarray) -> np.ndarray:
        if history.generated == self.max_new_tokens - 1:
            scores[:] = NEG_INF
            scores[:, self.eos] = 0.0
        return scores


class SuppressTokens:
    def __init__(self, token_ids: Sequence[int]):
        self.ids = np.array(list(token_ids), dtype=np.int64)

    def __call__(self, history: History, scores: np.ndarray) -> np.ndarray:
        scores[:, self.ids] = NEG_INF
        return scores


class SuppressTokensAtBegin:
    """Ban `token_ids` at one step only: the first generated one, or the second after a forced BOS
    (transformers' begin_index: the decoder input's length, plus one when a forced BOS follows a lone
    decoder start)."""

    def __init__(self, token_ids: Sequence[int], begin: int):
        self.ids = np.array(list(token_ids), dtype=np.int64)
        self.begin = int(begin)

    def __call__(self, history: History, scores: np.ndarray) -> np.ndarray:
        if history.generated == self.begin:
            scores[:, self.ids] = NEG_INF
        return scores


class LogitNormalization:
    """log_softmax after all the others (`renormalize_logits`): beam search adds up the processed scores."""

    def __call__(self, history: History, scores: np.ndarray) -> np.ndarray:
        return log_softmax(scores, inplace=True)


class Temperature:
    def __init__(self, temperature: float):
        self.temperature = np.float32(temperature)

    def __call__(self, history: History, scores: np.ndarray) -> np.ndarray:
        return scores / self.temperature


class TopK:
    """Keep the k best scores (and every score tied with the k-th)."""

    def __init__(self, top_k: int, min_tokens_to_keep: int = 1):
        self.top_k = max(int(top_k), min_tokens_to_keep)

    def __call__(self, history: History, scores: np.ndarray) -> np.ndarray:
        vocab = scores.shape[1]
        k = min(self.top_k, vocab)
        kth = np.partition(scores, vocab - k, axis=1)[:, vocab - k : vocab - k + 1]
        scores[scores < kth] = NEG_INF
        return scores


class TopP:
    """Keep the smallest set of best ids whose probability reaches `top_p` (nucleus)."""

    def __init__(self, top_p: float, min_tokens_to_keep: int = 1):
        self.top_p = float(top_p)
        self.min_tokens_to_keep = int(min_tokens_to_keep)

    def __call__(self, history: History, scores: np.ndarray) -> np.ndarray:
        order = np.argsort(scores, axis=1, kind="stable")  # ascending, as transformers sorts
        sorted_scores = np.take_along_axis(scores, order, axis=1)
        cumulative = np.cumsum(softmax(sorted_scores), axis=1)
        remove = cumulative <= np.float32(1 - self.top_p)
        remove[:, -self.min_tokens_to_keep :] = False
        mask = np.empty_like(remove)
        np.put_along_axis(mask, order, remove, axis=1)
        scores[mask] = NEG_INF
        return scores


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(x: np.ndarray, inplace: bool = False) -> np.ndarray:
    """(x - max) - log(sum(exp(x - max))), in that order of roundings whether or not in place.

    In place, X (float32, owned by the caller) is overwritten and returned: on a beam search over a
    58k vocabulary the temporaries were a third of the numpy time of a step.
    """
    if not inplace:
        x = x.copy()
    x -= x.max(axis=-1, keepdims=True)
    total = np.exp(x).sum(axis=-1, keepdims=True)
    x -= np.log(total, out=total)
    return x


class ProcessorList(list):
    def __call__(self, history: History, scores: np.ndarray) -> np.ndarray:
        for processor in self:
            scores = processor(history, scores)
        return scores


def build_processors(
    config: GenerationConfig,
    max_new_tokens: int | None = None,
    encoder_ids: Sequence[Sequence[int]] | None = None,
    prompt_width: int | None = None,
) -> ProcessorList:
    """The processors `config` asks for, in transformers' order (warpers last, only when sampling).

    `encoder_ids`: an encoder-decoder's source ids per input (`History.inputs` indexes them).
    `prompt_width`: the decoder prompt's length when known (1 for an encoder-decoder's lone start).
    """
    eos = list(config.eos_token_id or [])
    procs = ProcessorList()
    if config.repetition_penalty != 1.0:
        procs.append(RepetitionPenalty(config.repetition_penalty))
    if config.no_repeat_ngram_size > 0:
        procs.append(NoRepeatNGram(config.no_repeat_ngram_size))
    if config.encoder_no_repeat_ngram_size > 0:
        procs.append(EncoderNoRepeatNGram(config.encoder_no_repeat_ngram_size, encoder_ids))
    if config.bad_words_ids:
        procs.append(NoBadWords(config.bad_words_ids, eos))
    if config.min_length > 0 and eos:
        procs.append(MinLength(config.min_length, eos))
    if config.min_new_tokens > 0 and eos:
        procs.append(MinNewTokens(config.min_new_tokens, eos))
    if config.forced_bos_token_id is not None:
        procs.append(ForcedBOS(config.forced_bos_token_id))
    max_new = max_new_tokens if max_new_tokens is not None else config.max_new_tokens
    if config.forced_eos_token_id and max_new:
        procs.append(ForcedEOS(max_new, config.forced_eos_token_id))
    if config.suppress_tokens:
        procs.append(SuppressTokens(config.suppress_tokens))
    if config.begin_suppress_tokens:
        after_bos = prompt_width == 1 and config.forced_bos_token_id is not None
        procs.append(SuppressTokensAtBegin(config.begin_suppress_tokens, 1 if after_bos else 0))
    if config.do_sample:
        # Beam sampling keeps one non-eos candidate alive, as transformers does.
        keep = len(eos) + 1 if config.num_beams > 1 else 1
        if config.temperature != 1.0:
            procs.append(Temperature(config.temperature))
        if config.top_k:
            procs.append(TopK(config.top_k, keep))
        if config.top_p < 1.0:
            procs.append(TopP(config.top_p, keep))
    if config.renormalize_logits:
        procs.append(LogitNormalization())
    return procs
