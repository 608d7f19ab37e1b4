"""onnxpipe's fused Llama graph (export.fused): exact recovery of GGUF blocks, the graph's shape, --graph.

The ids of greedy, beam and sampled generation on the fused exports are compared with transformers in
test_decoding.py (the "llama" and "llama-blocks" cases), and on the real SmolLM2 in test_generate.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnxpipe.errors import UsageError
from onnxpipe.export.fused import BLOCK, exact_blocks

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import quants  # noqa: E402


def _dequantized(kind, shape=(48, 96), seed=0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.05
    return quants.dequantize(quants.quantize(w, kind), kind).reshape(shape)


def _rebuild(parts) -> np.ndarray:
    """The weights the MatMulNBits operands stand for, in float64: sum of scale * (q - zero) (+ offset)."""
    total = 0
    for p in parts:
        v = (p.q.astype(np.float64) - p.zero) * p.scales[..., None]
        if p.offsets is not None:
            v = v + p.offsets[..., None]
        total = total + v
    return total.reshape(total.shape[0], -1)


@pytest.mark.parametrize("kind", [T.Q4_0, T.Q4_1, T.Q8_0])
def test_gguf_blocks_are_recovered_exactly(kind):
    w = _dequantized(kind)
    found = exact_blocks(w)
    assert found is not None and found[0] == kind.name.lower()
    kind_name, parts = found
    assert len(parts) == (2 if kind == T.Q8_0 else 1)
    for p in parts:
        assert p.q.dtype == np.uint8 and p.q.max() <= 15
        assert p.packed().shape == (w.shape[0], w.shape[1] // BLOCK, BLOCK // 2)
        # The packing MatMulNBits reads: the first of each pair in the low nibble.
        assert (p.packed()[..., 0] & 0x0F).tolist() == p.q[..., 0].tolist()
        assert (p.packed()[..., 0] >> 4).tolist() == p.q[..., 1].tolist()
    assert np.array_equal(_rebuild(parts).astype(np.float32), w)


def test_anything_else_stays_float32():
    rng = np.random.default_rng(1)
    assert exact_blocks(rng.standard_normal((16, 64)).astype(np.float32)) is None
    assert exact_blocks(_dequantized(T.Q4_1, (16, 64))[:, :40]) is None  # not whole blocks
    for kind in (T.Q4_0, T.Q4_1, T.Q8_0):
        w = _dequantized(kind, (16, 64))
        w[7, 33] = np.nextafter(w[7, 33], np.float32(1))  # one weight one float32 step off
        assert exact_blocks(w) is None, kind
    w = _dequantized(T.Q4_1, (16, 64))
    w[0, 0] = np.nan
    assert exact_blocks(w) is None


def test_constant_and_zero_blocks():
    w = np.zeros((4, 64), np.float32)
    assert exact_blocks(w)[0] == "q4_0"
    w = _dequantized(T.Q4_1, (4, 64))
    w[1, :BLOCK] = np.float16(0.0123)  # a block of one value, as Q4_1 stores it: d = 0, m = the value
    kind, parts = exact_blocks(w)
    assert kind == "q4_1" and parts[0].scales[1, 0] == 0
    assert np.array_equal(_rebuild(parts).astype(np.float32), w)


# --- the exported graph ----------------------------------------------------------------------


def _prefill_feeds(model, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The fused graph's inputs for prompts IDS (no padding) with an empty cache."""
    cfg = model.config
    rows, width = ids.shape
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.tile(np.arange(width), (rows, 1)),
    }
    empty = np.zeros((rows, cfg.num_key_value_heads, 0, cfg.hidden_size // cfg.num_attention_heads), np.float32)
    for i in range(cfg.num_hidden_layers):
        feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = empty
    return feeds


def _ops(folder) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def test_fused_export_of_gguf_blocks(exported):
    folder = exported("llama", checkpoint_kw={"blocks": True})
    manifest = json.loads((folder / "onnxpipe.json").read_text())
    graph = manifest["graph"]
    assert graph["builder"] == "onnxpipe-fused"
    # tiny_models.gguf_blocks: 2 layers x (qkv, o, gate_up, down); layer 0 Q4_1, layer 1 Q4_0; lm_head and
    # the embedding Q8_0.
    assert graph["weights"] == {"float32": 0, "q4_0": 4, "q4_1": 4, "q8_0": 2}
    ops = _ops(folder)
    assert ops["GatherBlockQuantized"] == 1 and "Gather" not in ops
    assert ops["GroupQueryAttention"] == 2 and ops["RotaryEmbedding"] == 4
    assert ops["MatMulNBits"] == 4 + 4 + 2 and ops["MatMul"] == 4  # the Q4_1 offsets' block sums
    validation = manifest["validation"]
    assert validation["passed"] and validation["greedy"]["identical"] == validation["greedy"]["sequences"]
    assert validation["outputs"]["logits"]["max_abs_diff"] < 1e-4


def test_fused_export_of_float32_weights_is_smaller_than_optimums(exported):
    fused, optimum = exported("llama"), exported("llama", graph="optimum")
    assert json.loads((fused / "onnxpipe.json").read_text())["graph"]["weights"] == {
        "float32": 10,
        "q4_0": 0,
        "q4_1": 0,
        "q8_0": 0,
    }  # 2 x 4 projections, lm_head, embedding
    assert json.loads((optimum / "onnxpipe.json").read_text())["graph"]["builder"] == "optimum"
    # About a tenth of the nodes of optimum's trace; the same inputs and outputs.
    assert sum(_ops(fused).values()) * 5 < sum(_ops(optimum).values())
    same = ("inputs", "outputs", "num_layers", "num_kv_heads", "head_dim")
    f, o = (json.loads((x / "onnxpipe.json").read_text())["graph"] for x in (fused, optimum))
    assert {k: f[k] for k in same} == {k: o[k] for k in same}


def test_graph_flag_refuses_what_the_fused_graph_cannot_do(checkpoint, tmp_path):
    from onnxpipe.export import export_model

    with pytest.raises(UsageError, match="text-generation only"):
        export_model(checkpoint("bert"), tmp_path / "a", graph="fused")
    with pytest.raises(UsageError, match="model type gpt2"):
        export_model(checkpoint("gpt2"), tmp_path / "b", graph="fused")
    with pytest.raises(UsageError, match="--optimize"):
        export_model(checkpoint("llama"), tmp_path / "c", graph="fused", optimize="O2")
    with pytest.raises(UsageError, match="unknown graph"):
        export_model(checkpoint("llama"), tmp_path / "d", graph="mine")
    assert not any(tmp_path.iterdir())  # nothing left behind


def test_cli_graph_flag(checkpoint, tmp_path):
    from click.testing import CliRunner

    from onnxpipe.main import cli

    result = CliRunner().invoke(cli, ["export", str(checkpoint("gpt2")), "-o", str(tmp_path / "x"), "--graph", "fused"])
    assert result.exit_code == 2
    assert "--graph fused is not available here: model type gpt2" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("graph, warned", [("auto", True), ("optimum", False)])
def test_generate_warns_when_a_fused_export_meets_cuda(exported, monkeypatch, capsys, graph, warned):
    """ONNX Runtime's CUDA GroupQueryAttention is fp16-only: on CUDA the fused fp32 graph would run its
    attention on the CPU, so generate says so (faked here: no GPU runs the tests). The task notes it;
    the command prints it (library code never prints)."""
    from click.testing import CliRunner

    from onnxpipe.main import cli
    from onnxpipe.runtime.device import Device
    from onnxpipe.runtime.model import ExportedModel
    from onnxpipe.tasks.causal import GenerateTask

    folder = exported("llama", **({"graph": graph} if graph != "auto" else {}))
    model = ExportedModel(folder, device="cpu")
    session = model.session()
    model.provider = "CUDAExecutionProvider"
    monkeypatch.setattr(model, "session", lambda name="model": session)
    task = GenerateTask(model)
    assert capsys.readouterr().err == ""
    assert any("Re-export with --graph optimum" in note for note in task.notes) == warned

    monkeypatch.setattr(ExportedModel, "runs_on", property(lambda self: Device("cuda", 0)))
    result = CliRunner().invoke(cli, ["generate", "-m", str(folder), "--device", "cpu"], input="")
    assert result.exit_code == 0 and result.stdout == ""
    assert ("Re-export with --graph optimum" in result.stderr) == warned
    import onnxpipe  # the Python API says it too, without printing

    assert any("Re-export with --graph optimum" in n for n in onnxpipe.load(folder, device="cpu").notes) == warned
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("rope", ["llama3", "linear"])
def test_rope_scaling_ids_equal_transformers(exported, checkpoint, rope):
    """The rotary tables are transformers' own (rope scaling included): greedy ids over prompts of
    different lengths in one left-padded batch equal transformers' generate."""
    import torch
    import transformers

    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.causal import CausalLM

    folder = checkpoint("llama", rope=rope)
    lm = CausalLM.from_model(load_model(exported("llama", checkpoint_kw={"rope": rope}), device="cpu", threads=1))
    assert lm.manifest["graph"]["builder"] == "onnxpipe-fused"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.eos_token
    prompts = ["The cat sat on the mat and looked at the long row of houses", "Hello", "A river runs"]
    config = lm.defaults.update(max_new_tokens=40, min_new_tokens=40, do_sample=False, num_beams=1)
    ours = [c[0].token_ids for c in lm.generate([tokenizer(p).input_ids for p in prompts], config)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    assert ours == out[:, enc.input_ids.shape[1] :].tolist()


def test_dynamic_rope_keeps_optimums_graph(exported):
    """Dynamic NTK rope changes its frequencies with the sequence length, which fixed tables cannot
    follow: auto keeps optimum's graph for it."""
    folder = exported("llama", checkpoint_kw={"rope": "dynamic"})
    assert json.loads((folder / "onnxpipe.json").read_text())["graph"]["builder"] == "optimum"


@pytest.mark.parametrize("kind", [T.Q8_0, T.Q4_0, T.Q4_1])
def test_the_embedding_lookup_returns_the_tables_rows_exactly(checkpoint, tmp_path, kind):
    """Q8_0 and Q4_0 tables become GatherBlockQuantized, whose rows are bit for bit the float32 table's;
    Q4_1 (offsets) stays a float32 Gather."""
    import onnx
    import torch
    import transformers
    from onnx import helper

    from onnxpipe.export import fused
    from onnxpipe.runtime.sessions import make_session

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint("llama")).eval()
    table = model.model.embed_tokens.weight
    table.data = torch.from_numpy(_dequantized(kind, tuple(table.shape)))
    _, weights = fused.build(model, tmp_path)
    proto = onnx.load(str(tmp_path / "model.onnx"))
    (embed,) = [n for n in proto.graph.node if n.name == "embed"]
    assert embed.op_type == ("Gather" if kind == T.Q4_1 else "GatherBlockQuantized")
    assert weights["float32"] == 10 - (kind != T.Q4_1)
    proto.graph.output.append(helper.make_tensor_value_info(embed.output[0], onnx.TensorProto.FLOAT, None))
    session = make_session(proto.SerializeToString())
    ids = np.array([[0, 1, 2, 17, table.shape[0] - 1]])
    (rows,) = session.run([embed.output[0]], _prefill_feeds(model, ids))
    assert np.array_equal(rows[0], table.detach().numpy()[ids[0]])


def test_a_tied_float32_output_layer_reads_the_embedding_table(checkpoint, tmp_path):
    """Tied float32 embeddings are stored once: the output layer is a Gemm on the Gather's table."""
    import onnx
    import torch
    import transformers

    from onnxpipe.export import fused
    from onnxpipe.runtime.sessions import make_session

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint("llama"), tie_word_embeddings=True).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _, weights = fused.build(model, tmp_path)
    proto = onnx.load(str(tmp_path / "model.onnx"))
    table = model.model.embed_tokens.weight.detach().numpy()
    assert sum(int(np.prod(t.dims)) == table.size for t in proto.graph.initializer) == 1  # no second copy
    assert [n.op_type for n in proto.graph.node if n.name == "lm_head"] == ["Gemm"]
    session = make_session(tmp_path / "model.onnx")
    ids = np.array([[5, 9, 33, 7], [1, 2, 3, 4]])
    (logits,) = session.run(["logits"], _prefill_feeds(model, ids))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids)).logits[:, -1:].numpy()
    assert logits.shape == ref.shape and np.abs(logits - ref).max() < 1e-4
