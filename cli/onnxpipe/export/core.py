"""checkpoint -> optimum export -> post-process -> validate -> atomic rename.

export_model() is the one entry point that the CLI and the tests call. It never prints: stages
are reported through the `progress` callback, and library chatter is kept off stderr (see quiet.py).

The export is built in a hidden folder beside the target (`.NAME.onnxpipe-tmp-PID-XXXX/`) and
renamed into place only after validation passed, so a killed or failed export leaves nothing
under the final name. SIGTERM takes the same way out as Ctrl-C (the temporary is removed); after
`kill -9`, the stray temporaries (and `-old` folders) of dead processes are removed by the next
export to the same parent folder, links unlinked, never followed.

The target is the user's: `--force` replaces an onnxpipe export (a folder whose `onnxpipe.json`
parses as ours, holding nothing onnxpipe did not write) and nothing else. An empty folder is
used as it is; any other folder, a symbolic link, the source checkpoint, a folder inside it or
around it, and the current folder (unless it is an export) are refused before anything is written.

Manifest keys beyond manifest.py's list: `source.weights` (file names hashed), `tokenizer.check`
(the fast/slow comparison), `graph.encoder_inputs`/`encoder_outputs` (seq2seq), and
`validation.fp32` (the fp32 report a variant was built from), `validation.quality` (fused-graph int4/int8:
teacher-forced agreement and perplexity against the fp32 graph, with their thresholds), `quantization` (int8
and int4: method, weights, how many MatMuls were kept in fp32 or, on the fused graph, the MatMulNBits bits and
accuracy level), and for feature-extraction from sentence-transformers files: `dense` (a list of {"weight", "bias": .npy paths in the export, "activation", "shape"}) and
`max_seq_length`; `pooling` may join several modes with "+" ("cls+mean"), as sentence-transformers concatenates them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from onnxpipe.errors import ExportError, OnnxpipeError, SourceError, UsageError, require_extra
from onnxpipe.export.tasks import FAMILY, check_exportable, check_task, infer_task, optimum_task
from onnxpipe.manifest import checksums, looks_like_export, write_manifest

Progress = Callable[[str, str], None]
TMP_MARK = ".onnxpipe-tmp-"
STAGES = ("load", "export", "validate", "write")
FP16_PROVIDER = "CUDAExecutionProvider"  # fp16 is built for, and validated on, CUDA
GRAPHS = ("auto", "fused", "optimum")  # who writes the graph: auto = onnxpipe's fused one where it applies
NAME_MAX = 255  # bytes in one path component on Linux and macOS file systems
# --validate-with: the validators use at most 256 lines, and tokenize each whole before they truncate,
# so a 20 MB line would cost GBs. Like the streaming commands, cut long lines before tokenizing.
VALIDATION_LINES = 256
VALIDATION_LINE_CHARS = 16_000
VALIDATION_BYTES = 256 << 20  # read no further than this (a file of one endless line)


def _no_progress(stage: str, message: str) -> None:
    pass


def require_export_stack() -> None:
    """Fail with "install onnxpipe[export]" before anything else when the export extra is missing."""
    require_extra("export", "onnxpipe export", "torch", "transformers", "optimum.exporters.onnx", "onnx")


def export_model(
    source: str | Path,
    output: str | Path,
    task: str | None = None,
    *,
    force: bool = False,
    optimize: str | None = None,
    quantize: str | None = None,
    fp16: bool = False,
    bf16: bool = False,
    validate_with: str | Path | None = None,
    calibration: str | Path | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    opset: int | None = None,
    graph: str = "auto",
    device: str = "auto",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Export SOURCE (folder, .gguf file or hub id) into the folder OUTPUT; return the manifest written there.

    DEVICE is the target: cuda makes the fused graph's decoders (Llama, Qwen2, Mistral, Phi-3, Gemma) onnxpipe's fused CUDA graph (export.cuda_graph,
    validated through its CPU twin, so no GPU is needed here); cpu its fused CPU graph; auto as cpu where
    CUDA does not run, else optimum's graph, which runs on both."""
    from onnxpipe.export.variants import OPTIMIZATION_LEVELS, QUANTIZATIONS

    progress = progress or _no_progress
    output = Path(os.path.abspath(Path(output).expanduser()))  # `-o .` and `-o ../x` get a real name
    require_export_stack()
    if task is not None:
        check_task(task)
    if optimize is not None and optimize not in OPTIMIZATION_LEVELS:
        raise UsageError(f"unknown optimisation level {optimize!r}", hint="one of: " + ", ".join(OPTIMIZATION_LEVELS))
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise UsageError(f"unknown quantisation {quantize!r}", hint="one of: " + ", ".join(QUANTIZATIONS))
    if fp16 and bf16:
        raise UsageError("--fp16 and --bf16 exclude each other", hint="choose one half precision")
    if bf16 and quantize:
        raise UsageError("--bf16 and --quantize exclude each other", hint="bf16 is for CUDA, --quantize for the CPU")
    if fp16 and quantize:
        raise UsageError("--fp16 and --quantize exclude each other", hint="fp16 is for CUDA, int8 and int4 for the CPU")
    if graph not in GRAPHS:
        raise UsageError(f"unknown graph {graph!r}", hint="one of: " + ", ".join(GRAPHS))
    if calibration is not None and quantize != "int8":
        raise UsageError(
            "--calibration sets the scales of --quantize int8", hint="add --quantize int8, or leave --calibration out"
        )
    device = _export_device(device, quantize)
    _check_target(output, force, source)
    texts, inputs_note = _validation_texts(validate_with)
    calibration_texts = _validation_texts(calibration, "--calibration")[0] if calibration is not None else None
    if fp16:
        from onnxpipe.export.variants import require_cuda_for_fp16

        require_cuda_for_fp16()  # before anything is written
    if bf16:
        from onnxpipe.export.variants import require_cuda_for_bf16

        require_cuda_for_bf16()

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(output.parent)
        # The name is cut in the temporary's: NAME + the mark must fit in NAME_MAX too.
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name[:64]}{TMP_MARK}{os.getpid()}-", dir=output.parent))
    except OSError as exc:
        raise ExportError(
            f"cannot write into {output.parent}: {exc.strerror or exc}",
            hint="choose an --output in a folder you can write to",
        ) from None
    try:
        with _sigterm_as_interrupt():
            manifest = _build(
                source,
                tmp,
                output.name,
                task,
                dict(
                    optimize=optimize,
                    quantize=quantize,
                    fp16=fp16,
                    bf16=bf16,
                    trust_remote_code=trust_remote_code,
                    revision=revision,
                    opset=opset,
                    graph=graph,
                    device=device,
                    calibration=(Path(calibration).name, calibration_texts)
                    if calibration is not None and calibration_texts
                    else None,
                ),
                texts,
                inputs_note,
                progress,
            )
            progress("write", f"writing {output}")
            _check_target(output, force, source)
            _move_into_place(tmp / "export", output)
        return manifest
    finally:
        _remove(tmp)


