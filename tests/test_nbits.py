"""Weight quantisation for the fused graph (export.nbits, --quantize int4|int8).

The oracle for the packing is round-to-nearest written out by hand here, block by block; the oracle for
the graph is the PyTorch model given the weights that the packed operands stand for: at accuracy level 1
(float32 compute) the fused graph must then pick the very same greedy ids as transformers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnxpipe.errors import UsageError
from onnxpipe.export import nbits


def _hand_rtn4(block: list[float]) -> tuple[list[int], float, int]:
    """4-bit levels, scale and zero point of one block: [min(w, 0), max(w, 0)] cut in 15 steps."""
    lo, hi = min(min(block), 0.0), max(max(block), 0.0)
    scale = float(np.float32((np.float32(hi) - np.float32(lo)) / np.float32(15)))
    zero = min(15, max(0, round(-lo / scale))) if scale else 0
    q = [min(15, max(0, round(w / scale) + zero)) if scale else zero for w in block]
    return q, scale, zero


def _unpack4(packed: np.ndarray, count: int) -> np.ndarray:
    """Bytes to 4-bit values, the low nibble first (MatMulNBits' layout)."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)[..., :count]


def test_rtn4_packs_the_hand_computed_levels_and_zero_points():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 96)).astype(np.float32) * 0.1
    w[1, :32] = np.abs(w[1, :32])  # a block of positive weights only: zero stays a level
    w[2, 32:64] = 0.0  # an all-zero block
    op = nbits.rtn4(w)
    q = _unpack4(op.packed(), nbits.BLOCK)
    zeros = _unpack4(op.zero_points(), 3)  # 3 blocks, two zero points a byte (the last padded)
    assert op.packed().shape == (5, 3, 16) and op.zero_points().shape == (5, 2)
    for r in range(5):
        for b in range(3):
            block = w[r, b * 32 : (b + 1) * 32].astype(np.float64).tolist()
            levels, scale, zero = _hand_rtn4(block)
            assert q[r, b].tolist() == levels, (r, b)
            assert zeros[r, b] == zero and op.scales[r, b] == np.float32(scale)
    deq = (q.astype(np.float64) - zeros[..., None]) * op.scales[..., None]
    assert np.array_equal(deq.reshape(5, 96), op.dequantized())
    # Round to nearest: no weight is further than half a step from its value.
    assert (np.abs(op.dequantized() - w).reshape(5, 3, 32) <= op.scales[..., None] / 2 + 1e-7).all()


def test_rtn8_is_symmetric_with_the_default_zero_point():
    w = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    op = nbits.rtn8(w)
    assert op.zero_points() is None and op.packed().shape == (3, 2, 32)
    blocks = w.reshape(3, 2, 32).astype(np.float64)
    scale = np.abs(blocks).max(-1) / 127
    assert np.allclose(op.scales, scale, rtol=1e-6)
    assert (op.packed().astype(int) - 128 == np.rint(blocks / op.scales[..., None].astype(np.float64))).all()


def test_8bit_operands_split_exactly_for_float32_compute():
    op = nbits.rtn8(np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32))
    hi, lo = nbits.for_level([op], 1)
    assert (hi.bits, lo.bits, hi.zero, lo.zero) == (4, 4, 8, 0) and hi.q.max() <= 15 and lo.q.max() <= 15
    assert np.array_equal(hi.dequantized() + lo.dequantized(), op.dequantized())
    assert nbits.for_level([op], 4) == [op]


def test_gguf_blocks_are_kept_exactly():
    pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    from onnxpipe.export.fused import exact_blocks

    w = np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32) * 0.05
    q41 = quants.dequantize(quants.quantize(w, T.Q4_1), T.Q4_1).reshape(w.shape)
    kind, parts = nbits.quantize(q41, "int4", exact_blocks(q41))
    assert kind == "q4_1" and np.array_equal(sum(p.dequantized() for p in parts).astype(np.float32), q41)
    # Centred for int8 compute: integer zero points, and only a remainder under half a step left as offset.
    (part,) = parts
    assert part.zero_points() is not None and np.abs(part.offsets).max() <= part.scales.max() / 2 * 1.001
    q80 = quants.dequantize(quants.quantize(w, T.Q8_0), T.Q8_0).reshape(w.shape)
    kind, (part,) = nbits.quantize(q80, "int4", exact_blocks(q80), output_layer=True)  # 8-bit output layer
    assert kind == "q8_0" and part.bits == 8 and np.array_equal(part.dequantized().astype(np.float32), q80)
    assert nbits.quantize(q41, "int8", exact_blocks(q41))[0] == "int8"
    assert nbits.quantize(w, None, None) is None  # no --quantize: float32 stays float32


