"""The encoder-decoder driver (translate, summarize): an export's encoder and merged decoder, step by step.

The export holds `encoder_model.onnx` and optimum's merged `decoder_model_merged.onnx`, whose
`use_cache_branch` input picks one of two subgraphs:

- first step (False): the decoder start id per row, `encoder_hidden_states`, zero-length pasts. It
  returns the logits, the decoder self-attention keys/values and the cross-attention keys/values
  computed from the encoder states (`present.N.encoder.*`), once per batch;
- later steps (True): one id per row, `past_key_values.N.decoder.*` = the previous self-attention
  presents, `past_key_values.N.encoder.*` = the cross-attention keys/values of the first step. This
  branch does not read `encoder_hidden_states` (a (rows, 1, d) placeholder is bound), and its
  cross-attention presents, copies of the pasts, are not bound, so ONNX Runtime need not keep them.

The encoder runs once per batch and the first decoder step once per input (not per beam): the search
(`onnxpipe.decoding`, shared with `generate`) then asks for the rows it wants through `parents`. The
self-attention cache is gathered by parent row; the cross-attention cache only when the set of inputs
changes (a beam moving within its input keeps the same encoder), i.e. after the first step and when
finished inputs leave the batch. With IO binding the caches stay where the provider made them (GPU
memory on CUDA); only ids, masks and the logits cross to and from the host.

Languages, prefixes, generation defaults and results are tasks.seq2seq's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from onnxpipe.decoding import GenerationConfig, Hypothesis, generate
from onnxpipe.errors import ModelNotFoundError
from onnxpipe.runtime.device import Device
from onnxpipe.runtime.kv_cache import KV_DTYPES, CacheReorder
from onnxpipe.runtime.model import ExportedModel

FUSED_BUILDER = "onnxpipe-fused-seq2seq"  # the manifest's graph.builder of export.seq2seq_graph's graphs


def right_padded(
    sources: Sequence[Sequence[int]], pad_id: int, config: GenerationConfig
) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, attention mask, decoder start id) of SOURCES right-padded with PAD_ID, as both runners feed them."""
    width = max(len(s) for s in sources)
    ids = np.full((len(sources), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sources), width), dtype=np.int64)
    for r, source in enumerate(sources):
        ids[r, : len(source)] = source
        mask[r, : len(source)] = 1
    start = config.decoder_start_token_id
    if start is None:  # int(None) would fail with a TypeError
        raise ModelNotFoundError(
            "no decoder_start_token_id to start decoding from", hint="re-export it with onnxpipe export"
        )
    return ids, mask, int(start)


