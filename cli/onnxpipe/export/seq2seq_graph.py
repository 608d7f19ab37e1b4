"""onnxpipe's own encoder-decoder graphs: the BART-like families (Marian, BART, mBART, M2M100/NLLB, Pegasus) and T5.

optimum's merged decoder grows its self-attention cache by Concat every step, recomputes nothing but
copies everything, and carries the cross-attention keys/values of every beam. These two graphs are
written node by node from the PyTorch modules instead:

    encoder_model.onnx   input_ids, attention_mask (batch, source)
                         -> last_hidden_state, and cross_key.N / cross_value.N (batch, heads, source, head_dim):
                            every decoder layer's cross-attention keys and values, computed once per input
    decoder_model.onnx   one step: input_ids (rows, 1), seqlens_k (rows,) int32 and total_sequence_length
                         (int32 scalar) as GroupQueryAttention takes them, past_key.N / past_value.N
                         (rows, heads, max_length, head_dim): one preallocated buffer per layer, bound as
                         both past and present (present_key.N / present_value.N), so a step writes its own
                         position in place; cross_key.N / cross_value.N and encoder_attention_mask of the
                         *inputs* (inputs, ...): the rows are inputs x group (beams), and the cross-attention
                         (MultiHeadAttention, the group as its query length) reads each input's keys once
                         for all its beams. Outputs: logits (rows, vocab), final_logits_bias included, and
                         log_probs (LogSoftmax of them, for beam search; ONNX Runtime computes only the
                         outputs a run asks for).

Every decoder row is at the same position (all start from decoder_start_token_id together), so the
decoder positions come from total_sequence_length. The projections are MatMul (+ Add), the output layer a
Gemm on its own (vocab, d) copy (transB; ONNX Runtime prepacks it), and a tied token table is written once,
to embed_tokens.bin, which the runtime loads once for both sessions.

What each family is, as transformers builds it (read from the modules, not assumed):
    marian    post-LN, sinusoidal positions, embeddings x sqrt(d) (scale_embedding), swish
    bart      post-LN, learned positions (offset 2), layernorm_embedding, gelu
    mbart     pre-LN + a final layer_norm, learned positions (offset 2), layernorm_embedding
    m2m_100   pre-LN + final layer_norm, sinusoidal positions counted from padding_idx + 1 (pads get
              padding_idx), embeddings x sqrt(d)
    pegasus   pre-LN + final layer_norm, sinusoidal positions, embeddings x sqrt(d)
    t5, mt5   pre-RMSNorm + final norm, no biases, no position embeddings: a relative position bias of the
              first layer's buckets, added to every layer's self-attention scores (the encoder's from
              k - q in both directions, the decoder's from how far back each key is, passed to
              GroupQueryAttention as attention_bias); unscaled attention; relu or gated gelu FFN; a tied
              output layer reads the decoder state x d**-0.5
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.export.fused import save_configs

GRAPH_NAME = "onnxpipe-fused-seq2seq"
BUILDER = "onnxpipe-fused-seq2seq"  # the manifest's graph.builder
ENCODER_FILE = "encoder_model.onnx"
DECODER_FILE = "decoder_model.onnx"
SHARED_FILE = "embed_tokens.bin"  # the token embedding both graphs read, when they read the same one
SHARED_NAME = "embed"
SUPPORTED_MODEL_TYPES = ("marian", "bart", "mbart", "m2m_100", "pegasus", "t5", "mt5")
PRE_LN = ("mbart", "m2m_100", "pegasus", "t5", "mt5")
T5_TYPES = ("t5", "mt5")
ACTIVATIONS = ("swish", "silu", "gelu", "relu", "gelu_new", "gelu_pytorch_tanh")
FAMILY_DIFFERENCES = {
    "umt5": "a relative position bias in every layer",
    "longt5": "local and transient-global attention",
}


def unsupported_reason(config: Any) -> str | None:
    """Why the fused seq2seq graph cannot express this checkpoint, or None when it can."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        differs = f"{FAMILY_DIFFERENCES[model_type]}; " if model_type in FAMILY_DIFFERENCES else ""
        return f"model type {model_type} ({differs}fused seq2seq graphs exist for {', '.join(SUPPORTED_MODEL_TYPES)})"
    act = _activation(config)
    if act not in ACTIVATIONS:
        return f"activation {act}"
    if model_type == "bart" and (
        getattr(config, "add_final_layer_norm", False) or getattr(config, "normalize_before", False)
    ):
        return "a BART config with normalize_before or add_final_layer_norm (transformers' BART ignores them)"
    if model_type in T5_TYPES:
        buckets, distance = int(config.relative_attention_num_buckets), int(config.relative_attention_max_distance)
        if distance < buckets // 2:  # the buckets past the exact ones never settle (see _relative_bias_table)
            return f"relative_attention_max_distance {distance} below the {buckets // 2} exact buckets"
        head_dim = int(config.d_kv)
    else:
        head_dim = int(config.d_model) // int(config.decoder_attention_heads)
    if head_dim % 8:  # ONNX Runtime's CPU GroupQueryAttention refuses other head sizes at run time
        return f"decoder head size {head_dim} (GroupQueryAttention needs a multiple of 8)"
    return None


