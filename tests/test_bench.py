"""`onnxpipe bench`: report shape, counts, output formats and errors on tiny exports. No timing assertions."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from onnxpipe.main import cli

FAST = ("--device", "cpu", "--threads", "1", "--repeat", "2", "--warmup", "1")


def invoke(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input)


def bench_json(*args, input=None) -> dict:
    result = invoke("bench", *args, *FAST, "--json", input=input)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_encoder_json_has_every_shape_with_counts(exported):
    folder = exported("bert", "text-classification")
    report = bench_json("-m", str(folder), "-b", "1,3", "-s", "8,16")
    manifest = json.loads((folder / "onnxpipe.json").read_text())
    assert report["task"] == "text-classification"
    assert report["provider"] == "CPUExecutionProvider" and report["device"] == "cpu"
    assert report["precision"] == manifest["precision"]
    assert report["threads"] == 1 and report["repeat"] == 2 and report["warmup"] == 1
    assert report["input"] == "generated"
    assert report["machine"]["cores"] >= 1 and "cpu" in report["machine"] and "gpu" in report["machine"]
    assert report["versions"]["onnxruntime"].startswith("1.")
    shapes = [(r["seq_len"], r["batch_size"]) for r in report["results"]]
    assert shapes == [(8, 1), (8, 3), (16, 1), (16, 3)]
    for row in report["results"]:
        assert row["test"] == "encode" and row["unit"] == "records/s" and row["new_tokens"] is None
        assert row["runs"] == 2 and len(row["seconds"]) == 2 and all(s > 0 for s in row["seconds"])
        assert row["records"] == row["batch_size"] * 2
        assert row["tokens"] == row["records"] * row["seq_len"]
        assert row["mean"] > 0 and row["sd"] >= 0


@pytest.mark.parametrize(
    "arch,task",
    [
        ("bert", "text-classification"),
        ("roberta", "fill-mask"),
        ("distilbert", "feature-extraction"),
        ("gpt2", "text-generation"),
        ("llama", "text-generation"),
    ],
)
def test_generated_inputs_have_the_exact_token_length(exported, arch, task):
    from onnxpipe.measure.speed import text_of_length
    from onnxpipe.runtime import load_model

    tokenizer = load_model(exported(arch, task), device="cpu").tokenizer
    for n in (3, 7, 16, 50):
        assert len(tokenizer.encode(text_of_length(tokenizer, n)).ids) == n


def test_markdown_output(exported):
    result = invoke(
        "bench", "-m", str(exported("distilbert", "feature-extraction")), "-b", "2", "-s", "8", *FAST, "--markdown"
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "- provider: CPUExecutionProvider (--device cpu)" in lines
    assert "| test | batch | seq len | records/s |" in lines
    assert "|---|---:|---:|---:|" in lines
    row = next(line for line in lines if line.startswith("| encode |"))
    assert row.startswith("| encode | 2 | 8 | ") and " ± " in row
    assert "records/s" in result.stderr  # progress on stderr, one line per figure
    assert "{" not in result.stdout


@pytest.mark.parametrize("arch,task", [("roberta", "fill-mask"), ("bert", "token-classification")])
def test_table_output(exported, arch, task):
    result = invoke("bench", "-m", str(exported(arch, task)), "-b", "1", "-s", "12", *FAST)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for word in ("provider", "CPUExecutionProvider", "precision", "threads", "machine", "records/s", "encode", "±"):
        assert word in out, word


def test_generator_pp_and_tg(exported):
    report = bench_json("-m", str(exported("gpt2", "text-generation")), "-b", "1,2", "-p", "6", "-n", "5")
    assert report["task"] == "text-generation"
    rows = report["results"]
    assert [(r["test"], r["batch_size"]) for r in rows] == [("pp", 1), ("tg", 1), ("pp", 2), ("tg", 2)]
    for row in rows:
        assert row["unit"] == "tokens/s" and row["runs"] == 2 and row["mean"] > 0
        assert row["records"] == row["batch_size"] * 2 and row["seq_len"] == 6
    pp, tg = rows[2], rows[3]
    assert pp["tokens"] == 2 * 6 * 2 and pp["new_tokens"] is None
    # 5 forced new tokens: the first comes from the prefill's logits, then 4 one-token passes per run
    assert tg["new_tokens"] == 5 and tg["tokens"] == 2 * 4 * 2


def test_generator_table(exported):
    result = invoke("bench", "-m", str(exported("llama", "text-generation")), "-b", "2", "-p", "4", "-n", "3", *FAST)
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.stdout and "pp" in result.stdout and "tg" in result.stdout


@pytest.mark.parametrize("graph", ["auto", "optimum"])  # onnxpipe's encoder-decoder graph, and optimum's
def test_seq2seq_pp_and_tg(exported, graph):
    report = bench_json("-m", str(exported("t5", graph=graph)), "-b", "2", "-p", "5", "-n", "4")
    assert report["task"] == "text2text-generation"
    pp, tg = report["results"]
    assert pp["test"] == "pp" and pp["tokens"] == 2 * 5 * 2
    assert tg["test"] == "tg" and tg["new_tokens"] == 4 and tg["tokens"] == 2 * 3 * 2 and tg["mean"] > 0


def test_input_file_lines(exported, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("a good movie\n\nthis film was boring and too long\n", encoding="utf-8")
    report = bench_json("-m", str(exported("bert", "text-classification")), "-i", str(lines), "-b", "4")
    assert report["input"] == str(lines)
    (row,) = report["results"]
    assert row["batch_size"] == 4 and row["records"] == 8 and row["seq_len"] > 2


def test_input_from_stdin(exported):
    report = bench_json(
        "-m",
        str(exported("gpt2", "text-generation")),
        "-i",
        "-",
        "-b",
        "1",
        "-n",
        "2",
        input="Paris is the capital of\n",
    )
    assert report["input"] == "-" and [r["test"] for r in report["results"]] == ["pp", "tg"]


def _one_line_error(result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_unknown_model_is_one_line():
    err = _one_line_error(invoke("bench", "-m", "no-such-model", "--device", "cpu"), 1)
    assert err.startswith("onnxpipe: error: no export named 'no-such-model'")


def test_options_for_the_other_kind_of_task(exported):
    err = _one_line_error(invoke("bench", "-m", str(exported("gpt2", "text-generation")), "-s", "16", *FAST), 2)
    assert "--seq-lens apply to encoder tasks" in err
    err = _one_line_error(invoke("bench", "-m", str(exported("bert", "text-classification")), "-n", "8", *FAST), 2)
    assert "--new-tokens apply to generators" in err


def test_out_of_range_lengths(exported):
    folder = str(exported("bert", "text-classification"))
    err = _one_line_error(invoke("bench", "-m", folder, "-s", "100000", *FAST), 2)
    assert "100000 tokens" in err and "at most" in err
    err = _one_line_error(invoke("bench", "-m", folder, "-s", "1", *FAST), 2)
    assert "exactly 1 tokens" in err
    err = _one_line_error(
        invoke("bench", "-m", str(exported("gpt2", "text-generation")), "-p", "250", "-n", "10", *FAST), 2
    )
    assert "do not fit" in err


def test_bad_option_values(exported):
    folder = str(exported("bert", "text-classification"))
    assert invoke("bench", "-m", folder, "-b", "0").exit_code == 2
    assert invoke("bench", "-m", folder, "-b", "x,y").exit_code == 2
    _one_line_error(invoke("bench", "-m", folder, "--json", "--markdown", *FAST), 2)