# --- the stages -------------------------------------------------------------------------


def _build(
    source, tmp: Path, name: str, task: str | None, opts: dict, texts: list[str], inputs_note: str, progress: Progress
) -> dict[str, Any]:
    from onnxpipe.export import tasks as tasks_mod
    from onnxpipe.export import validate as val
    from onnxpipe.export.quiet import quiet_libraries
    from onnxpipe.export.source import resolve_source
    from onnxpipe.export.tokenizer import check_tokenizers, for_graph, load_tokenizers, save_tokenizers

    progress("load", f"loading {source}")
    with quiet_libraries():
        src = resolve_source(source, tmp / "source", revision=opts["revision"])
    config = json.loads((src.folder / "config.json").read_text(encoding="utf-8"))
    task = task or infer_task(config)
    family = FAMILY[task]
    model_type = config.get("model_type")
    check_exportable(model_type, task)
    from types import SimpleNamespace

    builder = _choose_graph(opts, family, SimpleNamespace(**config))  # before the model loads: fail fast
    if opts["quantize"] == "int4" and builder != "fused":
        raise UsageError(
            "--quantize int4 needs onnxpipe's fused decoder graph (text generation, Llama family, CPU)",
            hint="use --quantize int8 (dynamic quantisation) for this model",
        )
    if opts.get("calibration") and family != "encoder":
        raise UsageError(
            f"--calibration is for encoders (classification, embeddings, tagging, fill-mask), not {task}",
            hint="leave it out: int8 here scales each row's activations at run time, which needs no calibration text",
        )
    if builder == "optimum":
        _check_traceable(SimpleNamespace(**config))
    with quiet_libraries():
        toks = load_tokenizers(src.folder, config, opts["trust_remote_code"])
        try:
            model = tasks_mod.load_model(src.folder, task, src.use_safetensors, opts["trust_remote_code"])
        except OnnxpipeError:
            raise
        except Exception as exc:
            raise SourceError(f"cannot load the model from {_name_weights(src)}: {_first_line(exc)}") from None
    progress("load", f"{type(model).__name__} ({model_type}), task {task}, {_count_parameters(model)} parameters")

    out = tmp / "export"
    validated = out  # what the fp32 validation runs: for CUDA, the graph's float32 CPU twin
    if builder == "cuda":
        from onnxpipe.export import cuda_graph

        progress(
            "export",
            f"building onnxpipe's fused {model_type} graph for CUDA (fp16 GroupQueryAttention, one key/value "
            "buffer shared by past and present) and its float32 CPU twin",
        )
        validated = tmp / "twin"
        with quiet_libraries():
            files, weights = cuda_graph.export(model, out, opts["opset"], twin=validated)
    elif builder == "fused-seq2seq":
        from onnxpipe.export import seq2seq_graph

        progress(
            "export",
            f"building onnxpipe's fused {model_type} encoder-decoder graphs (cross-attention keys once per input, "
            "one self-attention buffer per layer shared by past and present)",
        )
        with quiet_libraries():
            files, weights = seq2seq_graph.export(model, out, opts["opset"]), None
    elif builder == "fused":
        from onnxpipe.export import fused

        progress(
            "export", f"building onnxpipe's fused {model_type} graph (GroupQueryAttention; exact 4-bit blocks kept)"
        )
        with quiet_libraries():
            files, weights = fused.export(model, out, opts["opset"])
        progress("export", "weight matrices: " + ", ".join(f"{n} {k}" for k, n in weights.items() if n))
    else:
        progress(
            "export",
            f"exporting {optimum_task(task)} with optimum"
            + (f", optimisation {opts['optimize']}" if opts["optimize"] else ""),
        )
        files, weights = _export_graphs(model, out, task, family, opts), None
    with quiet_libraries():
        tokenizer_record = save_tokenizers(toks, out)
        check_texts = list(dict.fromkeys(val.GENERATED_TEXTS + texts[:256]))
        tokenizer_record["check"] = check_tokenizers(toks, check_texts)

    from tokenizers import Tokenizer

    fast = for_graph(Tokenizer.from_file(str(out / "tokenizer.json")), tokenizer_record.get("unk_remap"))
    special = _special_tokens(toks.special_tokens, out)
    all_texts = val.GENERATED_TEXTS + texts
    precision = "fp16" if opts["fp16"] else "bf16" if opts.get("bf16") else (opts["quantize"] or "fp32")
    if builder == "cuda":
        precision = "fp16"

    progress(
        "validate",
        f"validating fp32{' ' + opts['optimize'] if opts['optimize'] else ''} against PyTorch on {inputs_note}",
    )
    report = val.validate(
        model,
        validated,
        task,
        family,
        files,
        fast,
        all_texts,
        val.budget_for("fp32", opts["optimize"]),
        inputs_note,
        special_tokens=special,
    )
    val.raise_if_failed(report, "the exported ONNX graph" if not opts["optimize"] else f"the {opts['optimize']} graph")
    quantization = None
    kept_fp32: list[str] | None = None  # bf16: op types without a CUDA bfloat16 kernel, left in float32
    if precision != "fp32":
        from onnxpipe.export import variants

        progress("export", f"building the {precision} variant")
        with quiet_libraries():
            if builder == "cuda":
                pass  # cuda_graph.export wrote it in fp16
            elif builder == "fused":
                from onnxpipe.export import fused, nbits

                reference = tmp / "fp32"  # the float32 graph, for the teacher-forced quality figures
                reference.mkdir()
                for f in out.iterdir():
                    if f.name.startswith("model.onnx") or f.name in ("tokenizer.json", "config.json"):
                        shutil.copy2(f, reference / f.name)
                _, weights = fused.build(model, out, opts["opset"], quantize=precision)
                # One key/value buffer per layer, bound as past and present (export.cuda_graph's form, in
                # float32): each row's keys start at position 0 whatever its batch-mates, so the int8
                # rounding of its activations, and its ids, do not depend on the batch it runs in.
                from onnxpipe.export import cuda_graph

                cuda_graph.rewrite(out / files["model"], "float32")
                quantization = nbits.describe(precision)
                progress("export", "weight matrices: " + ", ".join(f"{n} {k}" for k, n in weights.items() if n))
            elif precision == "int8":
                if family in ("encoder", "seq2seq"):  # the float32 graphs (and their weight files), for the agreement
                    shutil.copytree(out, tmp / "fp32")
                calibrated = None
                if opts.get("calibration"):
                    source_name, calibration_texts = opts["calibration"]
                    progress(
                        "export", f"calibrating the int8 scales on {len(calibration_texts)} lines of {source_name}"
                    )
                    calibrated = variants.calibrate_int8(
                        out / files["model"], fast, calibration_texts, special.get("pad_token_id"), source_name
                    )
                quantization = variants.quantize_int8(out, list(files.values()), family, calibrated)
            elif precision == "bf16":
                kept_fp32 = variants.convert_bf16(
                    out, list(files.values()), lambda path: val.session(path, FP16_PROVIDER)
                )
            else:
                variants.convert_fp16(out, list(files.values()))
        provider = FP16_PROVIDER if precision in ("fp16", "bf16") else "CPUExecutionProvider"
        if builder == "cuda":  # ONNX Runtime's CPU kernels run the fp16 graph too, shared buffer included
            from onnxpipe.export.variants import cuda_unusable_reason

            provider = FP16_PROVIDER if cuda_unusable_reason() is None else "CPUExecutionProvider"
        progress("validate", f"validating the {precision} variant against fp32")
        baseline = report
        report = val.validate(
            model,
            out,
            task,
            family,
            files,
            fast,
            all_texts,
            val.budget_for({"int4": "int8", "bf16": "fp16"}.get(precision, precision), opts["optimize"]),
            inputs_note,
            provider=provider,
            special_tokens=special,
        )
        report["fp32"] = {
            k: baseline[k] for k in ("passed", "tolerance", "outputs", "label_agreement", "greedy") if k in baseline
        }
        val.raise_if_failed(report, f"the {precision} variant")
        if builder != "fused" and precision == "int8" and family in ("encoder", "seq2seq"):
            report["quality"] = _int8_agreement(
                out, tmp / "fp32", family, files, fast, all_texts, config, special, progress
            )
        if builder == "fused" and precision in ("int4", "int8"):
            progress("validate", f"teacher-forced quality of the {precision} variant against fp32")
            quality = val.lm_quality_report(out, tmp / "fp32")
            report["quality"] = quality
            progress(
                "validate",
                f"next-token agreement {quality['agreement']:.4f}, perplexity {quality['perplexity_ratio']:.4f} x fp32's"
                f" ({quality['tokens']} tokens)"
                + ("" if quality["passed"] else ": below " + str(quality["thresholds"])),
            )

    manifest = _manifest(
        name, task, family, config, out, files, tokenizer_record, special, src, precision, opts, report
    )
    manifest["graph"]["builder"] = "onnxpipe-fused" if builder == "fused" else "optimum"
    if builder == "fused-seq2seq":
        from onnxpipe.export.seq2seq_graph import BUILDER, geometry

        manifest["graph"]["builder"] = BUILDER  # runtime.seq2seq.FusedSeq2SeqRunner
        manifest["graph"]["kv_cache"] = "shared-buffer"
        manifest["graph"].update(geometry(out / files["decoder"]))
    if builder == "cuda":
        manifest["graph"]["builder"] = "onnxpipe-fused-cuda"
        manifest["graph"]["kv_cache"] = "shared-buffer"  # runtime.decoder.SharedBufferDecoder
    elif builder == "fused" and precision in ("int4", "int8"):
        manifest["graph"]["kv_cache"] = "shared-buffer"  # the same form, in float32, for the CPU
    manifest["device"] = {"cuda": "cuda", "fused": "cpu", "fused-seq2seq": "cpu"}.get(builder, "any")
    if weights is not None:
        manifest["graph"]["weights"] = weights
    if kept_fp32 is not None:
        manifest["graph"]["bf16_fp32_ops"] = kept_fp32
    if quantization:
        manifest["quantization"] = quantization
    manifest["checksums"] = checksums(out)  # `onnxpipe verify` and `info` compare the folder with these
    write_manifest(out, manifest)
    return manifest