def _activation(config: Any) -> str | None:
    return getattr(config, "dense_act_fn" if config.model_type in T5_TYPES else "activation_function", None)


def _positions(module: Any, model_type: str) -> tuple[np.ndarray, str, int]:
    """(table, kind, offset) of an encoder's or decoder's position embedding: kind "static" (row
    position + offset) or "padded" (M2M100: counted from padding_idx + 1, pads at padding_idx)."""
    emb = module.embed_positions
    if model_type == "m2m_100":
        return emb.weights.detach().float().cpu().numpy(), "padded", int(emb.padding_idx)
    table = emb.weight.detach().float().cpu().numpy()
    return table, "static", int(getattr(emb, "offset", 0))


def _embed_scale(module: Any) -> float:
    scale: Any = getattr(module.embed_tokens, "embed_scale", None)
    if scale is None:
        scale = getattr(module, "embed_scale", 1.0)
    return float(scale)


class _Graph:
    """A list of nodes and initializers, with small helpers (as export.fused writes its graph)."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []
        self.names: set[str] = set()

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        if name not in self.names:
            self.names.add(name)
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, name: str, values, dtype=np.int64) -> str:
        return self.init(name, np.array(values, dtype=dtype))

    def node(
        self,
        op: str,
        inputs: list[str],
        outputs: list[str] | int = 1,
        domain: str = "",
        name: str | None = None,
        **attrs,
    ) -> list[str]:
        from onnx import helper

        name = name or f"{op}_{len(self.nodes)}"
        if isinstance(outputs, int):
            outputs = [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs

    def linear(self, x: str, name: str, lin: Any) -> str:
        """x @ W.T + b of a torch Linear: MatMul (+ Add), so that weight-only passes find it."""
        w = lin.weight.detach().float().cpu().numpy()
        y = self.node("MatMul", [x, self.init(name + ".weight", w.T)], name=name)[0]
        if lin.bias is not None:
            y = self.node(
                "Add", [y, self.init(name + ".bias", lin.bias.detach().float().cpu().numpy())], name=name + ".bias"
            )[0]
        return y

    def layer_norm(self, x: str, ln: Any, name: str) -> str:
        """LayerNorm, or T5's RMSNorm (a weight, no bias, no mean subtracted)."""
        if getattr(ln, "bias", None) is None:
            return self.node(
                "SimplifiedLayerNormalization",
                [x, self.init(name + ".weight", ln.weight.detach().float().cpu().numpy())],
                axis=-1,
                epsilon=float(ln.variance_epsilon),
                stash_type=1,
                name=name,
            )[0]
        return self.node(
            "LayerNormalization",
            [
                x,
                self.init(name + ".weight", ln.weight.detach().float().cpu().numpy()),
                self.init(name + ".bias", ln.bias.detach().float().cpu().numpy()),
            ],
            axis=-1,
            epsilon=float(ln.eps),
            name=name,
        )[0]

    def activation(self, x: str, act: str, name: str) -> str:
        ms = "com.microsoft"
        if act in ("swish", "silu"):
            return self.node("Mul", [x, self.node("Sigmoid", [x], name=name + ".sigmoid")[0]], name=name)[0]
        if act == "gelu":
            return self.node("Gelu", [x], domain=ms, name=name)[0]
        if act in ("gelu_new", "gelu_pytorch_tanh"):
            return self.node("FastGelu", [x], domain=ms, name=name)[0]
        return self.node("Relu", [x], name=name)[0]

    def model(self, name: str, inputs: list, outputs: list, opset: int | None) -> Any:
        from onnx import helper

        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        proto = helper.make_model(
            graph,
            producer_name="onnxpipe",
            opset_imports=[helper.make_opsetid("", opset or 17), helper.make_opsetid("com.microsoft", 1)],
        )
        proto.ir_version = 8
        return proto


