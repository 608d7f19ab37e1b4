"""onnxpipe's fused decoder graph for CUDA: fp16, with the key/value cache in one buffer shared by past and present.

ONNX Runtime's CUDA GroupQueryAttention runs in fp16 (or bf16) only and takes no attention bias, so the
CPU graph of export.fused (fp32, left padding through an additive bias) cannot run its attention on the
GPU. This module takes that graph, as fused.build writes it for any family it supports, and rewrites it
the way onnxruntime-genai's model builder writes its CUDA decoders:

- the cache is one preallocated buffer per layer and kind, (batch, kv_heads, max_sequence_length,
  head_dim), bound as both `past_key_values.N.key` and `present.N.key`: GroupQueryAttention sees the
  same pointer and writes the new positions in place ("past_present_share_buffer"), so nothing is
  copied per step;
- which positions of a row are real is told by `seqlens_k` (batch,) int32, each row's total length
  minus one, and `total_sequence_length`, a scalar int32 the kernel reads on the host: a row's tokens
  sit at positions 0..length-1 of its buffer (prompts are right-padded, never left-padded);
- the rotary positions are computed in the graph from seqlens_k (past length + 0..S-1), and the logits
  are those of each row's last real token (GatherND at min(seqlens_k, S - 1)), as float32;
- weights and activations are fp16 (stash_type keeps the norms' sums in float32).

The inputs are input_ids, seqlens_k, total_sequence_length and the buffers; the outputs logits
(batch, 1, vocab) float32 and the presents (the same buffers). runtime.decoder.SharedBufferDecoder
drives it. The same rewrite in fp32 is the graph's CPU twin: ONNX Runtime's CPU kernels run it, shared
buffer included, so an export for CUDA is validated on a machine without a GPU
(`export --device cuda`), and the tests compare its greedy ids with transformers'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

GRAPH_SUFFIX = "-cuda"
DTYPES = ("float16", "float32")  # float32: the CPU twin
SHARED_INPUTS = ("seqlens_k", "total_sequence_length")
MAX_LENGTH_DIM = "max_sequence_length"
_GQA_SEQLENS, _GQA_TOTAL, _GQA_BIAS = 5, 6, 10  # GroupQueryAttention's input slots (contrib op spec)
_NORMS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization")


def build(
    model: Any, out: Path, dtype: str = "float16", opset: int | None = None, block_weights: bool = True
) -> tuple[str, dict]:
    """Write OUT/model.onnx, the shared-buffer graph of MODEL in DTYPE; return (file name, weight kinds)."""
    from onnxpipe.export import fused

    name, weights = fused.build(model, Path(out), opset, block_weights)
    rewrite(Path(out) / name, dtype)
    return name, _relabel(weights, dtype)


def _relabel(weights: dict, dtype: str) -> dict:
    """fused.build's count of weight matrices by kind, its unquantised ones ("float32") in DTYPE."""
    plain = "float16" if dtype == "float16" else "float32"
    return {(plain if kind == "float32" else kind): n for kind, n in weights.items()}


def export(
    model: Any, out: Path, opset: int | None = None, dtype: str = "float16", twin: Path | None = None
) -> tuple[dict[str, str], dict]:
    """fused.export (the graph and the configs beside it), its graph then rewritten for CUDA in DTYPE; with
    TWIN, the same graph in float32 is written there too (the CPU twin that validation runs)."""
    import shutil

    from onnxpipe.export import fused

    out = Path(out)
    files, weights = fused.export(model, out, opset)
    graph = out / files["model"]
    if twin is not None:
        Path(twin).mkdir(parents=True, exist_ok=True)
        for path in (graph, graph.with_name(graph.name + "_data")):
            if path.is_file():
                shutil.copyfile(path, Path(twin) / path.name)
        rewrite(Path(twin) / graph.name, "float32")
    rewrite(graph, dtype)
    return files, _relabel(weights, dtype)


