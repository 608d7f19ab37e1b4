"""Weight quantisation for the fused decoder graph: `MatMulNBits` operands with integer compute.

`onnxpipe export --quantize int4|int8` on a text-generation model that gets the fused graph
(export/fused.py) stores its weight matrices as `MatMulNBits` operands run at accuracy level 4: ONNX
Runtime quantises the activations to int8 per block of 32 and multiplies in integers (VNNI), as
onnxruntime-genai's model builder does. At level 1 the 4-bit kernel dequantises every weight to float32
before its multiply-add, and that, not memory, is most of a batch-1 step.

    int4: round-to-nearest 4-bit, blocks of 32 along the input dimension, a float32 scale and a uint8
          zero point per block (w = scale * (q - zero)). A matrix that is exactly GGUF blocks (a
          checkpoint converted from a .gguf) keeps them (fused.exact_blocks): no second rounding. The
          output layer is 8-bit (OUTPUT_BITS): at 4 bits it costs the most agreement for the least time.
    int8: round-to-nearest 8-bit, symmetric (the default zero point 128), blocks of 32.

The embedding table becomes GatherBlockQuantized (8-bit symmetric) where it is not GGUF blocks already.
Zero points are packed integers, never floats: a float zero point sends MatMulNBits to a path that
dequantises the whole matrix on every run (20x slower, BENCHMARKS.md).

What it costs on SmolLM2-135M (benchmarks/quantize.py; teacher-forced on onnxpipe's held-out text, 2,797
tokens, against the float32 graph): int4 of the Q4_1 GGUF, 96.4% top-1 agreement, perplexity x 1.003;
int8, 95.9%, x 1.007; int4 rounding the GGUF's float32 values again (what a float32 checkpoint gets),
68.3%, x 1.19. Every int8-compute variant misses the 98% agreement target, so a plain export stays exact
(float32 compute) and these are opt-in. Keeping float32 compute for the output layer or the down
projections (FLOAT_COMPUTE) gained at most 0.2 points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32  # weights per block along the input dimension (GGUF's and onnxruntime-genai's block)
QUANTIZATIONS = ("int4", "int8")
ACCURACY_LEVEL = 4  # MatMulNBits' int8 compute: activations quantised per block
OUTPUT_BITS = {"int4": 8, "int8": 8}  # the output layer (the largest matrix, the most sensitive)
# Matrices (by their name's ending in the fused graph: ".qkv", ".o", ".gate_up", ".down", "lm_head") that keep
# float32 compute (accuracy level 1) in a quantised export: int8 activations cost them the most agreement.
FLOAT_COMPUTE: tuple[str, ...] = ()


@dataclass
class Operand:
    """One MatMulNBits weight: w = scale * (q - zero) (+ offset) per block of BLOCK inputs of an (out, in)
    matrix. zero is a constant (MatMulNBits' default 2^(bits-1) when it is that, else stored) or one
    uint8 per block; offsets (Q4_1's m) are added outside the operator."""

    q: np.ndarray  # (out, in // BLOCK, BLOCK) uint8, 0 .. 2^bits - 1
    scales: np.ndarray  # (out, in // BLOCK) float32
    bits: int
    zero: int | np.ndarray  # an int for every block, or (out, in // BLOCK) uint8
    offsets: np.ndarray | None = None  # (out, in // BLOCK) float32

    def packed(self) -> np.ndarray:
        """MatMulNBits' B: (out, blocks, BLOCK * bits / 8) bytes; at 4 bits the first of a pair is the low nibble."""
        return _pack(self.q, self.bits)

    def zero_points(self) -> np.ndarray | None:
        """MatMulNBits' zero_points input, (out, ceil(blocks * bits / 8)) bytes, or None for the default."""
        rows, blocks = self.scales.shape
        zero = self.zero
        if isinstance(zero, (int, np.integer)):
            if zero == 1 << (self.bits - 1):
                return None
            zero = np.full((rows, blocks), zero, np.uint8)
        return _pack(np.asarray(zero, np.uint8), self.bits)

    def dequantized(self) -> np.ndarray:
        """The (out, in) float64 weights that the operand stands for."""
        zero = self.zero if isinstance(self.zero, (int, np.integer)) else np.asarray(self.zero)[..., None]
        w = (self.q.astype(np.float64) - zero) * self.scales[..., None].astype(np.float64)
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        return w.reshape(w.shape[0], -1)


def accuracy_level(name: str) -> int:
    """MatMulNBits' accuracy_level for the fused graph's matrix NAME in a quantised export."""
    return 1 if name.endswith(FLOAT_COMPUTE) else ACCURACY_LEVEL


def for_level(parts: list[Operand], level: int) -> list[Operand]:
    """PARTS as LEVEL computes them fast: at level 1 an 8-bit operand becomes two 4-bit ones, q = 16 hi + lo
    (8-bit MatMulNBits in float32 dequantises the whole matrix on every run: 7x slower on SmolLM2's output layer)."""
    if level != 1:
        return parts
    out = []
    for p in parts:
        if p.bits != 8:
            out.append(p)
            continue
        if not (isinstance(p.zero, (int, np.integer)) and p.zero == 128) or p.offsets is not None:
            raise ValueError("only symmetric 8-bit operands split into 4-bit halves")
        # w = s (q - 128) = 16 s (hi - 8) + s lo, with hi = q >> 4 and lo = q & 15
        out.append(Operand(p.q >> 4, p.scales * np.float32(16), 4, 8))
        out.append(Operand(p.q & 15, p.scales, 4, 0))
    return out


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis, two 4-bit values a byte (low nibble first, an odd count padded), or one 8-bit a byte."""
    q = q.astype(np.uint8)
    if bits == 8:
        return q
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros((*q.shape[:-1], 1), np.uint8)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _blocks(w: np.ndarray) -> np.ndarray:
    rows, cols = w.shape
    if cols % BLOCK:
        raise ValueError(f"{cols} inputs are not whole blocks of {BLOCK}")
    return w.astype(np.float32, copy=False).reshape(rows, cols // BLOCK, BLOCK)


def rtn4(w: np.ndarray) -> Operand:
    """Round-to-nearest 4-bit with a zero point, per block: the range [min(w, 0), max(w, 0)] in 16 levels
    (zero stays exact, as in ONNX Runtime's own MatMulNBits quantiser)."""
    b = _blocks(w)
    f32 = np.float32
    lo = np.minimum(b.min(-1), f32(0))
    hi = np.maximum(b.max(-1), f32(0))
    scale = ((hi - lo) / f32(15)).astype(f32)
    safe = np.where(scale > 0, scale, f32(1))
    zero = np.clip(np.rint(-lo / safe), 0, 15).astype(np.uint8)
    q = np.clip(np.rint(b / safe[..., None]) + zero[..., None], 0, 15).astype(np.uint8)
    return Operand(q, scale, 4, zero)


def rtn8(w: np.ndarray) -> Operand:
    """Round-to-nearest 8-bit, symmetric per block: scale = max |w| / 127, q = round(w / scale) + 128."""
    b = _blocks(w)
    f32 = np.float32
    scale = (np.abs(b).max(-1) / f32(127)).astype(f32)
    safe = np.where(scale > 0, scale, f32(1))
    q = (np.clip(np.rint(b / safe[..., None]), -127, 127) + 128).astype(np.uint8)
    return Operand(q, scale, 8, 128)


def from_gguf(found, centred: bool = False) -> tuple[str, list[Operand]]:
    """fused.exact_blocks' (kind, Nibbles) as Operands: the same 4-bit values, scales and offsets.

    CENTRED (for int8 compute) writes Q4_1's w = d q + m as d (q - z) + (m + d z), z = round(-m / d): the
    same weights, but the int8-quantised activations meet the centred d (q - z) instead of d q, whose
    large mean (about -m) multiplied their rounding error (SmolLM2: 91.8% top-1 agreement with float32
    uncentred). The small remainder m + d z stays in the float32 offsets term."""
    kind, parts = found
    out = []
    for p in parts:
        if centred and p.offsets is not None:
            safe = np.where(p.scales > 0, p.scales, np.float32(1))
            zero = np.clip(np.rint(-p.offsets / safe), 0, 15).astype(np.uint8)
            rest = (p.offsets + p.scales * zero.astype(np.float32)).astype(np.float32)
            out.append(Operand(p.q, p.scales, 4, zero, rest))
        else:
            out.append(Operand(p.q, p.scales, 4, p.zero, p.offsets))
    return kind, out


def quantize(w: np.ndarray, quantization: str | None, found=None, output_layer: bool = False):
    """W as (kind, [Operand]) for MatMulNBits, or None where it stays a float32 MatMul.

    QUANTIZATION None keeps only exact GGUF blocks (FOUND, from fused.exact_blocks); int4 keeps them too
    and rounds every other matrix; int8 rounds every matrix (GGUF blocks included) to 8 bits. The output
    layer gets OUTPUT_BITS."""
    if quantization is None:
        return from_gguf(found) if found is not None else None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}")
    if w.shape[1] % BLOCK:
        return None
    bits = OUTPUT_BITS[quantization] if output_layer else (4 if quantization == "int4" else 8)
    if bits == 4 and found is not None:
        return from_gguf(found, centred=True)
    if bits == 4:
        return "int4", [rtn4(w)]
    if found is not None and found[0] == "q8_0":  # Q8_0 is exactly 8-bit symmetric: keep its values
        hi, lo = found[1]
        q = (hi.q.astype(np.int16) - 8) * 16 + lo.q
        return "q8_0", [Operand((q + 128).astype(np.uint8), lo.scales, 8, 128)]
    return "int8", [rtn8(w)]


def embedding_table(table: np.ndarray, quantization: str | None, found=None):
    """(data, scales, bits) for GatherBlockQuantized (default zero points), or None for a float32 Gather.

    GGUF Q8_0 and Q4_0 tables are kept as they are; with a QUANTIZATION any other table is 8-bit."""
    if found is not None and found[0] == "q8_0":  # q = 16 hi + lo, stored as q + 128
        hi, lo = found[1]
        q = (hi.q.astype(np.int16) - 8) * 16 + lo.q
        return (q + 128).astype(np.uint8).reshape(table.shape[0], -1), lo.scales, 8
    if found is not None and found[0] == "q4_0":
        return found[1][0].packed().reshape(table.shape[0], -1), found[1][0].scales, 4
    if quantization is None or table.shape[1] % BLOCK:
        return None
    op = rtn8(table)
    return op.packed().reshape(table.shape[0], -1), op.scales, 8


def describe(quantization: str) -> dict:
    """The manifest's `quantization` record of a fused-graph variant."""
    return {
        "method": "MatMulNBits round-to-nearest" + (", GGUF blocks kept" if quantization == "int4" else ""),
        "weights": f"{4 if quantization == 'int4' else 8}-bit blocks of {BLOCK}",
        "bits": 4 if quantization == "int4" else 8,
        "output_layer_bits": OUTPUT_BITS[quantization],
        "embedding": "8-bit GatherBlockQuantized (GGUF Q8_0/Q4_0 tables kept)",
        "block_size": BLOCK,
        "accuracy_level": ACCURACY_LEVEL,
    }