@dataclass
class _Attention:
    q: Any  # the torch Linears
    k: Any
    v: Any
    o: Any
    heads: int
    scale: float


@dataclass
class _Layer:
    """One encoder or decoder layer, as the graph builder reads it from either kind of module."""

    self_norm: Any
    self_attn: _Attention
    ffn_norm: Any
    ffn: Any  # (g, x, act, name) -> output
    cross_norm: Any = None
    cross_attn: _Attention | None = None


def _bart_layer(layer: Any) -> _Layer:
    def attention(a: Any) -> _Attention:
        return _Attention(a.q_proj, a.k_proj, a.v_proj, a.out_proj, a.num_heads, float(a.scaling))

    def ffn(g: _Graph, x: str, act: str, name: str) -> str:
        h = g.activation(g.linear(x, name + ".fc1", layer.fc1), act, name + ".act")
        return g.linear(h, name + ".fc2", layer.fc2)

    cross = getattr(layer, "encoder_attn", None)
    return _Layer(
        layer.self_attn_layer_norm,
        attention(layer.self_attn),
        layer.final_layer_norm,
        ffn,
        getattr(layer, "encoder_attn_layer_norm", None),
        attention(cross) if cross is not None else None,
    )


def _t5_layer(block: Any) -> _Layer:
    def attention(a: Any) -> _Attention:
        return _Attention(a.q, a.k, a.v, a.o, a.n_heads, 1.0)  # T5 does not scale its scores

    dense = block.layer[-1].DenseReluDense

    def ffn(g: _Graph, x: str, act: str, name: str) -> str:
        if hasattr(dense, "wi_0"):  # gated: act(wi_0 x) * wi_1 x
            gate = g.activation(g.linear(x, name + ".wi_0", dense.wi_0), act, name + ".act")
            h = g.node("Mul", [gate, g.linear(x, name + ".wi_1", dense.wi_1)], name=name + ".gated")[0]
        else:
            h = g.activation(g.linear(x, name + ".wi", dense.wi), act, name + ".act")
        return g.linear(h, name + ".wo", dense.wo)

    cross = block.layer[1] if len(block.layer) == 3 else None
    return _Layer(
        block.layer[0].layer_norm,
        attention(block.layer[0].SelfAttention),
        block.layer[-1].layer_norm,
        ffn,
        cross.layer_norm if cross is not None else None,
        attention(cross.EncDecAttention) if cross is not None else None,
    )


def _layers(stack: Any, model_type: str) -> list[_Layer]:
    if model_type in T5_TYPES:
        return [_t5_layer(block) for block in stack.block]
    return [_bart_layer(layer) for layer in stack.layers]


