"""Batch-independent int8 for encoders and encoder-decoders: a pass over any ONNX graph.

Every MatMul (and Gemm) whose weight is a constant 2-D matrix becomes an int8 product whose activations
are quantised per row, so what a record gets depends on that record only, never on its batch-mates.
optimum's dynamic quantisation (the method before this one) takes one scale for the whole batch tensor,
padding included: 15-22 of the 1,000 sentiment labels changed between --batch-size 1 and 32.

    activations  s = max|x| / 127 per row (per token), q = round(x / s) + 128 as uint8, at run time
    weights      int8 per output channel, symmetric: w = ws[n] * wq[k, n], wq in [-127, 127]
    product      MatMulIntegerToFloat(q, wq) * ws (ONNX Runtime's U8S8 GEMM, which runs on VNNI's
                 vpdpbusd where the CPU has it), then * s per row, then + bias

The graph is otherwise left alone (optimum's, or onnxpipe's own seq2seq graph): weights are found as
initializers of the main graph (a merged decoder's If branches share them: each is quantised once), or as
a Transpose of one (a tied output projection). An activation that feeds several products (query, key and
value) is quantised once. Products with fewer than MIN_OUTPUTS outputs (classification heads) stay
float32: they cost nothing and decide the label.

Measured against the alternatives (this project's AMD EPYC with AVX512-VNNI, ONNX Runtime 1.31):
on sentiment (MiniLM-L6) per-row int8 runs at the speed of the dynamic quantisation it replaces (CPU time
per record, one thread) with 996 of 1,000 labels as float32's (dynamic: 981) and none changing with the batch
size; on opus-mt-shaped beam search it is about 1.4x float32 on the same graph, where dynamic int8 was
slower than float32. MatMulNBits bits=8 at accuracy level 4 (ONNX Runtime quantises activations per block
of 32 itself) is as batch-independent and agrees a little more (998 of 1,000), but its 8-bit kernel runs
no faster than float32 MatMul here; METHOD "nbits" builds it for such measurements.

With calibration text (`export --quantize int8 --calibration FILE`, encoders), METHOD "static" takes each
activation's scale and zero point from its range on that text instead (uint8, asymmetric: a constant), so
there is no per-row work at run time, a MatMul's bias Add goes inside MatMulIntegerToFloat (which also
unfuses ONNX Runtime's BiasGelu: Gelu alone ran 2.5x faster than BiasGelu here), and a record's result
still depends on that record alone. On the sentiment model, calibrated on 256 of its training sentences:
ONNX Runtime's kernel time 1,370 ms against per-row's 1,894 for the 1,000 held-out sentences; through
`classify`, 1.22-1.27x per-row's rate; 986 of 1,000 labels as float32's (per-row: 996), accuracy 82.3%
(float32: 82.1%). An activation the text never reached falls back to per-row.

U8S8 without VNNI (AVX2 only) multiplies through vpmaddubsw, whose 16-bit pair sums can saturate with
activations up to 255 and weights up to 127; the validation at export time runs on the exporting CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

METHODS = ("rows", "nbits", "static")
MIN_OUTPUTS = 16  # products with fewer outputs (a classifier's head) stay float32
PREFIX = "int8"  # names of the values, nodes and initializers the pass adds start with this


def describe(counts: dict[str, int], method: str = "rows", calibration: dict | None = None) -> dict[str, Any]:
    """The manifest's `quantization` record of a per-row (or calibrated) int8 export."""
    if method == "static":
        record = {
            "method": "int8 with calibrated activation scales (QuantizeLinear, MatMulIntegerToFloat)",
            "weights": "int8 per output channel, symmetric",
            "activations": "uint8 per tensor, asymmetric, min/max over the calibration text; per row where it"
            " never ran",
            "calibration": calibration or {},
            "per_row_fallbacks": counts.get("per_row", 0),
        }
    elif method == "nbits":
        from onnxpipe.export import nbits

        record = {
            "method": "MatMulNBits 8-bit, activations per block of 32 (accuracy level 4)",
            "weights": f"int8 symmetric blocks of {nbits.BLOCK}",
        }
    else:
        record = {
            "method": "int8 with per-row activation scales (MatMulIntegerToFloat)",
            "weights": "int8 per output channel, symmetric",
            "activations": "int8 per row, symmetric, scale max|x|/127 at run time",
        }
    return {
        **record,
        "batch_independent": True,
        "matmuls": counts["converted"],
        "kept_fp32_matmuls": counts["kept"],
        "cpu": cpu_int8_kernels(),
    }