def _int8_agreement(
    out: Path, reference: Path, family: str, files, tokenizer, texts, config, special, progress
) -> dict:
    """export.agreement's gate of an int8 encoder or encoder-decoder against its float32 graphs (raises below it)."""
    from onnxpipe.export import agreement

    if family == "encoder":
        progress("validate", "labels of the int8 variant against fp32, and alone against in a batch")
        quality = agreement.encoder_agreement(
            out / files["model"], reference / files["model"], tokenizer, texts, special.get("pad_token_id")
        )
    else:
        from onnxpipe.tasks.seq2seq import base_generation_config

        progress("validate", "teacher-forced next-token agreement of the int8 variant with fp32")
        generation = base_generation_config(out, config, special)
        quality = agreement.seq2seq_agreement(out, reference, files, tokenizer, generation)
    progress("validate", f"agreement {quality['agreement']:.4f} ({quality['compared']} compared)")
    agreement.raise_if_failed(quality)
    return quality


def _check_traceable(config) -> None:
    """Refuse what optimum's traced graph cannot follow within the positions the runtime allows.

    longrope (Phi-3 128k) switches from short to long factors once a sequence passes
    original_max_position_embeddings: a Python branch, which the trace fixes to the dummy inputs' (short)
    side, and the validation texts are too short to notice. (dynamic NTK only changes past
    max_position_embeddings, where the runtime never goes.)"""
    rope = getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    original = getattr(config, "original_max_position_embeddings", None) or rope.get("original_max_position_embeddings")
    if kind == "longrope" and original and original < (getattr(config, "max_position_embeddings", 0) or 0):
        raise ExportError(
            f"{config.model_type} with longrope rope scaling cannot be exported exactly: optimum's graph keeps the "
            f"short factors, so sequences past original_max_position_embeddings ({original}) would differ from PyTorch"
        )