def _relative_bias_table(attn: Any, bidirectional: bool) -> tuple[np.ndarray, int]:
    """(table, span) of T5's relative position bias: table[r + span] (bidirectional, r = k - q clipped to
        [-span, span]) or table[d] (the decoder: d = q - k clipped to [0, span]) is the (heads,) bias of that
        relative position. Past max_distance every position falls in the last bucket (when max_distance is at least
    the num_buckets / 2 exact buckets, which unsupported_reason holds), so the clip changes nothing."""
    import torch

    span = int(attn.relative_attention_max_distance) + 1
    relative = torch.arange(-span, span + 1) if bidirectional else -torch.arange(0, span + 1)
    buckets = attn._relative_position_bucket(
        relative,
        bidirectional=bidirectional,
        num_buckets=attn.relative_attention_num_buckets,
        max_distance=attn.relative_attention_max_distance,
    )
    with torch.no_grad():
        table = attn.relative_attention_bias(buckets).float().cpu().numpy()
    return np.ascontiguousarray(table), span


def _sublayer(g: _Graph, x: str, pre_ln: bool, ln: Any, name: str, body) -> str:
    """x + body(x) with the family's norm: LN(x + body(x)) (post-LN) or x + body(LN(x)) (pre-LN)."""
    if pre_ln:
        return g.node("Add", [x, body(g.layer_norm(x, ln, name + ".ln"))], name=name + ".residual")[0]
    return g.layer_norm(g.node("Add", [x, body(x)], name=name + ".residual")[0], ln, name + ".ln")


def _embed(
    g: _Graph, ids: str, table: str, scale: float, positions: tuple, pos: str | None, name: str, rows: str | None = None
) -> str:
    """Token embedding x scale + the position rows POS (indices into the position table), or ROWS."""
    x = g.node("Gather", [table, ids], name=name + ".tokens")[0]
    if scale != 1.0:
        x = g.node("Mul", [x, g.init(name + ".scale", np.array(scale, np.float32))], name=name + ".scaled")[0]
    if rows is None:
        assert pos is not None
        rows = g.node("Gather", [g.init(name + ".positions", positions[0]), pos], name=name + ".positions")[0]
    return g.node("Add", [x, rows], name=name + ".embedded")[0]


