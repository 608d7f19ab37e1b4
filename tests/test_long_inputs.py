"""Inputs longer than the model's window (issue 17, long inputs).

`tag` reads a long line whole, in strided windows whose entities are merged, and must give what
transformers' token-classification pipeline gives with the same `stride=` (words, labels, offsets into
the whole line, scores within 1e-4). classify, embed and fill-mask truncate, count and say so once at
the end; `--truncation error` makes a long record an error record instead.
"""

from __future__ import annotations

import json
import warnings

import pytest
from click.testing import CliRunner

import onnxpipe
from onnxpipe.errors import InputError, UsageError
from onnxpipe.main import cli

# The tiny models take 128 (BERT) and 126 (RoBERTa) tokens; these lines take several windows.
SENTENCE = "Paris is the capital of France, and Émile moved to Zürich in 2019."
NON_ASCII = "日本の東京 and 🙂 emoji, cafe\u0301 with a combining accent, São Paulo, naïve Ñandú \u00a0 ok."
LONG = [
    " ".join([SENTENCE] * 25),
    " ".join([NON_ASCII, SENTENCE] * 12),
    "Short line about Berlin.",
    "x" + " unbreakable" * 150 + " 🙂" * 40,
]
# Every aggregation the pipeline allows with stride (it refuses "none"), at strides of 0 (windows that only
# touch), a little and a lot of overlap.
STRIDED = [("simple", 0), ("simple", 60), ("first", 7), ("first", 60), ("average", 0), ("average", 7), ("max", 60)]


def invoke(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input)


def comparable(entities):
    return [{k: v for k, v in e.items() if k != "score"} for e in entities], [float(e["score"]) for e in entities]


def assert_same_entities(mine, theirs, context):
    mine_keys, mine_scores = comparable(mine)
    their_keys, their_scores = comparable(theirs)
    assert mine_keys == their_keys, context
    assert mine_scores == pytest.approx(their_scores, abs=1e-4), context


@pytest.fixture(scope="module")
def hf_tagger(checkpoint):
    """arch -> transformers' token-classification pipeline on the same tiny checkpoint (PyTorch)."""
    from transformers import pipeline

    cache: dict = {}

    def make(arch):
        if arch not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[arch] = pipeline("token-classification", model=str(checkpoint(arch, "token-classification")))
        return cache[arch]

    return make


def hf_entities(pipe, text, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Tokenizer does not support real words" (byte-level BPE)
        return pipe(text, **kw)


# --- tag: windows ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_tag_windows_match_the_pipeline_with_stride(arch, exported, hf_tagger):
    """Every aggregation the pipeline allows with stride, at several strides, on lines of 1 to ~10 windows."""
    hf = hf_tagger(arch)
    tagger = onnxpipe.load(exported(arch, "token-classification"), device="cpu")
    assert tagger.model.max_length == hf.tokenizer.model_max_length
    for strategy, stride in STRIDED:
        results = tagger(LONG, aggregation=strategy, stride=stride)
        for text, result in zip(LONG, results):
            expected = hf_entities(hf, text, aggregation_strategy=strategy, stride=stride)
            assert_same_entities(result.entities, expected, (strategy, stride, text[:30]))
            for entity in result.entities:  # byte-level BPE splits an emoji into pieces of zero width
                assert 0 <= entity["start"] <= entity["end"] <= len(text)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_tag_reads_long_lines_whole_by_default(arch, exported, hf_tagger):
    """The default: windows with a quarter of the window as stride; entities found past the first window."""
    hf = hf_tagger(arch)
    folder = exported(arch, "token-classification")
    result = invoke("tag", "-m", str(folder), "--format", "jsonl", input="\n".join(LONG) + "\n")
    assert result.exit_code == 0, result.stderr
    assert "truncated (" not in result.stderr and ", 0 truncated," in result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["text"] for row in rows] == LONG
    stride = hf.tokenizer.model_max_length // 4
    first_window_end = hf.tokenizer(LONG[0], truncation=True, return_offsets_mapping=True)["offset_mapping"][-2][1]
    for text, row in zip(LONG, rows):
        assert_same_entities(row["entities"], hf_entities(hf, text, aggregation_strategy="simple", stride=stride), text)
    assert max(e["end"] for e in rows[0]["entities"]) > first_window_end  # the tail of the line is tagged too


