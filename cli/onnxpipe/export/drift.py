"""Name the op where an fp32 graph drifts, when its greedy ids differ from PyTorch's.

Only on validation's failure path (it is slow): the step whose id differed is replayed twice on the
same graph and feeds, once by ONNX Runtime in float32 with every node output made a graph output,
once by onnx's reference evaluator on a float64 copy of the graph. Walking the nodes in graph
order, the first float output whose error relative to its own float64 scale exceeds the tolerance is
where float32 loses the result; if none does, the node whose relative error grew most over its
inputs'. The float64 graph's own result is compared with PyTorch's choice as well: when it also
picks another id, the graph computes something else, and no op "drifts".
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np

# Entries beyond this are attention-mask sentinels (float32 min and its sums, which overflow to
# -inf in float32 but not in float64): not results, so not compared.
_SENTINEL = 1e30


def locate_drift(folder: Path, files: dict[str, str], case: dict[str, Any], rtol: float) -> dict[str, Any] | None:
    """The drift report for CASE (validate._mismatch), or None where the graphs cannot be replayed."""
    try:
        reports = [
            _locate(
                folder / files[graph], case["feeds"][graph], rtol, case["expected"] if graph == case["graph"] else None
            )
            for graph in _graphs_for(case)
        ]
    except Exception as exc:  # a graph the reference evaluator cannot run: say so, keep the failure
        return {
            "summary": f"the drifting op could not be located ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        }
    # The encoder runs first: an op above the tolerance there is where it starts.
    return next((r for r in reports if r.get("above_tolerance")), reports[-1])


def _graphs_for(case: dict[str, Any]) -> list[str]:
    return ["encoder", case["graph"]] if "encoder" in case["feeds"] else [case["graph"]]


def _locate(path: Path, feeds: dict[str, np.ndarray], rtol: float, expected: int | None) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(path))
    inputs = {i.name for i in model.graph.input}
    feeds = {k: v for k, v in feeds.items() if k in inputs}
    _inline_ifs(model, feeds)
    names, ops = [], {}
    for node in model.graph.node:
        for out in node.output:
            if out:
                names.append(out)
                ops[out] = node
    got = _run_fp32(model, names, feeds)
    ref = _run_fp64(model, feeds, got)
    errors: dict[str, float] = {}
    first = None
    best: tuple[float, tuple[Any, str, float, float] | None] = (0.0, None)
    for node in model.graph.node:
        for out in node.output:
            if out not in got or out not in ref or not np.issubdtype(np.asarray(got[out]).dtype, np.floating):
                continue
            err = _relative_error(np.asarray(ref[out]), np.asarray(got[out]))
            errors[out] = err
            before = max((errors.get(i, 0.0) for i in node.input), default=0.0)
            growth = err - before
            if first is None and err > rtol:
                first = (node, out, err, before)
            if growth > best[0]:
                best = (growth, (node, out, err, before))
    outputs = [o.name for o in model.graph.output]
    final = {o: _relative_error(np.asarray(ref[o]), np.asarray(got[o])) for o in outputs if o in ref and o in got}
    chosen = first or best[1]
    report: dict[str, Any] = {
        "graph": path.name,
        "outputs_relative_error_vs_float64": {k: float(f"{v:.3g}") for k, v in final.items()},
    }
    if expected is not None and "logits" in ref:
        picked = int(np.asarray(ref["logits"])[0, -1].argmax())
        report["float64_id"] = picked
        if picked != expected:  # the graph itself computes another result: not float32 noise
            report["summary"] = (
                f"the float64 evaluation of {path.name} picks {picked} too: "
                "the graph computes something else than PyTorch, no op merely drifts"
            )
            return report
    if chosen is None:
        report["summary"] = f"float32 and float64 runs of {path.name} agree: no op drifts"
        return report
    node, out, err, before = chosen
    report.update(
        node=node.name or out,
        op_type=node.op_type,
        output=out,
        relative_error=float(f"{err:.3g}"),
        inputs_relative_error=float(f"{before:.3g}"),
        above_tolerance=first is not None,
    )
    how = "first op above" if first is not None else "no op above; largest growth, from"
    report["summary"] = (
        f"float32 drifts at {node.op_type} {node.name or out!r} in {path.name} "
        f"(relative error vs float64 {err:.2g}, its inputs {before:.2g}; {how} {rtol:g})"
    )
    return report


def _relative_error(ref: np.ndarray, got: np.ndarray) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape or not ref.size:
        return 0.0
    keep = np.isfinite(ref) & (np.abs(ref) < _SENTINEL)
    if not keep.any():
        return 0.0
    ref, got = ref[keep], got[keep]
    scale = float(np.max(np.abs(ref)))
    diff = np.abs(ref - got)
    diff[~np.isfinite(diff)] = np.inf
    return float(np.max(diff) / scale) if scale > 0 else float(np.max(diff))


def _inline_ifs(model, feeds: dict[str, np.ndarray]) -> None:
    """Replace each top-level If whose condition is a fed input (optimum's merged decoder:
    use_cache_branch) by the nodes of the branch the feeds take, so every node output is reachable."""
    from onnx import helper

    graph = model.graph
    nodes = []
    for node in graph.node:
        if node.op_type != "If" or node.input[0] not in feeds:
            nodes.append(node)
            continue
        branch_name = "then_branch" if bool(np.asarray(feeds[node.input[0]]).reshape(-1)[0]) else "else_branch"
        branch = next(a.g for a in node.attribute if a.name == branch_name)
        graph.initializer.extend(branch.initializer)
        nodes.extend(branch.node)
        for inner, outer in zip(branch.output, node.output):
            if inner.name != outer:
                nodes.append(helper.make_node("Identity", [inner.name], [outer], name=f"{node.name}/{outer}"))
    del graph.node[:]
    graph.node.extend(nodes)


def _run_fp32(model, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnx
    import onnxruntime as ort

    from onnxpipe.runtime.sessions import make_session

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.value_info[:]
    present = {o.name for o in copy.graph.output}
    copy.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # node outputs as the graph has them
    sess = make_session(copy.SerializeToString(), options=options)
    wanted = [o.name for o in sess.get_outputs()]
    return dict(zip(wanted, sess.run(wanted, feeds)))


def _run_fp64(model, feeds: dict[str, np.ndarray], fp32: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    double = _to_float64(model, fp32)
    feeds64 = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in feeds.items()}
    with warnings.catch_warnings(), np.errstate(all="ignore"):  # log(0) in masks etc.: library code stays quiet
        warnings.simplefilter("ignore")
        # intermediate=True: a dict of every result by name (onnx types run() as dict | list)
        return cast(dict[str, np.ndarray], ReferenceEvaluator(double).run(None, feeds64, intermediate=True))


def _to_float64(model, fp32: dict[str, np.ndarray]):
    """A copy of MODEL computing in float64: float tensors, Casts to float and float inputs/outputs.

    Nodes whose outputs are all integers or booleans keep the float32 run's values (as constants):
    a float computation cast to an index (T5's log-spaced position buckets) must take the branch that
    float32, and PyTorch, took; only the float arithmetic is compared.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    del graph.value_info[:]
    nodes = []
    for node in graph.node:
        outs = [o for o in node.output if o]
        if outs and all(o in fp32 and not np.issubdtype(np.asarray(fp32[o]).dtype, np.floating) for o in outs):
            for o in outs:
                nodes.append(
                    helper.make_node("Constant", [], [o], value=numpy_helper.from_array(np.asarray(fp32[o]), o))
                )
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)

    def widen(tensor):
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))

    for init in graph.initializer:
        widen(init)
    for value in list(graph.input) + list(graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    for node in graph.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.DOUBLE
            elif attr.type == onnx.AttributeProto.TENSOR:
                widen(attr.t)
    return copy