def build(model: Any, out: Path, opset: int | None = None) -> dict[str, str]:
    """Write OUT/encoder_model.onnx and OUT/decoder_model.onnx for the PyTorch MODEL; return the files."""
    import onnx
    from onnx import TensorProto, helper

    config = model.config
    reason = unsupported_reason(config)
    if reason:
        raise ValueError(f"no fused seq2seq graph for {reason}")
    model_type = config.model_type
    t5 = model_type in T5_TYPES
    pre_ln = model_type in PRE_LN
    act = _activation(config)
    encoder, decoder = model.get_encoder(), model.get_decoder()
    ms = "com.microsoft"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    enc_layers, dec_layers = _layers(encoder, model_type), _layers(decoder, model_type)
    dec_heads = dec_layers[0].self_attn.heads
    d = int(config.d_model)
    inner = int(dec_layers[0].self_attn.q.weight.shape[0])  # heads x head_dim: d, or T5's num_heads x d_kv
    head_dim = inner // dec_heads
    f32, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32

    def value(name: str, elem: int, dims: list) -> Any:
        return helper.make_tensor_value_info(name, elem, dims)

    def final_norm(g: _Graph, x: str, stack: Any, name: str) -> str:
        norm = getattr(stack, "final_layer_norm" if t5 else "layer_norm", None)
        return g.layer_norm(x, norm, name) if norm is not None else x

    # --- encoder ---------------------------------------------------------------------------
    g = _Graph()
    enc_table = encoder.embed_tokens.weight.detach().float().cpu().numpy()
    if t5:  # no scale, no positions: T5's are the relative bias of its attention
        x = g.node("Gather", [g.init("embed", enc_table), "input_ids"], name="enc.embed.tokens")[0]
    else:
        positions = _positions(encoder, model_type)
        if positions[1] == "padded":  # cumsum(ids != pad) * (ids != pad) + padding_idx
            real = g.node(
                "Cast", [g.node("Not", [g.node("Equal", ["input_ids", g.const("pad", positions[2])])[0]])[0]], to=i64
            )[0]
            counted = g.node("CumSum", [real, g.const("axis1", 1)])[0]
            pos = g.node("Add", [g.node("Mul", [counted, real])[0], "pad"])[0]
            pos_rows = None
        else:  # rows offset .. offset + source length (a Slice: ONNX Runtime's Gather-of-Range rewrite fails here)
            length = g.node("Slice", [g.node("Shape", ["input_ids"])[0], g.const("c1", [1]), g.const("c2", [2])])[0]
            start = g.const("offset", [positions[2]])
            pos = None
            pos_rows = g.node(
                "Slice",
                [
                    g.init("enc.embed.positions", positions[0]),
                    start,
                    g.node("Add", [length, start])[0],
                    g.const("c0", [0]),
                ],
            )[0]
        x = _embed(
            g, "input_ids", g.init("embed", enc_table), _embed_scale(encoder), positions, pos, "enc.embed", pos_rows
        )
        if getattr(encoder, "layernorm_embedding", None) is not None:
            x = g.layer_norm(x, encoder.layernorm_embedding, "enc.ln_embed")
    mask32 = g.node("Cast", ["attention_mask"], to=i32, name="enc.mask")[0]
    enc_bias = _encoder_bias(g, encoder.block[0].layer[0].SelfAttention) if t5 else ""
    for i, layer in enumerate(enc_layers):

        def self_attention(h: str, a=layer.self_attn, i=i) -> str:
            q, k, v = (g.linear(h, f"enc{i}.{n}", getattr(a, n)) for n in ("q", "k", "v"))
            inputs = [q, k, v, "", mask32] + ([enc_bias] if enc_bias else [])
            o = g.node("MultiHeadAttention", inputs, domain=ms, name=f"enc{i}.attn", num_heads=a.heads, scale=a.scale)
            return g.linear(o[0], f"enc{i}.o", a.o)

        x = _sublayer(g, x, pre_ln, layer.self_norm, f"enc{i}.sa", self_attention)
        x = _sublayer(
            g, x, pre_ln, layer.ffn_norm, f"enc{i}.ff", lambda h, layer=layer, i=i: layer.ffn(g, h, act, f"enc{i}.ffn")
        )
    x = final_norm(g, x, encoder, "enc.ln_final")
    g.node("Identity", [x], ["last_hidden_state"], name="last_hidden_state")
    heads_shape = g.const("heads_shape", [0, 0, dec_heads, head_dim])
    cross_outputs = []
    for i, layer in enumerate(dec_layers):
        for n in ("key", "value"):
            t = g.linear(x, f"cross{i}.{n[0]}", getattr(layer.cross_attn, n[0]))
            t = g.node("Reshape", [t, heads_shape], name=f"cross{i}.{n}.heads")[0]
            g.node("Transpose", [t], [f"cross_{n}.{i}"], perm=[0, 2, 1, 3], name=f"cross{i}.{n}.bnsh")
            cross_outputs.append(
                value(f"cross_{n}.{i}", f32, ["batch_size", dec_heads, "encoder_sequence_length", head_dim])
            )
    enc_proto = g.model(
        GRAPH_NAME + "-encoder",
        [
            value("input_ids", i64, ["batch_size", "encoder_sequence_length"]),
            value("attention_mask", i64, ["batch_size", "encoder_sequence_length"]),
        ],
        [value("last_hidden_state", f32, ["batch_size", "encoder_sequence_length", d]), *cross_outputs],
        opset,
    )
    dec_table = decoder.embed_tokens.weight.detach().float().cpu().numpy()
    shared = np.array_equal(enc_table, dec_table)
    if shared:  # one file for both graphs: the runtime loads it once (runtime.seq2seq.FusedSeq2SeqRunner)
        (out / SHARED_FILE).write_bytes(np.ascontiguousarray(enc_table, dtype="<f4").tobytes())
        _external(enc_proto, SHARED_NAME, SHARED_FILE)
    onnx.save_model(enc_proto, str(out / ENCODER_FILE))

    # --- decoder step ----------------------------------------------------------------------
    g = _Graph()
    table = g.init(SHARED_NAME, dec_table)
    t = g.node("Cast", [g.node("Sub", ["total_sequence_length", g.const("one32", 1, np.int32)])[0]], to=i64)[
        0
    ]  # this step's position
    if t5:
        x = g.node("Gather", [table, "input_ids"], name="dec.embed.tokens")[0]
    else:
        positions = _positions(decoder, model_type)
        if positions[1] == "padded":
            pad = g.const("pad", positions[2])
            pos = g.node(
                "Where",
                [g.node("Equal", ["input_ids", pad])[0], pad, g.node("Add", [t, g.const("pad1", positions[2] + 1)])[0]],
            )[0]
        else:
            pos = g.node("Add", [t, g.const("offset", positions[2])])[0]  # a scalar: one row of the table for all rows
        x = _embed(g, "input_ids", table, _embed_scale(decoder), positions, pos, "dec.embed")
        if getattr(decoder, "layernorm_embedding", None) is not None:
            x = g.layer_norm(x, decoder.layernorm_embedding, "dec.ln_embed")
    dec_bias = _decoder_bias(g, decoder.block[0].layer[0].SelfAttention, t) if t5 else ""
    enc_mask = g.node("Cast", ["encoder_attention_mask"], to=i32, name="dec.enc_mask")[0]
    # The rows are inputs x group: the cross-attention's query is (inputs, group, inner).
    inputs_n = g.node(
        "Slice", [g.node("Shape", ["encoder_attention_mask"])[0], g.const("c0", [0]), g.const("c1", [1])]
    )[0]
    by_input = g.node("Concat", [inputs_n, g.const("m1", [-1]), g.const("inner", [inner])], axis=0)[0]
    by_row = g.const("rows_shape", [-1, 1, inner])
    presents = []
    for i, layer in enumerate(dec_layers):

        def decoder_self_attention(h: str, a=layer.self_attn, i=i) -> str:
            q, k, v = (g.linear(h, f"dec{i}.{n}", getattr(a, n)) for n in ("q", "k", "v"))
            inputs = [q, k, v, f"past_key.{i}", f"past_value.{i}", "seqlens_k", "total_sequence_length"]
            if dec_bias:  # cos_cache, sin_cache and position_ids unused, then attention_bias
                inputs += ["", "", "", dec_bias]
            o = g.node(
                "GroupQueryAttention",
                inputs,
                [f"dec{i}.attn", f"present_key.{i}", f"present_value.{i}"],
                domain=ms,
                name=f"dec{i}.attn",
                num_heads=dec_heads,
                kv_num_heads=dec_heads,
                scale=a.scale,
                do_rotary=0,
            )[0]
            return g.linear(o, f"dec{i}.o", a.o)

        def cross_attention(h: str, a=layer.cross_attn, i=i) -> str:
            q = g.node("Reshape", [g.linear(h, f"dec{i}.cq", a.q), by_input], name=f"dec{i}.cq.by_input")[0]
            o = g.node(
                "MultiHeadAttention",
                [q, f"cross_key.{i}", f"cross_value.{i}", "", enc_mask],
                domain=ms,
                name=f"dec{i}.cross",
                num_heads=dec_heads,
                scale=a.scale,
            )[0]
            o = g.node("Reshape", [o, by_row], name=f"dec{i}.cross.by_row")[0]
            return g.linear(o, f"dec{i}.co", a.o)

        x = _sublayer(g, x, pre_ln, layer.self_norm, f"dec{i}.sa", decoder_self_attention)
        x = _sublayer(g, x, pre_ln, layer.cross_norm, f"dec{i}.ca", cross_attention)
        x = _sublayer(
            g, x, pre_ln, layer.ffn_norm, f"dec{i}.ff", lambda h, layer=layer, i=i: layer.ffn(g, h, act, f"dec{i}.ffn")
        )
        presents += [f"present_key.{i}", f"present_value.{i}"]
    x = final_norm(g, x, decoder, "dec.ln_final")
    flat = g.node("Reshape", [x, g.const("flat", [-1, d])], name="lm_head.rows")[0]
    if t5 and getattr(config, "tie_word_embeddings", True):  # as T5ForConditionalGeneration: the state x d**-0.5
        flat = g.node("Mul", [flat, g.init("lm_head.rescale", np.array(d**-0.5, np.float32))], name="lm_head.rescale")[
            0
        ]
    head = model.get_output_embeddings().weight.detach().float().cpu().numpy()
    bias = getattr(model, "final_logits_bias", None)
    # The output layer has its own copy even when tied: ONNX Runtime prepacks it for the Gemm (and frees the
    # original), which it does not do for the table the runtime shares between the two sessions.
    gemm_in = [flat, g.init("lm_head.weight", head)]
    if bias is not None:
        gemm_in.append(g.init("final_logits_bias", bias.detach().float().cpu().numpy().reshape(-1)))
    # Gemm reads the (vocab, d) matrix transposed (transB), as it is stored.
    g.node("Gemm", gemm_in, ["logits"], transB=1, name="lm_head")
    g.node("LogSoftmax", ["logits"], ["log_probs"], axis=-1, name="log_softmax")
    vocab = head.shape[0]
    inputs = [
        value("input_ids", i64, ["batch_size", 1]),
        value("seqlens_k", i32, ["batch_size"]),
        value("total_sequence_length", i32, []),
        value("encoder_attention_mask", i64, ["num_inputs", "encoder_sequence_length"]),
    ]
    outputs = [value("logits", f32, ["batch_size", vocab]), value("log_probs", f32, ["batch_size", vocab])]
    for i in range(len(dec_layers)):
        for n in ("key", "value"):
            inputs.append(value(f"past_{n}.{i}", f32, ["batch_size", dec_heads, "max_sequence_length", head_dim]))
            outputs.append(value(f"present_{n}.{i}", f32, ["batch_size", dec_heads, "max_sequence_length", head_dim]))
    for i in range(len(dec_layers)):
        for n in ("key", "value"):
            inputs.append(value(f"cross_{n}.{i}", f32, ["num_inputs", dec_heads, "encoder_sequence_length", head_dim]))
    dec_proto = g.model(GRAPH_NAME + "-decoder", inputs, outputs, opset)
    if shared:
        _external(dec_proto, SHARED_NAME, SHARED_FILE)
    onnx.save_model(dec_proto, str(out / DECODER_FILE))
    return {"encoder": ENCODER_FILE, "decoder": DECODER_FILE}