def test_tag_offsets_are_into_the_whole_non_ascii_line(exported, hf_tagger):
    """CJK, emoji and combining marks in every window: offsets count characters of the whole line."""
    tagger = onnxpipe.load(exported("bert", "token-classification"), device="cpu")
    text = LONG[1]
    entities = tagger(text, aggregation="first", stride=7).entities
    expected = hf_entities(hf_tagger("bert"), text, aggregation_strategy="first", stride=7)
    assert [(e["start"], e["end"]) for e in entities] == [(e["start"], e["end"]) for e in expected]
    assert max(e["end"] for e in entities) > len(text) - 20  # the last window's offsets are into the whole line
    for e in entities:
        piece = text[e["start"] : e["end"]]
        assert piece and piece == piece.strip(), e
    pieces = {text[e["start"] : e["end"]] for e in entities}
    assert pieces & {"東", "京", "🙂", "cafe\u0301", "São", "naïve", "Ñandú"}, pieces


def test_tag_truncate_is_the_pipeline_without_stride_and_is_reported(exported, hf_tagger):
    hf = hf_tagger("roberta")
    folder = exported("roberta", "token-classification")
    result = invoke(
        "tag", "-m", str(folder), "--format", "jsonl", "--truncation", "truncate", input="\n".join(LONG) + "\n"
    )
    assert result.exit_code == 0, result.stderr
    for text, line in zip(LONG, result.stdout.splitlines()):
        assert_same_entities(json.loads(line)["entities"], hf_entities(hf, text, aggregation_strategy="simple"), text)
    assert (
        "onnxpipe: warning: 3 of 4 records were longer than the model's 126 tokens and were truncated "
        "(<stdin>:1, <stdin>:2, <stdin>:4); the default --truncation window reads them whole"
    ) in result.stderr.splitlines()


def test_tag_aggregation_none_truncates_and_refuses_a_stride(exported, hf_tagger):
    """As the pipeline: per-token results are not windowed (it raises for stride with aggregation none)."""
    hf = hf_tagger("bert")
    folder = str(exported("bert", "token-classification"))
    result = invoke("tag", "-m", folder, "--format", "jsonl", "--aggregation", "none", input=LONG[0] + "\n")
    assert result.exit_code == 0, result.stderr
    assert_same_entities(json.loads(result.stdout)["entities"], hf_entities(hf, LONG[0]), "none")
    assert "1 of 1 record was longer than the model's 128 tokens and was truncated (<stdin>:1)" in result.stderr
    assert "need an --aggregation other than none" in result.stderr
    with pytest.raises(ValueError):
        hf_entities(hf, LONG[0], aggregation_strategy="none", stride=8)
    refused = invoke("tag", "-m", folder, "--aggregation", "none", "--stride", "8", input=LONG[0] + "\n")
    assert refused.exit_code == 2 and refused.stdout == ""
    assert refused.stderr.startswith("onnxpipe: error: windows over long lines (--stride) need an aggregation")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stride", "126"], "--stride 126: must be at least 0 and less than 126"),  # 128 less [CLS], [SEP]
        (["--stride", "500"], "--stride 500: must be at least 0 and less than 126"),
        (["--truncation", "truncate", "--stride", "8"], "--stride is for --truncation window"),
    ],
)
def test_tag_stride_out_of_range_is_a_usage_error(exported, args, message):
    result = invoke("tag", "-m", str(exported("bert", "token-classification")), *args, input=LONG[0] + "\n")
    assert result.exit_code == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith(f"onnxpipe: error: {message}"), result.stderr
    assert "Traceback" not in result.stderr


