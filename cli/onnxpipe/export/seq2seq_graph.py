"""onnxpipe's own encoder-decoder graphs for the BART-like families (Marian, BART, mBART, M2M100/NLLB, Pegasus).

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
"""

from __future__ import annotations

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
SUPPORTED_MODEL_TYPES = ("marian", "bart", "mbart", "m2m_100", "pegasus")
PRE_LN = ("mbart", "m2m_100", "pegasus")
ACTIVATIONS = ("swish", "silu", "gelu", "relu", "gelu_new", "gelu_pytorch_tanh")
FAMILY_DIFFERENCES = {
    "t5": "relative position bias and unscaled attention",
    "mt5": "relative position bias and unscaled attention",
}


def unsupported_reason(config: Any) -> str | None:
    """Why the fused seq2seq graph cannot express this checkpoint, or None when it can."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        differs = f"{FAMILY_DIFFERENCES[model_type]}; " if model_type in FAMILY_DIFFERENCES else ""
        return f"model type {model_type} ({differs}fused seq2seq graphs exist for {', '.join(SUPPORTED_MODEL_TYPES)})"
    act = getattr(config, "activation_function", None)
    if act not in ACTIVATIONS:
        return f"activation {act}"
    if model_type == "bart" and (
        getattr(config, "add_final_layer_norm", False) or getattr(config, "normalize_before", False)
    ):
        return "a BART config with normalize_before or add_final_layer_norm (transformers' BART ignores them)"
    head_dim = int(config.d_model) // int(config.decoder_attention_heads)
    if head_dim % 8:  # ONNX Runtime's CPU GroupQueryAttention refuses other head sizes at run time
        return f"decoder head size {head_dim} (GroupQueryAttention needs a multiple of 8)"
    return None


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


def _ffn(g: _Graph, x: str, layer: Any, act: str, name: str) -> str:
    h = g.activation(g.linear(x, name + ".fc1", layer.fc1), act, name + ".act")
    return g.linear(h, name + ".fc2", layer.fc2)


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
    pre_ln = model_type in PRE_LN
    act = config.activation_function
    base = model.get_encoder(), model.get_decoder()
    encoder, decoder = base
    ms = "com.microsoft"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dec_layers = list(decoder.layers)
    dec_heads = dec_layers[0].self_attn.num_heads
    d = int(config.d_model)
    head_dim = d // dec_heads
    f32, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32

    def value(name: str, elem: int, dims: list) -> Any:
        return helper.make_tensor_value_info(name, elem, dims)

    # --- encoder ---------------------------------------------------------------------------
    g = _Graph()
    enc_table = encoder.embed_tokens.weight.detach().float().cpu().numpy()
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
            [g.init("enc.embed.positions", positions[0]), start, g.node("Add", [length, start])[0], g.const("c0", [0])],
        )[0]
    x = _embed(g, "input_ids", g.init("embed", enc_table), _embed_scale(encoder), positions, pos, "enc.embed", pos_rows)
    if getattr(encoder, "layernorm_embedding", None) is not None:
        x = g.layer_norm(x, encoder.layernorm_embedding, "enc.ln_embed")
    mask32 = g.node("Cast", ["attention_mask"], to=i32, name="enc.mask")[0]
    for i, layer in enumerate(encoder.layers):
        attn = layer.self_attn
        heads = attn.num_heads

        def self_attention(h: str, attn=attn, heads=heads, i=i) -> str:
            q, k, v = (g.linear(h, f"enc{i}.{n}", getattr(attn, f"{n}_proj")) for n in ("q", "k", "v"))
            o = g.node(
                "MultiHeadAttention",
                [q, k, v, "", mask32],
                domain=ms,
                name=f"enc{i}.attn",
                num_heads=heads,
                scale=float(attn.scaling),
            )[0]
            return g.linear(o, f"enc{i}.o", attn.out_proj)

        x = _sublayer(g, x, pre_ln, layer.self_attn_layer_norm, f"enc{i}.sa", self_attention)
        x = _sublayer(
            g,
            x,
            pre_ln,
            layer.final_layer_norm,
            f"enc{i}.ff",
            lambda h, layer=layer, i=i: _ffn(g, h, layer, act, f"enc{i}.ffn"),
        )
    if getattr(encoder, "layer_norm", None) is not None:
        x = g.layer_norm(x, encoder.layer_norm, "enc.ln_final")
    g.node("Identity", [x], ["last_hidden_state"], name="last_hidden_state")
    heads_shape = g.const("heads_shape", [0, 0, dec_heads, head_dim])
    cross_outputs = []
    for i, layer in enumerate(dec_layers):
        for n in ("key", "value"):
            t = g.linear(x, f"cross{i}.{n[0]}", getattr(layer.encoder_attn, f"{n[0]}_proj"))
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
    positions = _positions(decoder, model_type)
    t = g.node("Cast", [g.node("Sub", ["total_sequence_length", g.const("one32", 1, np.int32)])[0]], to=i64)[
        0
    ]  # this step's position
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
    enc_mask = g.node("Cast", ["encoder_attention_mask"], to=i32, name="dec.enc_mask")[0]
    # The rows are inputs x group: the cross-attention's query is (inputs, group, d).
    inputs_n = g.node(
        "Slice", [g.node("Shape", ["encoder_attention_mask"])[0], g.const("c0", [0]), g.const("c1", [1])]
    )[0]
    by_input = g.node("Concat", [inputs_n, g.const("m1", [-1]), g.const("d", [d])], axis=0)[0]
    by_row = g.const("rows_shape", [-1, 1, d])
    presents = []
    for i, layer in enumerate(dec_layers):
        sa, ca = layer.self_attn, layer.encoder_attn

        def decoder_self_attention(h: str, sa=sa, i=i) -> str:
            q, k, v = (g.linear(h, f"dec{i}.{n}", getattr(sa, f"{n}_proj")) for n in ("q", "k", "v"))
            o = g.node(
                "GroupQueryAttention",
                [q, k, v, f"past_key.{i}", f"past_value.{i}", "seqlens_k", "total_sequence_length"],
                [f"dec{i}.attn", f"present_key.{i}", f"present_value.{i}"],
                domain=ms,
                name=f"dec{i}.attn",
                num_heads=dec_heads,
                kv_num_heads=dec_heads,
                scale=float(sa.scaling),
                do_rotary=0,
            )[0]
            return g.linear(o, f"dec{i}.o", sa.out_proj)

        def cross_attention(h: str, ca=ca, i=i) -> str:
            q = g.node("Reshape", [g.linear(h, f"dec{i}.cq", ca.q_proj), by_input], name=f"dec{i}.cq.by_input")[0]
            o = g.node(
                "MultiHeadAttention",
                [q, f"cross_key.{i}", f"cross_value.{i}", "", enc_mask],
                domain=ms,
                name=f"dec{i}.cross",
                num_heads=dec_heads,
                scale=float(ca.scaling),
            )[0]
            o = g.node("Reshape", [o, by_row], name=f"dec{i}.cross.by_row")[0]
            return g.linear(o, f"dec{i}.co", ca.out_proj)

        x = _sublayer(g, x, pre_ln, layer.self_attn_layer_norm, f"dec{i}.sa", decoder_self_attention)
        x = _sublayer(g, x, pre_ln, layer.encoder_attn_layer_norm, f"dec{i}.ca", cross_attention)
        x = _sublayer(
            g,
            x,
            pre_ln,
            layer.final_layer_norm,
            f"dec{i}.ff",
            lambda h, layer=layer, i=i: _ffn(g, h, layer, act, f"dec{i}.ffn"),
        )
        presents += [f"present_key.{i}", f"present_value.{i}"]
    if getattr(decoder, "layer_norm", None) is not None:
        x = g.layer_norm(x, decoder.layer_norm, "dec.ln_final")
    flat = g.node("Reshape", [x, g.const("flat", [-1, d])], name="lm_head.rows")[0]
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
