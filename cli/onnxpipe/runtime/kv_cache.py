"""Reordering the rows of a key/value cache between decoding steps, on the device that holds it.

Beam search moves beams between rows and finished rows leave the batch, so after each step the
cache must follow `rows` (row i takes row rows[i]). The decoder drivers (runtime.decoder for
generate, runtime.seq2seq for translate and summarize) share this: on CPU numpy moves only the rows that change, in place; on CUDA a tiny
Gather graph keeps the cache in GPU memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxpipe.runtime.device import Device

# The key/value types the drivers take, by ONNX Runtime's type name (bfloat16 has no numpy type).
KV_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_ONNX_ELEM = {np.float32: 1, np.float16: 10}


class CacheReorder:
    """`reorder(values, rows)` for the cache of one model session (one Gather session per tensor count)."""

    def __init__(self, model_session: Any, kv_dtype, device: Device):
        self.model_session = model_session
        self.kv_dtype = kv_dtype
        self.device = device
        self.device_type, self.device_id = device.kind, device.index  # as IO binding names them
        # On CPU numpy reorders the cache: ONNX Runtime's Gather graph is faster in isolation, but in a
        # 58k-vocabulary beam search it was slower overall and raised the peak RSS from 1.7 to 2.4 GB.
        self.graph = device.kind != "cpu"
        self._sessions: dict[int, Any] = {}

    def __call__(self, values: list, rows: np.ndarray) -> list:
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if not self.graph:
            return reorder_rows(values, rows)
        session = self._sessions.get(len(values))
        if session is None:
            session = self._sessions[len(values)] = _gather_session(
                len(values), self.kv_dtype, self.model_session, self.device
            )
        binding = session.io_binding()
        binding.bind_cpu_input("rows", rows)
        for i, value in enumerate(values):
            binding.bind_ortvalue_input(f"x{i}", value)
            binding.bind_output(f"y{i}", self.device_type, self.device_id)
        session.run_with_iobinding(binding)
        return binding.get_outputs()


def reorder_rows(values: list, rows: np.ndarray) -> list:
    """VALUES (CPU OrtValues of one batch) with row i taken from row rows[i], as new or the same values.

    When the batch keeps its size (beams moving), only the rows whose parent is another row are
    copied, in place: most beams continue themselves (three quarters of the rows in a 4-beam search),
    so this copies a fraction of the cache where a gather copied all of it. The values are the presents
    of the run before, which nothing else holds. A smaller batch (finished rows dropped) is gathered.
    """
    from onnxruntime import OrtValue

    if values and len(rows) == values[0].shape()[0]:
        moved = np.flatnonzero(rows != np.arange(len(rows)))
        if len(moved):
            sources = rows[moved]
            for value in values:
                array = value.numpy()
                array[moved] = array[sources]  # the right side is gathered first: overlaps are safe
        return values
    return [OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[rows])) for v in values]


def _gather_session(n: int, dtype, model_session, device: Device):
    """A session that gathers rows of n tensors at once (Gather axis 0), to reorder a cache on its device.

    It runs on DEVICE (MODEL_SESSION's) with MODEL_SESSION's thread count; its threads do not spin after a run, so
    they leave the cores to the model's own run that follows.
    """
    import onnxruntime as ort

    model = gather_model(n, _ONNX_ELEM[dtype])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    threads = model_session.get_session_options().intra_op_num_threads
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    from onnxpipe.runtime.sessions import make_session

    return make_session(model, device, options=options)


def gather_model(n: int, elem_type: int) -> bytes:
    """ONNX ModelProto bytes for y_i = Gather(x_i, rows, axis=0), i < n, written without the onnx package
    (the runtime does not depend on it). Field numbers are those of onnx.proto3."""

    def varint(v: int) -> bytes:
        out = bytearray()
        while True:
            byte, v = v & 0x7F, v >> 7
            out.append(byte | (0x80 if v else 0))
            if not v:
                return bytes(out)

    def num(field_no: int, v: int) -> bytes:
        return varint(field_no << 3) + varint(v)

    def blob(field_no: int, data: bytes | str) -> bytes:
        data = data.encode() if isinstance(data, str) else data
        return varint(field_no << 3 | 2) + varint(len(data)) + data

    def value_info(name: str, elem: int, rank: int) -> bytes:
        dims = b"".join(blob(1, blob(2, f"{name}_{d}")) for d in range(rank))
        tensor_type = num(1, elem) + blob(2, dims)
        return blob(1, name) + blob(2, blob(1, tensor_type))

    nodes = b"".join(
        blob(
            1,
            blob(1, f"x{i}")
            + blob(1, "rows")
            + blob(2, f"y{i}")
            + blob(4, "Gather")
            + blob(5, blob(1, "axis") + num(3, 0) + num(20, 2)),
        )
        for i in range(n)
    )
    inputs = blob(11, value_info("rows", 7, 1)) + b"".join(
        blob(11, value_info(f"x{i}", elem_type, 4)) for i in range(n)
    )
    outputs = b"".join(blob(12, value_info(f"y{i}", elem_type, 4)) for i in range(n))
    graph = nodes + blob(2, "gather_rows") + inputs + outputs
    return num(1, 8) + blob(8, blob(1, "") + num(2, 13)) + blob(7, graph)


# --- the shared buffer of export.cuda_graph ------------------------------------------------

UNSIZED_NEW_TOKENS = 1024  # new positions when neither max_new_tokens nor the model's positions are known


def buffer_length(prompt_width: int, max_new_tokens: int | None, max_positions: int | None) -> int:
    """Positions to preallocate for a batch whose longest prompt is PROMPT_WIDTH tokens: the prompt and
    MAX_NEW_TOKENS (unknown: the model's positions), never past the model's MAX_POSITIONS."""
    if max_new_tokens:
        wanted = prompt_width + max_new_tokens
    else:
        wanted = max_positions or prompt_width + UNSIZED_NEW_TOKENS
    if max_positions:
        wanted = min(wanted, max_positions)
    return max(wanted, prompt_width, 1)


def buffer_shape(rows: int, kv_heads: int, length: int, head_dim: int) -> tuple[int, int, int, int]:
    """One layer's key (or value) buffer: (batch, kv_heads, max_sequence_length, head_dim), as
    GroupQueryAttention takes past_key and writes present_key when both are the same buffer."""
    return (rows, kv_heads, length, head_dim)


def allocate_buffers(count: int, shape: tuple[int, ...], dtype, device: Device) -> list:
    """COUNT zeroed cache buffers of SHAPE on DEVICE (OrtValues), each bound as a past and its present."""
    from onnxruntime import OrtValue

    if device.kind == "cpu":
        # A numpy-backed OrtValue: binding it as input and output gives the kernel one pointer.
        return [OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype)) for _ in range(count)]
    # Device memory is not zeroed: GroupQueryAttention reads a row's first seqlens_k + 1 positions only.
    return [OrtValue.ortvalue_from_shape_and_type(shape, dtype, device.kind, device.index) for _ in range(count)]