def cpu_int8_kernels() -> str:
    """Which integer dot-product instructions this CPU offers ONNX Runtime's int8 GEMM (from /proc/cpuinfo)."""
    from onnxpipe.runtime.machine import cpuinfo

    flags = set((cpuinfo() or [{}])[0].get("flags", "").split())
    found = [f for f in ("amx_int8", "avx512_vnni", "avx_vnni", "avx2") if f in flags]
    return ", ".join(found) if found else "unknown"


@dataclass
class _Pass:
    method: str
    opset: int
    keep: tuple[str, ...]
    shapes: dict[str, Any]
    base_dir: str = ""
    initializers: list[Any] = field(default_factory=list)
    value_info: list[Any] = field(default_factory=list)
    shared: dict[str, str] = field(default_factory=dict)
    weights: dict[str, tuple[str, ...]] = field(default_factory=dict)  # weight name -> its quantised initializers
    rows: dict[str, tuple[str, str]] = field(default_factory=dict)  # activation -> (q, scale), per graph
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)  # static: activation -> (min, max)
    static: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # activation -> (q, scale, zero point)
    per_row: int = 0  # static: products whose activation had no range
    converted: int = 0
    kept: int = 0
    counter: int = 0

    def name(self, base: str) -> str:
        self.counter += 1
        return f"{PREFIX}/{base}_{self.counter}"

    def const(self, base: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def constant(self, base: str, value: Any, dtype) -> str:
        """One initializer per distinct small constant."""
        key = f"{base}:{np.dtype(dtype).name}:{value}"
        if key not in self.shared:
            self.shared[key] = self.const(base, np.array(value, dtype))
        return self.shared[key]


def quantize_graph(
    model,
    method: str = "rows",
    keep: tuple[str, ...] = (),
    base_dir: str = "",
    ranges: dict[str, tuple[float, float]] | None = None,
) -> dict[str, int]:
    """Rewrite MODEL (an onnx ModelProto) in place; KEEP: substrings of node names that stay float32.
    Weights held as external data are read from BASE_DIR; the tensors left alone (an embedding table) keep
    their external references. RANGES (method "static"): the (min, max) of each activation (calibrate).

    Returns {"converted": products made int8, "kept": products with a constant weight left float32,
    "per_row": static products that fell back to per-row}."""
    if method not in METHODS:
        raise ValueError(f"unknown int8 method {method!r}")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:  # QuantizeLinear and ReduceMax as used here
        raise ValueError(f"opset {opset} is older than 13")
    p = _Pass(method, opset, keep, _inferred_shapes(model), base_dir, ranges=dict(ranges or {}))
    main = model.graph
    initializers = {i.name: i for i in main.initializer}
    transposed = {  # a tied output projection: Transpose(embedding table), in the main graph or a branch
        n.output[0]: n.input[0]
        for g in all_graphs(main)
        for n in g.node
        if n.op_type == "Transpose"
        and n.input[0] in initializers
        and [list(a.ints) for a in n.attribute if a.name == "perm"] in ([], [[1, 0]])
    }
    # subgraphs first: rewriting a graph copies its nodes, so an If rewritten before its branches would
    # keep the old branches
    for graph in reversed(list(all_graphs(main))):
        p.rows, p.static = {}, {}
        _rewrite(graph, initializers, transposed, p)
    model.graph.initializer.extend(p.initializers)
    model.graph.value_info.extend(p.value_info)
    _drop_unused(model)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        from onnx import helper

        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {"converted": p.converted, "kept": p.kept, "per_row": p.per_row}


def calibration_inputs(model, keep: tuple[str, ...] = ()) -> list[str]:
    """The activations (main graph values) that quantize_graph quantises: what calibration measures."""
    main = model.graph
    initializers = {i.name: i for i in main.initializer}
    found = []
    for node in main.node:
        if node.op_type not in ("MatMul", "Gemm") or any(k in node.name for k in keep):
            continue
        weight = initializers.get(node.input[1])
        if weight is None or len(weight.dims) != 2:
            continue
        gemm_transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        outputs = weight.dims[0] if gemm_transposed else weight.dims[1]
        if outputs >= MIN_OUTPUTS and node.input[0] not in found:
            found.append(node.input[0])
    return found


def all_graphs(graph) -> Iterator[Any]:
    """GRAPH and every subgraph in it (a merged decoder keeps its layers inside If branches)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from all_graphs(attr.g)
            for sub in attr.graphs:
                yield from all_graphs(sub)


def _inferred_shapes(model) -> dict[str, Any]:
    """Value name -> its type from onnx's shape inference (on a copy without the weights' bytes)."""
    import onnx

    light = onnx.ModelProto()
    light.CopyFrom(model)
    for init in light.graph.initializer:
        init.ClearField("raw_data")
        init.ClearField("float_data")
        init.ClearField("external_data")
        init.data_location = onnx.TensorProto.DEFAULT
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception:  # noqa: BLE001 - without shapes the graph is as right, only less fused by ONNX Runtime
        return {}
    return {v.name: v.type for g in all_graphs(inferred.graph) for v in [*g.value_info, *g.output]}


def _array(init, base_dir: str = "") -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(init, base_dir).astype(np.float32)


def _weight(node, initializers, transposed, base_dir: str) -> tuple[str, np.ndarray, np.ndarray | None] | None:
    """(key, W as (K, N) float32, bias or None) of a MatMul/Gemm with a constant 2-D float weight."""
    from onnx import TensorProto

    def matrix(name: str) -> tuple[np.ndarray, bool] | None:
        source, flip = (transposed[name], True) if name in transposed else (name, False)
        init = initializers.get(source)
        if init is None or len(init.dims) != 2 or init.data_type != TensorProto.FLOAT:
            return None
        return _array(init, base_dir), flip

    found = matrix(node.input[1])
    if found is None:
        return None
    w, flip = found
    if node.op_type == "MatMul":
        return node.input[1], np.ascontiguousarray(w.T if flip else w), None
    attrs = {a.name: a for a in node.attribute}
    if attrs.get("transA") and attrs["transA"].i or (attrs["alpha"].f if "alpha" in attrs else 1.0) != 1.0:
        return None
    if bool(attrs.get("transB") and attrs["transB"].i) != flip:
        w = w.T
    bias = None
    if len(node.input) > 2 and node.input[2]:
        init = initializers.get(node.input[2])
        if init is None or (attrs["beta"].f if "beta" in attrs else 1.0) != 1.0:
            return None
        bias = _array(init, base_dir)
        if bias.shape != (w.shape[1],):
            return None
    return node.input[1], np.ascontiguousarray(w), bias


def _rewrite(graph, initializers, transposed, p: _Pass) -> None:
    nodes = []
    folded: set[str] = set()  # outputs of the Add nodes whose bias a product took
    for node in graph.node:
        if node.op_type == "Add" and node.output[0] in folded:
            continue
        found = _weight(node, initializers, transposed, p.base_dir) if node.op_type in ("MatMul", "Gemm") else None
        if found is None:
            nodes.append(node)
            continue
        key, w, bias = found
        if w.shape[1] < MIN_OUTPUTS or any(k in node.name for k in p.keep):
            p.kept += 1
            nodes.append(node)
            continue
        if p.method == "static" and node.input[0] in p.ranges:
            if bias is None:  # MatMul then Add(bias): the bias goes inside MatMulIntegerToFloat
                add = _bias_add(node.output[0], w.shape[1], graph, initializers, p)
                if add is not None:
                    bias, add_node = add
                    node = _renamed(node, add_node.output[0])
                    folded.add(add_node.output[0])
            nodes.extend(_static(node, key, w, bias, p))
        elif p.method == "nbits":
            nodes.extend(_nbits(node, key, w, bias, p))
        else:
            p.per_row += p.method == "static"
            nodes.extend(_rows(node, key, w, bias, p))
        p.converted += 1
    del graph.node[:]
    graph.node.extend(nodes)


def _bias_add(value: str, n_out: int, graph, initializers, p: _Pass) -> tuple[np.ndarray, Any] | None:
    """(bias, the Add node) when VALUE's only reader adds a constant (N,) vector to it, else None."""
    from onnx import TensorProto

    readers = [n for n in graph.node if value in n.input]
    if len(readers) != 1 or readers[0].op_type != "Add" or value in {o.name for o in graph.output}:
        return None
    add = readers[0]
    other = add.input[1] if add.input[0] == value else add.input[0]
    init = initializers.get(other)
    if init is None or list(init.dims) != [n_out] or init.data_type != TensorProto.FLOAT:
        return None
    return _array(init, p.base_dir), add


