"""Text pairs: `classify --pair-field/--pair-column` and the API's (text, text_pair) tuples against
transformers' text-classification pipeline, and `onnxpipe rerank` against sentence-transformers'
CrossEncoder, on sharpened tiny models (see tiny_pairs)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import tiny_pairs
from click.testing import CliRunner

from onnxpipe.main import cli
from onnxpipe.stream.writers import escape_cell

ARCHS = ("bert", "roberta", "distilbert")
LONG = "Paris is the capital of France, and Berlin is the capital of Germany. " * 12
PAIRS = [
    ("A good movie with a great cast and a moving story.", "This film was boring, too long and badly acted."),
    ("Short.", "The quick brown fox jumps over the lazy dog."),
    ("Émile a visité Zürich et São Paulo en été.", "Numbers like 42 and 2026 appear in text too."),
    (LONG, "Short."),  # the first text is cut: longest-first truncation
    ("I loved every minute of it!", LONG),  # the second is cut
    (LONG, LONG[:300]),  # both are cut
]
QUERY = "Is Paris the capital of France?"
PASSAGES = [
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "The quick brown fox jumps over the lazy dog.",
    "I loved every minute of it!",
    LONG,
    "Short.",
]


def invoke(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.getbasetemp()


def pipeline_scores(folder, pairs):
    """{label: score} per pair from transformers' pipeline, truncating as our classify does."""
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(folder), top_k=None, truncation=True, device="cpu")
    return [{d["label"]: d["score"] for d in pipe({"text": a, "text_pair": b})} for a, b in pairs]


def assert_close(got: dict, expected: dict, atol=1e-4):
    assert set(got) == set(expected)
    for label in expected:
        assert abs(got[label] - expected[label]) <= atol, (label, got, expected)


# --- classify with pairs ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_pairs_match_the_text_classification_pipeline(arch, base):
    import onnxpipe

    folder = tiny_pairs.export(base, arch)
    expected = pipeline_scores(tiny_pairs.checkpoint(base, arch), PAIRS)
    results = onnxpipe.load(folder, device="cpu")(PAIRS, top_k=3)
    assert len(results) == len(PAIRS)
    for result, want in zip(results, expected):
        assert result.labels == sorted(want, key=want.get, reverse=True)
        assert_close(dict(zip(result.labels, result.scores)), want)
    # The swapped pairs score differently: the order matters and is the one above.
    swapped = onnxpipe.load(folder, device="cpu")([(b, a) for a, b in PAIRS], top_k=3)
    assert any(
        max(abs(x - y) for x, y in zip(sorted(r.scores), sorted(s.scores))) > 1e-3 for r, s in zip(results, swapped)
    )


def test_pair_field_jsonl_passes_fields_through_and_matches_the_pipeline(base):
    folder = tiny_pairs.export(base, "bert")
    expected = pipeline_scores(tiny_pairs.checkpoint(base, "bert"), PAIRS)
    lines = [json.dumps({"id": i, "premise": a, "hypothesis": b}, ensure_ascii=False) for i, (a, b) in enumerate(PAIRS)]
    result = invoke(
        "classify",
        "-m",
        folder,
        "--field",
        "premise",
        "--pair-field",
        "hypothesis",
        "-k",
        "3",
        "--batch-size",
        "2",
        input="\n".join(lines) + "\n",
    )
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in records] == list(range(len(PAIRS)))
    assert [r["hypothesis"] for r in records] == [b for _, b in PAIRS]
    for record, want in zip(records, expected):
        assert_close(dict(zip(record["labels"], record["scores"])), want)
    # 3 of the pairs do not fit the model's 128 tokens: counted once on stderr, never on stdout.
    assert re.search(r"\b3\b[^\n]*truncated", result.stderr), result.stderr


def test_pair_column_tsv_matches_the_pair_field(base):
    folder = tiny_pairs.export(base, "roberta")
    rows = "".join(f"{i}\t{a}\t{b}\n" for i, (a, b) in enumerate(PAIRS[:3]))
    tsv = invoke("classify", "-m", folder, "--column", "2", "--pair-column", "3", input=rows)
    assert tsv.exit_code == 0, tsv.stderr
    lines = [line.split("\t") for line in tsv.stdout.splitlines()]
    assert [cells[:3] for cells in lines] == [[str(i), a, b] for i, (a, b) in enumerate(PAIRS[:3])]
    expected = pipeline_scores(tiny_pairs.checkpoint(base, "roberta"), PAIRS[:3])
    for cells, want in zip(lines, expected):
        best = max(want, key=want.get)
        assert cells[3] == best
        assert abs(float(cells[4]) - want[best]) < 1e-4


