"""Export variants: int8 (CPU), fp16 and bf16 (CUDA).

int8 on encoders and encoder-decoders is export.int8's per-row quantisation (batch-independent); on
decoder-only graphs from optimum, dynamic quantisation.

On onnxpipe's fused decoder graph, --quantize int8|int4 is weight quantisation into integer-compute
MatMulNBits instead (export/nbits.py); int4 exists only there.

Graph optimisation (--optimize O1|O2|O3) happens inside the optimum export, before the decoders
are merged, because optimum's optimiser cannot rewrite a merged decoder afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from onnxpipe.errors import DeviceError, ExportError
from onnxpipe.export.int8 import all_graphs

OPTIMIZATION_LEVELS = ("O1", "O2", "O3")
QUANTIZATIONS = ("int8", "int4")


def cuda_unusable_reason() -> str | None:
    """None where a CUDA session really runs; else why not.

    onnxruntime-gpu lists CUDAExecutionProvider even where the CUDA libraries or the GPU are
    missing, and then silently falls back to the CPU: only a real session tells.
    """
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"this onnxruntime ({ort.__version__}) has no CUDA execution provider"
    from onnx import TensorProto, helper

    from onnxpipe.runtime.sessions import make_session

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    probe.ir_version = 8
    options = ort.SessionOptions()
    options.log_severity_level = 4
    previous = 2
    ort.set_default_logger_severity(4)  # the failed CUDA load logs a multi-line error otherwise
    try:
        session = make_session(probe.SerializeToString(), options=options, providers=["CUDAExecutionProvider"])
        if "CUDAExecutionProvider" not in session.get_providers():
            return "the CUDA execution provider cannot load here (no GPU, driver or CUDA libraries)"
    except Exception as exc:  # noqa: BLE001 - any failure means "no CUDA"
        return f"the CUDA execution provider failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    finally:
        ort.set_default_logger_severity(previous)
    return None


def require_cuda_for_fp16() -> None:
    _require_cuda("--fp16")


def require_cuda_for_bf16() -> None:
    _require_cuda("--bf16")


def _require_cuda(flag: str) -> None:
    """--fp16 and --bf16 export a CUDA model: validating it needs a CUDA session (bf16 has no CPU kernels)."""
    reason = cuda_unusable_reason()
    if reason:
        raise DeviceError(
            f"{flag} builds a CUDA model and needs a working CUDA provider to validate it, but {reason}",
            hint="export fp32 (or --quantize int8 for the CPU) here, or run the fp16 export on a GPU machine",
        )


# MatMuls whose inputs carry the large activation outliers of decoder LMs (MLP down projections)
# and the vocabulary projection: quantising them costs SmolLM2-135M its greedy output (logit
# cosine 0.82 -> 0.97 and top-1 agreement 69% -> 92% when they stay fp32).
_KEEP_FP32 = ("down_proj", "lm_head", "mlp/c_proj", "/fc2/", "/wo/")


def quantize_int8(folder: Path, files: list[str], family: str, calibration: dict | None = None) -> dict:
    """int8 in place: encoders and encoder-decoders get per-row activation scales (export.int8), so a
    record's result never depends on its batch, or with CALIBRATION (calibrate_int8's record, encoders)
    constant ones; decoder-only graphs from optimum keep dynamic quantisation."""
    if calibration is not None:
        return quantize_int8_rows(folder, files, "static", calibration)
    if family in ("encoder", "seq2seq"):
        return quantize_int8_rows(folder, files)
    return _quantize_int8_dynamic(folder, files, family)


CALIBRATION_BATCH = 16


def calibrate_int8(model_file: Path, tokenizer, texts: list[str], pad_id: int | None, source: str) -> dict:
    """The (min, max) over TEXTS' real tokens of every activation that int8 quantises in the float32
    encoder MODEL_FILE: {"ranges": {name: (min, max)}, "texts": n, "file": SOURCE}."""
    import numpy as np
    import onnx
    from onnx import helper

    from onnxpipe.export import int8
    from onnxpipe.export.validate import _encode, _pad, session

    model = onnx.load(str(model_file))
    names = int8.calibration_inputs(model)
    known = {o.name for o in model.graph.output}
    for name in names:
        if name not in known:
            model.graph.output.append(helper.make_value_info(name, onnx.TypeProto()))
    probe = model_file.with_name(".calibration.onnx")
    big = model.ByteSize() > (1 << 31) - (1 << 24)  # past protobuf's 2 GB: the weights beside it
    onnx.save(model, str(probe), save_as_external_data=big, location=probe.name + ".data")
    try:
        sess = session(probe)
    finally:
        probe.unlink(missing_ok=True)
        probe.with_name(probe.name + ".data").unlink(missing_ok=True)
    inputs = [i.name for i in sess.get_inputs()]
    ranges: dict[str, tuple[float, float]] = {}
    for start in range(0, len(texts), CALIBRATION_BATCH):
        batch = _pad(_encode(tokenizer, texts[start : start + CALIBRATION_BATCH]), pad_id or 0)
        mask = batch["attention_mask"].astype(bool)
        for name, value in zip(names, sess.run(names, {n: batch[n] for n in inputs})):
            if value.ndim == 3 and value.shape[:2] == mask.shape:  # per token: real positions only
                value = value[mask]
            if value.size:
                low, high = float(value.min()), float(value.max())
                old = ranges.get(name, (low, high))
                ranges[name] = (min(old[0], low), max(old[1], high))
    if not np.isfinite([v for r in ranges.values() for v in r]).all():
        raise ExportError("calibration: an activation of the float32 graph is not finite on the calibration text")
    return {"ranges": ranges, "texts": len(texts), "file": source}


def quantize_int8_rows(folder: Path, files: list[str], method: str = "rows", calibration: dict | None = None) -> dict:
    """export.int8's pass over each graph of FILES in FOLDER, in place; returns the manifest's record.

    The graphs are read without their external data: the pass reads the weights it quantises from the
    folder, and what it leaves alone (an embedding table, onnxpipe's shared embed_tokens.bin) stays where it
    was. Weight files that no graph reads any more are removed at the end."""
    import onnx

    from onnxpipe.export import int8

    def locations(model) -> set[str]:
        return {
            entry.value
            for graph in int8.all_graphs(model.graph)
            for init in graph.initializer
            for entry in init.external_data
            if entry.key == "location"
        }

    totals = {"converted": 0, "kept": 0, "per_row": 0}
    before: set[str] = set()
    after: set[str] = set()
    for name in files:
        path = folder / name
        try:
            model = onnx.load(str(path), load_external_data=False)
            before |= locations(model)
            counts = int8.quantize_graph(model, method, base_dir=str(folder), ranges=(calibration or {}).get("ranges"))
            after |= locations(model)
            if model.ByteSize() > (1 << 31) - (1 << 24):
                raise ValueError("the int8 graph is over the 2 GB protobuf limit")
            new = folder / f"{path.stem}_int8.onnx"
            onnx.save(model, str(new))
        except Exception as exc:
            raise ExportError(
                f"int8 quantisation of {name} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None
        new.replace(path)
        totals = {k: totals[k] + counts[k] for k in totals}
    for location in before - after:  # only float32 weights, now int8 inside the graphs
        (folder / location).unlink(missing_ok=True)
    record = {k: v for k, v in (calibration or {}).items() if k != "ranges"}
    return int8.describe(totals, method, record if calibration else None)


def _quantize_int8_dynamic(folder: Path, files: list[str], family: str) -> dict:
    """Dynamic int8 quantisation (int8 weights, activations quantised at run time, one scale per batch) in place."""
    import onnx
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    excluded = 0
    for name in files:
        path = folder / name
        keep = []
        if family in ("decoder", "seq2seq"):
            graph = onnx.load(str(path), load_external_data=False).graph
            keep = [
                n.name
                for g in all_graphs(graph)
                for n in g.node
                if n.op_type in ("MatMul", "Gemm") and any(k in n.name for k in _KEEP_FP32)
            ]
            excluded += len(keep)
        config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True, nodes_to_exclude=keep)
        try:
            quantizer = ORTQuantizer.from_pretrained(folder, file_name=name)
            with _default_tensor_type_float():
                quantizer.quantize(
                    save_dir=folder,
                    quantization_config=config,
                    file_suffix="int8",
                    use_external_data_format=path.stat().st_size > (1 << 31) - (1 << 24),
                )
        except Exception as exc:
            raise ExportError(
                f"int8 quantisation of {name} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None
        _replace_onnx(folder / f"{path.stem}_int8.onnx", path)
    return {"method": "dynamic", "weights": "int8 per-channel", "kept_fp32_matmuls": excluded}


@contextmanager
def _default_tensor_type_float():
    """Quantise graphs that --optimize fused (Attention, SkipLayerNormalization, ...).

    onnx's shape inference gives no type to the outputs of those contrib operators, and onnxruntime's
    quantiser then stops ("Unable to find data type for weight_name=..."); its own advice is the extra
    option DefaultTensorType=FLOAT, which optimum does not pass through, so it is added here.
    """
    import onnx
    import optimum.onnxruntime.quantization as optimum_quantization

    base = optimum_quantization.ONNXQuantizer

    class Quantizer(base):
        def __init__(self, *args, **kwargs):
            extra = dict(kwargs.pop("extra_options", None) or {})
            extra.setdefault("DefaultTensorType", onnx.TensorProto.FLOAT)
            super().__init__(*args, extra_options=extra, **kwargs)

    optimum_quantization.ONNXQuantizer = Quantizer
    try:
        yield
    finally:
        optimum_quantization.ONNXQuantizer = base


def convert_fp16(folder: Path, files: list[str]) -> None:
    """fp16 weights and compute, fp32 inputs and outputs (the runtime feeds the same arrays)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    for name in files:
        path = folder / name
        try:
            model = onnx.load(str(path))
            private_branch_outputs(model)
            model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
            onnx.save(model, str(path), save_as_external_data=model.ByteSize() > (1 << 31) - (1 << 24))
        except Exception as exc:
            raise ExportError(
                f"fp16 conversion of {name} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None


def private_branch_outputs(model) -> None:
    """Rename, inside every subgraph, the values named like a graph output (in place).

    A merged decoder's If returns `logits` and its branches compute values of the same name. With
    keep_io_types, convert_float_to_float16 renames the producer of each graph output to a cast's input,
    and it renames the branches' producers too, so a branch would return the outer `logits` and ONNX
    Runtime refuses the graph ("Subgraph output (logits) is an outer scope value")."""
    outputs = {o.name for o in model.graph.output}

    def rename(graph, suffix: str) -> None:
        for node in graph.node:
            node.input[:] = [f"{n}{suffix}" if n in outputs else n for n in node.input]
            node.output[:] = [f"{n}{suffix}" if n in outputs else n for n in node.output]
            for attr in node.attribute:
                if attr.HasField("g"):
                    rename(attr.g, suffix)
                for sub in attr.graphs:
                    rename(sub, suffix)
        for value in [*graph.output, *graph.value_info]:
            if value.name in outputs:
                value.name += suffix

    for i, node in enumerate(model.graph.node):
        for attr in node.attribute:
            if attr.HasField("g"):
                rename(attr.g, f"__{i}_{attr.name}")
            for j, sub in enumerate(attr.graphs):
                rename(sub, f"__{i}_{attr.name}{j}")


def _replace_onnx(new: Path, old: Path) -> None:
    """Put NEW in OLD's place. An external data file keeps its name: the new graph refers to it."""
    for stale in (old.with_name(old.name + "_data"), old.with_name(old.name + ".data")):
        stale.unlink(missing_ok=True)
    new.replace(old)


# bf16: ONNX Runtime's CPU provider has no bfloat16 MatMul, Gemm or Add kernel (1.31, checked on this
# project's avx512_bf16 machine), so bf16 is a CUDA variant, validated there as fp16 is.
BF16_MAX_RETRIES = 12  # ops left in fp32 one by one where the CUDA provider has no bfloat16 kernel


def convert_bf16(folder: Path, files: list[str], probe=None) -> list[str]:
    """bfloat16 weights and compute, fp32 inputs and outputs; returns the op types kept in float32.

    onnxruntime's converter writes float16 only, so the graph is converted to float16 (keep_io_types, its
    op block list) and every float16 type, Cast and initializer is then made bfloat16, the initializers
    rounded from their float32 values (float16 would have clamped them). PROBE(path) makes a session of
    the converted graph (CUDA): where the provider has no bfloat16 kernel for an op, onnxruntime says
    "Could not find an implementation for OP(..)", that op type is kept in float32 and the graph converted again.
    """
    import re

    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    kept: list[str] = []
    for name in files:
        path = folder / name
        original = onnx.load(str(path))
        block = list(DEFAULT_OP_BLOCK_LIST)
        for _ in range(BF16_MAX_RETRIES):
            model = onnx.ModelProto()
            model.CopyFrom(original)
            private_branch_outputs(model)
            try:
                model = convert_float_to_float16(
                    model, keep_io_types=True, disable_shape_infer=True, op_block_list=block
                )
                to_bfloat16(model, original)
                onnx.save(model, str(path), save_as_external_data=model.ByteSize() > (1 << 31) - (1 << 24))
            except Exception as exc:
                raise ExportError(
                    f"bf16 conversion of {name} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                ) from None
            if probe is None:
                break
            try:
                probe(path)
                break
            except Exception as exc:
                missing = re.search(r"Could not find an implementation for (\w+)\(", str(exc))
                if not missing or missing.group(1) in block:
                    raise ExportError(
                        f"the bf16 graph of {name} does not load: {str(exc).splitlines()[0][:300]}"
                    ) from None
                block.append(missing.group(1))
                kept.append(missing.group(1))
        else:
            raise ExportError(f"bf16: more than {BF16_MAX_RETRIES} op types of {name} lack bfloat16 kernels")
    return sorted(set(kept))


def to_bfloat16(model, original=None) -> None:
    """Every float16 in MODEL (a graph converted by convert_float_to_float16) made bfloat16, in place:
    value types, Cast targets, initializers (from ORIGINAL's float32 values where the name is there), tensor
    attributes (Constant, ConstantOfShape), in subgraphs too."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    f16, bf16 = TensorProto.FLOAT16, TensorProto.BFLOAT16
    source = {}
    if original is not None:
        for graph in all_graphs(original.graph):
            for init in graph.initializer:
                if init.data_type == TensorProto.FLOAT and not init.external_data:
                    source[init.name] = init

    def retensor(tensor, fp32=None) -> None:
        if tensor.data_type != f16:
            return
        values = numpy_helper.to_array(fp32 if fp32 is not None else tensor).astype(np.float32)
        bits = bfloat16_bits(values)
        name, dims = tensor.name, list(tensor.dims)
        tensor.Clear()
        tensor.name, tensor.data_type = name, bf16
        tensor.dims.extend(dims)
        tensor.raw_data = bits.astype("<u2").tobytes()

    def retype(value_type) -> None:
        if value_type.tensor_type.elem_type == f16:
            value_type.tensor_type.elem_type = bf16
        if value_type.HasField("sequence_type"):
            retype(value_type.sequence_type.elem_type)

    for graph in all_graphs(model.graph):
        for init in graph.initializer:
            retensor(init, source.get(init.name))
        for value in [*graph.input, *graph.output, *graph.value_info]:
            retype(value.type)
        for node in graph.node:
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == f16:
                    attr.i = bf16
                elif attr.name in ("dtype", "to") and attr.i == f16:
                    attr.i = bf16
                if attr.HasField("t"):
                    retensor(attr.t)
                for tensor in attr.tensors:
                    retensor(tensor)


def bfloat16_bits(values):
    """float32 array -> uint16 bfloat16 bit patterns, rounded to nearest even (NaN kept NaN)."""
    import numpy as np

    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)