def test_tag_largest_stride_works(exported, hf_tagger):
    """stride = window - specials - 1: one new token per window, the most the tokenizer allows."""
    hf = hf_tagger("bert")
    tagger = onnxpipe.load(exported("bert", "token-classification"), device="cpu")
    text = " ".join([SENTENCE] * 4)
    got = tagger(text, aggregation="max", stride=125).entities
    assert_same_entities(got, hf_entities(hf, text, aggregation_strategy="max", stride=125), "stride 125")


def test_tag_windows_keep_the_line_contract_and_batching(exported):
    """Long and short lines, empty lines, any batch size: one output line per input line, the same results."""
    folder = str(exported("roberta", "token-classification"))
    lines = [LONG[0], "", LONG[2], LONG[3], "", LONG[1]] * 3
    data = "\n".join(lines) + "\n"
    outputs = []
    for extra in (["--batch-size", "1"], ["--batch-size", "64"], ["--max-batch-tokens", "200"]):
        result = invoke("tag", "-m", folder, "--format", "jsonl", "--aggregation", "first", *extra, input=data)
        assert result.exit_code == 0, result.stderr
        rows = [json.loads(line) for line in result.stdout.splitlines()]
        assert [row["text"] for row in rows] == lines
        assert all((r["entities"] is None) == (line == "") for r, line in zip(rows, lines))
        outputs.append(
            [[(e["word"], e["entity_group"], e["start"], e["end"]) for e in r["entities"] or []] for r in rows]
        )
    assert outputs[0] == outputs[1] == outputs[2]
    text = invoke("tag", "-m", folder, input=data).stdout
    assert text.count("\n") == len(lines)


# --- classify, embed, fill-mask: truncation counted, or refused -----------------------------
LINES = ["a short line", "word " * 300, "", "another short one", "é🙂 " * 200]
ENCODERS = {
    "classify": ("bert", "text-classification", [], 128),
    "embed": ("distilbert", "feature-extraction", [], 128),
    "fill-mask": ("bert", "fill-mask", [], 128),
}


def masked(command: str, lines: list[str]) -> list[str]:
    return [f"[MASK] {line}" if command == "fill-mask" and line else line for line in lines]


@pytest.mark.parametrize("command", list(ENCODERS))
def test_truncated_records_are_counted_in_one_line(command, exported):
    arch, task, extra, window = ENCODERS[command]
    lines = masked(command, LINES)
    result = invoke(command, "-m", str(exported(arch, task)), *extra, input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("\n") == len(lines)
    warning = (
        f"onnxpipe: warning: 2 of 5 records were longer than the model's {window} tokens and were truncated "
        "(<stdin>:2, <stdin>:5); --truncation error refuses them"
    )
    assert [line for line in result.stderr.splitlines() if "truncated (" in line] == [warning]


@pytest.mark.parametrize("command", list(ENCODERS))
def test_truncation_error_with_on_error_null_gives_error_records(command, exported):
    arch, task, extra, window = ENCODERS[command]
    lines = masked(command, LINES)
    result = invoke(
        command,
        "-m",
        str(exported(arch, task)),
        *extra,
        "--truncation",
        "error",
        "--on-error",
        "null",
        "--format",
        "jsonl",
        input="\n".join(lines) + "\n",
    )
    assert result.exit_code == 3, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["text"] for row in rows] == lines
    message = f"longer than the model's {window} tokens (--truncation error)"
    assert [row.get("error") for row in rows] == [None, message, None, None, message]
    assert all(row.get(key) is None for row in rows[1::3] for key in ("label", "embedding", "candidates"))
    assert f"<stdin>:2: {message}" in result.stderr and f"<stdin>:5: {message}" in result.stderr
    assert "truncated (" not in result.stderr  # refused, not truncated
    plain = invoke(command, "-m", str(exported(arch, task)), *extra, "--format", "jsonl", input=lines[0] + "\n")
    assert set(json.loads(plain.stdout)) == set(rows[0])  # the short records got their results


