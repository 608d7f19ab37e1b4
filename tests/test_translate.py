"""`onnxpipe translate` and `onnxpipe summarize` through the CLI (stdout and stderr apart)."""

from __future__ import annotations

import json

import pytest
import tiny_models
import tiny_seq2seq
from click.testing import CliRunner

from onnxpipe.main import cli

pytest.importorskip("transformers")

TEXTS = tiny_models.CORPUS[:16]


@pytest.fixture(scope="session")
def s2s(tmp_path_factory, checkpoint):
    root = tmp_path_factory.mktemp("s2s")
    return lambda arch: tiny_seq2seq.sharpened_export(arch, root, checkpoint)


def _run(*args: str, input: str = ""):
    return CliRunner().invoke(cli, list(args), input=input)


def test_marian_text_matches_marian_tokenizer_and_generate(s2s):
    """tokenizer.json/target_tokenizer.json converted from source.spm/target.spm give MarianTokenizer's text."""
    import torch
    import transformers

    ckpt, export = s2s("marian")
    lines = TEXTS[:8] + [""] + TEXTS[8:]
    result = _run(
        "translate",
        "-m",
        str(export),
        "--device",
        "cpu",
        "--min-length",
        "4",
        "--max-length",
        "20",
        "--no-repeat-ngram-size",
        "2",
        input="".join(line + "\n" for line in lines),
    )
    assert result.exit_code == 0, result.output
    got = result.stdout.split("\n")[:-1]

    tokenizer = transformers.MarianTokenizer.from_pretrained(ckpt)
    model = transformers.MarianMTModel.from_pretrained(ckpt).eval()
    with torch.no_grad():  # the model's generation_config: 4 beams, pad banned, forced eos
        out = model.generate(
            **tokenizer(TEXTS, return_tensors="pt", padding=True), min_length=4, max_length=20, no_repeat_ngram_size=2
        )
    expected = tokenizer.batch_decode(out, skip_special_tokens=True)
    assert got == expected[:8] + [""] + expected[8:]
    assert len(set(expected)) >= 4 and all(expected)  # real, different texts: a test that can fail
    assert "17 records" in result.stderr and "tokens generated" in result.stderr


def test_nbest_jsonl(s2s):
    _, export = s2s("marian")
    result = _run(
        "translate",
        "-m",
        str(export),
        "--device",
        "cpu",
        "--format",
        "jsonl",
        "--num-beams",
        "4",
        "--num-return-sequences",
        "3",
        "--min-length",
        "4",
        input=TEXTS[0] + "\n\n",
    )
    assert result.exit_code == 0, result.output
    first, empty = [json.loads(line) for line in result.stdout.splitlines()]
    assert first["text"] == TEXTS[0] and len(first["sequences"]) == 3
    assert first["translation"] == first["sequences"][0]["translation"]
    scores = [s["score"] for s in first["sequences"]]
    assert scores == sorted(scores, reverse=True) and first["provider"] == "CPUExecutionProvider"
    assert empty["translation"] == "" and empty["generated_tokens"] == 0


def test_nbest_needs_jsonl(s2s):
    _, export = s2s("marian")
    result = _run("translate", "-m", str(export), "--num-return-sequences", "2", input="a\n")
    assert result.exit_code == 2 and result.stdout == ""
    assert "--format jsonl" in result.stderr


