"""The running batch of continuous batching: the key/value cache of rows that join and leave between steps.

serve.continuous admits requests at step boundaries, ends each row at its own step, and runs one decoding
step for the rows that remain. What that asks of the cache depends on the graph, so each decoder driver
gives its own `running()` batch, with one interface:

    batch = decoder.running()
    logits = batch.admit(prompts, pad_id, ends)  # prefill PROMPTS, append them as rows; their next-token logits
    batch.keep(rows)                             # only these rows go on, in this order
    logits = batch.step(tokens)                  # one id per row; every row's next-token logits
    batch.rows                                   # rows running now

ENDS is each prompt's last position (prompt + the most tokens it may generate): the shared buffer is
sized by it, the growing cache needs no size.

- `GrowingBatch` (runtime.decoder.CausalDecoder: optimum's graph and onnxpipe's fused CPU graph). Each
  step's presents are the pasts grown by one position. Newcomers are prefilled together, left-padded, and
  their cache rows merged into the running ones: the shorter caches are left-padded with zeros that the
  attention mask hides, and each row keeps its own position ids. This is what a left-padded prefill
  already does, so both graph kinds take it. Rows that leave are gathered out, and the left-padding
  columns that no remaining row uses any more are trimmed off.
- `SharedBatch` (runtime.decoder.SharedBufferDecoder: export.cuda_graph's graph). Each layer's cache is
  one buffer of a fixed length, bound as past and present; a row's tokens sit at positions 0..length-1
  and the graph reads each row's length (seqlens_k), so rows of different lengths need no padding and no
  mask. Newcomers are prefilled (right-padded) into buffers of their own, then appended as rows. The
  buffer length covers every row's ENDS (rounded up to LENGTH_STEP positions) and grows only when a
  newcomer needs more. Rows that leave are gathered out on the device.

A row's logits depend only on its own tokens in both, so a request's greedy ids are the ids it gets alone.
Steps and leaving rows keep the cache on its device; admitting newcomers into a running batch copies
the cache through the host on CUDA (it happens only when requests arrive).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # runtime.decoder imports this module
    from onnxpipe.runtime.decoder import CausalDecoder, SharedBufferDecoder

LENGTH_STEP = 64  # a shared buffer's length is a multiple of this (fewer regrowths as requests arrive)


class GrowingBatch:
    """The running rows of a CausalDecoder: a cache that grows by one position a step (see the module doc)."""

    def __init__(self, decoder: CausalDecoder):
        self.decoder = decoder
        self.reset()

    def reset(self) -> None:
        self.past: list = []
        self.mask = np.zeros((0, 0), dtype=np.int64)
        self.next = np.zeros(0, dtype=np.int64)  # each row's next position id

    @property
    def rows(self) -> int:
        return len(self.next)

    def admit(self, prompts: Sequence[Sequence[int]], pad_id: int, ends: Sequence[int] | None = None) -> np.ndarray:
        logits, past, mask, next_positions = self.decoder.prefill_cache(prompts, pad_id)
        if not self.rows:
            self.past, self.mask, self.next = past, mask, next_positions
        else:
            self.past, self.mask = merge_caches(self.decoder, self.past, self.mask, past, mask)
            self.next = np.concatenate([self.next, next_positions])
        return logits

    def keep(self, rows: np.ndarray) -> None:
        """Keep the cache rows ROWS, without the left-padding columns that no remaining row uses any more:
        they would only cost compute."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            self.reset()
            return
        self.mask, self.next = self.mask[rows], self.next[rows]
        lead = int(np.argmax(self.mask.any(axis=0)))
        if lead:
            self.mask = np.ascontiguousarray(self.mask[:, lead:])
        if self.decoder.device_type == "cpu":  # one copy: the rows and columns at once
            self.decoder.stats.cache_gathers += 1
            self.past = [_from_numpy(self.decoder, v.numpy()[rows, :, lead:]) for v in self.past]
            return
        self.past = self.decoder.gather(self.past, rows)  # on the device
        if lead:
            self.past = [_from_numpy(self.decoder, _to_numpy(v)[:, :, lead:]) for v in self.past]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), dtype=np.int64)], axis=1)
        positions = self.next[:, None].copy()
        self.next = self.next + 1
        logits, self.past = self.decoder.decode(tokens, self.mask, positions, self.past)
        return logits


