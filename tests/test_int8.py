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
    assert counts == {"converted": 4, "kept": 0, "per_row": 0}  # the tied MatMul once per branch
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
    assert quantize_graph(model) == {"converted": 0, "kept": 1, "per_row": 0}


def test_static_pass_matches_calibrated_quantisation():
    """Method "static": constant (calibrated) activation scales, the MatMul's bias Add taken into
    MatMulIntegerToFloat, values past the calibrated range saturated, and an activation that calibration
    never saw falls back to per-row."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from onnxpipe.export.int8 import activation_scale, quantize_graph, quantize_weight

    rng = np.random.default_rng(1)
    k, n = 32, 24
    w1, w3 = (rng.standard_normal((k, n)).astype(np.float32) for _ in range(2))
    w2 = rng.standard_normal((n, n)).astype(np.float32)  # Gemm transB: (outputs, inputs)
    b1, b2 = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["m1"]),
            helper.make_node("Add", ["b1", "m1"], ["a"]),  # bias first: Add is commutative
            helper.make_node("Gemm", ["a", "w2", "b2"], ["h"], transB=1),
            helper.make_node("MatMul", ["x", "w3"], ["r"]),  # x is calibrated: static too
            helper.make_node("MatMul", ["h", "w3t"], ["z"]),  # h is not: per-row
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["rows", width])
            for name, width in (("a", n), ("h", n), ("r", n), ("z", k))
        ],
        [
            numpy_helper.from_array(v, name)
            for name, v in (
                ("w1", w1),
                ("w2", w2),
                ("w3", w3),
                ("w3t", np.ascontiguousarray(w3.T)),
                ("b1", b1),
                ("b2", b2),
            )
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    ranges = {"x": (-1.5, 2.5), "a": (-20.0, 30.0)}
    counts = quantize_graph(model, "static", ranges=ranges)
    assert counts == {"converted": 4, "kept": 0, "per_row": 1}
    op_types = [node.op_type for node in model.graph.node]
    assert "Add" not in op_types and op_types.count("QuantizeLinear") == 3  # x once for two products
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.uniform(-1.5, 2.5, (6, k)).astype(np.float32)
    x[2, :4] = [9.0, -9.0, 2.5, -1.5]  # past the calibrated range: saturates

    def static(x, w, bias, low, high):
        scale, zero = activation_scale(low, high)
        q = np.clip(np.rint(x / np.float32(scale)) + zero, 0, 255).astype(np.int64) - zero
        wq, ws = quantize_weight(w)
        return (q @ wq.astype(np.int64)).astype(np.float32) * (np.float32(scale) * ws) + bias

    a, h, r, z = sess.run(None, {"x": x})
    want_a = static(x, w1, b1, *ranges["x"])
    np.testing.assert_allclose(a, want_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r, static(x, w3, 0, *ranges["x"]), rtol=1e-5, atol=1e-5)
    want_h = static(want_a, np.ascontiguousarray(w2.T), b2, *ranges["a"])
    np.testing.assert_allclose(h, want_h, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(z, _per_row(want_h, np.ascontiguousarray(w3.T)), rtol=1e-4, atol=1e-4)
    assert activation_scale(0.0, 0.0) == (1.0, 0) and activation_scale(1.0, 2.0) == (2 / 255, 0)  # 0 is covered


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


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calibration") / "lines.txt"
    path.write_text("\n".join(t.upper() + " " + t for t in TEXTS) + "\n\n", encoding="utf-8")
    return path


def test_calibrated_int8_encoder(exported, calibration_file):
    """--calibration: constant scales from the text's ranges (no per-row work at run time), the same
    bits for a text alone and in a padded batch, and the manifest says what it was calibrated on."""
    from tokenizers import Tokenizer

    from onnxpipe.export.validate import session

    folder = exported("bert", quantize="int8", calibration=str(calibration_file))
    m = manifest(folder)
    q = m["quantization"]
    assert "calibrated" in q["method"] and q["calibration"] == {"texts": len(TEXTS), "file": "lines.txt"}
    assert q["per_row_fallbacks"] == 0 and q["batch_independent"] is True and q["matmuls"] > 0
    assert m["validation"]["quality"]["passed"] and m["validation"]["quality"]["batch_independent"] is True
    graph_ops = ops(folder / "model.onnx")
    assert {"QuantizeLinear", "MatMulIntegerToFloat"} <= graph_ops and not {"ReduceMax", "Abs"} & graph_ops
    sess = session(folder / "model.onnx")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    together = _run(sess, tokenizer, TEXTS)
    for row, text in enumerate(TEXTS):
        assert np.array_equal(_run(sess, tokenizer, [text])[0], together[row]), text
    fp32 = _run(session(exported("bert") / "model.onnx"), tokenizer, TEXTS)
    assert np.mean(fp32.argmax(-1) == together.argmax(-1)) >= 0.75
    assert np.abs(fp32 - together).max() < 0.5 * np.abs(fp32).max()  # int8 of the same model, not noise


def test_calibration_refusals(checkpoint, tmp_path, calibration_file):
    from click.testing import CliRunner

    from onnxpipe.errors import UsageError
    from onnxpipe.export import export_model
    from onnxpipe.main import cli

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    cases = [
        (dict(calibration=calibration_file), "--calibration sets the scales of --quantize int8"),
        (dict(quantize="int8", calibration=empty), "--calibration .*empty.txt has no non-empty lines"),
        (dict(quantize="int8", calibration=tmp_path), "--calibration .*: not a regular file"),
    ]
    for kw, message in cases:
        with pytest.raises(UsageError, match=message):
            export_model(checkpoint("bert"), tmp_path / "out", **kw)
    with pytest.raises(UsageError, match="--calibration is for encoders .*not text2text-generation"):
        export_model(checkpoint("marian"), tmp_path / "out", quantize="int8", calibration=calibration_file)
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(
        cli, ["export", str(checkpoint("bert")), "-o", str(tmp_path / "o"), "--calibration", str(calibration_file)]
    )
    assert result.exit_code == 2 and "--calibration sets the scales of --quantize int8" in result.output


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
