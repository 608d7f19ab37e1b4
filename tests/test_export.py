"""`onnxpipe export`: every task family and tiny architecture, validation, variants, errors, atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_models
from click.testing import CliRunner

from onnxpipe.main import cli

ARCHS = [
    ("bert", None),
    ("distilbert", None),
    ("roberta", None),
    ("gpt2", None),
    ("llama", None),
    ("marian", None),
    ("t5", None),
    ("bart", None),
]


def run(*args: str, **kw):
    return CliRunner().invoke(cli, list(args), **kw)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0, result.output
    assert result.stdout == ""
    # Progress lines may come first; the error is one line, the last one.
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("onnxpipe: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def manifest(folder: Path) -> dict:
    return json.loads((folder / "onnxpipe.json").read_text())


# --- every architecture -----------------------------------------------------------------


@pytest.mark.parametrize("arch,task", ARCHS)
def test_tiny_architecture_exports_and_validates(exported, arch, task):
    folder = exported(arch, task)
    m = manifest(folder)
    assert m["validation"]["passed"], m["validation"]
    assert m["precision"] == "fp32" and m["optimization"] is None
    assert all(o["max_abs_diff"] <= m["validation"]["tolerance"] for o in m["validation"]["outputs"].values())
    assert (folder / "tokenizer.json").is_file()
    assert m["source"]["kind"] == "folder" and len(m["source"]["sha256"]) == 64
    assert m["versions"]["optimum"] and m["versions"]["onnxruntime"] and isinstance(m["opset"], int)
    onnx_files = sorted(p.name for p in folder.glob("*.onnx"))
    assert onnx_files == sorted(m["files"].values())
    fused_seq2seq = m["graph"]["builder"] == "onnxpipe-fused-seq2seq"  # Marian, BART: test_seq2seq_graph.py
    if m["family"] == "seq2seq":
        merged = "decoder_model.onnx" if fused_seq2seq else "decoder_model_merged.onnx"
        assert onnx_files == [merged, "encoder_model.onnx"]  # unmerged decoders deleted
        assert m["graph"]["encoder_inputs"][:1] == ["input_ids"]
    if m["family"] in ("decoder", "seq2seq"):
        g = m["validation"]["greedy"]
        assert g["identical"] == g["sequences"] > 0 and g["steps"] >= 8
        assert m["graph"]["num_layers"] == 2 and m["graph"]["head_dim"] == 8
        past = "past_key." if fused_seq2seq else "past_key_values."
        assert any(name.startswith(past) for name in m["graph"]["inputs"])
        assert m["special_tokens"]["eos_token_id"]
    else:
        assert m["validation"]["label_agreement"] == 1.0
        assert m["labels"] == ["negative", "positive", "neutral"]
    # `onnxpipe info` shows the validation report.
    result = run("info", str(folder))
    assert result.exit_code == 0, result.output
    assert "passed against PyTorch" in result.stdout and "max abs diff" in result.stdout


def test_task_families_of_encoders(exported):
    token = manifest(exported("bert", "token-classification"))
    assert token["task"] == "token-classification" and token["labels"][:2] == ["O", "B-PER"]
    assert token["validation"]["label_agreement"] == 1.0
    fill = manifest(exported("roberta", "fill-mask"))
    assert fill["task"] == "fill-mask" and fill["special_tokens"]["mask_token_id"] is not None
    assert fill["validation"]["top5_overlap"] == 1.0
    features = manifest(exported("distilbert", "feature-extraction"))
    assert features["task"] == "feature-extraction" and features["pooling"] == "mean"
    assert features["validation"]["outputs"]["last_hidden_state"]["max_abs_diff"] < 1e-3
    assert features["validation"]["cosine_similarity"]["min"] > 0.9999


def test_multi_label_classification(exported):
    m = manifest(exported("bert", "text-classification", checkpoint_kw={"problem_type": "multi_label_classification"}))
    assert m["problem_type"] == "multi_label_classification"
    assert m["validation"]["passed"] and m["validation"]["label_agreement"] == 1.0


def test_generation_records_chat_template_and_kv_geometry(exported):
    folder = exported("llama")
    m = manifest(folder)
    assert m["tokenizer"]["chat_template"] == "chat_template.jinja"
    assert "<|assistant|>" in (folder / "chat_template.jinja").read_text()
    assert m["graph"]["num_kv_heads"] == 2 and m["special_tokens"]["bos_token_id"] == 1


def test_inferred_task_from_architectures(exported):
    assert manifest(exported("gpt2"))["task"] == "text-generation"
    assert manifest(exported("t5"))["task"] == "text2text-generation"
    assert manifest(exported("bert"))["architecture"] == "BertForSequenceClassification"


# --- Marian's slow tokenizer, converted --------------------------------------------------

UNICODE_LINES = [
    "Émile a visité Zürich et São Paulo en été.",
    "Straße, Ärger, Öl, Übel – “quoted” … ‘single’",
    "日本語のテキストと中文",
    "emoji 😀😀 and 👍🏽 mixed in",
    "ﬁ ligatures ① ² ½ get NFKC-normalised",
    "  leading and   inner   spaces  ",
    "tabs\tand\u00a0non-breaking spaces",
    "ЖЖ cyrillic Привет мир",
    "</s> and <unk> and <pad> as text",
    "",
    "x",
    "Ünïcödé everywhere: ñ ç ø å ß ğ ş ı",
]


def test_marian_tokenizers_match_the_slow_tokenizer(exported, checkpoint):
    from tokenizers import Tokenizer
    from transformers import MarianTokenizer

    folder = exported("marian")
    m = manifest(folder)
    assert m["tokenizer"]["target_file"] == "target_tokenizer.json"
    assert m["tokenizer"]["check"]["identical"]
    slow = MarianTokenizer.from_pretrained(checkpoint("marian"))
    source = Tokenizer.from_file(str(folder / "tokenizer.json"))
    target = Tokenizer.from_file(str(folder / "target_tokenizer.json"))
    sentences = tiny_models.CORPUS[:16] + UNICODE_LINES
    for text in sentences:
        ids = source.encode(text).ids
        assert ids == slow(text)["input_ids"], text
        assert ids[-1] == slow.eos_token_id  # </s> appended
        target_ids = slow(text_target=text)["input_ids"]
        assert target.encode(text).ids == target_ids, text
        assert target.decode(target_ids) == slow.decode(target_ids, skip_special_tokens=True), text
    # Unknown pieces map to <unk> (vocab.json's id, not the spm's own).
    assert slow.unk_token_id in source.encode("日本語").ids
    assert source.token_to_id("<unk>") == slow.unk_token_id != 0


def test_marian_ids_are_vocab_json_ids_not_spm_ids(checkpoint, exported):
    import sentencepiece as spm
    from tokenizers import Tokenizer

    ckpt = checkpoint("marian")
    vocab = json.loads((ckpt / "vocab.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "source.spm"))
    source = Tokenizer.from_file(str(exported("marian") / "tokenizer.json"))
    text = "The quick brown fox"
    pieces = sp.encode(text, out_type=str)
    assert source.encode(text).ids == [vocab.get(p, vocab["<unk>"]) for p in pieces] + [vocab["</s>"]]


# --- variants ---------------------------------------------------------------------------


def test_int8_classifier_reports_quality_against_fp32(exported):
    m = manifest(exported("bert", quantize="int8"))
    v = m["validation"]
    assert m["precision"] == "int8" and v["passed"]
    assert 0.75 <= v["label_agreement"] <= 1.0
    assert v["cosine_similarity"]["min"] > 0.9 and "top5_overlap" in v
    assert v["fp32"]["passed"]


def test_int8_generators(exported):
    for arch in ("gpt2", "t5"):
        m = manifest(exported(arch, quantize="int8"))
        v = m["validation"]
        assert m["precision"] == "int8" and v["passed"], v
        assert "agreement" in v["greedy"] and v["cosine_similarity"]["mean"] > 0.9
        assert sorted(p.name for p in exported(arch, quantize="int8").glob("*.onnx")) == sorted(m["files"].values())


@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
def test_optimize_levels(exported, level):
    m = manifest(exported("bert", optimize=level))
    assert m["optimization"] == level and m["validation"]["passed"]
    assert m["validation"]["label_agreement"] == 1.0


def test_optimized_graph_can_be_quantized(exported):
    """--optimize fuses Attention/SkipLayerNormalization, whose outputs onnx's shape inference leaves
    untyped; the int8 quantiser used to stop on them."""
    import onnx

    folder = exported("bert", "text-classification", optimize="O2", quantize="int8")
    m = manifest(folder)
    assert m["optimization"] == "O2" and m["precision"] == "int8" and m["validation"]["passed"]
    ops = {n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node}
    # fused, then quantised per row (export.int8): the MatMuls outside Attention; Attention's own projections,
    # an input of the fused op, stay float32 (QAttention would bring back one activation scale per batch)
    assert {"Attention", "MatMulIntegerToFloat", "SkipLayerNormalization"} <= ops
    assert not {"QAttention", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"} & ops


def test_optimized_seq2seq_keeps_a_merged_decoder(exported):
    folder = exported("bart", optimize="O2")
    m = manifest(folder)
    assert (
        m["validation"]["passed"] and m["validation"]["greedy"]["identical"] == m["validation"]["greedy"]["sequences"]
    )
    assert sorted(p.name for p in folder.glob("*.onnx")) == ["decoder_model_merged.onnx", "encoder_model.onnx"]


def test_fp16_without_cuda_fails_before_writing_anything(checkpoint, tmp_path):
    from onnxpipe.export.variants import cuda_unusable_reason

    if cuda_unusable_reason() is None:
        pytest.skip("CUDA works here: fp16 is exported, not refused")
    out = tmp_path / "parent" / "fp16"
    result = run("export", str(checkpoint("bert")), "--output", str(out), "--fp16")
    assert_one_line_error(result, "--fp16", "CUDA")
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())


# --- validation -------------------------------------------------------------------------


def test_validate_with_file_is_used_and_recorded(checkpoint, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("First validation line.\n\nZürich is lovely in summer.\nAnother one!\n", encoding="utf-8")
    result = run("export", str(checkpoint("gpt2")), "--output", str(tmp_path / "out"), "--validate-with", str(lines))
    assert result.exit_code == 0, result.output
    v = manifest(tmp_path / "out")["validation"]
    assert "3 lines of lines.txt" in v["inputs"] and v["texts"] == 9
    assert "3 lines of lines.txt" in result.stderr


def test_failed_validation_exits_nonzero_and_keeps_nothing(checkpoint, tmp_path, monkeypatch):
    from onnxpipe.export import validate

    # No diff can be <= -1: every output fails its tolerance.
    monkeypatch.setitem(validate.BUDGETS, "fp32", validate.Budget(atol=-1.0))
    out = tmp_path / "exports" / "broken"
    result = run("export", str(checkpoint("bert")), "--output", str(out))
    assert_one_line_error(result, "failed validation", "logits")
    assert result.exit_code == 1
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_corrupted_weights_fail_validation(checkpoint, tmp_path, monkeypatch):
    """An ONNX graph that computes something else is caught by the comparison, not by a tolerance tweak."""
    from onnxpipe.export import core

    real = core._export_graphs

    def corrupt(model, out, *args):
        files = real(model, out, *args)
        import onnx
        from onnx import numpy_helper

        path = out / files["model"]
        graph = onnx.load(str(path))
        init = max(graph.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
        array = numpy_helper.to_array(init).copy()
        array *= -3.0
        init.CopyFrom(numpy_helper.from_array(array, init.name))
        onnx.save(graph, str(path))
        return files

    monkeypatch.setattr(core, "_export_graphs", corrupt)
    out = tmp_path / "corrupt"
    result = run("export", str(checkpoint("gpt2")), "--output", str(out))
    assert_one_line_error(result, "failed validation")
    assert not out.exists()


# --- sources ----------------------------------------------------------------------------


def _copy_checkpoint(checkpoint, tmp_path, arch="bert") -> Path:
    dst = tmp_path / f"{arch}-copy"
    shutil.copytree(checkpoint(arch), dst)
    return dst


def test_truncated_safetensors_names_the_file(checkpoint, tmp_path):
    ckpt = _copy_checkpoint(checkpoint, tmp_path)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    result = run("export", str(ckpt), "--output", str(tmp_path / "out"))
    assert_one_line_error(result, str(weights), "truncated")
    assert not (tmp_path / "out").exists()


def test_missing_config_names_the_file(checkpoint, tmp_path):
    ckpt = _copy_checkpoint(checkpoint, tmp_path)
    (ckpt / "config.json").unlink()
    result = run("export", str(ckpt), "--output", str(tmp_path / "out"))
    assert_one_line_error(result, str(ckpt / "config.json"), "missing")


def test_missing_weights_and_bad_config(checkpoint, tmp_path):
    ckpt = _copy_checkpoint(checkpoint, tmp_path)
    (ckpt / "model.safetensors").unlink()
    assert_one_line_error(run("export", str(ckpt), "--output", str(tmp_path / "o")), "no weights")
    (ckpt / "config.json").write_text("{not json")
    assert_one_line_error(run("export", str(ckpt), "--output", str(tmp_path / "o")), "config.json", "not valid JSON")


def test_hub_id_offline_names_the_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = run("export", "someone/not-a-local-model", "--output", str(tmp_path / "o"))
    assert_one_line_error(result, "'someone/not-a-local-model'", "offline", "local folder")


def test_missing_source_path(tmp_path):
    result = run("export", str(tmp_path / "nope" / "model"), "--output", str(tmp_path / "o"))
    assert_one_line_error(result, "no such folder or file")


def test_gguf_source_is_converted_then_exported(checkpoint, tmp_path, monkeypatch):
    import onnxpipe.export.gguf as gguf

    gguf_file = tmp_path / "tiny-llama.Q8_0.gguf"
    gguf_file.write_bytes(b"GGUF fake bytes for the dispatch test")
    seen = {}

    def fake(path, workdir):
        seen["path"] = path
        dst = Path(workdir) / "hf"
        shutil.copytree(checkpoint("llama"), dst)
        return dst

    monkeypatch.setattr(gguf, "gguf_to_checkpoint", fake)
    result = run("export", str(gguf_file))
    assert result.exit_code == 0, result.output
    folder = Path(os.environ["ONNXPIPE_HOME"]) / "tiny-llama.Q8_0"
    m = manifest(folder)
    import hashlib

    assert seen["path"] == gguf_file
    assert m["source"] == {
        **m["source"],
        "kind": "gguf",
        "path": str(gguf_file.resolve()),
        "sha256": hashlib.sha256(gguf_file.read_bytes()).hexdigest(),
    }
    assert m["task"] == "text-generation" and m["validation"]["passed"]
    # The converted folder was a temporary: nothing but the export is left beside it.
    assert [p.name for p in folder.parent.iterdir()] == ["tiny-llama.Q8_0"]


def test_unknown_architecture_lists_supported_model_types(checkpoint, tmp_path):
    ckpt = _copy_checkpoint(checkpoint, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "frobnicator"
    (ckpt / "config.json").write_text(json.dumps(config))
    result = run("export", str(ckpt), "--output", str(tmp_path / "o"))
    assert_one_line_error(result, "'frobnicator'", "bert, ")
    listed = result.stderr.split("text-classification: ")[1].strip().split(", ")
    assert listed == sorted(listed) and "roberta" in listed


def test_task_not_inferable_lists_choices(checkpoint, tmp_path):
    ckpt = _copy_checkpoint(checkpoint, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["SomethingWeird"]
    (ckpt / "config.json").write_text(json.dumps(config))
    result = run("export", str(ckpt), "--output", str(tmp_path / "o"))
    assert_one_line_error(
        result, "cannot infer the task", "--task", "fill-mask, question-answering, text-classification"
    )


def test_trust_remote_code_is_off_by_default(checkpoint, tmp_path, monkeypatch):
    from onnxpipe.export import tasks

    seen = {}
    real = tasks.load_model

    def spy(folder, task, use_safetensors, trust_remote_code):
        seen.update(trust=trust_remote_code, safetensors=use_safetensors)
        return real(folder, task, use_safetensors, trust_remote_code)

    monkeypatch.setattr(tasks, "load_model", spy)
    assert run("export", str(checkpoint("bert")), "--output", str(tmp_path / "o")).exit_code == 0
    assert seen == {"trust": False, "safetensors": True}


# --- CLI behaviour ----------------------------------------------------------------------


def test_progress_on_stderr_stdout_clean(checkpoint, tmp_path):
    result = run("export", str(checkpoint("bert")), "--name", "sentiment")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    for stage in ("load", "export", "validate", "write"):
        assert stage in result.stderr
    assert "passed against PyTorch" in result.stderr  # the summary table
    assert "Warning" not in result.stderr and "TracerWarning" not in result.stderr
    assert (Path(os.environ["ONNXPIPE_HOME"]) / "sentiment" / "onnxpipe.json").is_file()


def test_quiet_export_prints_nothing(checkpoint, tmp_path):
    result = run("-q", "export", str(checkpoint("bert")), "--output", str(tmp_path / "o"))
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""


def test_default_name_is_the_source_folder(checkpoint):
    ckpt = checkpoint("distilbert")
    result = run("export", str(ckpt))
    assert result.exit_code == 0, result.output
    assert (Path(os.environ["ONNXPIPE_HOME"]) / ckpt.name / "onnxpipe.json").is_file()


def test_existing_target_refused_without_force(checkpoint, tmp_path):
    out = tmp_path / "o"
    assert run("export", str(checkpoint("bert")), "--output", str(out)).exit_code == 0
    before = manifest(out)["created"]
    result = run("export", str(checkpoint("bert")), "--output", str(out))
    assert_one_line_error(result, "already exists", "--force")
    assert result.exit_code == 2
    assert manifest(out)["created"] == before
    result = run("export", str(checkpoint("bert")), "--output", str(out), "--force", "--quantize", "int8")
    assert result.exit_code == 0, result.output
    assert manifest(out)["precision"] == "int8"
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_name_and_output_exclude_each_other(checkpoint, tmp_path):
    result = run("export", str(checkpoint("bert")), "--name", "a", "--output", str(tmp_path / "b"))
    assert_one_line_error(result, "--name and --output")


def test_missing_export_extra_says_install(checkpoint, tmp_path, monkeypatch):
    for module in ("torch", "optimum", "optimum.exporters", "optimum.exporters.onnx"):
        monkeypatch.setitem(sys.modules, module, None)
    result = run("export", str(checkpoint("bert")), "--output", str(tmp_path / "o"))
    assert_one_line_error(result, "install onnxpipe[export]")
    assert not (tmp_path / "o").exists()


def test_traceback_flag_shows_the_traceback(tmp_path):
    result = run("--traceback", "export", str(tmp_path / "missing"), "--output", str(tmp_path / "o"))
    assert result.exit_code != 0
    assert result.exception is not None and type(result.exception).__name__ == "SourceError"


# --- atomic writes ----------------------------------------------------------------------


def test_sigkill_mid_export_leaves_no_folder(checkpoint, tmp_path):
    parent = tmp_path / "exports"
    parent.mkdir()
    out = parent / "killed"
    env = {**os.environ, "ONNXPIPE_HOME": str(parent), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "onnxpipe", "export", str(checkpoint("t5")), "--output", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        # Wait until the export is half-written: ONNX graphs exist in the temporary folder.
        while time.monotonic() < deadline and proc.poll() is None:
            if any(parent.glob(".killed.onnxpipe-tmp-*/export/*.onnx")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the export finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    leftovers = [p.name for p in parent.iterdir()]
    assert leftovers and all(name.startswith(".") for name in leftovers)  # hidden temporaries only
    # `models` ignores them, and the next export cleans them up.
    result = run("models", env={"ONNXPIPE_HOME": str(parent)})
    assert result.exit_code == 0 and "killed" not in result.stdout
    assert run("export", str(checkpoint("bert")), "--output", str(out)).exit_code == 0
    assert [p.name for p in parent.iterdir()] == ["killed"]


def test_export_model_api_returns_the_manifest(checkpoint, tmp_path):
    from onnxpipe.export import export_model

    stages = []
    m = export_model(checkpoint("bert"), tmp_path / "api", progress=lambda stage, msg: stages.append(stage))
    assert m == {k: v for k, v in manifest(tmp_path / "api").items() if k != "format"}
    assert [s for s in dict.fromkeys(stages)] == ["load", "export", "validate", "write"]


def test_real_gguf_file_exports_end_to_end(tmp_path):
    test_gguf = pytest.importorskip("test_gguf")
    path = tmp_path / "tiny-chat.gguf"
    test_gguf.write_tiny_gguf(path)
    result = run("export", str(path), "--name", "chat")
    assert result.exit_code == 0, result.output
    m = manifest(Path(os.environ["ONNXPIPE_HOME"]) / "chat")
    assert m["source"]["kind"] == "gguf" and m["task"] == "text-generation"
    assert m["validation"]["passed"] and m["tokenizer"]["chat_template"] == "chat_template.jinja"
    assert "Converting" not in result.stderr  # the converter's progress bar stays quiet


def test_saved_padding_and_truncation_are_dropped_from_tokenizer_json(checkpoint, tmp_path):
    """all-MiniLM ships a tokenizer.json that pads every input to 128: the runtime pads per batch."""
    from tokenizers import Tokenizer

    ckpt = _copy_checkpoint(checkpoint, tmp_path, "roberta")
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tok.enable_padding(length=64, pad_id=1, pad_token="<pad>")
    tok.enable_truncation(max_length=64)
    tok.save(str(ckpt / "tokenizer.json"))
    result = run("export", str(ckpt), "--output", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    saved = Tokenizer.from_file(str(tmp_path / "o" / "tokenizer.json"))
    assert saved.padding is None and saved.truncation is None
    assert manifest(tmp_path / "o")["tokenizer"]["max_length"] == 126


def test_fp16_conversion_and_validation_path(checkpoint, tmp_path, monkeypatch):
    """The CUDA-only fp16 path, run on the CPU provider (which executes fp16 graphs, slowly)."""
    from onnxpipe.export import core, variants

    monkeypatch.setattr(variants, "require_cuda_for_fp16", lambda: None)
    monkeypatch.setattr(core, "FP16_PROVIDER", "CPUExecutionProvider")
    result = run("export", str(checkpoint("gpt2")), "--output", str(tmp_path / "o"), "--fp16")
    assert result.exit_code == 0, result.output
    m = manifest(tmp_path / "o")
    assert m["precision"] == "fp16" and m["validation"]["passed"] and m["validation"]["tolerance"] is None
    assert m["validation"]["cosine_similarity"]["mean"] > 0.99 and m["validation"]["fp32"]["passed"]
    import onnx

    graph = onnx.load(str(tmp_path / "o" / "model.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer)