def rewrite(path: Path, dtype: str = "float16") -> None:
    """Turn the fused graph file PATH into the shared-buffer graph in DTYPE, in place."""
    import onnx

    from onnxpipe.export import fused

    if dtype not in DTYPES:
        raise ValueError(f"unknown graph dtype {dtype!r} (one of {', '.join(DTYPES)})")
    proto = onnx.load(str(path))  # external data (a large model) loaded with it
    data = path.with_name(path.name + "_data")
    data.unlink(missing_ok=True)
    to_shared_buffer(proto, dtype)
    if sum(len(t.raw_data) for t in proto.graph.initializer) > fused.EXTERNAL_DATA_BYTES:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    else:
        onnx.save_model(proto, str(path))


def to_shared_buffer(proto: Any, dtype: str = "float16") -> None:
    """Rewrite fused.build's graph PROTO in place (see the module doc)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    names = {i.name for i in graph.input}
    if not {"input_ids", "attention_mask", "position_ids"} <= names:
        raise ValueError("not a fused decoder graph (input_ids, attention_mask, position_ids expected)")
    elem = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    added: list = []

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        added.append(helper.make_node(op, inputs, [output], name=f"cuda/{output}", **attrs))
        return output

    def const(name: str, values) -> str:
        graph.initializer.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    # --- positions and the last real token of each row, from seqlens_k ---------------------------
    p = "shared."
    shape = node("Shape", ["input_ids"], p + "ids_shape")
    seq = node("Slice", [shape, const(p + "1", [1]), const(p + "2", [2])], p + "seq")  # (1,)
    seqlens = node("Cast", ["seqlens_k"], p + "seqlens64", to=TensorProto.INT64)  # (B,)
    # past length = total - S for a row that continues its cache; a first prompt's pads make it negative: 0
    past = node(
        "Max",
        [node("Sub", [node("Add", [seqlens, p + "1"], p + "total"), seq], p + "past_or_less"), const(p + "0", 0)],
        p + "past",
    )
    steps = node(
        "Range", [const(p + "zero", 0), node("Squeeze", [seq], p + "seq_scalar"), const(p + "one", 1)], p + "steps"
    )
    node("Add", [node("Unsqueeze", [past, p + "1"], p + "past_col"), steps], "position_ids")
    last = node("Min", [seqlens, node("Sub", [seq, p + "1"], p + "seq_minus_1")], p + "last")  # (B,)
    last_index = node("Reshape", [last, const(p + "index_shape", [-1, 1, 1])], p + "last_index")

    # --- the graph's inputs and outputs ------------------------------------------------------
    kept = [i for i in graph.input if i.name not in ("attention_mask", "position_ids")]
    del graph.input[:]
    graph.input.extend(kept[:1])
    graph.input.append(helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch_size"]))
    graph.input.append(helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []))
    graph.input.extend(kept[1:])
    for value in [*graph.input, *graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            tensor = value.type.tensor_type
            tensor.elem_type = elem
            dims = tensor.shape.dim
            dims[0].dim_param = "batch_size"
            dims[2].Clear()
            dims[2].dim_param = MAX_LENGTH_DIM

    # --- the nodes ---------------------------------------------------------------------------
    sliced = 0
    for n in graph.node:
        if n.op_type == "GroupQueryAttention":
            ins = list(n.input) + [""] * max(0, _GQA_BIAS + 1 - len(n.input))
            ins[_GQA_SEQLENS], ins[_GQA_TOTAL], ins[_GQA_BIAS] = SHARED_INPUTS[0], SHARED_INPUTS[1], ""
            while ins and ins[-1] == "":
                ins.pop()
            del n.input[:]
            n.input.extend(ins)
        elif n.op_type == "Slice" and len(n.input) > 1 and n.input[1] == "c.last":
            # the last position of every row -> each row's last real token (right padding)
            x = n.input[0]
            n.op_type = "GatherND"
            del n.input[:]
            n.input.extend([x, last_index])
            n.attribute.append(helper.make_attribute("batch_dims", 1))
            sliced += 1
        elif n.op_type == "Cast" and elem != TensorProto.FLOAT:
            for a in n.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = elem
    if not sliced:
        raise ValueError("the fused graph has no last-position Slice (c.last) to turn into the last real token")
    if elem != TensorProto.FLOAT:  # float32 logits at the boundary, whatever runs inside
        for n in graph.node:
            n.output[:] = [p + "logits" if o == "logits" else o for o in n.output]
        node("Cast", [p + "logits"], "logits", to=TensorProto.FLOAT)
    graph.node.extend(added)
    del graph.value_info[:]
    _prune(graph)
    if elem != TensorProto.FLOAT:
        for i, t in enumerate(graph.initializer):
            if t.data_type == TensorProto.FLOAT:
                array = numpy_helper.to_array(t)
                if np.abs(array[np.isfinite(array)]).max(initial=0) > np.finfo(np.float16).max:
                    raise ValueError(f"initializer {t.name} overflows float16")
                graph.initializer[i].CopyFrom(numpy_helper.from_array(array.astype(np.float16), t.name))
    _sort(graph)
    graph.name += GRAPH_SUFFIX


def _prune(graph: Any) -> None:
    """Remove the nodes and initializers no output depends on (the old mask, bias and length nodes)."""
    producer = {o: n for n in graph.node for o in n.output}
    needed: set[str] = set()
    stack = [o.name for o in graph.output]
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        n = producer.get(name)
        if n is not None:
            stack += [i for i in n.input if i]
            stack += [o for o in n.output if o]
    nodes = [n for n in graph.node if any(o in needed for o in n.output)]
    consumed = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    for n in nodes:  # the norms' optional mean and inv_std_var: unnamed, as the CUDA kernels produce neither
        if n.op_type in _NORMS:
            n.output[:] = [o if i not in (1, 2) or o in consumed else "" for i, o in enumerate(n.output)]
    del graph.node[:]
    graph.node.extend(nodes)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _sort(graph: Any) -> None:
    """Topological order (ONNX requires it; the added nodes went last)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError(f"the graph has a cycle or a missing input at {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


# --- validation --------------------------------------------------------------------------


class _Arg:
    def __init__(self, name: str, type_: str, shape: list):
        self.name, self.type, self.shape = name, type_, shape


class GrowingCacheView:
    """A shared-buffer session seen as a graph of optimum's inputs (attention_mask, position_ids, a past
    that grows), one row at a time: what export.validate feeds every decoder, step by step. Each run
    copies the past into a buffer of exactly the new total length; the presents come back at that length."""

    def __init__(self, session: Any):
        self.session = session
        self.past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        self.outputs = [o.name for o in session.get_outputs()]

    def get_inputs(self) -> list:
        growing = [
            _Arg(i.name, i.type, [i.shape[0], i.shape[1], "past_sequence_length", i.shape[3]]) for i in self.past
        ]
        ids = ["batch_size", "sequence_length"]
        return [
            _Arg("input_ids", "tensor(int64)", ids),
            _Arg("attention_mask", "tensor(int64)", ["batch_size", "total_sequence_length"]),
            _Arg("position_ids", "tensor(int64)", ids),
            *growing,
        ]

    def get_outputs(self) -> list:
        return self.session.get_outputs()

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        ids = feeds["input_ids"]
        rows, new = ids.shape
        if rows != 1 or not feeds["attention_mask"].all():
            raise ValueError("the shared-buffer view runs one unpadded row")
        total = feeds["attention_mask"].shape[1]
        run_feeds: dict[str, np.ndarray] = {
            "input_ids": ids,
            "seqlens_k": np.array([total - 1], dtype=np.int32),
            "total_sequence_length": np.array(total, dtype=np.int32),
        }
        for i in self.past:
            past = feeds[i.name]
            buffer = np.zeros((rows, past.shape[1], total, past.shape[3]), dtype=past.dtype)
            buffer[:, :, : past.shape[2]] = past
            run_feeds[i.name] = buffer
        results = self.session.run(None, run_feeds)
        return [r[:, :, :total] if n.startswith("present.") else r for n, r in zip(self.outputs, results)]
