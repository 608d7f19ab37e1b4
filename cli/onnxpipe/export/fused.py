"""onnxpipe's own decoder graph for Llama-like models (Llama, Qwen2, Mistral, Phi-3, Gemma), on ONNX Runtime's
fused kernels.

optimum's export of a Llama decoder is the traced PyTorch code: about a hundred small shape, mask and
rotary nodes per layer (3,150 nodes a step for SmolLM2-135M), which cost a third of a batch-1 step on
the CPU. This graph is written node by node from the checkpoint's weights instead, with the operators
ONNX Runtime fuses for this architecture (the ones its onnxruntime-genai model builder uses):

    Gather (embedding; GatherBlockQuantized when the table is exactly Q8_0 or Q4_0 blocks)
    per layer: [Skip]SimplifiedLayerNormalization (RMSNorm, with the residual add)
               MatMul q|k|v packed (+ bias) -> Split -> RotaryEmbedding(q), RotaryEmbedding(k)
               GroupQueryAttention (causal, attention_bias = the padding mask) -> MatMul o_proj
               SkipSimplifiedLayerNormalization -> MatMul gate|up packed -> Split -> SiLU|gelu * up -> MatMul down
    last position only: Add -> SimplifiedLayerNormalization -> MatMul lm_head

Every "MatMul" above is MatMulNBits instead where the weight matrix is exactly GGUF blocks
(exact_blocks): a checkpoint converted from a .gguf keeps its 4-bit blocks, computed in float32 with
the very values transformers dequantizes them to, from a fifth of the bytes.

It has the inputs and outputs of optimum's `text-generation-with-past` graph, so the runtime drives it the
same way (tasks.causal): input_ids, attention_mask, position_ids and past_key_values.N.key/value in;
logits and present.N.key/value out, the cache in (batch, kv_heads, length, head_dim). Two differences:
the logits are those of the last position only, (batch, 1, vocab), which also saves the prefill its
vocab x prompt-length product; and GroupQueryAttention takes a prompt with a non-empty past only at
batch 1, so a prompt is run in one piece. Left padding works as in optimum's graph: the attention mask
becomes an additive bias (finfo.min on pads), the rows' cache lengths are all the mask's width, and the
rotary positions are the position_ids the runtime computes (transformers' cumsum(mask) - 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GRAPH_NAME = "onnxpipe-fused-llama"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "gemma3_text")
GEMMAS = ("gemma", "gemma2", "gemma3_text")
EXTERNAL_DATA_BYTES = 1_800_000_000  # above this the weights go to model.onnx_data (protobuf's 2 GB limit)

# What each family adds to Llama, and how this graph builds it:
#   qwen2    q/k/v biases (an Add after the packed projection); sliding windows on the layers
#            config.layer_types names (GroupQueryAttention's local_window_size)
#   mistral  a sliding window on every layer
#   phi3     qkv_proj and gate_up_proj already packed; a sliding window on every layer; partial rotary
#            (RotaryEmbedding's rotary_embedding_dim). longrope only where its switch is out of reach.
#   qwen3    RMSNorm of each head's q and k before the rotary (a SimplifiedLayerNormalization over head_dim)
#   gemma    embeddings times sqrt(hidden), gelu (tanh), RMSNorm with (1 + weight): the 1 is folded in
#   gemma2   Gemma's, plus norms after attention and after the MLP, the output logits soft-capped,
#            sliding windows on every other layer; attention soft-capping is refused (below)
#   gemma3   Gemma 2's norms and windows (five layers in six), q/k norms, and the windowed layers' own
#            rotary table (rope_local_base_freq)
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")

# What the Llama-like families add that this graph does not build: they go through optimum's graph.
FAMILY_DIFFERENCES: dict[str, str] = {}


def _rope_type(config: Any) -> str | None:
    rope = getattr(config, "rope_scaling", None) or {}
    return rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None


def _activation(config: Any) -> str:
    """The MLP's activation as transformers reads it: hidden_activation for Gemma 2 and 3, else hidden_act
    (Gemma's own MLP reads hidden_act, whatever its hidden_activation says)."""
    if getattr(config, "model_type", None) in ("gemma2", "gemma3_text"):
        return getattr(config, "hidden_activation", None) or "gelu_pytorch_tanh"
    return getattr(config, "hidden_act", "silu")


def unsupported_reason(config: Any) -> str | None:
    """Why the fused graph cannot express this checkpoint, or None when it can."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        differs = f"{FAMILY_DIFFERENCES[model_type]}; " if model_type in FAMILY_DIFFERENCES else ""
        return f"model type {model_type} ({differs}fused graphs exist for {', '.join(SUPPORTED_MODEL_TYPES)})"
    act = _activation(config)
    if act not in ACTIVATIONS:
        return f"activation {act}"
    if getattr(config, "attn_logit_softcapping", None):
        # GroupQueryAttention has a softcap attribute (applied before the padding bias, as transformers
        # applies it), but ONNX Runtime 1.31's CPU kernel computes its tanh approximately: on a tiny Gemma 2
        # the second layer's keys came out 4e-3 off transformers', past the validation's tolerance.
        return "attention logit soft-capping (ONNX Runtime's GroupQueryAttention computes it approximately)"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    rope_type = _rope_type(config)
    if rope_type == "dynamic":  # its frequencies change with the sequence length
        return f"{rope_type} rope scaling"
    original = getattr(config, "original_max_position_embeddings", None)
    if rope_type in ("longrope", "su") and original and original < getattr(config, "max_position_embeddings", 0):
        # Past original_max_position_embeddings its long factors apply, and Phi-3's generate drops the cache
        # and reruns the sequence the step a row crosses it (transformers' prepare_inputs_for_generation):
        # no fixed graph over a growing cache gives those ids.
        return f"{rope_type} rope scaling (its factors switch at original_max_position_embeddings, {original})"
    return None


# The families whose transformers attention reads config.sliding_window. Llama and Gemma ignore one that a
# config.json carries (a converted checkpoint's leftover): a window there would be a wrong graph past it.
WINDOWED = ("qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3_text")


def _windows(config: Any) -> list[int | None]:
    """Each layer's sliding window (the keys a query sees, itself included), or None for full attention."""
    window = getattr(config, "sliding_window", None)
    layers = int(config.num_hidden_layers)
    if not window or config.model_type not in WINDOWED or getattr(config, "use_sliding_window", True) is False:
        return [None] * layers
    types = getattr(config, "layer_types", None)
    if types:  # Qwen2: the layers past max_window_layers
        return [int(window) if t == "sliding_attention" else None for t in types]
    return [int(window)] * layers


BLOCK = 32  # GGUF's Q4_0/Q4_1/Q8_0 block: 32 weights of one row share a scale (and Q4_1 an offset)


@dataclass
class Nibbles:
    """One MatMulNBits operand: w = scale * (q - zero) (+ offset), q in 0..15, per block of BLOCK weights
    along the input dimension of an (out, in) matrix."""

    q: np.ndarray  # (out, in // BLOCK, BLOCK) uint8
    scales: np.ndarray  # (out, in // BLOCK) float32
    zero: int  # 8 (MatMulNBits' default) or 0
    offsets: np.ndarray | None = None  # (out, in // BLOCK) float32: Q4_1's m

    def packed(self) -> np.ndarray:
        """MatMulNBits' B: (out, blocks, BLOCK / 2) bytes, the first weight of each pair in the low nibble."""
        return (self.q[..., 0::2] | (self.q[..., 1::2] << 4)).astype(np.uint8)


def _fp16_candidates(estimate: np.ndarray):
    """A float32 estimate of float16 scales, rounded to float16, then each neighbour (the estimate's own
    rounding can land one float16 step off)."""
    first = estimate.astype(np.float16)
    for cand in (first, np.nextafter(first, np.float16(np.inf)), np.nextafter(first, np.float16(0))):
        yield cand.astype(np.float32)


def _solve(b: np.ndarray, estimate: np.ndarray, levels, rebuild):
    """Per block, the first float16 scale d (of _fp16_candidates) for which q = levels(d) reproduces the
    block exactly through rebuild(d, q); None unless every block is reproduced."""
    best_q = np.zeros(b.shape, np.int16)
    best_d = np.zeros(b.shape[:-1], np.float32)
    done = np.zeros(b.shape[:-1], bool)
    for d in _fp16_candidates(estimate):
        q = levels(d)
        ok = (rebuild(d, q) == b).all(-1)
        new = ok & ~done
        best_q[new], best_d[new] = q[new], d[new]
        done |= ok
        if done.all():
            return best_d, best_q
    return None


def exact_blocks(w: np.ndarray) -> tuple[str, list[Nibbles]] | None:
    """W's exact 4-bit block form, as (kind, operands whose products add up to x @ w.T), or None.

    A checkpoint converted from a GGUF (transformers dequantizes it to float32) holds only 16 or 256
    values per block. Recovering the blocks is not a quantisation: every weight must equal the float32
    that gguf-py's dequantizer computes from the blocks, or the whole matrix stays float32.
      Q4_0: w = d * (q - 8)      one MatMulNBits (zero point 8)
      Q4_1: w = d * q + m        one MatMulNBits (zero point 0), plus m times x's block sums
      Q8_0: w = d * q, q int8    q = 16 hi + lo: two MatMulNBits, 16 d * hi and d * lo
    """
    rows, cols = w.shape
    if cols % BLOCK or not np.isfinite(w).all():
        return None
    b = w.astype(np.float32, copy=False).reshape(rows, cols // BLOCK, BLOCK)
    f32 = np.float32
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # Q4_0: the weight of largest magnitude is q = 0, so d = -w / 8 exactly.
        idx = np.abs(b).argmax(-1)
        d = -np.take_along_axis(b, idx[..., None], -1)[..., 0] / f32(8)
        q = np.where(d[..., None] != 0, np.rint(b / d[..., None]), 0)
        if ((q >= -8) & (q <= 7)).all() and np.array_equal(d[..., None] * q.astype(f32), b):
            return "q4_0", [Nibbles((q + 8).astype(np.uint8), d.astype(f32), 8)]
        # Q4_1: the smallest weight is q = 0 (m = min, a float16) and the largest q = 15.
        lo, hi = b.min(-1), b.max(-1)
        if np.array_equal(lo.astype(np.float16).astype(f32), lo):
            solved = _solve(
                b,
                (hi - lo) / f32(15),
                lambda d: np.clip(np.where(d[..., None] > 0, np.rint((b - lo[..., None]) / d[..., None]), 0), 0, 15),
                lambda d, q: d[..., None] * q.astype(f32) + lo[..., None],
            )
            if solved is not None:
                d, q = solved
                return "q4_1", [Nibbles(q.astype(np.uint8), d, 0, lo.astype(f32))]
        # Q8_0: the weight of largest magnitude is q = +-127.
        amax = np.abs(b).max(-1)
        solved = _solve(
            b,
            amax / f32(127),
            lambda d: np.clip(np.where(d[..., None] > 0, np.rint(b / d[..., None]), 0), -128, 127),
            lambda d, q: q.astype(f32) * d[..., None],
        )
        if solved is not None:
            d, q = solved
            high, low = np.floor_divide(q, 16), np.mod(q, 16)  # high in -8..7, low in 0..15
            return "q8_0", [Nibbles((high + 8).astype(np.uint8), d * f32(16), 8), Nibbles(low.astype(np.uint8), d, 0)]
    return None


def _packed(state: dict, prefix: str, parts: tuple[str, ...], packed: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The weight and bias of PARTS' projections stacked by rows (Phi-3 stores them stacked already, as PACKED);
    the bias is None when none has one, and zeros stand in for those that have none."""
    if prefix + packed + ".weight" in state:
        return state[prefix + packed + ".weight"], state.get(prefix + packed + ".bias")
    weights = [state[f"{prefix}{part}.weight"] for part in parts]
    biases = [state.get(f"{prefix}{part}.bias") for part in parts]
    if all(b is None for b in biases):
        return np.concatenate(weights, axis=0), None
    filled = [np.zeros(w.shape[0], np.float32) if b is None else b for w, b in zip(weights, biases)]
    return np.concatenate(weights, axis=0), np.concatenate(filled)


def build(
    model: Any, out: Path, opset: int | None = None, block_weights: bool = True, quantize: str | None = None
) -> tuple[str, dict]:
    """Write OUT/model.onnx for the PyTorch MODEL (a *ForCausalLM of SUPPORTED_MODEL_TYPES); return the file name."""
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from onnxpipe.export import nbits

    config = model.config
    reason = unsupported_reason(config)
    if reason:
        raise ValueError(f"no fused graph for {reason}")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layers = config.num_hidden_layers
    eps = float(config.rms_norm_eps)
    max_positions = int(config.max_position_embeddings)
    state = {k: v.detach().to(torch.float32).cpu().numpy() for k, v in model.state_dict().items()}
    gemma = config.model_type in GEMMAS
    if gemma:  # Gemma's RMSNorms (q/k norms too) scale by (1 + weight), summed in float32 as here
        for key in [k for k in state if k.endswith("norm.weight")]:
            state[key] = state[key] + np.float32(1)
    windows = _windows(config)
    rotary_dim = int(head_dim * float(getattr(config, "partial_rotary_factor", None) or 1.0))
    scale = float(getattr(model.model.layers[0].self_attn, "scaling", head_dim**-0.5))

    inits: list = []
    nodes: list = []

    def init(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(name: str, values, dtype=np.int64) -> str:
        return init(name, np.array(values, dtype=dtype))

    def node(
        op: str, inputs: list[str], outputs: list[str] | int = 1, domain: str = "", name: str | None = None, **attrs
    ) -> list[str]:
        name = name or f"{op}_{len(nodes)}"
        if isinstance(outputs, int):
            outputs = [f"{name}/out{i}" for i in range(outputs)]
        nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs

    ms = "com.microsoft"
    weights = {"float32": 0, "q4_0": 0, "q4_1": 0, "q8_0": 0}

    def blocks_of(w: np.ndarray):
        return exact_blocks(w) if block_weights else None

    def linear(x: str, name: str, w: np.ndarray, found=None, output_layer: bool = False) -> str:
        """x @ w.T for an (out, in) weight: MatMulNBits where W is exactly 4-bit blocks (FOUND, when the
        caller has them) or --quantize asks (export.nbits), else MatMul."""
        found = found or blocks_of(w)
        quantized = nbits.quantize(w, quantize, found, output_layer)
        if quantized is None:
            weights["float32"] += 1
            return node("MatMul", [x, init(name, w.T)], name=name)[0]
        kind, parts = quantized
        weights[kind] = weights.get(kind, 0) + 1
        rows, cols = w.shape
        # Exact blocks alone compute in float32 (level 1): the very values transformers computes with.
        level = nbits.accuracy_level(name) if quantize else 1
        parts = nbits.for_level(parts, level)
        terms = []
        for j, part in enumerate(parts):
            tag = f"{name}.{kind}" + (f".{j}" if len(parts) > 1 else "")
            ins = [x, init(tag + ".q", part.packed()), init(tag + ".scales", part.scales)]
            zero_points = part.zero_points()
            if zero_points is not None:
                ins.append(init(tag + ".zero", zero_points))
            terms.append(
                node(
                    "MatMulNBits",
                    ins,
                    domain=ms,
                    name=tag,
                    K=cols,
                    N=rows,
                    bits=part.bits,
                    block_size=BLOCK,
                    accuracy_level=level,
                )[0]
            )
            if part.offsets is not None:  # sum_k x_k * m_block(k) = (x's block sums) @ offsets.T
                grouped = node(
                    "Reshape", [x, const(tag + ".blocks", [0, 0, cols // BLOCK, BLOCK])], name=tag + ".group"
                )[0]
                sums = node("ReduceSum", [grouped, const(tag + ".axis", [-1])], keepdims=0, name=tag + ".block_sums")[0]
                terms.append(node("MatMul", [sums, init(tag + ".offsets", part.offsets.T)], name=tag + ".offset")[0])
        y = terms[0]
        for t in terms[1:]:
            y = node("Add", [y, t], name=f"{name}.add{len(nodes)}")[0]
        return y

    def embedding(table: np.ndarray, found) -> str:
        """The input embedding of input_ids: GatherBlockQuantized on Q8_0 or Q4_0 blocks (FOUND) or, with
        --quantize, on 8-bit blocks (export.nbits), else Gather."""
        quantized = nbits.embedding_table(table, quantize, found)
        if quantized is None:  # Q4_1's offsets have no place in GatherBlockQuantized
            weights["float32"] += 1
            return node("Gather", [init("embed", table), "input_ids"], name="embed")[0]
        data, scales, bits = quantized
        kind = found[0] if found is not None and found[0] in ("q8_0", "q4_0") else "int8"
        weights[kind] = weights.get(kind, 0) + 1
        return node(
            "GatherBlockQuantized",
            [init("embed.q", data), "input_ids", init("embed.scales", scales)],
            domain=ms,
            name="embed",
            bits=bits,
            block_size=BLOCK,
            gather_axis=0,
            quantize_axis=1,
        )[0]

    def biased(x: str, name: str, w: np.ndarray, b: np.ndarray | None) -> str:
        y = linear(x, name, w)
        return y if b is None else node("Add", [y, init(name + ".bias", b)], name=name + ".bias")[0]

    def rms(t: str, weight: np.ndarray, name: str) -> str:
        return node(
            "SimplifiedLayerNormalization", [t, init(name, weight)], axis=-1, epsilon=eps, stash_type=1, name=name
        )[0]

    def head_norm(t: str, weight: np.ndarray, name: str) -> str:
        """RMSNorm of each head of T (batch, seq, heads x head_dim) over its head_dim."""
        heads_of = node("Reshape", [t, const(name + ".heads", [0, 0, -1, head_dim])], name=name + ".by_head")[0]
        normed = node(
            "SimplifiedLayerNormalization",
            [heads_of, init(name, weight)],
            axis=-1,
            epsilon=eps,
            stash_type=1,
            name=name,
        )[0]
        return node("Reshape", [normed, const(name + ".flat_shape", [0, 0, -1])], name=name + ".flat")[0]

    act_name = _activation(config)

    def activation(g: str, name: str) -> str:
        if act_name == "gelu_pytorch_tanh":
            return node("FastGelu", [g], domain=ms, name=name)[0]
        if act_name == "gelu":  # erf
            return node("Gelu", [g], domain=ms, name=name)[0]
        return node("Mul", [g, node("Sigmoid", [g], name=name + ".sigmoid")[0]], name=name)[0]

    # --- shared inputs: the padding bias, the cache lengths, the rotary tables -----------------
    # Rotary tables: cos/sin of every position's angles, formed as transformers forms them (its module's
    # inv_freq, rope scaling included, times the float32 position), then rounded from float64. Not
    # torch's cos of the whole table: on this VM its second thread's half (positions >= 4096 of 8192)
    # came out up to 1.5e-4 off in some runs, a different table each export.
    # (longrope gets here only when its long factors are out of reach: its short ones, its initial inv_freq)
    def rotary_tables(rotary: Any, name: str) -> tuple[str, str]:
        inv_freq = getattr(rotary, "original_inv_freq", rotary.inv_freq).detach().to(torch.float32).cpu().numpy()
        angles = (np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        cos = init(name + ".cos", (np.cos(angles) * scaling).astype(np.float32))
        return cos, init(name + ".sin", (np.sin(angles) * scaling).astype(np.float32))

    tables = [rotary_tables(model.model.rotary_emb, "rotary")] * layers
    local = getattr(model.model, "rotary_emb_local", None)  # Gemma 3: the windowed layers' own base
    if local is not None:
        local_tables = rotary_tables(local, "rotary_local")
        tables = [local_tables if windows[i] else tables[i] for i in range(layers)]
    partial = {} if rotary_dim == head_dim else {"rotary_embedding_dim": rotary_dim}

    ids_shape = node("Shape", ["input_ids"])[0]
    batch = node("Slice", [ids_shape, const("c.0", [0]), const("c.1", [1])])[0]
    seq = node("Slice", [ids_shape, "c.1", const("c.2", [2])])[0]
    mask_shape = node("Shape", ["attention_mask"])[0]
    total = node("Slice", [mask_shape, "c.1", "c.2"])[0]  # (1,) int64: past + new
    total32 = node("Cast", [node("Squeeze", [total, const("c.axes0", [0])])[0]], to=TensorProto.INT32)[0]
    seqlens = node("Cast", [node("Expand", [node("Sub", [total, "c.1"])[0], batch])[0]], to=TensorProto.INT32)[0]
    mask_f = node("Cast", ["attention_mask"], to=TensorProto.FLOAT)[0]
    pad = node("Sub", [init("c.one", np.array(1.0, np.float32)), mask_f])[0]
    bias2 = node("Mul", [pad, init("c.min", np.array(np.finfo(np.float32).min, np.float32))])[0]
    bias4 = node("Unsqueeze", [bias2, const("c.axes12", [1, 2])])[0]
    bias_shape = node("Concat", [batch, "c.1", seq, total], axis=0)[0]
    bias = node("Expand", [bias4, bias_shape])[0]

    # --- the layers --------------------------------------------------------------------------
    table = state["model.embed_tokens.weight"]
    table_blocks = blocks_of(table)  # once: a tied output layer has the same (2.8 s for SmolLM2's table)
    residual = embedding(table, table_blocks)
    if gemma:  # transformers multiplies by sqrt(hidden) rounded to float32
        normalizer = init("embed.normalizer", np.array(hidden**0.5, np.float32))
        residual = node("Mul", [residual, normalizer], name="embed.scale")[0]
    x = node(
        "SimplifiedLayerNormalization",
        [residual, init("l0.ln1", state["model.layers.0.input_layernorm.weight"])],
        axis=-1,
        epsilon=eps,
        stash_type=1,
        name="l0.ln1",
    )[0]
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    split_qkv = const("c.split_qkv", [q_size, kv_size, kv_size])
    split_mlp = const("c.split_mlp", [config.intermediate_size, config.intermediate_size])
    presents = []
    for i in range(layers):
        p = f"model.layers.{i}."
        qkv = biased(x, f"l{i}.qkv", *_packed(state, p + "self_attn.", ("q_proj", "k_proj", "v_proj"), "qkv_proj"))
        q, k, v = node("Split", [qkv, split_qkv], 3, axis=-1, name=f"l{i}.split_qkv")
        if p + "self_attn.q_norm.weight" in state:  # Qwen3, Gemma 3
            q, k = (
                head_norm(t, state[f"{p}self_attn.{n}_norm.weight"], f"l{i}.{n}_norm") for t, n in ((q, "q"), (k, "k"))
            )
        q, k = (
            node(
                "RotaryEmbedding",
                [t, "position_ids", *tables[i]],
                domain=ms,
                name=f"l{i}.rotary_{n}",
                **(partial and {**partial, "num_heads": h}),
            )[0]
            for t, n, h in ((q, "q", heads), (k, "k", kv_heads))
        )
        pk, pv = f"present.{i}.key", f"present.{i}.value"
        attn = node(
            "GroupQueryAttention",
            [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total32, "", "", "", bias],
            [f"l{i}.attn", pk, pv],
            domain=ms,
            name=f"l{i}.attn",
            num_heads=heads,
            kv_num_heads=kv_heads,
            scale=scale,
            do_rotary=0,
            # The keys a query sees, itself included, as transformers' window: ONNX Runtime 1.31's CPU kernel
            # (older sources read it as one more)
            **({} if windows[i] is None else {"local_window_size": windows[i]}),
        )[0]
        presents += [pk, pv]
        o = biased(attn, f"l{i}.o", state[p + "self_attn.o_proj.weight"], state.get(p + "self_attn.o_proj.bias"))
        sandwich = p + "pre_feedforward_layernorm.weight" in state  # Gemma 2 and 3: norms after attention and MLP
        if sandwich:
            o = rms(o, state[p + "post_attention_layernorm.weight"], f"l{i}.post_attn")
        mlp_norm = "pre_feedforward_layernorm" if sandwich else "post_attention_layernorm"
        x, _, _, residual = node(
            "SkipSimplifiedLayerNormalization",
            [o, residual, init(f"l{i}.ln2", state[f"{p}{mlp_norm}.weight"])],
            4,
            domain=ms,
            epsilon=eps,
            name=f"l{i}.ln2",
        )
        gu = biased(x, f"l{i}.gate_up", *_packed(state, p + "mlp.", ("gate_proj", "up_proj"), "gate_up_proj"))
        g, u = node("Split", [gu, split_mlp], 2, axis=-1, name=f"l{i}.split_mlp")
        act = activation(g, f"l{i}.act")
        down = biased(
            node("Mul", [act, u], name=f"l{i}.gated")[0],
            f"l{i}.down",
            state[p + "mlp.down_proj.weight"],
            state.get(p + "mlp.down_proj.bias"),
        )
        if sandwich:
            down = rms(down, state[p + "post_feedforward_layernorm.weight"], f"l{i}.post_mlp")
        if i + 1 < layers:
            x, _, _, residual = node(
                "SkipSimplifiedLayerNormalization",
                [down, residual, init(f"l{i + 1}.ln1", state[f"model.layers.{i + 1}.input_layernorm.weight"])],
                4,
                domain=ms,
                epsilon=eps,
                name=f"l{i + 1}.ln1",
            )
    # --- the last position only --------------------------------------------------------------
    last = const("c.last", [-1])
    end = const("c.end", [np.iinfo(np.int64).max])
    h = node("Add", [node("Slice", [down, last, end, "c.1"])[0], node("Slice", [residual, last, end, "c.1"])[0]])[0]
    h = node(
        "SimplifiedLayerNormalization",
        [h, init("norm", state["model.norm.weight"])],
        axis=-1,
        epsilon=eps,
        stash_type=1,
        name="norm",
    )[0]
    head = state.get("lm_head.weight", table)
    tied = head is table or np.array_equal(head, table)
    if tied and table_blocks is None and not quantize:
        # A float32 output layer tied to the float32 embedding: Gemm reads the Gather's table transposed
        # (transB), as fast as a MatMul on a transposed copy, which would store the table twice.
        weights["float32"] += 1
        flat = node("Reshape", [h, const("c.rows", [-1, hidden])], name="lm_head.rows")[0]
        logits = node("Gemm", [flat, "embed"], transB=1, name="lm_head")[0]
        logits = node("Unsqueeze", [logits, "c.1"], name="lm_head.3d")[0]
    else:
        logits = linear(h, "lm_head", head, table_blocks if tied else None, output_layer=True)
    final_cap = getattr(config, "final_logit_softcapping", None)
    if final_cap:  # Gemma 2: cap * tanh(logits / cap)
        cap = init("c.final_softcap", np.array(final_cap, np.float32))
        logits = node("Mul", [node("Tanh", [node("Div", [logits, cap])[0]])[0], cap], name="softcap")[0]
    node("Identity", [logits], ["logits"], name="logits")

    def value(name: str, elem: int, dims: list) -> Any:
        return helper.make_tensor_value_info(name, elem, dims)

    inputs = [
        value("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        value("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        value("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [value("logits", TensorProto.FLOAT, ["batch_size", 1, config.vocab_size])]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(
                value(
                    f"past_key_values.{i}.{kind}",
                    TensorProto.FLOAT,
                    ["batch_size", kv_heads, "past_sequence_length", head_dim],
                )
            )
            outputs.append(
                value(
                    f"present.{i}.{kind}",
                    TensorProto.FLOAT,
                    ["batch_size", kv_heads, "total_sequence_length", head_dim],
                )
            )
    graph = helper.make_graph(nodes, GRAPH_NAME, inputs, outputs, inits)
    proto = helper.make_model(
        graph,
        producer_name="onnxpipe",
        opset_imports=[helper.make_opsetid("", opset or 17), helper.make_opsetid(ms, 1)],
    )
    proto.ir_version = 8
    path = Path(out) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    if sum(len(t.raw_data) for t in inits) > EXTERNAL_DATA_BYTES:
        onnx.save_model(
            proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx_data"
        )
    else:
        onnx.save_model(proto, str(path))
    return path.name, weights


def export(
    model: Any, out: Path, opset: int | None = None, quantize: str | None = None
) -> tuple[dict[str, str], dict[str, int]]:
    """The export folder's graph and configs, as optimum writes them: ({"model": file}, weight kinds).
    QUANTIZE (int4, int8) stores the weights as integer-compute MatMulNBits (export.nbits)."""
    out = Path(out)
    name, weights = build(model, out, opset, quantize=quantize)
    save_configs(model, out)
    return {"model": name}, weights


def save_configs(model: Any, out: Path) -> None:
    """MODEL's config.json and generation_config.json in OUT, as optimum writes them beside its graphs."""
    generation = getattr(model, "generation_config", None)
    if generation is not None:  # as optimum does: generation settings left in config.json move over
        for key, value in model.config._get_non_default_generation_parameters().items():
            setattr(generation, key, value)
            setattr(model.config, key, None)
    model.config.save_pretrained(out)
    if generation is not None:
        try:
            generation.save_pretrained(out)
        except Exception:  # transformers refuses to save an invalid one; optimum then skips it too
            pass