def _encoder_bias(g: _Graph, attn: Any) -> str:
    """T5's encoder position bias (1, heads, source, source): table[clip(k - q) + span] for every q, k."""
    table, span = _relative_bias_table(attn, bidirectional=True)
    length = g.node("Gather", [g.node("Shape", ["input_ids"])[0], g.const("enc.bias.axis1", 1)])[0]
    r = g.node("Range", [g.const("enc.bias.zero", 0), length, g.const("enc.bias.step", 1)], name="enc.bias.range")[0]
    rows = g.node("Unsqueeze", [r, g.const("enc.bias.ax1", [1])])[0]  # q
    cols = g.node("Unsqueeze", [r, g.const("enc.bias.ax0", [0])])[0]  # k
    rel = g.node("Sub", [cols, rows], name="enc.bias.relative")[0]
    low, high = g.const("enc.bias.low", -span), g.const("enc.bias.high", span)
    index = g.node("Add", [g.node("Min", [g.node("Max", [rel, low])[0], high])[0], high], name="enc.bias.index")[0]
    bias = g.node("Gather", [g.init("enc.relative_bias", table), index], name="enc.bias.gather")[0]  # (q, k, heads)
    return g.node("Unsqueeze", [g.node("Transpose", [bias], perm=[2, 0, 1])[0], g.const("enc.bias.ax0", [0])])[0]