class Seq2SeqRunner:
    """The encoder and merged-decoder sessions, driven step by step through a `decoding.Step`."""

    def __init__(self, encoder, decoder, device: Device):
        self.encoder = encoder
        self.decoder = decoder
        self.device = device  # where the sessions really run (ExportedModel.runs_on)
        self.device_type, self.device_id = device.kind, device.index  # as IO binding names them
        inputs = {i.name: i for i in decoder.get_inputs()}
        self.encoder_output = encoder.get_outputs()[0].name
        self.encoder_inputs = [i.name for i in encoder.get_inputs()]
        pasts = [n for n in inputs if n.startswith("past_key_values.")]
        self.self_pasts = [n for n in pasts if ".encoder." not in n]
        self.cross_pasts = [n for n in pasts if ".encoder." in n]
        self.self_presents = ["present." + n[len("past_key_values.") :] for n in self.self_pasts]
        self.cross_presents = ["present." + n[len("past_key_values.") :] for n in self.cross_pasts]
        if "use_cache_branch" not in inputs or not self.self_pasts or not self.cross_pasts:
            raise ModelNotFoundError(
                "this export has no merged decoder with past key values",
                hint="re-export it with onnxpipe export (task text2text-generation)",
            )
        first = inputs[self.self_pasts[0]]
        self.kv_dtype = KV_DTYPES.get(first.type)
        self.hidden_dtype = KV_DTYPES.get(inputs["encoder_hidden_states"].type)
        if self.kv_dtype is None or self.hidden_dtype is None:
            raise ModelNotFoundError(f"unsupported key/value type {first.type}", hint="export in fp32 or fp16")
        self.heads, self.head_dim = first.shape[1], first.shape[3]
        self.hidden_size = inputs["encoder_hidden_states"].shape[2]
        if not all(isinstance(d, int) for d in (self.heads, self.head_dim, self.hidden_size)):
            raise ModelNotFoundError(
                "the decoder graph does not declare its key/value and hidden sizes",
                hint="re-export it with onnxpipe export",
            )
        self.steps = 0
        self.gathers = 0
        vocab = {o.name: o for o in decoder.get_outputs()}["logits"].shape[-1]
        self.vocab_size = vocab if isinstance(vocab, int) else None
        self._logits_buffers: list[np.ndarray] = []  # two flat float32 arrays, used in turn
        self.reorder = CacheReorder(decoder, self.kv_dtype, device)

    @classmethod
    def from_model(cls, model: ExportedModel) -> Seq2SeqRunner | FusedSeq2SeqRunner:
        """The driver of MODEL's encoder and merged decoder, on the device their sessions really got
        (onnxpipe's own graphs, export.seq2seq_graph, get FusedSeq2SeqRunner)."""
        if (model.manifest.get("graph") or {}).get("builder") == FUSED_BUILDER:
            return FusedSeq2SeqRunner.from_model(model)
        encoder, decoder = model.session("encoder"), model.session("decoder")  # sets model.provider
        device = model.runs_on
        assert device is not None  # known once a session exists
        return cls(encoder, decoder, device)

    # --- values on the device -------------------------------------------------------------
    def _placeholder(self, shape: tuple, dtype) -> Any:
        """A tensor the graph needs bound but does not read (empty pasts, later encoder states)."""
        from onnxruntime import OrtValue

        if self.device_type == "cpu":
            return OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype))
        return OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", self.device_id)

    def gather(self, values: list, rows: np.ndarray) -> list:
        """VALUES' rows `rows` (in that order), on their device (see runtime.kv_cache)."""
        self.gathers += 1
        return self.reorder(values, rows)

    # --- running the graphs ---------------------------------------------------------------
    def encode(self, ids: np.ndarray, mask: np.ndarray) -> Any:
        """The encoder states (an OrtValue on the device) of right-padded ids."""
        binding = self.encoder.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        if "attention_mask" in self.encoder_inputs:
            binding.bind_cpu_input("attention_mask", mask)
        binding.bind_output(self.encoder_output, self.device_type, self.device_id)
        self.encoder.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def _decode(
        self, tokens: np.ndarray, hidden: Any, mask: np.ndarray, self_past: list, cross_past: list, first: bool
    ) -> tuple[np.ndarray, list, list]:
        binding = self.decoder.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1, 1))
        binding.bind_cpu_input("encoder_attention_mask", mask)
        binding.bind_ortvalue_input("encoder_hidden_states", hidden)
        binding.bind_cpu_input("use_cache_branch", np.array([not first]))
        for name, value in zip(self.self_pasts, self_past):
            binding.bind_ortvalue_input(name, value)
        for name, value in zip(self.cross_pasts, cross_past):
            binding.bind_ortvalue_input(name, value)
        rows = len(tokens)
        buffer = self._logits_buffer(rows)
        if buffer is not None:  # ONNX Runtime writes the logits straight into an array the search may change
            binding.bind_output("logits", "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
        else:
            binding.bind_output("logits", "cpu")
        for name in self.self_presents:
            binding.bind_output(name, self.device_type, self.device_id)
        if first:  # computed once; the later steps only copy them through
            for name in self.cross_presents:
                binding.bind_output(name, self.device_type, self.device_id)
        self.decoder.run_with_iobinding(binding)
        self.steps += 1
        outputs = binding.get_outputs()
        if buffer is not None:
            logits = buffer[:, -1, :]
        else:
            logits = np.array(outputs[0].numpy()[:, -1, :], dtype=np.float32)  # a copy the search may change
        n = len(self.self_presents)
        return logits, outputs[1 : 1 + n], (outputs[1 + n :] if first else cross_past)

    def _logits_buffer(self, rows: int) -> np.ndarray | None:
        """A (rows, 1, vocab) float32 array for the next step's logits, or None (GPU, unknown vocabulary).

        Views of two flat arrays, used in turn and grown to the largest batch seen: the search is done
        with a step's logits before it asks for the next step's, and the second array keeps even a
        one-step-late reader safe. It saves copying the rows x vocabulary logits out of ONNX Runtime
        (30 MB a step for 128 beams of opus-mt).
        """
        if self.device_type != "cpu" or self.vocab_size is None:
            return None
        size = rows * self.vocab_size
        if not self._logits_buffers or self._logits_buffers[0].size < size:
            self._logits_buffers = [np.empty(size, np.float32) for _ in range(2)]
        self._logits_buffers.reverse()
        return self._logits_buffers[0][:size].reshape(rows, 1, self.vocab_size)

    def start(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        decoder_start: int,
        max_rows: int = 0,
        max_steps: int = 0,
        log_probs: bool = False,
    ):
        """Encode the batch and run the first decoder step; return its logits and the `Step` that continues.
        (MAX_ROWS, MAX_STEPS and LOG_PROBS are FusedSeq2SeqRunner's: this graph's cache grows, its output is
        logits.)"""
        rows = ids.shape[0]
        hidden = self.encode(ids, mask)
        empty = (rows, self.heads, 0, self.head_dim)
        pasts = [self._placeholder(empty, self.kv_dtype) for _ in self.self_pasts]
        crosses = [self._placeholder(empty, self.kv_dtype) for _ in self.cross_pasts]
        tokens = np.full(rows, decoder_start, dtype=np.int64)
        logits, self_past, cross_past = self._decode(tokens, hidden, mask, pasts, crosses, first=True)
        state: dict[str, Any] = {"self": self_past, "cross": cross_past, "mask": mask, "inputs": np.arange(rows)}
        placeholders: dict[int, Any] = {}

        def step(tokens: np.ndarray, parents: np.ndarray | None) -> np.ndarray:
            n = len(tokens)
            if parents is not None and not (len(parents) == len(state["inputs"]) and (parents == np.arange(n)).all()):
                inputs = state["inputs"][parents]
                if np.array_equal(inputs, state["inputs"]):  # beams moved within their inputs
                    state["self"] = self.gather(state["self"], parents)
                else:
                    both = self.gather(state["self"] + state["cross"], parents)
                    state["self"], state["cross"] = both[: len(self.self_pasts)], both[len(self.self_pasts) :]
                    state["mask"] = np.ascontiguousarray(state["mask"][parents])
                    state["inputs"] = inputs
            if n not in placeholders:
                placeholders[n] = self._placeholder((n, 1, self.hidden_size), self.hidden_dtype)
            logits, state["self"], state["cross"] = self._decode(
                tokens, placeholders[n], state["mask"], state["self"], state["cross"], first=False
            )
            return logits

        return logits, step

    def generate(
        self,
        sources: Sequence[Sequence[int]],
        config: GenerationConfig,
        pad_id: int,
        max_new_tokens: int,
        keys: Sequence[int] | None = None,
    ) -> list[list[Hypothesis]]:
        """Decode each source (token ids); n-best lists (num_return_sequences), best first."""
        ids, mask, start = right_padded(sources, pad_id, config)
        logits, step = self.start(ids, mask, start)
        return generate(
            step,
            logits,
            [[start]] * len(sources),
            config.update(max_new_tokens=max_new_tokens),
            keys=keys,
            encoder_ids=sources,
        )


def is_fused(decoder) -> bool:
    """Whether DECODER is export.seq2seq_graph's step graph (shared self-attention buffers, cross keys as inputs)."""
    return "seqlens_k" in {i.name for i in decoder.get_inputs()}


class FusedSeq2SeqRunner:
    """The driver of onnxpipe's own encoder-decoder graphs (export.seq2seq_graph), CPU only.

    The encoder returns every decoder layer's cross-attention keys and values, once per input; the
    decoder step takes them per *input*, its rows being inputs x group (the beams of an input are
    consecutive rows), so a beam search neither copies nor reorders them. The self-attention cache is one
    buffer per layer and kind, (rows, heads, max_length, head_dim), allocated once (grown when a batch
    needs more) and bound as both past and present: GroupQueryAttention writes each step's position in
    place. Following beams copies only the rows whose parent is another row, and only the positions
    written so far; a smaller batch (finished inputs left) is compacted to the buffer's first rows.
    Beam search reads the graph's log_probs output (its LogSoftmax), greedy and sampling its logits.
    """

    def __init__(self, encoder, decoder, device: Device):
        if device.kind != "cpu":
            raise ModelNotFoundError(
                "onnxpipe's fused encoder-decoder graph runs on the CPU only",
                hint="run it with --device cpu, or export the checkpoint again with --graph optimum for the GPU",
            )
        self.encoder = encoder
        self.decoder = decoder
        self.device = device
        inputs = {i.name: i for i in decoder.get_inputs()}
        self.layers = sum(1 for n in inputs if n.startswith("past_key."))
        self.self_names = [(f"past_{k}.{i}", f"present_{k}.{i}") for i in range(self.layers) for k in ("key", "value")]
        self.cross_names = [o.name for o in encoder.get_outputs() if o.name.startswith("cross_")]
        first = inputs["past_key.0"]
        self.heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        vocab = {o.name: o for o in decoder.get_outputs()}["logits"].shape[-1]
        self.vocab_size = int(vocab)
        self.steps = 0
        self.gathers = 0
        self.last_cross_rows = 0
        self.shared: Any = None  # the embedding table both sessions read (_shared_initializer)
        self._flat: list[np.ndarray] = []  # one flat float32 array per self-attention buffer, grown on demand
        self._logits_buffers: list[np.ndarray] = []

    @classmethod
    def from_model(cls, model: ExportedModel) -> FusedSeq2SeqRunner:
        """The driver of MODEL's graphs. They are made for the CPU (float32 GroupQueryAttention has no CUDA
        kernel): --device auto runs them there, --device cuda is refused by the model (graph_device)."""
        if model.device.kind == "auto" and model.provider is None:  # no session made yet
            model.device = Device("cpu")
        if model.provider is None:  # before the sessions: ONNX Runtime reads the table in place, so the model
            shared = _shared_initializer(model)  # that owns the sessions keeps it (a later runner of the same
            if shared is not None:  # model reads freed memory otherwise)
                model.session_arrays.append(shared)
        encoder, decoder = model.session("encoder"), model.session("decoder")
        device = model.runs_on
        assert device is not None
        runner = cls(encoder, decoder, device)
        runner.shared = model.session_arrays[0] if model.session_arrays else None
        return runner

    def _buffers(self, rows: int, length: int) -> list[np.ndarray]:
        """Self-attention buffers of ROWS x LENGTH positions: views of the first rows of the flat arrays."""
        size = rows * self.heads * length * self.head_dim
        if not self._flat or self._flat[0].size < size:
            self._flat = []  # freed before the larger ones are made
            self._flat = [np.zeros(size, np.float32) for _ in self.self_names]
        return [f[:size].reshape(rows, self.heads, length, self.head_dim) for f in self._flat]

    def _logits_buffer(self, rows: int) -> np.ndarray:
        """(rows, vocab) float32 for a step's output: two flat arrays used in turn (see Seq2SeqRunner)."""
        size = rows * self.vocab_size
        if not self._logits_buffers or self._logits_buffers[0].size < size:
            self._logits_buffers = [np.empty(size, np.float32) for _ in range(2)]
        self._logits_buffers.reverse()
        return self._logits_buffers[0][:size].reshape(rows, self.vocab_size)

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        """The cross-attention keys and values of right-padded ids, per input (cross_names' order)."""
        return self.encoder.run(self.cross_names, {"input_ids": ids, "attention_mask": mask})

    def start(
        self, ids: np.ndarray, mask: np.ndarray, decoder_start: int, max_rows: int, max_steps: int, log_probs: bool
    ):
        """Encode the batch and run the first decoder step; return its logits and the `Step` that continues.
        MAX_ROWS and MAX_STEPS (decoder positions) size the self-attention buffers."""
        from onnxruntime import OrtValue

        batch = ids.shape[0]
        cross_full = self.encode(ids, mask)
        length = max_steps
        state: dict[str, Any] = {
            "t": 0,  # decoder positions written
            "rows": np.arange(batch),  # each row's input (index into the batch)
            "inputs": np.arange(batch),  # the inputs of the bound cross-attention values, in row-group order
            "cross": [OrtValue.ortvalue_from_numpy(c) for c in cross_full],
            "mask": mask,
        }
        flat_views = self._buffers(max(max_rows, batch), length)
        bound: dict[int, list] = {}

        def buffers(rows: int) -> tuple[list[np.ndarray], list]:
            """The first ROWS rows of every buffer, as arrays and as OrtValues (made once per row count)."""
            views = [v[:rows] for v in flat_views]
            if rows not in bound:
                bound[rows] = [OrtValue.ortvalue_from_numpy(v) for v in views]
            return views, bound[rows]

        output = "log_probs" if log_probs else "logits"

        def run(tokens: np.ndarray) -> np.ndarray:
            rows, t = len(tokens), state["t"]
            if t >= length:
                raise RuntimeError(f"the self-attention buffer holds {length} positions; this step needs more")
            binding = self.decoder.io_binding()
            binding.bind_cpu_input("input_ids", np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1, 1))
            binding.bind_cpu_input("seqlens_k", np.full(rows, t, dtype=np.int32))
            binding.bind_cpu_input("total_sequence_length", np.array(t + 1, dtype=np.int32))
            binding.bind_cpu_input("encoder_attention_mask", state["mask"])
            for (past, present), value in zip(self.self_names, buffers(rows)[1]):
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)  # the same buffer: written in place
            for name, value in zip(self.cross_names, state["cross"]):
                binding.bind_ortvalue_input(name, value)
            self.last_cross_rows = len(state["mask"])  # inputs, not rows: beams share theirs
            buffer = self._logits_buffer(rows)
            binding.bind_output(output, "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
            self.decoder.run_with_iobinding(binding)
            self.steps += 1
            state["t"] = t + 1
            return buffer

        logits = run(np.full(batch, decoder_start, dtype=np.int64))

        def step(tokens: np.ndarray, parents: np.ndarray | None) -> np.ndarray:
            n = len(tokens)
            if parents is not None:
                self._follow(state, parents, buffers)
            elif n != len(state["rows"]):
                raise ValueError("fewer rows without parents")
            return run(tokens)

        return logits, step

    def _follow(self, state: dict, parents: np.ndarray, buffers) -> None:
        """Row i continues row parents[i]: move the self-attention rows, and the inputs' cross values when
        the set of inputs changed."""
        parents = np.asarray(parents, dtype=np.int64)
        old, new, t = len(state["rows"]), len(parents), state["t"]
        if new == old:
            moved = np.flatnonzero(parents != np.arange(new))
            if len(moved):
                self.gathers += 1
                sources = parents[moved]
                for view in buffers(new)[0]:
                    view[moved, :, :t] = view[sources, :, :t]  # the right side is gathered first
        else:
            self.gathers += 1
            views = buffers(old)[0]
            for view, target in zip(views, buffers(new)[0]):
                target[:, :, :t] = view[parents, :, :t]  # a copy, then into the first rows of the same memory
        rows = state["rows"][parents]
        state["rows"] = rows
        # Inputs in row order, each over a run of equal length (the beams of one input), else one per row.
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        inputs = rows[starts]
        sizes = np.diff(np.r_[starts, len(rows)])
        if not ((sizes == sizes[0]).all() and len(np.unique(inputs)) == len(inputs)):
            inputs = rows
        if not np.array_equal(inputs, state["inputs"]):
            from onnxruntime import OrtValue

            position = {int(i): j for j, i in reversed(list(enumerate(state["inputs"])))}
            where = np.array([position[int(i)] for i in inputs], dtype=np.int64)
            state["cross"] = [
                OrtValue.ortvalue_from_numpy(np.ascontiguousarray(c.numpy()[where])) for c in state["cross"]
            ]
            state["mask"] = np.ascontiguousarray(state["mask"][where])
            state["inputs"] = inputs

    def generate(
        self,
        sources: Sequence[Sequence[int]],
        config: GenerationConfig,
        pad_id: int,
        max_new_tokens: int,
        keys: Sequence[int] | None = None,
    ) -> list[list[Hypothesis]]:
        """Decode each source (token ids); n-best lists (num_return_sequences), best first."""
        ids, mask, start = right_padded(sources, pad_id, config)
        beams = config.num_beams
        log_probs = beams > 1  # beam search works on log-probabilities (transformers' too)
        logits, step = self.start(ids, mask, start, len(sources) * beams, max_new_tokens + 1, log_probs)
        return generate(
            step,
            logits,
            [[start]] * len(sources),
            config.update(max_new_tokens=max_new_tokens),
            keys=keys,
            log_probs=log_probs,
            encoder_ids=sources,
        )


def _shared_initializer(model: ExportedModel) -> Any:
    """The token embedding table that the encoder and decoder graphs both read (export.seq2seq_graph writes it
    to one file), loaded once and handed to both sessions (SessionOptions.add_initializer): each session would
    otherwise hold its own copy (119 MB for opus-mt). None when the export has none."""
    from onnxruntime import OrtValue

    from onnxpipe.manifest import inside

    record = (model.manifest.get("graph") or {}).get("shared_initializer")
    if not isinstance(record, dict):
        return None
    shape = tuple(int(d) for d in record.get("shape") or ())
    path = inside(model.folder, str(record.get("file")))
    table = np.fromfile(path, dtype="<f4")
    if not shape or table.size != int(np.prod(shape)):
        raise ModelNotFoundError(
            f"{path} does not hold the {shape} table the manifest names", hint="re-run onnxpipe export"
        )
    value = OrtValue.ortvalue_from_numpy(table.reshape(shape))
    model.session_options().add_initializer(str(record.get("name")), value)
    return (table, value)
