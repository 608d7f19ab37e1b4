"""Zero-shot classification (`classify --candidate-labels`) against transformers'
ZeroShotClassificationPipeline on sharpened tiny NLI models (see tiny_pairs)."""

from __future__ import annotations

import json

import pytest
import tiny_pairs
from click.testing import CliRunner

from onnxpipe.main import cli

LONG = "Paris is the capital of France, and Berlin is the capital of Germany. " * 12
TEXTS = [
    "A good movie with a great cast and a moving story.",
    "The quick brown fox jumps over the lazy dog.",
    "Émile a visité Zürich et São Paulo en été.",
    LONG,  # cut to the model's length, the hypothesis kept whole (only-first truncation)
    "Short.",
]
CANDIDATES = ["sports", "politics", "technology", "movies"]


def invoke(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.getbasetemp()


def zero_shot(folder, texts, labels, **kw):
    from transformers import pipeline

    pipe = pipeline("zero-shot-classification", model=str(folder), device="cpu")
    return [pipe(text, candidate_labels=labels, **kw) for text in texts]


def assert_matches(records, expected):
    assert len(records) == len(expected)
    for got, want in zip(records, expected):
        assert got["labels"] == want["labels"], (got, want)
        assert got["scores"] == pytest.approx(want["scores"], abs=1e-4)


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("multi_label", [False, True])
def test_matches_the_zero_shot_pipeline(arch, multi_label, base):
    folder = tiny_pairs.export(base, arch, labels=tiny_pairs.NLI_LABELS)
    args = ["classify", "-m", folder, "--candidate-labels", ",".join(CANDIDATES), "--format", "jsonl"]
    result = invoke(*args, *(["--multi-label"] if multi_label else []), input="\n".join(TEXTS) + "\n")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    checkpoint = tiny_pairs.checkpoint(base, arch, labels=tiny_pairs.NLI_LABELS)
    expected = zero_shot(checkpoint, TEXTS, CANDIDATES, multi_label=multi_label)
    assert_matches(records, expected)
    assert [r["text"] for r in records] == TEXTS
    assert [r["label"] for r in records] == [e["labels"][0] for e in expected]
    if not multi_label:
        assert all(sum(r["scores"]) == pytest.approx(1.0, abs=1e-5) for r in records)
    # The scores really differ between candidates: a wrong column would show (not for this distilbert's
    # multi-label scores, whose contradiction logit is far below its entailment one for every candidate).
    if arch != "distilbert" or not multi_label:
        assert max(abs(a - b) for r in records for a, b in zip(r["scores"], r["scores"][1:])) > 1e-3
    assert "1 of 5 records" in result.stderr or "truncated" in result.stderr  # LONG was cut, and said so


def test_one_candidate_is_entailment_against_contradiction(base):
    import onnxpipe

    folder = tiny_pairs.export(base, "bert", labels=tiny_pairs.NLI_LABELS)
    clf = onnxpipe.load(folder, device="cpu")
    got = [r.to_dict() for r in clf(TEXTS, candidate_labels=["politics"])]
    assert_matches(got, zero_shot(tiny_pairs.checkpoint(base, "bert", labels=tiny_pairs.NLI_LABELS), TEXTS, "politics"))
    assert len({round(r["scores"][0], 4) for r in got}) > 1


def test_the_entailment_label_is_found_where_the_config_puts_it(base):
    labels = ["contradiction", "neutral", "ENTAILMENT"]  # entailment last, in capitals
    folder = tiny_pairs.export(base, "bert", labels=labels)
    for multi in ([], ["--multi-label"]):
        result = invoke(
            "classify", "-m", folder, "--candidate-labels", "a,b,c", *multi, "--format", "jsonl", input="\n".join(TEXTS)
        )
        expected = zero_shot(
            tiny_pairs.checkpoint(base, "bert", labels=labels), TEXTS, "a,b,c", multi_label=bool(multi)
        )
        assert_matches([json.loads(line) for line in result.stdout.splitlines()], expected)


def test_a_model_without_an_entailment_label_runs_as_transformers_does_and_says_so(base):
    labels = ["yes", "maybe", "no"]
    folder = tiny_pairs.export(base, "roberta", labels=labels)
    result = invoke(
        "classify", "-m", folder, "--candidate-labels", "a,b,c", "--format", "jsonl", input="\n".join(TEXTS)
    )
    assert result.exit_code == 0
    assert "entail" in result.stderr and "entail" not in result.stdout
    expected = zero_shot(tiny_pairs.checkpoint(base, "roberta", labels=labels), TEXTS, "a,b,c")
    assert_matches([json.loads(line) for line in result.stdout.splitlines()], expected)


def test_labels_are_split_and_trimmed_as_transformers_does_and_template_is_used(base):
    folder = tiny_pairs.export(base, "bert", labels=tiny_pairs.NLI_LABELS)
    checkpoint = tiny_pairs.checkpoint(base, "bert", labels=tiny_pairs.NLI_LABELS)
    messy = " sports ,politics,, tech news ,"
    template = "Das Thema ist {}!"
    result = invoke(
        "classify", "-m", folder, "--candidate-labels", messy, "--hypothesis-template", template, "--format", "jsonl",
        input="\n".join(TEXTS),
    )  # fmt: skip
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert_matches(records, zero_shot(checkpoint, TEXTS, messy, hypothesis_template=template))
    assert sorted(records[0]["labels"]) == ["politics", "sports", "tech news"]
    # The default template is transformers' own: leaving it out and giving it agree.
    default = invoke("classify", "-m", folder, "--candidate-labels", "a,b", "--format", "jsonl", input="x\n")
    given = invoke(
        "classify", "-m", folder, "--candidate-labels", "a,b", "--hypothesis-template", "This example is {}.",
        "--format", "jsonl", input="x\n",
    )  # fmt: skip
    assert default.stdout == given.stdout
    # A comma inside a label: escaped as \, on the command line, a list in the API.
    escaped = invoke(
        "classify", "-m", folder, "--candidate-labels", r"war\, peace,sports", "--format", "jsonl", input="x\n"
    )
    assert sorted(json.loads(escaped.stdout)["labels"]) == ["sports", "war, peace"]
    assert_matches([json.loads(escaped.stdout)], zero_shot(checkpoint, ["x"], ["war, peace", "sports"]))


def test_text_output_top_k_threshold_and_batching(base):
    folder = tiny_pairs.export(base, "distilbert", labels=tiny_pairs.NLI_LABELS)
    data = "\n".join(TEXTS) + "\n"
    labels = ",".join(CANDIDATES)
    full = [
        json.loads(line)
        for line in invoke(
            "classify", "-m", folder, "--candidate-labels", labels, "--format", "jsonl", input=data
        ).stdout.splitlines()
    ]
    text = invoke("classify", "-m", folder, "--candidate-labels", labels, input=data).stdout.splitlines()
    assert text == [",".join(r["labels"]) for r in full]  # every candidate, best first
    best = invoke("classify", "-m", folder, "--candidate-labels", labels, "-k", "1", input=data).stdout.splitlines()
    assert best == [r["labels"][0] for r in full]
    one_by_one = invoke(
        "classify", "-m", folder, "--candidate-labels", labels, "--format", "jsonl", "--batch-size", "1", input=data
    )  # fmt: skip
    for got, want in zip(one_by_one.stdout.splitlines(), full):
        assert json.loads(got)["scores"] == pytest.approx(want["scores"], abs=1e-5)
    kept = invoke(
        "classify", "-m", folder, "--candidate-labels", labels, "--multi-label", "--threshold", "0.5", "--format", "jsonl",
        input=data,
    )  # fmt: skip
    for line in kept.stdout.splitlines():
        assert all(s >= 0.5 for s in json.loads(line)["scores"])


def test_the_api_takes_a_list_of_labels_and_refuses_pairs(base):
    import onnxpipe

    clf = onnxpipe.load(tiny_pairs.export(base, "bert", labels=tiny_pairs.NLI_LABELS), device="cpu", on_error="null")
    listed = clf(TEXTS[0], candidate_labels=["war, peace", "sports"], multi_label=True)
    assert sorted(listed.labels) == ["sports", "war, peace"]
    pair = clf([("a premise", "a hypothesis"), TEXTS[0]], candidate_labels="sports,politics")
    assert "text pair" in pair[0].error and pair[1].error is None
    # Zero-shot truncates only-first on the export's tokenizer, which its other tasks share: they are unmoved.
    long_pair = (LONG, "word " * 100)
    before = clf(long_pair, top_k=3).scores
    clf([LONG], candidate_labels="sports", hypothesis_template="word " * 100 + "{}")
    assert clf(long_pair, top_k=3).scores == before


def test_usage_errors_are_one_line_before_any_output(base):
    folder = tiny_pairs.export(base, "bert", labels=tiny_pairs.NLI_LABELS)
    cases = [
        (["--candidate-labels", "a,b", "--hypothesis-template", "no placeholder"], "{}"),
        (["--multi-label"], "--candidate-labels"),
        (["--hypothesis-template", "x {}"], "--candidate-labels"),
        (["--candidate-labels", " , ,"], "at least one candidate label"),
        (["--candidate-labels", "a", "--field", "t", "--pair-field", "h"], "--pair-field"),
    ]
    for args, message in cases:
        result = invoke("classify", "-m", folder, *args, input="x\n")
        assert result.exit_code == 2, (args, result.stderr)
        assert result.stdout == "" and message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) <= 2  # the error, and at most a hint


