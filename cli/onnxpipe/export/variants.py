"""Export variants: int8 dynamic quantisation (CPU) and fp16 (CUDA).

Graph optimisation (--optimize O1|O2|O3) happens inside the optimum export, before the decoders
are merged, because optimum's optimiser cannot rewrite a merged decoder afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from onnxpipe.errors import DeviceError, ExportError

OPTIMIZATION_LEVELS = ("O1", "O2", "O3")
QUANTIZATIONS = ("int8",)


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
    reason = cuda_unusable_reason()
    if reason:
        raise DeviceError(
            f"--fp16 builds a CUDA model and needs a working CUDA provider to validate it, but {reason}",
            hint="export fp32 (or --quantize int8 for the CPU) here, or run the fp16 export on a GPU machine",
        )


# MatMuls whose inputs carry the large activation outliers of decoder LMs (MLP down projections)
# and the vocabulary projection: quantising them costs SmolLM2-135M its greedy output (logit
# cosine 0.82 -> 0.97 and top-1 agreement 69% -> 92% when they stay fp32).
_KEEP_FP32 = ("down_proj", "lm_head", "mlp/c_proj", "/fc2/", "/wo/")


def quantize_int8(folder: Path, files: list[str], family: str) -> dict:
    """Dynamic int8 quantisation (int8 weights, activations quantised at run time) in place."""
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
                for n in _all_nodes(graph)
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


def _all_nodes(graph):
    """Nodes of GRAPH and of its subgraphs (a merged decoder keeps its layers inside If branches)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)


def convert_fp16(folder: Path, files: list[str]) -> None:
    """fp16 weights and compute, fp32 inputs and outputs (the runtime feeds the same arrays)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    for name in files:
        path = folder / name
        try:
            model = onnx.load(str(path))
            model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
            onnx.save(model, str(path), save_as_external_data=model.ByteSize() > (1 << 31) - (1 << 24))
        except Exception as exc:
            raise ExportError(
                f"fp16 conversion of {name} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None


def _replace_onnx(new: Path, old: Path) -> None:
    """Put NEW in OLD's place. An external data file keeps its name: the new graph refers to it."""
    for stale in (old.with_name(old.name + "_data"), old.with_name(old.name + ".data")):
        stale.unlink(missing_ok=True)
    new.replace(old)