@pytest.mark.parametrize("command", list(ENCODERS))
def test_truncation_error_with_on_error_fail_stops_at_the_long_record(command, exported):
    arch, task, extra, window = ENCODERS[command]
    lines = masked(command, LINES)
    result = invoke(
        command, "-m", str(exported(arch, task)), *extra, "--truncation", "error", input="\n".join(lines) + "\n"
    )
    assert result.exit_code == 1
    assert result.stdout.count("\n") == 1  # the record before it was written
    assert result.stderr.splitlines()[-1] == (
        f"onnxpipe: error: <stdin>:2: longer than the model's {window} tokens (--truncation error)"
    )


def test_embed_counts_against_the_sentence_transformers_limit(exported, tmp_path):
    """An export with max_seq_length (sentence-transformers) truncates there, and the line says that limit."""
    import shutil

    folder = tmp_path / "st"
    shutil.copytree(exported("distilbert", "feature-extraction"), folder)
    manifest = json.loads((folder / "onnxpipe.json").read_text())
    manifest["max_seq_length"] = 16
    (folder / "onnxpipe.json").write_text(json.dumps(manifest))
    result = invoke("embed", "-m", str(folder), input="one two\n" + "word " * 20 + "\n")
    assert result.exit_code == 0, result.stderr
    assert "1 of 2 records was longer than the model's 16 tokens and was truncated (<stdin>:2)" in result.stderr


def test_the_api_takes_truncation_as_a_task_option(exported):
    classifier = onnxpipe.load(exported("bert", "text-classification"), device="cpu", on_error="null")
    short, long = classifier(["a short line", "word " * 300], truncation="error")
    assert short.error is None and short.label
    assert long.error == "longer than the model's 128 tokens (--truncation error)" and long.value is None
    assert classifier("word " * 300).error is None  # the default truncates
    strict = onnxpipe.load(exported("bert", "text-classification"), device="cpu")
    with pytest.raises(InputError, match="longer than the model's 128 tokens"):
        strict(["word " * 300], truncation="error")
    with pytest.raises(UsageError, match="unknown truncation 'window'"):
        strict("x", truncation="window")  # only tag has windows


def test_fill_mask_says_too_long_rather_than_no_mask(exported):
    """A mask past the window: the default says the window had no mask; --truncation error says too long."""
    folder = str(exported("bert", "fill-mask"))
    data = "word " * 300 + "[MASK]\n"
    default = invoke("fill-mask", "-m", folder, "--on-error", "null", "--format", "jsonl", input=data)
    assert json.loads(default.stdout)["error"] == "no mask token [MASK] within the first 128 tokens"
    refused = invoke(
        "fill-mask", "-m", folder, "--truncation", "error", "--on-error", "null", "--format", "jsonl", input=data
    )
    assert json.loads(refused.stdout)["error"] == "longer than the model's 128 tokens (--truncation error)"


def test_tag_windows_a_hostile_long_line(exported):
    """20 kB of random bytes on one line (invalid UTF-8 replaced): windowed whole, offsets inside the line."""
    import random

    rng = random.Random(17)
    junk = bytes(rng.choice([b for b in range(256) if b != 10]) for _ in range(20_000))
    data = b"before\n" + junk + b"\n\nafter\n"
    result = invoke("tag", "-m", str(exported("roberta", "token-classification")), "--format", "jsonl", input=data)
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 4 and rows[2]["entities"] is None
    text = rows[1]["text"]
    assert len(text) > 10_000 and rows[1]["entities"]
    assert all(0 <= e["start"] <= e["end"] <= len(text) for e in rows[1]["entities"])
    assert max(e["end"] for e in rows[1]["entities"]) > len(text) - 200  # tagged to the end