def _choose_graph(opts: dict, family: str, config) -> str:
    """ "fused" (onnxpipe's own graph, export.fused), "fused-seq2seq" (export.seq2seq_graph), "cuda" or
    "optimum", from --graph and what applies."""
    from onnxpipe.export import fused

    wanted = opts.get("graph") or "auto"
    if wanted == "optimum":
        return "optimum"
    if family == "seq2seq":
        return _choose_seq2seq_graph(opts, wanted, config)
    reason = None if family == "decoder" else "text-generation only (and text2text-generation)"
    reason = reason or fused.unsupported_reason(config)
    # --quantize int4|int8 is the fused graph's own (MatMulNBits, export.nbits): not a reason to leave it.
    for flag, why in (("optimize", "--optimize"), ("fp16", "--fp16"), ("bf16", "--bf16")):
        if reason is None and opts.get(flag):
            reason = f"{why} (it is made for optimum's graph)"
    if reason is None and wanted == "auto" and opts.get("device", "auto") == "auto" and not opts.get("quantize"):
        from onnxpipe.export.variants import cuda_unusable_reason

        if cuda_unusable_reason() is None:  # this machine runs CUDA: the fused fp32 graph is for CPUs
            reason = "CUDA works here"
    if reason is None:
        return "cuda" if opts.get("device") == "cuda" else "fused"
    if wanted == "fused":
        raise UsageError(f"--graph fused is not available here: {reason}", hint="drop --graph, or pass --graph optimum")
    return "optimum"