def _decoder_bias(g: _Graph, attn: Any, position: str) -> str:
    """T5's decoder position bias of this step's query at POSITION (int64 scalar) against keys 0..POSITION,
    (1, heads, 1, POSITION + 1), as GroupQueryAttention's attention_bias takes it: table[min(q - k, span)]."""
    table, span = _relative_bias_table(attn, bidirectional=False)
    total = g.node("Add", [position, g.const("dec.bias.one", 1)])[0]
    keys = g.node("Range", [g.const("dec.bias.zero", 0), total, g.const("dec.bias.one", 1)], name="dec.bias.range")[0]
    back = g.node("Min", [g.node("Sub", [position, keys])[0], g.const("dec.bias.span", span)], name="dec.bias.index")[0]
    bias = g.node("Gather", [g.init("dec.relative_bias", table), back], name="dec.bias.gather")[0]  # (keys, heads)
    heads = int(table.shape[1])
    return g.node(
        "Reshape",
        [g.node("Transpose", [bias], perm=[1, 0])[0], g.const("dec.bias.shape", [1, heads, 1, -1])],
        name="dec.bias",
    )[0]


def _external(proto: Any, name: str, location: str) -> None:
    """Make PROTO's initializer NAME read its data from LOCATION (raw little-endian, written by the caller)."""
    from onnx import TensorProto
    from onnx.external_data_helper import set_external_data

    tensor = next(t for t in proto.graph.initializer if t.name == name)
    set_external_data(tensor, location=location, offset=0, length=len(tensor.raw_data))
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")