def test_a_hypothesis_that_leaves_no_room_is_an_error_record(base):
    folder = tiny_pairs.export(base, "bert", labels=tiny_pairs.NLI_LABELS)
    template = "word " * 130 + "{}"  # longer than the model's 128 tokens by itself
    result = invoke(
        "classify", "-m", folder, "--candidate-labels", "a", "--hypothesis-template", template, "--on-error", "null",
        "--format", "jsonl", input=LONG + "\n\n",
    )  # fmt: skip
    assert result.exit_code == 3
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 2 and "no room" in records[0]["error"] and "error" not in records[1]


def test_a_long_hypothesis_is_kept_whole_and_the_text_cut_as_transformers_does(base):
    folder = tiny_pairs.export(base, "bert", labels=tiny_pairs.NLI_LABELS)
    template = (
        "This long example of a hypothesis, with many words in it, goes on. " * 2 + "It is about {}."
    )  # ~70 tokens
    result = invoke(
        "classify", "-m", folder, "--candidate-labels", "sports,politics", "--hypothesis-template", template,
        "--format", "jsonl", input=LONG + "\n" + "Short.\n",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    checkpoint = tiny_pairs.checkpoint(base, "bert", labels=tiny_pairs.NLI_LABELS)
    expected = zero_shot(checkpoint, [LONG, "Short."], "sports,politics", hypothesis_template=template)
    assert_matches([json.loads(line) for line in result.stdout.splitlines()], expected)