def _choose_seq2seq_graph(opts: dict, wanted: str, config) -> str:
    """onnxpipe's encoder-decoder graphs (CPU, float32) where the family is one of theirs, else optimum's."""
    from onnxpipe.export import seq2seq_graph

    reason = seq2seq_graph.unsupported_reason(config)
    # --quantize int8 (export.int8's per-row pass) rewrites this graph's MatMuls as it does optimum's
    for flag, why in (("optimize", "--optimize"), ("fp16", "--fp16"), ("bf16", "--bf16")):
        if reason is None and opts.get(flag):
            reason = f"{why} (it is made for optimum's graph)"
    if reason is None and opts.get("device") == "cuda":
        reason = "--device cuda (the fused encoder-decoder graph is for CPUs)"
    if reason is None and wanted == "auto" and opts.get("device", "auto") == "auto":
        from onnxpipe.export.variants import cuda_unusable_reason

        if cuda_unusable_reason() is None:  # this machine runs CUDA: the fused fp32 graph is for CPUs
            reason = "CUDA works here"
    if reason is None:
        return "fused-seq2seq"
    if wanted == "fused":
        raise UsageError(f"--graph fused is not available here: {reason}", hint="drop --graph, or pass --graph optimum")
    return "optimum"


def _export_device(device: str | None, quantize: str | None) -> str:
    """--device of export (auto, cpu, cuda; cuda:N is cuda): the device the graph is for."""
    from onnxpipe.runtime.device import parse_device

    kind = parse_device(device).kind
    if kind == "cuda" and quantize:
        raise UsageError(
            "--quantize and --device cuda exclude each other",
            hint="--quantize is for the CPU; --device cuda writes an fp16 graph where it can",
        )
    return kind