def test_pair_records_that_cannot_pair_are_error_records_and_the_line_contract_holds(base):
    folder = tiny_pairs.export(base, "bert")
    data = "\n".join(
        [
            json.dumps({"p": "a premise", "h": "a hypothesis"}),
            json.dumps({"p": "no hypothesis"}),
            "",
            json.dumps({"p": "numbers", "h": 3}),
            "{not json",
            json.dumps({"p": "last", "h": "one"}),
        ]
    )
    result = invoke("classify", "-m", folder, "--field", "p", "--pair-field", "h", "--on-error", "null", input=data)
    assert result.exit_code == 3
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 6
    assert [r["label"] is not None for r in records] == [True, False, False, False, False, True]
    assert "no field 'h'" in records[1]["error"] and "not a string" in records[3]["error"]
    assert "error" not in records[2]  # an empty line is an empty result, not an error


def test_pair_options_need_their_input_format(base):
    folder = tiny_pairs.export(base, "bert")
    result = invoke("classify", "-m", folder, "--pair-field", "h", input="x\n")
    assert result.exit_code == 2 and result.stdout == ""
    assert "--pair-field needs --field" in result.stderr and "Traceback" not in result.stderr
    result = invoke("classify", "-m", folder, "--field", "t", "--pair-column", "2", input="x\n")
    assert result.exit_code == 2 and "--pair-column needs --column" in result.stderr


def test_the_api_takes_tuples_as_pairs(base):
    import onnxpipe
    from onnxpipe.errors import UsageError

    clf = onnxpipe.load(tiny_pairs.export(base, "distilbert"), device="cpu")
    pair, text = clf(PAIRS[0]), clf(PAIRS[0][0])
    assert pair.to_dict()["text"] == PAIRS[0][0]
    assert pair.scores != text.scores  # the second text was read
    assert [r.scores for r in clf.stream(iter(PAIRS[:2]))] == [r.scores for r in clf(PAIRS[:2])]
    with pytest.raises(UsageError, match="tuple"):
        clf([("a", "b", "c")])


# --- rerank -------------------------------------------------------------------------------------


def cross_encoder_scores(folder, query, passages, **kw):
    from sentence_transformers import CrossEncoder

    scores = CrossEncoder(str(folder), device="cpu").predict([(query, p) for p in passages], **kw)
    return [s.tolist() for s in scores]


@pytest.mark.parametrize("arch", ARCHS)
def test_rerank_matches_cross_encoder_predict(arch, base):
    folder = tiny_pairs.export(base, arch, num_labels=1)
    expected = cross_encoder_scores(tiny_pairs.checkpoint(base, arch, num_labels=1), QUERY, PASSAGES)
    result = invoke("rerank", "-m", folder, "--query", QUERY, "--format", "jsonl", input="\n".join(PASSAGES) + "\n")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["text"] for r in records] == PASSAGES
    for record, want in zip(records, expected):
        assert abs(record["score"] - want) < 1e-4, (record["score"], want)
    assert max(expected) - min(expected) > 1e-2  # the passages really score apart (a swapped order would show)
    # Text output: one score per line, the same numbers.
    text = invoke("rerank", "-m", folder, "--query", QUERY, input="\n".join(PASSAGES) + "\n")
    assert [float(s) for s in text.stdout.splitlines()] == pytest.approx(expected, abs=1e-4)


def test_rerank_uses_the_models_own_activation_and_activation_option(base):
    identity = tiny_pairs.export(
        base,
        "bert",
        num_labels=1,
        config={"sentence_transformers": {"activation_fn": "torch.nn.modules.linear.Identity"}},
    )
    checkpoint = tiny_pairs.checkpoint(
        base,
        "bert",
        num_labels=1,
        config={"sentence_transformers": {"activation_fn": "torch.nn.modules.linear.Identity"}},
    )
    logits = cross_encoder_scores(checkpoint, QUERY, PASSAGES)
    got = invoke("rerank", "-m", identity, "--query", QUERY, "--format", "jsonl", input="\n".join(PASSAGES))
    assert [json.loads(line)["score"] for line in got.stdout.splitlines()] == pytest.approx(logits, abs=1e-4)
    assert any(not 0 <= s <= 1 for s in logits)  # raw logits, not probabilities
    sig = invoke(
        "rerank", "-m", identity, "--query", QUERY, "--activation", "sigmoid", "--format", "jsonl", input="x\n"
    )
    import math

    assert json.loads(sig.stdout)["score"] == pytest.approx(
        1 / (1 + math.exp(-cross_encoder_scores(checkpoint, QUERY, ["x"])[0])), abs=1e-5
    )