def _dequantized_initializers(path) -> dict[str, np.ndarray]:
    """Each MatMulNBits / GatherBlockQuantized of the graph as (out, in) float64 weights, unpacked by hand."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = {}
    for n in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "MatMulNBits":
            bits, rows, cols = attrs["bits"], attrs["N"], attrs["K"]
            packed, scales = inits[n.input[1]], inits[n.input[2]].reshape(rows, -1).astype(np.float64)
            blocks = scales.shape[1]
            q = _unpack4(packed, 32) if bits == 4 else packed
            if len(n.input) > 3 and n.input[3]:
                zero = _unpack4(inits[n.input[3]], blocks) if bits == 4 else inits[n.input[3]]
            else:
                zero = np.full((rows, blocks), 1 << (bits - 1))
            w = ((q.astype(np.float64) - zero[..., None]) * scales[..., None]).reshape(rows, cols)
            # An 8-bit operand at level 1 is two 4-bit MatMulNBits (NAME.0, NAME.1), whose products add up.
            whole = n.name[:-2] if n.name[-2:] in (".0", ".1") else n.name
            weights[whole] = weights.get(whole, 0) + w
        elif n.op_type == "GatherBlockQuantized":
            assert attrs["bits"] == 8
            data, scales = inits[n.input[0]].astype(np.float64), inits[n.input[2]].astype(np.float64)
            weights[n.name] = ((data - 128).reshape(*scales.shape, -1) * scales[..., None]).reshape(data.shape)
    return weights


@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_level1_ids_equal_pytorch_with_the_dequantized_weights(checkpoint, tmp_path, monkeypatch, quantize):
    """At accuracy level 1 (float32 compute) the quantised graph is the float32 model with the weights the
    packed blocks stand for: greedy ids equal transformers' on that model, logits within float32 noise."""
    import torch
    from transformers import AutoModelForCausalLM

    from onnxpipe.export import fused
    from onnxpipe.runtime.sessions import make_session

    model = AutoModelForCausalLM.from_pretrained(checkpoint("llama")).eval()
    monkeypatch.setattr(nbits, "ACCURACY_LEVEL", 1)
    _, weights = fused.build(model, tmp_path, quantize=quantize)
    # 2 layers x (qkv, o, gate_up, down), then the output layer and the embedding, both 8-bit
    expected = {"int4": 8, "int8": 2} if quantize == "int4" else {"int8": 10}
    assert {k: n for k, n in weights.items() if n} == expected
    deq = _dequantized_initializers(tmp_path / "model.onnx")
    cfg = model.config
    q_size = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    kv_size = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            qkv = deq[f"l{i}.qkv.{quantize}"]
            attn, mlp = layer.self_attn, layer.mlp
            for lin, part in zip((attn.q_proj, attn.k_proj, attn.v_proj), np.split(qkv, [q_size, q_size + kv_size])):
                lin.weight.copy_(torch.from_numpy(part))
            attn.o_proj.weight.copy_(torch.from_numpy(deq[f"l{i}.o.{quantize}"]))
            gate, up = np.split(deq[f"l{i}.gate_up.{quantize}"], 2)
            mlp.gate_proj.weight.copy_(torch.from_numpy(gate))
            mlp.up_proj.weight.copy_(torch.from_numpy(up))
            mlp.down_proj.weight.copy_(torch.from_numpy(deq[f"l{i}.down.{quantize}"]))
        model.lm_head.weight.copy_(torch.from_numpy(deq["lm_head.int8"]))
        model.model.embed_tokens.weight.copy_(torch.from_numpy(deq["embed"]))

    session = make_session(tmp_path / "model.onnx", providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    prompt = [1, 17, 42, 99, 7, 250, 3]
    heads_dim = cfg.hidden_size // cfg.num_attention_heads
    past = {
        f"past_key_values.{i}.{k}": np.zeros((1, cfg.num_key_value_heads, 0, heads_dim), np.float32)
        for i in range(cfg.num_hidden_layers)
        for k in ("key", "value")
    }
    ids, ours, logits_diff = list(prompt), [], 0.0
    feed = np.array([prompt], np.int64)
    with torch.no_grad():
        theirs = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=24,
            min_new_tokens=24,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    for step in range(24):
        result = dict(
            zip(
                outputs,
                session.run(
                    None,
                    {
                        "input_ids": feed,
                        "attention_mask": np.ones((1, len(ids)), np.int64),
                        "position_ids": np.arange(len(ids) - feed.shape[1], len(ids), dtype=np.int64)[None],
                        **past,
                    },
                ),
            )
        )
        logits = result["logits"][0, -1]
        logits_diff = max(logits_diff, float(np.abs(logits - theirs.logits[step][0].numpy()).max()))
        ours.append(int(logits.argmax()))
        ids.append(ours[-1])
        feed = np.array([[ours[-1]]], np.int64)
        past = {k.replace("present.", "past_key_values."): v for k, v in result.items() if k.startswith("present.")}
    assert ours == theirs.sequences[0, len(prompt) :].tolist()
    assert logits_diff < 1e-4


def test_int4_export_is_validated_and_described(exported):
    folder = exported("llama", checkpoint_kw={"blocks": True}, quantize="int4")
    m = json.loads((folder / "onnxpipe.json").read_text())
    assert m["precision"] == "int4" and m["validation"]["passed"]
    assert m["graph"]["builder"] == "onnxpipe-fused"
    # tiny_models.gguf_blocks: every GGUF block kept (layer 0 Q4_1, layer 1 Q4_0, output and embedding Q8_0)
    assert m["graph"]["weights"] == {"float32": 0, "q4_0": 4, "q4_1": 4, "q8_0": 2}
    assert m["quantization"]["accuracy_level"] == 4 and m["quantization"]["output_layer_bits"] == 8
    assert m["validation"]["fp32"]["passed"]
    # The teacher-forced figures against the float32 graph, with the targets they are held to.
    quality = m["validation"]["quality"]
    assert quality["thresholds"] == {"min_agreement": 0.98, "max_perplexity_ratio": 1.02}
    assert quality["tokens"] > 1000 and 0 < quality["agreement"] <= 1 and quality["perplexity_ratio"] > 0


def test_int4_needs_the_fused_graph(checkpoint, tmp_path):
    from onnxpipe.export import export_model

    with pytest.raises(UsageError, match="--quantize int4 needs"):
        export_model(checkpoint("gpt2"), tmp_path / "a", quantize="int4")
    with pytest.raises(UsageError, match="--quantize int4 needs"):
        export_model(checkpoint("llama"), tmp_path / "b", quantize="int4", graph="optimum")
    assert not any(tmp_path.iterdir())


def test_int4_and_int8_exports_give_each_row_the_same_logits_in_any_batch(exported):
    """The quantised exports keep each layer's cache in one buffer (export.cuda_graph's form, float32):
    each row's keys start at position 0 whatever its batch-mates, so its logits are bit-identical alone and
    in a batch, and its ids do not depend on --batch-size. (Left padding made the int8 rounding of a
    padded row's activations differ: 5 of 8 SmolLM2 int4 answers changed between batch 1 and 8.)"""
    from onnxpipe.runtime import load_model
    from onnxpipe.runtime.decoder import SharedBufferDecoder
    from onnxpipe.tasks.causal import CausalLM

    prompts = [[1, 17, 42, 99, 7, 250, 3, 12, 80, 5, 66], [1, 9], [1, 300, 4, 4, 21]]
    for quantize in ("int4", "int8"):
        folder = exported("llama", checkpoint_kw={"blocks": True}, quantize=quantize)
        assert json.loads((folder / "onnxpipe.json").read_text())["graph"]["kv_cache"] == "shared-buffer"
        lm = CausalLM.from_model(load_model(folder, device="cpu", threads=1))
        assert isinstance(lm.decoder, SharedBufferDecoder)
        batch_logits, batch_step = lm.decoder.prefill(prompts, 0, max_new_tokens=6)
        steps = [batch_logits]
        for _ in range(5):
            steps.append(batch_step(steps[-1].argmax(-1), None))
        for row, prompt in enumerate(prompts):
            logits, step = lm.decoder.prefill([prompt], 0, max_new_tokens=6)
            alone = [logits]
            for _ in range(5):
                alone.append(step(alone[-1].argmax(-1), None))
            for k, (a, b) in enumerate(zip(alone, steps)):
                assert np.array_equal(a[0], b[row]), (quantize, row, k)
        config = lm.defaults.update(max_new_tokens=12, min_new_tokens=12, do_sample=False)
        together = [c[0].token_ids for c in lm.generate(prompts, config)]
        assert together == [lm.generate([p], config)[0][0].token_ids for p in prompts]