def _export_graphs(model, out: Path, task: str, family: str, opts: dict) -> dict[str, str]:
    from optimum.exporters.onnx import onnx_export_from_model

    from onnxpipe.export.quiet import quiet_libraries

    with quiet_libraries():
        try:
            onnx_export_from_model(
                model,
                out,
                task=optimum_task(task),
                opset=opts["opset"],
                optimize=opts["optimize"],
                do_validation=False,
            )
        except OnnxpipeError:
            raise
        except NotImplementedError as exc:
            raise ExportError(
                f"optimum cannot {('optimise (' + opts['optimize'] + ') ') if opts['optimize'] else 'export'} "
                f"{model.config.model_type}: {_first_line(exc)}"
            ) from None
        except Exception as exc:
            raise ExportError(
                f"the ONNX export failed: {_first_line(exc)}", hint="run with -v --traceback for details"
            ) from None
    if family == "seq2seq":
        files = {"encoder": "encoder_model.onnx", "decoder": "decoder_model_merged.onnx"}
    else:
        files = {"model": "model.onnx"}
    for path in out.glob("*.onnx"):
        if path.name not in files.values():  # unmerged decoders: the merged one does both jobs
            path.unlink()
            for data in (path.with_name(path.name + "_data"), path.with_name(path.name + ".data")):
                data.unlink(missing_ok=True)
    missing = [f for f in files.values() if not (out / f).is_file()]
    if missing:
        raise ExportError(f"optimum did not write {', '.join(missing)}")
    return files


