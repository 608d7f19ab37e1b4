"""`onnxpipe models` and `onnxpipe info`: what is in the export home, and how each export was made."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxpipe.main import cli


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def _home() -> Path:
    return Path(os.environ["ONNXPIPE_HOME"])


def _install(exported, name: str, arch: str, **options) -> Path:
    """Copy a cached session export into this test's export home under NAME."""
    dst = _home() / name
    shutil.copytree(exported(arch, **options), dst)
    return dst


def test_models_lists_exports_with_their_figures(exported):
    _install(exported, "sentiment", "bert")
    _install(exported, "tiny-gpt2", "gpt2", quantize="int8")
    (_home() / ".half.onnxpipe-tmp-1-x").mkdir()  # an interrupted export's temporary
    (_home() / "not-an-export").mkdir()
    result = run("models")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "task", "architecture", "precision", "size", "validated"]
    assert lines[1].split()[:4] == ["sentiment", "text-classification", "BertForSequenceClassification", "fp32"]
    assert lines[2].split()[:4] == ["tiny-gpt2", "text-generation", "GPT2LMHeadModel", "int8"]
    assert all(line.rstrip().endswith("yes") for line in lines[1:])
    assert "KB" in lines[1] and len(lines) == 3
    assert result.stderr == ""


def test_models_json(exported):
    _install(exported, "sentiment", "bert")
    result = run("models", "--json")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows == [
        {**rows[0], "name": "sentiment", "task": "text-classification", "precision": "fp32", "validated": True}
    ]
    assert rows[0]["size"] > 0


def test_models_with_an_empty_home_says_how_to_start():
    result = run("models")
    assert result.exit_code == 0 and result.stdout == ""
    assert "onnxpipe export" in result.stderr


def test_info_shows_the_manifest_readably(exported):
    _install(exported, "opus", "marian")
    result = run("info", "opus")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in (
        "text2text-generation",
        "MarianMTModel",
        "target_tokenizer.json",
        "sha256",
        "passed against PyTorch fp32",
        "greedy ids",
        "6/6 sequences identical",
        "max abs diff",
        "KV cache 2 layers",
        "made with onnxpipe",
    ):
        assert text in out, text


def test_info_of_a_classifier_shows_labels_and_agreement(exported):
    _install(exported, "sentiment", "bert", quantize="int8")
    out = run("info", "sentiment").stdout
    assert "negative, positive, neutral" in out and "label agreement" in out
    assert "int8" in out and "fp32 baseline" in out and "cosine similarity" in out


def test_info_json_is_the_manifest(exported):
    folder = _install(exported, "sentiment", "bert")
    result = run("info", "--json", "sentiment")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == json.loads((folder / "onnxpipe.json").read_text())
    # A path works as well as a name.
    assert json.loads(run("info", "--json", str(folder)).stdout)["name"] == "bert-default"


def test_info_unknown_name_is_one_line_error(exported):
    _install(exported, "sentiment", "bert")
    result = run("info", "nope")
    assert result.exit_code != 0 and result.stdout == ""
    assert result.stderr.startswith("onnxpipe: error: no export named 'nope'") and "sentiment" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_name_beats_a_folder_that_is_not_an_export(exported, tmp_path, monkeypatch):
    """`-m sentiment` from a folder that holds the checkpoint `sentiment/` means the export."""
    import shutil

    from onnxpipe.home import export_home, resolve_model

    shutil.copytree(exported("bert", "text-classification"), export_home() / "sentiment")
    (tmp_path / "work" / "sentiment").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_model("sentiment") == export_home() / "sentiment"
    with pytest.raises(Exception, match="not an onnxpipe export"):
        resolve_model("./sentiment")


def test_info_of_an_int4_variant_says_what_was_rounded_and_its_next_token_quality(exported):
    """A --quantize int4 export of float32 weights is rounded to nearest, not 'kept as blocks: the exact
    values' (what GGUF blocks are), and its teacher-forced figures against float32 (the validation's
    quality report, held to a target it may miss) are shown, not only 'passed'."""
    folder = _install(exported, "tiny-int4", "llama", quantize="int4")
    manifest = json.loads((folder / "onnxpipe.json").read_text())
    kinds = {k: n for k, n in manifest["graph"]["weights"].items() if n}
    assert kinds == {"int4": 8, "int8": 2}  # 2 layers x 4 matrices; the output layer and the embedding 8-bit
    quality = manifest["validation"]["quality"]
    out = " ".join(run("info", "tiny-int4").stdout.split())  # rich wraps the rows
    assert "2 as INT8 blocks, 8 as INT4 blocks (rounded to nearest: --quantize)" in out
    assert "exact values" not in out
    assert (
        f"next tokens {quality['agreement']:.2%} agree with float32, perplexity x {quality['perplexity_ratio']:.4f} "
        f"({quality['tokens']} tokens, teacher-forced)" in out
    )
    assert ("short of the target" in out) is (not quality["passed"])


def test_weights_and_quality_text_from_hand_made_records():
    from onnxpipe.commands._format import validation_rows, weights_text

    gguf = {"weights": {"float32": 1, "q4_1": 120, "q8_0": 1}}
    assert weights_text(gguf) == "120 as Q4_1 blocks, 1 as Q8_0 blocks (kept as blocks: the exact values), 1 float32"
    mixed = {"weights": {"float32": 0, "q4_0": 4, "int4": 3, "int8": 1}}
    assert weights_text(mixed) == (
        "4 as Q4_0 blocks (kept as blocks: the exact values), 3 as INT4 blocks, 1 as INT8 blocks "
        "(rounded to nearest: --quantize)"
    )
    quality = {
        "passed": False,
        "agreement": 0.964,
        "perplexity_ratio": 1.0031,
        "tokens": 2797,
        "thresholds": {"min_agreement": 0.98, "max_perplexity_ratio": 1.02},
    }
    rows = dict(validation_rows({"passed": True, "inputs": "6 generated texts", "quality": quality}))
    assert rows["next tokens"] == (
        "96.40% agree with float32, perplexity x 1.0031 (2797 tokens, teacher-forced); short of the target "
        "(agreement >= 0.98, perplexity ratio <= 1.02)"
    )


def test_an_empty_model_is_a_usage_error_not_this_folder(exported):
    """-m '' (an unset shell variable) resolved to '.', 'is not an onnxpipe export (create one with:
    onnxpipe export .)': advice to export the current folder. It is a bad command line instead."""
    _install(exported, "sentiment", "bert", task="text-classification")
    for args, stdin in ((["classify", "-m", ""], "a\n"), (["info", " "], None), (["eval", "-m", "", "-"], "a\n")):
        result = CliRunner().invoke(cli, args, input=stdin)
        assert result.exit_code == 2 and result.stdout == "", (args, result.output)
        assert result.stderr.strip().splitlines() == [
            "onnxpipe: error: the model is empty: give an export name or folder (onnxpipe models lists the exports)"
        ]
    assert run("info", "sentiment").exit_code == 0
