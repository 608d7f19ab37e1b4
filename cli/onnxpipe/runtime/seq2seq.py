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
    def from_model(cls, model: ExportedModel) -> Seq2SeqRunner:
        """The driver of MODEL's encoder and merged decoder, on the device their sessions really got."""
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

    def start(self, ids: np.ndarray, mask: np.ndarray, decoder_start: int):
        """Encode the batch and run the first decoder step; return its logits and the `Step` that continues."""
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
        logits, step = self.start(ids, mask, int(start))
        return generate(step, logits, [[start]] * len(sources), config.update(max_new_tokens=max_new_tokens), keys=keys)
