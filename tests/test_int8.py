"""--quantize int8 on encoders and encoder-decoders: per-row int8 (export.int8) that does not depend on batching.

Oracles: numpy's per-row quantisation of the same matrices (the pass), the float32 export (labels, teacher-forced
next tokens), and the int8 export itself run alone against inside a padded batch (bit for bit)."""

from __future__ import annotations

import json

import numpy as np
import pytest

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Short.",
    "I loved every minute of it, and I would watch it again tomorrow with my friends!",
    "Paris is the capital of France.",
    "Numbers like 42 and 3.14 appear in text too.",
    "A",
    "She said hello and left the room before anyone could answer her question about the film.",
    "Dull.",
]


def manifest(folder) -> dict:
    return json.loads((folder / "onnxpipe.json").read_text())


def ops(path) -> set[str]:
    import onnx

    from onnxpipe.export.int8 import all_graphs

    return {n.op_type for g in all_graphs(onnx.load(str(path)).graph) for n in g.node}


# --- the pass, against numpy ------------------------------------------------------------


def _per_row(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """What the pass computes, written out: per-row uint8 activations, per-column int8 weights."""
    from onnxpipe.export.int8 import quantize_weight

    wq, ws = quantize_weight(w)
    s = np.maximum(np.abs(x).max(-1, keepdims=True) * np.float32(1 / 127), np.float32(1e-30))
    q = np.clip(np.rint(x / s), -128, 127).astype(np.int64)
    return ((q @ wq.astype(np.int64)).astype(np.float32) * ws) * s


def test_pass_matches_per_row_quantisation_in_branches_and_tied_weights():
    """MatMul, Gemm (transB, bias) and a Transpose-tied weight inside an If branch: numpy's per-row int8."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from onnxpipe.export.int8 import quantize_graph

    rng = np.random.default_rng(0)
    k, n = 48, 40
    w1 = rng.standard_normal((k, n)).astype(np.float32)
    w2 = rng.standard_normal((k, n)).astype(np.float32)  # Gemm transB: (outputs, inputs)
    bias = rng.standard_normal(k).astype(np.float32)
    table = rng.standard_normal((24, k)).astype(np.float32)  # tied: logits = h @ table.T
    branch = helper.make_graph(
        [
            helper.make_node("Transpose", ["table"], ["table_t"]),
            helper.make_node("MatMul", ["h", "table_t"], ["out"]),
        ],
        "branch",
        [],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
    )
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["a"]),
            helper.make_node("Gemm", ["a", "w2", "bias"], ["h"], transB=1),
            helper.make_node("If", ["cond"], ["logits"], then_branch=branch, else_branch=branch),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, [1]),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", 24]),
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["rows", n]),
        ],
        [numpy_helper.from_array(v, name) for name, v in (("w1", w1), ("w2", w2), ("bias", bias), ("table", table))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    counts = quantize_graph(model)
    assert counts == {"converted": 4, "kept": 0}  # the tied MatMul once per branch
    assert {i.name for i in model.graph.initializer}.isdisjoint({"w1", "w2", "table"})  # float32 copies gone
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = (rng.standard_normal((5, k)) * rng.uniform(0.1, 4, (5, 1))).astype(np.float32)
    x[3] = 0  # an all-zero row: a tiny scale, no division by zero
    logits, a = sess.run(None, {"x": x, "cond": np.array([True])})
    want_a = _per_row(x, w1)
    np.testing.assert_allclose(a, want_a, rtol=1e-6, atol=1e-6)
    h = _per_row(want_a, np.ascontiguousarray(w2.T)) + bias
    np.testing.assert_allclose(logits, _per_row(h, np.ascontiguousarray(table.T)), rtol=1e-5, atol=1e-5)
    for row in range(5):  # each row alone gives the same bits
        alone = sess.run(None, {"x": x[row : row + 1], "cond": np.array([True])})
        assert np.array_equal(alone[0][0], logits[row]) and np.array_equal(alone[1][0], a[row])


def test_small_heads_stay_float32():
    from onnx import TensorProto, helper, numpy_helper

    from onnxpipe.export.int8 import MIN_OUTPUTS, quantize_graph

    w = np.ones((32, MIN_OUTPUTS - 1), np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, MIN_OUTPUTS - 1])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert quantize_graph(model) == {"converted": 0, "kept": 1}


# --- encoders ---------------------------------------------------------------------------


def _run(sess, tokenizer, texts):
    from onnxpipe.export.validate import _encode, _pad

    names = [i.name for i in sess.get_inputs()]
    batch = _pad(_encode(tokenizer, texts), 0)
    return sess.run(None, {k: v for k, v in batch.items() if k in names})[0]


def test_int8_encoder_rows_do_not_depend_on_their_batch(exported):
    """The regression test of batch independence: a row's logits, alone and inside a batch of 8 of other
    lengths, are the same bits (dynamic quantisation's one scale per batch tensor changed them)."""
    from tokenizers import Tokenizer

    from onnxpipe.export.validate import session

    folder = exported("bert", quantize="int8")
    assert "MatMulIntegerToFloat" in ops(folder / "model.onnx")
    assert not {"DynamicQuantizeMatMul", "DynamicQuantizeLinear"} & ops(folder / "model.onnx")
    sess = session(folder / "model.onnx")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    together = _run(sess, tokenizer, TEXTS)
    assert len({len(tokenizer.encode(t).ids) for t in TEXTS}) > 4  # really different lengths
    for row, text in enumerate(TEXTS):
        assert np.array_equal(_run(sess, tokenizer, [text])[0], together[row]), text


def test_int8_encoder_manifest_and_labels_against_fp32(exported):
    import onnxpipe

    folder = exported("bert", quantize="int8")
    m = manifest(folder)
    q, quality = m["quantization"], m["validation"]["quality"]
    assert m["precision"] == "int8" and q["batch_independent"] is True and "per-row" in q["method"]
    assert q["matmuls"] > 0 and q["kept_fp32_matmuls"] >= 1  # the 3-label head stays float32
    assert quality["passed"] and quality["batch_independent"] is True
    assert quality["thresholds"] == {"min_agreement": 0.95} and quality["agreement"] >= 0.95
    fp32 = onnxpipe.load(str(exported("bert")), device="cpu", threads=1)
    want = [r.label for r in fp32(TEXTS * 4)]
    for batch_size in (1, 8):
        int8 = onnxpipe.load(str(folder), device="cpu", threads=1, batch_size=batch_size)
        got = [r.label for r in int8(TEXTS * 4)]
        assert np.mean([a == b for a, b in zip(got, want)]) >= 0.98
        if batch_size == 1:
            alone = got
    assert got == alone  # batch 8 and batch 1: the same labels


def test_int8_below_its_threshold_fails_in_one_line(checkpoint, tmp_path, monkeypatch):
    from onnxpipe.errors import ValidationError
    from onnxpipe.export import agreement, export_model

    monkeypatch.setitem(agreement.THRESHOLDS["encoder"], "min_agreement", 1.01)
    with pytest.raises(ValidationError) as err:
        export_model(checkpoint("bert"), tmp_path / "out", quantize="int8")
    message = str(err.value)
    assert "\n" not in message and "agreement with float32" in message and "1.01" in message
    assert not (tmp_path / "out").exists()


# --- seq2seq ----------------------------------------------------------------------------


def _ids(folder, texts, batch_size):
    from onnxpipe.runtime.model import load_model
    from onnxpipe.runtime.seq2seq import Seq2SeqRunner
    from onnxpipe.tasks.seq2seq import base_generation_config

    model = load_model(folder, device="cpu", threads=1)
    runner = Seq2SeqRunner.from_model(model)
    config = base_generation_config(model.folder, model.config, model.special_tokens).update(max_new_tokens=12)
    sources = [model.graph_ids(model.tokenizer.encode(t).ids) for t in texts]
    out = []
    for start in range(0, len(sources), batch_size):
        hyps = runner.generate(sources[start : start + batch_size], config, int(config.pad_token_id or 0), 12)
        out += [h[0].token_ids for h in hyps]
    return out


def test_int8_seq2seq_agreement_and_batch_independent_ids(exported):
    folder = exported("marian", quantize="int8", graph="optimum")
    m = manifest(folder)
    quality = m["validation"]["quality"]
    assert quality["passed"] and quality["agreement"] >= quality["thresholds"]["min_agreement"] == 0.98
    assert quality["compared"] >= 100 and "teacher-forced" in quality["measure"]
    assert m["quantization"]["batch_independent"] is True
    for graph in m["files"].values():  # every product with a constant weight is int8, the output projection too
        assert "MatMulIntegerToFloat" in ops(folder / graph)
    assert m["quantization"]["kept_fp32_matmuls"] == 0
    beams = _ids(folder, TEXTS[:4], 4)  # Marian's generation config: beam search, 4 beams
    assert beams == _ids(folder, TEXTS[:4], 1)


def test_int8_on_onnxpipes_own_seq2seq_graph(exported):
    """The pass is graph-agnostic: --graph auto gives Marian onnxpipe's encoder-decoder graph, and int8 keeps it."""
    folder = exported("marian", quantize="int8")
    m = manifest(folder)
    assert m["graph"]["builder"] == "onnxpipe-fused-seq2seq" and m["precision"] == "int8"
    assert m["validation"]["quality"]["passed"] and m["quantization"]["kept_fp32_matmuls"] == 0
    for graph in m["files"].values():
        assert "MatMulIntegerToFloat" in ops(folder / graph)
    assert _ids(folder, TEXTS[:4], 4) == _ids(folder, TEXTS[:4], 1)