class SharedBatch:
    """The running rows of a SharedBufferDecoder: one fixed-length buffer per cache tensor (see the module doc)."""

    def __init__(self, decoder: SharedBufferDecoder):
        self.decoder = decoder
        self.reset()

    def reset(self) -> None:
        self.past: list = []
        self.lengths = np.zeros(0, dtype=np.int64)  # each row's positions written so far
        self.ends = np.zeros(0, dtype=np.int64)  # each row's last position
        self.length = 0  # the buffers' positions

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def admit(self, prompts: Sequence[Sequence[int]], pad_id: int, ends: Sequence[int] | None = None) -> np.ndarray:
        widths = np.array([len(p) for p in prompts], dtype=np.int64)
        new_ends = np.maximum(np.asarray(ends if ends is not None else widths, dtype=np.int64), widths)
        length = self._length(int(max(new_ends.max(), self.ends.max(initial=0))))
        logits, past, lengths = self.decoder.prefill_rows(prompts, pad_id, length)
        if self.rows:
            past = self._appended(past, length)
        self.past, self.length = past, length
        self.lengths = np.concatenate([self.lengths, lengths])
        self.ends = np.concatenate([self.ends, new_ends])
        return logits

    def _length(self, needed: int) -> int:
        """The buffer length for rows that end at NEEDED positions: the current one when it is enough,
        else NEEDED rounded up to LENGTH_STEP, within the model's positions."""
        if needed <= self.length:
            return self.length
        rounded = -(-needed // LENGTH_STEP) * LENGTH_STEP
        limit = self.decoder.max_positions
        return max(needed, min(rounded, limit)) if limit else rounded

    def _appended(self, new: list, length: int) -> list:
        """The running rows' buffers, then NEW's rows, as buffers of LENGTH positions: written in place on
        the CPU, built on the host and sent once on CUDA."""
        rows = self.rows + new[0].shape()[0]
        cpu = self.decoder.device_type == "cpu"
        targets = self.decoder.buffers(rows, length) if cpu else [None] * len(new)
        out = []
        for target, old_value, new_value in zip(targets, self.past, new):
            old, fresh = _to_numpy(old_value), _to_numpy(new_value)
            if target is not None:
                array = target.numpy()  # the numpy-backed buffer itself
            else:
                array = np.zeros((rows, old.shape[1], length, old.shape[3]), dtype=old.dtype)
            array[: self.rows, :, : self.length] = old
            array[self.rows :] = fresh
            out.append(target if target is not None else _from_numpy(self.decoder, array))
        return out

    def keep(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            self.reset()
            return
        self.past = self.decoder.gather(self.past, rows)  # on the device
        self.lengths, self.ends = self.lengths[rows], self.ends[rows]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self.lengths = self.lengths + 1
        if int(self.lengths.max()) > self.length:
            raise RuntimeError(f"the key/value buffer holds {self.length} positions; this step needs more")
        return self.decoder.step_rows(tokens, self.lengths, self.past)


def merge_caches(
    decoder: Any, past_a: list, mask_a: np.ndarray, past_b: list, mask_b: np.ndarray
) -> tuple[list, np.ndarray]:
    """Two batches' growing caches as one: rows of A then rows of B, the shorter left-padded with masked zeros."""
    rows_a, width_a = mask_a.shape
    rows_b, width_b = mask_b.shape
    width = max(width_a, width_b)
    mask = np.zeros((rows_a + rows_b, width), dtype=np.int64)
    mask[:rows_a, width - width_a :] = mask_a
    mask[rows_a:, width - width_b :] = mask_b
    merged = []
    for value_a, value_b in zip(past_a, past_b):
        a, b = _to_numpy(value_a), _to_numpy(value_b)
        out = np.zeros((rows_a + rows_b, a.shape[1], width, a.shape[3]), dtype=a.dtype)
        out[:rows_a, :, width - width_a :] = a
        out[rows_a:, :, width - width_b :] = b
        merged.append(_from_numpy(decoder, out))
    return merged, mask


def _to_numpy(value: Any) -> np.ndarray:
    array: np.ndarray = value.numpy()  # a host copy when the value lives on the GPU
    return array


def _from_numpy(decoder: Any, array: np.ndarray) -> Any:
    from onnxruntime import OrtValue

    array = np.ascontiguousarray(array)
    if decoder.device_type == "cpu":
        return OrtValue.ortvalue_from_numpy(array)
    return OrtValue.ortvalue_from_numpy(array, decoder.device_type, decoder.device_id)
