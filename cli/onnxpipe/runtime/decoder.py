"""The decoder-only driver: one export session run step by step, with its key/value cache and IO binding.

The exported graph (optimum's `text-generation-with-past`, or onnxpipe's fused Llama graph, which has
the same inputs and outputs: export.fused) takes `input_ids`, `attention_mask`, `position_ids` and
`past_key_values.N.key/value` (batch, kv_heads, past, head_dim), and returns `logits` (every position's,
or the fused graph's last position only) and `present.N.key/value` with the new position appended. The prompt is run once with an
empty past (prefill); every later step feeds one id per row and the presents of the step before as
pasts, so nothing is recomputed. Prompts in a batch are left-padded: the attention mask hides the pads
and position ids count real tokens only (transformers' `cumsum(mask) - 1`), so a row's logits do not
depend on what it is batched with.

With IO binding the presents stay where the provider put them (GPU memory on CUDA) and go straight back
in as pasts. Per step the host sends input_ids, position_ids and attention_mask (and the row indices when
rows are dropped or beams reordered) and receives the logits: `CopyStats` counts these copies. Dropping
rows and following beams reorder the cache on its device (runtime.kv_cache). The search itself is `onnxpipe.decoding`,
shared with the encoder-decoders; prompts, chat templates, stop strings and results are tasks.causal's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxpipe.errors import ModelNotFoundError
from onnxpipe.runtime.device import Device
from onnxpipe.runtime.kv_cache import KV_DTYPES, CacheReorder
from onnxpipe.runtime.model import ExportedModel
from onnxpipe.runtime.running import GrowingBatch, SharedBatch

LOGITS_BUDGET = 1 << 26  # floats of prefill logits held at once (256 MB): the graph makes them for every position


@dataclass
class CopyStats:
    """Host<->device copies made by the decoding loop (on CPU they are the same bindings, not real copies)."""

    steps: int = 0  # model runs (the prefill included)
    h2d: int = 0  # arrays sent to the device
    d2h: int = 0  # arrays fetched from the device
    cache_gathers: int = 0  # cache reorders (dropped rows, beam moves)

    @property
    def per_step(self) -> float:
        return (self.h2d + self.d2h) / self.steps if self.steps else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "h2d": self.h2d,
            "d2h": self.d2h,
            "cache_gathers": self.cache_gathers,
            "copies_per_step": round(self.per_step, 3),
        }


class CausalDecoder:
    """One ONNX Runtime session of a decoder-only export, driven step by step with its KV cache."""

    def __init__(self, session, device: Device):
        self.session = session
        self.device = device  # where the session really runs (ExportedModel.runs_on)
        self.device_type, self.device_id = device.kind, device.index  # as IO binding names them
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = ["present." + n[len("past_key_values.") :] for n in self.past_names]
        missing = [n for n in ["input_ids", "logits", *self.present_names] if n not in inputs and n not in outputs]
        if not self.past_names or missing:
            raise ModelNotFoundError(
                "this export has no key/value cache inputs" + (f" (missing {', '.join(missing)})" if missing else ""),
                hint="re-export with task text-generation (onnxpipe exports decoders with past)",
            )
        self.has_mask = "attention_mask" in inputs
        self.has_positions = "position_ids" in inputs
        first = inputs[self.past_names[0]]
        self.kv_dtype = KV_DTYPES.get(first.type)
        if self.kv_dtype is None:
            raise ModelNotFoundError(f"unsupported key/value type {first.type}", hint="export in fp32 or fp16")
        heads, head_dim = first.shape[1], first.shape[3]
        if not isinstance(heads, int) or not isinstance(head_dim, int):
            raise ModelNotFoundError("the key/value inputs have no fixed head shape", hint="re-export the model")
        self.kv_heads, self.head_dim = heads, head_dim
        # onnxpipe's fused graph (export.fused) returns the last position's logits only: its prefill is
        # one run, which GroupQueryAttention needs (it takes a prompt after a past only at batch 1).
        self.last_logits_only = outputs["logits"].shape[1] == 1
        vocab = outputs["logits"].shape[-1]
        self.vocab_size = vocab if isinstance(vocab, int) else 65536  # unknown: assume a large one
        self.stats = CopyStats()
        self.reorder = CacheReorder(session, self.kv_dtype, device)

    @classmethod
    def from_model(cls, model: ExportedModel) -> CausalDecoder:
        """The driver of MODEL's graph, on the device its session really got."""
        session = model.session()  # sets model.provider: what really runs
        device = model.runs_on
        assert device is not None  # known once a session exists
        positions = model.config.get("max_position_embeddings") or model.config.get("n_positions")
        return cls.for_session(session, device, positions if isinstance(positions, int) else None)

    @classmethod
    def for_session(cls, session, device: Device, max_positions: int | None = None) -> CausalDecoder:
        """The driver SESSION's graph needs: SharedBufferDecoder for export.cuda_graph's form (its cache one
        buffer of at most MAX_POSITIONS), else this one."""
        if is_shared_buffer(session):
            return SharedBufferDecoder(session, device, max_positions)
        return cls(session, device)

    # --- the cache ----------------------------------------------------------------------

    def _empty_past(self, rows: int) -> list:
        from onnxruntime import OrtValue

        shape = (rows, self.kv_heads, 0, self.head_dim)
        if self.device_type == "cpu":
            return [OrtValue.ortvalue_from_numpy(np.zeros(shape, self.kv_dtype)) for _ in self.past_names]
        return [
            OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, "cuda", self.device_id) for _ in self.past_names
        ]

    @property
    def graph_gather(self) -> bool:
        """Whether the cache is reordered by a Gather graph (CUDA) rather than numpy (CPU)."""
        return self.reorder.graph

    @graph_gather.setter
    def graph_gather(self, value: bool) -> None:
        self.reorder.graph = value

    def gather(self, past: list, rows: np.ndarray) -> list:
        """The cache of rows `rows` (in that order), kept on its device (see runtime.kv_cache)."""
        self.stats.cache_gathers += 1
        if self.reorder.graph:
            self.stats.h2d += 1  # the row indices
        return self.reorder(past, rows)

    def running(self) -> GrowingBatch | SharedBatch:
        """The running batch of continuous batching over this graph's growing cache (runtime.running)."""
        return GrowingBatch(self)

    # --- running the graph --------------------------------------------------------------

    def _run(
        self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list, want_logits: bool = True
    ) -> tuple[np.ndarray | None, list]:
        """One forward pass; returns the last position's logits (rows, vocab) float32 and the presents.

        A fresh binding each run: an output OrtValue left bound would be reused as a preallocated buffer,
        which cannot work for presents that grow by one position per step.
        """
        binding = self.session.io_binding()
        # The one device->host copy of a step; a prefill chunk whose logits are not needed leaves them on the device.
        binding.bind_output("logits", "cpu" if want_logits else self.device_type, 0 if want_logits else self.device_id)
        for name in self.present_names:
            binding.bind_output(name, self.device_type, self.device_id)
        binding.bind_cpu_input("input_ids", ids)
        self.stats.h2d += 1
        if self.has_mask:
            binding.bind_cpu_input("attention_mask", mask)
            self.stats.h2d += 1
        if self.has_positions:
            binding.bind_cpu_input("position_ids", positions)
            self.stats.h2d += 1
        for name, value in zip(self.past_names, past):
            binding.bind_ortvalue_input(name, value)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.stats.steps += 1
        logits = None
        if want_logits:
            self.stats.d2h += 1
            logits = np.array(outputs[0].numpy()[:, -1, :], dtype=np.float32)  # a copy the search may change
        return logits, outputs[1:]

    def prefill(self, prompts: Sequence[Sequence[int]], pad_id: int = 0, max_new_tokens: int | None = None):
        """Run the left-padded prompts; return their next-token logits and the `Step` that continues them.
        (MAX_NEW_TOKENS sizes SharedBufferDecoder's buffers; this cache grows step by step.)"""
        logits, past, mask, next_positions = self.prefill_cache(prompts, pad_id)
        state: dict[str, Any] = {"past": past, "mask": mask, "next": next_positions}

        def step(tokens: np.ndarray, parents: np.ndarray | None) -> np.ndarray:
            if parents is not None:
                state["past"] = self.gather(state["past"], parents)
                state["mask"] = state["mask"][parents]
                state["next"] = state["next"][parents]
            n = len(tokens)
            state["mask"] = np.concatenate([state["mask"], np.ones((n, 1), dtype=np.int64)], axis=1)
            positions = state["next"][:, None].copy()
            state["next"] = state["next"] + 1
            logits, state["past"] = self.decode(tokens, state["mask"], positions, state["past"])
            return logits

        return logits, step

    def decode(
        self, tokens: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list
    ) -> tuple[np.ndarray, list]:
        """One decoding step: TOKENS (rows,) appended after PAST; MASK covers past and the new position,
        POSITIONS (rows, 1). Returns the next-token logits (rows, vocab) and the presents."""
        logits, presents = self._run(np.ascontiguousarray(tokens, dtype=np.int64)[:, None], mask, positions, past)
        assert logits is not None  # _run returns logits when want_logits (its default)
        return logits, presents

    def prefill_cache(
        self, prompts: Sequence[Sequence[int]], pad_id: int = 0
    ) -> tuple[np.ndarray, list, np.ndarray, np.ndarray]:
        """Run the left-padded prompts; return their next-token logits, the cache, its attention mask and
        each row's next position id: what `decode` continues (serve.continuous merges these between batches).

        optimum's graph computes logits for every position, so a long batch is run in chunks of positions
        (the cache carries over) to keep those logits within LOGITS_BUDGET floats; a fused graph makes the
        last position's only and takes the batch in one run.
        """
        from onnxpipe.decoding import left_pad

        ids, start = left_pad(prompts, pad_id)
        rows, width = ids.shape
        mask = (np.arange(width)[None, :] >= start[:, None]).astype(np.int64)
        positions = np.cumsum(mask, axis=1) - 1
        positions[mask == 0] = 1  # as transformers does; hidden by the mask anyway
        past = self._empty_past(rows)
        chunk = width if self.last_logits_only else max(16, LOGITS_BUDGET // (rows * self.vocab_size))
        for lo in range(0, width, chunk):
            hi = min(lo + chunk, width)
            logits, past = self._run(
                np.ascontiguousarray(ids[:, lo:hi]),
                np.ascontiguousarray(mask[:, :hi]),
                np.ascontiguousarray(positions[:, lo:hi]),
                past,
                want_logits=hi == width,
            )
        assert logits is not None  # the last chunk's logits are fetched
        return logits, past, mask, positions[:, -1] + 1


def is_shared_buffer(session) -> bool:
    """Whether SESSION's graph is export.cuda_graph's (the cache as one buffer shared by past and present)."""
    return "seqlens_k" in {i.name for i in session.get_inputs()}


class SharedBufferDecoder(CausalDecoder):
    """The driver of export.cuda_graph's graph: each layer's key and value live in one preallocated
    buffer of the batch's maximum length, bound as both past and present, so GroupQueryAttention
    writes each new position in place and nothing of the cache moves between steps.

    A row's tokens sit at positions 0..length-1 of its buffer: prompts are right-padded, and each row's
    length goes to the graph as seqlens_k (length - 1, int32), with total_sequence_length (the longest,
    read on the host). Per step the host sends input_ids and seqlens_k and receives the logits (float32);
    the rotary positions and each row's last real token are the graph's own.
    """

    def __init__(self, session, device: Device, max_positions: int | None = None):
        super().__init__(session, device)
        self.max_positions = max_positions
        self.buffer_length = 0  # the positions the last prefill allocated

    def buffers(self, rows: int, length: int) -> list:
        """Zeroed cache buffers for ROWS rows of LENGTH positions, on the session's device."""
        from onnxpipe.runtime.kv_cache import allocate_buffers, buffer_shape

        shape = buffer_shape(rows, self.kv_heads, length, self.head_dim)
        return allocate_buffers(len(self.past_names), shape, self.kv_dtype, self.device)

    def _run_shared(self, ids: np.ndarray, lengths: np.ndarray, past: list) -> np.ndarray:
        """One run: IDS (rows, S) after each row's LENGTHS - S cached positions (LENGTHS: after this run).
        Returns each row's last real token's logits (rows, vocab) float32; PAST is written in place."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("seqlens_k", (lengths - 1).astype(np.int32))
        # total_sequence_length is a host input of the kernel (no copy on CUDA)
        binding.bind_cpu_input("total_sequence_length", np.array(int(lengths.max()), dtype=np.int32))
        self.stats.h2d += 2
        binding.bind_output("logits", "cpu")  # the first output bound: get_outputs()[0]
        for past_name, present_name, value in zip(self.past_names, self.present_names, past):
            binding.bind_ortvalue_input(past_name, value)
            binding.bind_ortvalue_output(present_name, value)  # the same buffer: written in place
        self.session.run_with_iobinding(binding)
        self.stats.steps += 1
        self.stats.d2h += 1
        return np.array(binding.get_outputs()[0].numpy()[:, -1, :], dtype=np.float32)

    def prefill_rows(
        self, prompts: Sequence[Sequence[int]], pad_id: int, length: int
    ) -> tuple[np.ndarray, list, np.ndarray]:
        """Run the right-padded PROMPTS into fresh buffers of LENGTH positions; return their next-token
        logits, the buffers and each row's length (what `step_rows` continues)."""
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        width = int(lengths.max())
        if width > length:
            raise RuntimeError(f"a prompt of {width} tokens does not fit a key/value buffer of {length} positions")
        ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
        past = self.buffers(len(prompts), length)
        return self._run_shared(ids, lengths, past), past, lengths

    def step_rows(self, tokens: np.ndarray, lengths: np.ndarray, past: list) -> np.ndarray:
        """One decoding step: TOKENS (rows,) written at position LENGTHS - 1 of each row (LENGTHS: after
        this step) of the buffers PAST, in place. Returns the next-token logits (rows, vocab)."""
        return self._run_shared(np.asarray(tokens, dtype=np.int64)[:, None], lengths, past)

    def prefill(self, prompts: Sequence[Sequence[int]], pad_id: int = 0, max_new_tokens: int | None = None):
        """Run the right-padded prompts into fresh buffers sized for MAX_NEW_TOKENS more positions;
        return their next-token logits and the `Step` that continues them."""
        from onnxpipe.runtime.kv_cache import buffer_length

        width = max(len(p) for p in prompts)
        self.buffer_length = buffer_length(width, max_new_tokens, self.max_positions)
        logits, past, lengths = self.prefill_rows(prompts, pad_id, self.buffer_length)
        state: dict[str, Any] = {"past": past, "lengths": lengths}

        def step(tokens: np.ndarray, parents: np.ndarray | None) -> np.ndarray:
            if parents is not None:
                state["past"] = self.gather(state["past"], parents)
                state["lengths"] = state["lengths"][parents]
            state["lengths"] = state["lengths"] + 1
            if int(state["lengths"].max()) > self.buffer_length:
                raise RuntimeError(f"the key/value buffer holds {self.buffer_length} positions; this step needs more")
            return self.step_rows(tokens, state["lengths"], state["past"])

        return logits, step

    def running(self) -> GrowingBatch | SharedBatch:
        """The running batch of continuous batching over this graph's shared buffers (runtime.running)."""
        return SharedBatch(self)

    def prefill_cache(
        self, prompts: Sequence[Sequence[int]], pad_id: int = 0
    ) -> tuple[np.ndarray, list, np.ndarray, np.ndarray]:
        raise _not_a_growing_cache()

    def decode(
        self, tokens: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list
    ) -> tuple[np.ndarray, list]:
        raise _not_a_growing_cache()


def _not_a_growing_cache() -> TypeError:
    """A caller that feeds growing pasts (prefill_cache, decode) to the shared-buffer graph: a programming error."""
    return TypeError("the shared-buffer graph's cache does not grow: drive it with prefill() or running()")