def export(model: Any, out: Path, opset: int | None = None) -> dict[str, str]:
    """The export folder's graphs and configs, as optimum writes them: {"encoder": file, "decoder": file}."""
    out = Path(out)
    files = build(model, out, opset)
    save_configs(model, out)
    return files


def teacher_forced_logits(
    encoder: Any, decoder: Any, ids: np.ndarray, mask: np.ndarray, tokens: list[int]
) -> list[np.ndarray]:
    """The decoder's logits (1, vocab) after each of TOKENS (the start id, then the reference's ids), one
    row: what export.validate compares with PyTorch step by step."""
    cross_names = [o.name for o in encoder.get_outputs() if o.name.startswith("cross_")]
    cross = dict(zip(cross_names, encoder.run(cross_names, {"input_ids": ids, "attention_mask": mask})))
    info = {i.name: i for i in decoder.get_inputs()}
    past = {
        n: np.zeros((1, v.shape[1], len(tokens), v.shape[3]), np.float32)
        for n, v in info.items()
        if n.startswith("past_")
    }
    out: list[np.ndarray] = []
    for t, token in enumerate(tokens):
        feeds = {
            "input_ids": np.array([[token]], dtype=np.int64),
            "seqlens_k": np.array([t], dtype=np.int32),
            "total_sequence_length": np.array(t + 1, dtype=np.int32),
            "encoder_attention_mask": mask,
            **past,
            **cross,
        }
        names = ["logits"] + [n.replace("past_", "present_", 1) for n in past]
        logits, *presents = decoder.run(names, feeds)
        past = dict(zip(past, presents))
        out.append(logits.astype(np.float32))
    return out


def geometry(decoder_path: Path) -> dict[str, Any]:
    """The manifest's cache geometry of a decoder step graph (num_layers, num_kv_heads, head_dim, past_dtype),
    read from its declared inputs (its past_key.N are (rows, heads, max_length, head_dim))."""
    import onnx

    graph = onnx.load(str(decoder_path), load_external_data=False).graph
    keys = [i for i in graph.input if i.name.startswith("past_key.")]
    dims = [d.dim_value or None for d in keys[0].type.tensor_type.shape.dim]
    record: dict[str, Any] = {
        "num_layers": len(keys),
        "num_kv_heads": dims[1],
        "head_dim": dims[3],
        "past_dtype": "float32",
    }
    for tensor in graph.initializer:  # the table both graphs read from one file (runtime.seq2seq loads it once)
        if tensor.name == SHARED_NAME and tensor.data_location == onnx.TensorProto.EXTERNAL:
            where = {e.key: e.value for e in tensor.external_data}
            record["shared_initializer"] = {"name": tensor.name, "file": where["location"], "shape": list(tensor.dims)}
    return record