def _manifest(
    name, task, family, config, out: Path, files, tokenizer_record, special, src, precision, opts, report
) -> dict[str, Any]:
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    labels = None
    if task in ("text-classification", "token-classification"):
        id2label = cfg.get("id2label") or {}
        labels = [id2label.get(str(i), f"LABEL_{i}") for i in range(len(id2label))]
    source_record = dict(src.record)
    source_record["weights"] = [p.name for p in src.weights]
    embedding = _pooling(src.folder, out) if task == "feature-extraction" else {"pooling": None, "normalize": False}
    return {
        "name": name,
        "task": task,
        "family": family,
        "architecture": (cfg.get("architectures") or config.get("architectures") or [None])[0],
        "model_type": cfg.get("model_type"),
        "source": source_record,
        "files": files,
        "tokenizer": tokenizer_record,
        "special_tokens": special,
        "labels": labels,
        "problem_type": cfg.get("problem_type") if labels else None,
        **embedding,  # pooling, normalize (+ dense, max_seq_length from sentence-transformers files)
        "opset": _opset(out / next(iter(files.values()))),
        "precision": precision,
        "optimization": opts["optimize"],
        "graph": _graph(out, files),
        "validation": report,
        "versions": tool_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --- pieces -----------------------------------------------------------------------------


def _check_target(output: Path, force: bool, source: str | Path | None = None) -> None:
    """Refuse, before anything is written, every OUTPUT that --force must not replace (see the module doc)."""
    try:
        _check_target_path(output, force, source)
    except OSError as exc:
        raise UsageError(
            f"cannot use {output} as the output folder: {exc.strerror or exc}", hint="choose another --output or --name"
        ) from None


def _check_target_path(output: Path, force: bool, source: str | Path | None) -> None:
    for part in output.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise OSError(
                errno.ENAMETOOLONG,
                f"a name of {len(os.fsencode(part))} bytes is longer than the file system allows ({NAME_MAX})",
            )
    if source is not None:
        _check_not_source(output, source)
    if os.path.islink(output):
        raise UsageError(
            f"{output} is a symbolic link; refusing to replace it or what it points to",
            hint="give the folder itself as --output, or remove the link",
        )
    if not os.path.lexists(output):
        return
    if not output.is_dir():
        raise UsageError(f"{output} exists and is not a folder", hint="choose another --output or --name")
    entries = sorted(os.listdir(output))
    here = os.path.realpath(os.getcwd())
    is_cwd = os.path.commonpath([os.path.realpath(output), here]) == os.path.realpath(output)
    if not entries and not is_cwd:
        return  # an empty folder is used as it is
    if not looks_like_export(output):
        if not entries:
            raise UsageError(
                f"{output} is the current folder; refusing to export into it", hint="give a new folder as --output"
            )
        noun = (
            "file" if all(os.path.isfile(output / e) and not os.path.islink(output / e) for e in entries) else "entry"
        )
        noun = noun if len(entries) == 1 else ("files" if noun == "file" else "entries")
        raise UsageError(
            f"{output}{' (the current folder)' if is_cwd else ''} holds {len(entries)} {noun} that {'is' if len(entries) == 1 else 'are'} "
            f"not an onnxpipe export ({_some(entries)}); refusing to replace it",
            hint="--force replaces only onnxpipe exports: choose another --output or --name",
        )
    if not force:
        raise UsageError(f"{output} already exists", hint="pass --force to replace it")
    foreign = _not_written_by_us(output)
    if foreign:
        raise UsageError(
            f"{output} is an onnxpipe export that also holds {len(foreign)} file{'s' if len(foreign) > 1 else ''} "
            f"onnxpipe did not write ({_some(foreign)}); refusing to replace it",
            hint="move those files out first, or choose another --output or --name",
        )


def _some(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f", and {len(names) - shown} more" if len(names) > shown else "")


def _not_written_by_us(folder: Path) -> list[str]:
    """Files in the export FOLDER that its manifest's checksums do not list (none known: none)."""
    from onnxpipe.manifest import folder_files, read_json_object

    recorded = (read_json_object(folder) or {}).get("checksums")
    if not isinstance(recorded, dict):
        return []  # an export from before checksums were recorded: its files are not known one by one
    return [rel for rel in folder_files(folder) if rel not in recorded]


def _check_not_source(output: Path, source: str | Path) -> None:
    """The output must not be the source checkpoint, inside it, or around it: replacing it would delete it."""
    path = Path(str(source)).expanduser()
    if not path.exists():
        return  # a hub id
    src, out = os.path.realpath(path), os.path.realpath(output)
    if path.is_file():  # a .gguf file: only an output that is it or holds it would delete it
        clash = out == src or os.path.commonpath([out, src]) == out
    else:
        clash = os.path.commonpath([out, src]) in (out, src)
    if clash:
        where = "is" if out == src else "holds" if os.path.commonpath([out, src]) == out else "is inside"
        raise UsageError(
            f"the output {output} {where} the source {source}; refusing to write there",
            hint="choose an --output outside the checkpoint",
        )


def _move_into_place(built: Path, output: Path) -> None:
    """Rename BUILT to OUTPUT; an existing OUTPUT (--force) is swapped out first, then removed."""
    old = None
    if os.path.lexists(output):
        old = output.with_name(f".{output.name[:64]}{TMP_MARK}{os.getpid()}-old")
        _remove(old)
        output.rename(old)
    try:
        built.rename(output)
    except OSError as exc:
        if old is not None:
            old.rename(output)
        raise ExportError(f"cannot move the export into {output}: {exc.strerror or exc}") from None
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    """Delete PATH: a link is unlinked (what it points to is never touched), a folder removed whole."""
    try:
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
            os.unlink(path)
        elif os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


def clean_stale_temporaries(parent: Path) -> None:
    """Remove temporary export folders (and `-old` swaps) left by processes that no longer run (killed exports)."""
    for path in parent.glob(f".*{TMP_MARK}*"):
        pid_text = path.name.split(TMP_MARK, 1)[1].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _alive(int(pid_text)):
            _remove(path)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, a job scheduler's timeout) ends the export as Ctrl-C does: the temporary is removed.

    Only where nobody took SIGTERM yet (the Python API): the CLI's own handler already raises."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _validation_texts(validate_with: str | Path | None, flag: str = "--validate-with") -> tuple[list[str], str]:
    """The first VALIDATION_LINES non-empty lines of the file, each cut to VALIDATION_LINE_CHARS: read
    line by line with a bounded buffer, so neither a huge file nor a 20 MB line is read whole. FLAG names
    the option in errors (--calibration reads its file the same way)."""
    from onnxpipe.export.validate import GENERATED_TEXTS

    note = f"{len(GENERATED_TEXTS)} generated texts"
    if validate_with is None:
        return [], note
    path = Path(validate_with)
    limit = VALIDATION_LINE_CHARS * 4  # bytes: UTF-8 takes at most 4 a character
    lines: list[str] = []
    cut = 0
    try:
        if not path.is_file():  # /dev/zero or a FIFO would be read for ever
            raise UsageError(f"{flag} {path}: not a regular file", hint="give a text file, one input a line")
        with open(path, "rb") as f:
            while len(lines) < VALIDATION_LINES and f.tell() < VALIDATION_BYTES:
                raw = f.readline(limit)
                if not raw:
                    break
                long = len(raw) == limit and not raw.endswith(b"\n")
                if long:  # the rest of the line is skipped, never held
                    while f.tell() < VALIDATION_BYTES and (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                        pass
                text = raw.decode("utf-8", errors="replace").strip()
                if len(text) > VALIDATION_LINE_CHARS:
                    text, long = text[:VALIDATION_LINE_CHARS], True
                cut += long
                if text:
                    lines.append(text)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: {exc.strerror or exc}") from None
    if not lines:
        raise UsageError(f"{flag} {path} has no non-empty lines")
    extra = f", {cut} cut to {VALIDATION_LINE_CHARS:,} characters" if cut else ""
    return lines, f"{note} + {len(lines)} lines of {path.name}{extra}"


def _special_tokens(from_tokenizer: dict[str, Any], out: Path) -> dict[str, Any]:
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    gen_path = out / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}

    def first(*values):
        return next((v for v in values if v is not None), None)

    eos = first(gen.get("eos_token_id"), cfg.get("eos_token_id"), from_tokenizer.get("eos_token_id"))
    special = dict(from_tokenizer)
    special.update(
        {
            "bos_token_id": first(gen.get("bos_token_id"), cfg.get("bos_token_id"), from_tokenizer.get("bos_token_id")),
            "eos_token_id": eos if isinstance(eos, list) or eos is None else [eos],
            "pad_token_id": first(from_tokenizer.get("pad_token_id"), gen.get("pad_token_id"), cfg.get("pad_token_id")),
            "decoder_start_token_id": first(gen.get("decoder_start_token_id"), cfg.get("decoder_start_token_id")),
        }
    )
    return special


def _graph(out: Path, files: dict[str, str]) -> dict[str, Any]:
    """Input and output names, and the key/value cache geometry the runtime must allocate."""
    from onnxpipe.export.validate import session

    main = files.get("model") or files["decoder"]
    sess = session(out / main)
    graph: dict[str, Any] = {
        "inputs": [i.name for i in sess.get_inputs()],
        "outputs": [o.name for o in sess.get_outputs()],
    }
    past = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    if past:
        keys = [i for i in past if i.name.endswith(".key") and ".encoder." not in i.name]
        graph["num_layers"] = len(keys)
        graph["num_kv_heads"] = keys[0].shape[1] if isinstance(keys[0].shape[1], int) else None
        graph["head_dim"] = keys[0].shape[3] if isinstance(keys[0].shape[3], int) else None
        graph["past_dtype"] = "float16" if "float16" in keys[0].type else "float32"
    if "encoder" in files:
        enc = session(out / files["encoder"])
        graph["encoder_inputs"] = [i.name for i in enc.get_inputs()]
        graph["encoder_outputs"] = [o.name for o in enc.get_outputs()]
    return graph


def _opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _pooling(folder: Path, out: Path) -> dict[str, Any]:
    """The manifest's embedding keys: from a sentence-transformers folder (modules.json: Pooling, Dense,
    Normalize, max_seq_length), else mean pooling, not normalised. Dense weights are written into the
    export as float32 .npy files, which the runtime applies with numpy (no torch)."""
    from onnxpipe.tasks.embed import read_sentence_transformers

    declared = read_sentence_transformers(folder)
    if declared is None:
        return {"pooling": "mean", "normalize": False}
    dense = []
    for i, layer in enumerate(declared["dense"]):
        dense.append(_dense_files(folder / layer["path"], out, i, layer))
    record = {"pooling": declared["pooling"], "normalize": declared["normalize"]}
    if dense:
        record["dense"] = dense
    if declared["max_seq_length"]:
        record["max_seq_length"] = int(declared["max_seq_length"])
    return record


def _dense_files(folder: Path, out: Path, index: int, layer: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from safetensors.numpy import load_file

    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise SourceError(
            f"{folder} has no model.safetensors (a pickled Dense layer is not read)",
            hint="re-save the model with sentence-transformers' save(), which writes safetensors",
        )
    tensors = load_file(str(weights))
    (out / "dense").mkdir(exist_ok=True)
    record: dict[str, Any] = {"weight": f"dense/{index}_weight.npy", "bias": None, "activation": layer["activation"]}
    np.save(out / record["weight"], tensors["linear.weight"].astype(np.float32))
    if "linear.bias" in tensors:
        record["bias"] = f"dense/{index}_bias.npy"
        np.save(out / record["bias"], tensors["linear.bias"].astype(np.float32))
    record["shape"] = list(tensors["linear.weight"].shape)
    return record


def tool_versions() -> dict[str, str | None]:
    from importlib import metadata

    from onnxpipe import __version__

    def version(*dists: str) -> str | None:
        for dist in dists:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        return None

    return {
        "onnxpipe": __version__,
        "onnxruntime": version("onnxruntime-gpu", "onnxruntime"),
        "optimum": version("optimum"),
        "optimum-onnx": version("optimum-onnx"),
        "transformers": version("transformers"),
        "torch": version("torch"),
        "onnx": version("onnx"),
        "tokenizers": version("tokenizers"),
    }


def _count_parameters(model) -> str:
    n = sum(p.numel() for p in model.parameters())
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _name_weights(src) -> str:
    return ", ".join(str(p) for p in src.weights) or str(src.folder)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