def _renamed(node, output: str):
    """A copy of NODE writing OUTPUT."""
    from onnx import NodeProto

    copy = NodeProto()
    copy.CopyFrom(node)
    copy.output[0] = output
    return copy


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(wq int8 (K, N), ws float32 (N,)): symmetric per output channel, w ~ wq * ws."""
    ws = np.abs(w).max(0) / np.float32(127)
    ws = np.where(ws > 0, ws, np.float32(1)).astype(np.float32)
    return np.clip(np.rint(w / ws), -127, 127).astype(np.int8), ws


def _rows(node, key: str, w: np.ndarray, bias, p: _Pass) -> list[Any]:
    from onnx import helper

    nodes = []
    x, y = node.input[0], node.output[0]
    if x not in p.rows:
        n = p.name("x")
        reduce = (
            helper.make_node("ReduceMax", [f"{n}/abs", p.constant("axes", [-1], np.int64)], [f"{n}/max"], keepdims=1)
            if p.opset >= 18
            else helper.make_node("ReduceMax", [f"{n}/abs"], [f"{n}/max"], axes=[-1], keepdims=1)
        )
        reduce.name = f"{n}/ReduceMax"
        nodes += [
            helper.make_node("Abs", [x], [f"{n}/abs"], name=f"{n}/Abs"),
            reduce,
            helper.make_node(
                "Mul", [f"{n}/max", p.constant("inv127", 1 / 127, np.float32)], [f"{n}/raw"], name=f"{n}/Mul"
            ),
            # an all-zero row gets a tiny scale instead of a division by zero
            helper.make_node(
                "Max", [f"{n}/raw", p.constant("tiny", 1e-30, np.float32)], [f"{n}/scale"], name=f"{n}/Max"
            ),
            helper.make_node("Div", [x, f"{n}/scale"], [f"{n}/scaled"], name=f"{n}/Div"),
            helper.make_node(
                "QuantizeLinear",
                [f"{n}/scaled", p.constant("one", 1.0, np.float32), p.constant("zero_point", 128, np.uint8)],
                [f"{n}/q"],
                name=f"{n}/QuantizeLinear",
            ),
        ]
        p.rows[x] = (f"{n}/q", f"{n}/scale")
    q, scale = p.rows[x]
    if key not in p.weights:
        wq, ws = quantize_weight(w)
        p.weights[key] = (p.const("w", wq), p.const("w_scale", ws))
    wq_name, ws_name = p.weights[key]
    m = p.name("matmul")
    nodes.append(
        helper.make_node(
            "MatMulIntegerToFloat",
            [q, wq_name, p.constant("one", 1.0, np.float32), ws_name, p.constant("zero_point", 128, np.uint8)],
            [f"{m}/unscaled"],
            domain="com.microsoft",
            name=f"{m}/MatMulIntegerToFloat",
        )
    )
    if bias is None:
        nodes.append(helper.make_node("Mul", [f"{m}/unscaled", scale], [y], name=f"{m}/Mul"))
        return nodes
    nodes += [
        helper.make_node("Mul", [f"{m}/unscaled", scale], [f"{m}/scaled"], name=f"{m}/Mul"),
        helper.make_node("Add", [f"{m}/scaled", p.const("bias", bias)], [y], name=f"{m}/Bias"),
    ]
    if y in p.shapes:  # ONNX Runtime fuses the bias into what follows (BiasGelu) where it knows this shape
        p.value_info.append(helper.make_value_info(f"{m}/scaled", p.shapes[y]))
    return nodes


def activation_scale(low: float, high: float) -> tuple[float, int]:
    """(scale, uint8 zero point) covering [LOW, HIGH] and 0 (asymmetric: a GELU's output is mostly >= 0)."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = (high - low) / 255 if high > low else 1.0
    return scale, int(np.clip(np.rint(-low / scale), 0, 255))


def _static(node, key: str, w: np.ndarray, bias, p: _Pass) -> list[Any]:
    from onnx import helper

    nodes = []
    x, y = node.input[0], node.output[0]
    if x not in p.static:
        scale, zero = activation_scale(*p.ranges[x])
        n = p.name("x")
        s_name, z_name = p.const("x_scale", np.array(scale, np.float32)), p.const("x_zero", np.array(zero, np.uint8))
        nodes.append(helper.make_node("QuantizeLinear", [x, s_name, z_name], [f"{n}/q"], name=f"{n}/QuantizeLinear"))
        p.static[x] = (f"{n}/q", s_name, z_name)
    q, s_name, z_name = p.static[x]
    if key not in p.weights:
        wq, ws = quantize_weight(w)
        p.weights[key] = (p.const("w", wq), p.const("w_scale", ws))
    wq_name, ws_name = p.weights[key]
    inputs = [q, wq_name, s_name, ws_name, z_name]
    if bias is not None:
        inputs += ["", p.const("bias", bias)]
    nodes.append(helper.make_node("MatMulIntegerToFloat", inputs, [y], domain="com.microsoft", name=p.name("matmul")))
    return nodes


def _nbits(node, key: str, w: np.ndarray, bias, p: _Pass) -> list[Any]:
    from onnx import helper

    from onnxpipe.export import nbits

    k, n_out = w.shape
    blocks = -(-k // nbits.BLOCK)
    if key not in p.weights:
        padded = np.zeros((blocks * nbits.BLOCK, n_out), np.float32)
        padded[:k] = w
        op = nbits.rtn8(np.ascontiguousarray(padded.T))
        p.weights[key] = (p.const("w", op.packed()), p.const("w_scale", op.scales.reshape(n_out, blocks)))
    inputs = [node.input[0], *p.weights[key]]
    if bias is not None:
        inputs += ["", "", p.const("bias", bias)]
    return [
        helper.make_node(
            "MatMulNBits",
            inputs,
            [node.output[0]],
            domain="com.microsoft",
            name=p.name("MatMulNBits"),
            K=k,
            N=n_out,
            bits=8,
            block_size=nbits.BLOCK,
            accuracy_level=nbits.ACCURACY_LEVEL,
        )
    ]


def _drop_unused(model) -> None:
    """Remove the float32 weights (and the Transposes of tied ones) that no node reads any more."""
    graphs = list(all_graphs(model.graph))
    while True:
        used = {o.name for o in model.graph.output}
        for graph in graphs:
            for node in graph.node:
                used.update(node.input)
        initializers = {i.name for i in model.graph.initializer}
        removed = 0
        for graph in graphs:
            dead = [
                n
                for n in graph.node
                if n.op_type == "Transpose" and n.input[0] in initializers and not any(o in used for o in n.output)
            ]
            for node in dead:
                graph.node.remove(node)
            removed += len(dead)
        if not removed:
            break
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