def test_language_codes(s2s):
    _, export = s2s("nllb")
    result = _run("translate", "-m", str(export), "--target-lang", "xx_Yyyy", input="a\n")
    assert result.exit_code == 2 and result.stdout == ""
    assert "unknown target language 'xx_Yyyy'" in result.stderr and "deu_Latn" in result.stderr
    result = _run("translate", "-m", str(export), input="a\n")
    assert result.exit_code == 2 and "multilingual: give --target-lang" in result.stderr
    result = _run(
        "translate",
        "-m",
        str(export),
        "--device",
        "cpu",
        "--source-lang",
        "fra_Latn",
        "--target-lang",
        "deu_Latn",
        "--format",
        "jsonl",
        "--max-new-tokens",
        "5",
        input="Short.\n",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["generated_tokens"] == 5

    _, marian = s2s("marian")
    result = _run("translate", "-m", str(marian), "--target-lang", "de", input="a\n")
    assert result.exit_code == 2 and "takes no --source-lang/--target-lang" in result.stderr


def test_t5_prefix_and_settings_from_task_specific_params(s2s):
    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.seq2seq import Seq2SeqTask

    _, export = s2s("t5")
    task = Seq2SeqTask(load_model(export, device="cpu"))
    assert task.prefix == "translate English to German: "  # the tiny T5's translation_en_to_de entry
    assert task.generation_config.num_beams == 2 and task.max_new_tokens == 39
    result = _run("translate", "-m", str(export), "--device", "cpu", "--format", "jsonl", input="Short.\n")
    expected = len(task.tokenizer.encode("translate English to German: Short.").ids)
    assert json.loads(result.stdout)["source_tokens"] == expected
    result = _run(
        "translate", "-m", str(export), "--device", "cpu", "--format", "jsonl", "--prefix", "", input="Short.\n"
    )
    assert json.loads(result.stdout)["source_tokens"] == len(task.tokenizer.encode("Short.").ids)


def test_task_defaults_pick_the_pair():
    from onnxpipe.errors import UsageError
    from onnxpipe.tasks.seq2seq import task_defaults

    config = {
        "task_specific_params": {
            "summarization": {"prefix": "summarize: ", "num_beams": 4},
            "translation_en_to_de": {"prefix": "translate English to German: "},
            "translation_en_to_fr": {"prefix": "translate English to French: "},
        }
    }
    assert task_defaults(config, True, None, None)[0]["prefix"] == "summarize: "
    assert task_defaults(config, False, "en", "fr")[1] == "translation_en_to_fr"
    assert task_defaults(config, False, None, "de")[1] == "translation_en_to_de"
    with pytest.raises(UsageError, match="en->de, en->fr"):
        task_defaults(config, False, None, None)
    with pytest.raises(UsageError, match="not en->ro"):
        task_defaults(config, False, "en", "ro")
    assert task_defaults({}, False, None, None) == ({}, None)


def test_summarize_keeps_the_line_contract_and_counts_truncation(s2s):
    _, export = s2s("bart")
    long_line = " ".join(TEXTS) * 3  # far beyond the tiny model's 128 positions
    result = _run(
        "summarize",
        "-m",
        str(export),
        "--device",
        "cpu",
        "--max-new-tokens",
        "6",
        input=f"{TEXTS[0]}\n\n{long_line}\nline with\\backslash\n",
    )
    assert result.exit_code == 0, result.output
    assert len(result.stdout.split("\n")) == 5 and result.stdout.split("\n")[1] == ""
    assert "1 of 4 records was longer than the model's 128 tokens and was truncated (<stdin>:3)" in result.stderr


def test_export_of_another_task_is_refused(exported):
    result = _run("translate", "-m", str(exported("bert", "text-classification")), input="a\n")
    assert result.exit_code == 2 and result.stdout == ""
    assert "text-classification export" in result.stderr


def test_both_length_spellings_mean_what_transformers_means(s2s):
    """--max-length/--min-length count the decoder start token; --max-new-tokens/--min-new-tokens do not."""
    import torch
    import transformers

    ckpt, export = s2s("marian")
    stdin = "".join(line + "\n" for line in TEXTS[:8])
    new = _run(
        "translate",
        "-m",
        str(export),
        "--device",
        "cpu",
        "--num-beams",
        "1",
        "--min-new-tokens",
        "9",
        "--max-new-tokens",
        "12",
        input=stdin,
    )
    whole = _run(
        "translate",
        "-m",
        str(export),
        "--device",
        "cpu",
        "--num-beams",
        "1",
        "--min-length",
        "10",
        "--max-length",
        "13",
        input=stdin,
    )
    free = _run(
        "translate", "-m", str(export), "--device", "cpu", "--num-beams", "1", "--max-new-tokens", "12", input=stdin
    )
    assert new.exit_code == whole.exit_code == free.exit_code == 0, new.output + whole.output
    assert new.stdout == whole.stdout
    assert new.stdout != free.stdout  # the minimum changes some outputs: the flags are not ignored

    tokenizer = transformers.MarianTokenizer.from_pretrained(ckpt)
    model = transformers.MarianMTModel.from_pretrained(ckpt).eval()
    batch = tokenizer(TEXTS[:8], return_tensors="pt", padding=True)
    with torch.no_grad():
        by_new = model.generate(**batch, num_beams=1, min_new_tokens=9, max_new_tokens=12)
        by_length = model.generate(**batch, num_beams=1, min_length=10, max_length=13)
    expected = tokenizer.batch_decode(by_new, skip_special_tokens=True)
    assert expected == tokenizer.batch_decode(by_length, skip_special_tokens=True)
    assert new.stdout.split("\n")[:-1] == expected