def test_rerank_sort_writes_best_first_stably(base):
    folder = tiny_pairs.export(base, "distilbert", num_labels=1)
    expected = cross_encoder_scores(tiny_pairs.checkpoint(base, "distilbert", num_labels=1), QUERY, PASSAGES)
    lines = PASSAGES + ["", PASSAGES[1], "back\\slash \\n kept"]
    data = "\n".join(lines) + "\n"
    text = invoke("rerank", "-m", folder, "--query", QUERY, "--sort", "--batch-size", "2", input=data)
    assert text.exit_code == 0, text.stderr
    out = text.stdout.splitlines()
    assert len(out) == len(lines)
    assert set(out) == set(lines) and out[-1] == ""  # every line once; the empty one last
    ranked = invoke("rerank", "-m", folder, "--query", QUERY, "--sort", "--format", "tsv", input=data)
    rows = [line.split("\t") for line in ranked.stdout.splitlines()]
    values = [float(r[1]) for r in rows if r[1]]
    assert values == sorted(values, reverse=True)
    assert [r[0] for r in rows] == [escape_cell(line) for line in out]  # TSV and text agree on the order
    # The two copies of PASSAGES[1] are adjacent, and the order follows the CrossEncoder's scores.
    best = [lines[i] for i in sorted(range(len(PASSAGES)), key=lambda i: -expected[i])]
    assert [line for line in out if line in PASSAGES][:1] == best[:1]
    assert "back\\slash \\n kept" in out  # a text line comes back exactly as it was read
    top = invoke("rerank", "-m", folder, "--query", QUERY, "--sort", "-k", "2", input=data)
    assert top.stdout.splitlines() == out[:2]
    unsorted = invoke("rerank", "-m", folder, "--query", QUERY, "-k", "2", input=data)
    assert unsorted.exit_code == 2 and "--sort" in unsorted.stderr and unsorted.stdout == ""


def test_rerank_line_contract_under_hostile_input(base, tmp_path):
    folder = tiny_pairs.export(base, "bert", num_labels=1)
    hostile = (
        b"plain\n\n\xff\xfe bad utf-8\nnul \x00 byte\r\n"
        + b"x" * 200_000
        + b"\ncr\rinside\n\xe2\x80\xa8 line separator\n\t tabs \t\n\xf0\x9f\x98\x80 emoji\nlast without newline"
    )
    path = tmp_path / "hostile.txt"
    path.write_bytes(hostile)
    proc = subprocess.run(
        [sys.executable, "-m", "onnxpipe", "rerank", "-m", str(folder), "--query", QUERY, str(path)],
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode().split("\n")
    assert out[-1] == "" and len(out) - 1 == hostile.count(b"\n") + 1
    assert out[1] == ""  # the empty line keeps its place
    assert all(float(s) for s in out[:-1] if s)
    assert b"invalid UTF-8" in proc.stderr and b"truncated" in proc.stderr


def test_rerank_jsonl_field_and_errors(base):
    folder = tiny_pairs.export(base, "roberta", num_labels=1)
    data = "\n".join(
        [json.dumps({"id": 1, "body": PASSAGES[0]}), json.dumps({"id": 2}), json.dumps({"id": 3, "body": "x"})]
    )
    result = invoke("rerank", "-m", folder, "--query", QUERY, "--field", "body", "--on-error", "null", input=data)
    assert result.exit_code == 3
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in records] == [1, 2, 3]
    assert records[1]["score"] is None and "no field 'body'" in records[1]["error"]
    expected = cross_encoder_scores(tiny_pairs.checkpoint(base, "roberta", num_labels=1), QUERY, [PASSAGES[0], "x"])
    assert [records[0]["score"], records[2]["score"]] == pytest.approx(expected, abs=1e-4)
    missing = invoke("rerank", "-m", folder, input="x\n")
    assert missing.exit_code == 2 and "--query" in missing.stderr and missing.stdout == ""


def test_rerank_with_several_labels_needs_a_label_and_reports_all(base):
    import onnxpipe

    folder = tiny_pairs.export(base, "bert", labels=tiny_pairs.NLI_LABELS)
    refused = invoke("rerank", "-m", folder, "--query", QUERY, input="x\n")
    assert refused.exit_code == 2 and "--label" in refused.stderr and refused.stdout == ""
    logits = cross_encoder_scores(tiny_pairs.checkpoint(base, "bert", labels=tiny_pairs.NLI_LABELS), QUERY, ["x"])
    result = invoke("rerank", "-m", folder, "--query", QUERY, "--label", "neutral", "--format", "jsonl", input="x\n")
    record = json.loads(result.stdout)
    assert record["score"] == pytest.approx(record["scores"]["neutral"])
    assert list(record["scores"].values()) == pytest.approx(logits[0], abs=1e-4)  # CrossEncoder: identity
    rr = onnxpipe.load(folder, task="rerank", device="cpu")
    assert rr("x", query=QUERY, label=1).score == pytest.approx(record["score"])
