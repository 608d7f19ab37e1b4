"""Question answering: the export, AnswerTask against transformers' question-answering pipeline, `onnxpipe answer`.

The oracle is `pipeline("question-answering")` on the PyTorch checkpoint of each tiny random model:
answers, character offsets and scores must agree (scores within 1e-4), on short contexts, contexts
split into several windows, top_k, max_answer_len, the impossible answer and non-ASCII text.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from onnxpipe.main import cli
from onnxpipe.registry import FAMILIES
from onnxpipe.runtime import load_model
from onnxpipe.stream.records import Record

ARCHS = ["bert", "distilbert", "roberta"]
QA = "question-answering"

LONG = " ".join(
    [
        "Paris is the capital of France, and Berlin is the capital of Germany.",
        "The quick brown fox jumps over the lazy dog.",
        "Pipelines of small tools make the shell a pleasant place to work.",
        "Numbers like 42, 3.14 and 2026 appear in text too.",
    ]
    * 6
)
CASES = [
    ("Where is Paris?", "Paris is the capital of France."),
    ("What jumps over the dog?", LONG),  # several windows at the models' 126-128 tokens
    ("Wo?", "Émile a visité Zürich 東京タワー 😀🎉 et São Paulo en e\u0301te\u0301, cafe\u0301 ok."),
    ("WHO SAID HELLO?", 'She said: "hello, world" and left the room. Short. I loved every minute of it!'),
]
OPTIONS = [
    {},
    {"top_k": 3},
    {"max_seq_len": 40, "doc_stride": 10, "top_k": 2},  # many windows, short strides
    {"handle_impossible_answer": True, "top_k": 2},
    {"max_answer_len": 2, "top_k": 4},
    {"align_to_words": False, "top_k": 2},
]


@pytest.fixture(scope="module")
def qa_export(exported):
    return lambda arch: exported(arch, QA)


@pytest.fixture(scope="module")
def oracle(checkpoint):
    from transformers import pipeline

    cache: dict = {}

    def make(arch: str):
        if arch not in cache:
            folder = str(checkpoint(arch, QA))
            cache[arch] = pipeline(QA, model=folder, tokenizer=folder, device="cpu")
        return cache[arch]

    return make


def _ours(folder, options, pairs):
    task = FAMILIES["answer"].make_task(load_model(folder, device="cpu"), options)
    items = task.encode([Record(i, context, pair=question) for i, (question, context) in enumerate(pairs)])
    return task.run(items), items


def _theirs(pipe, options, question, context):
    ref = pipe(question=question, context=context, **options)
    return ref if isinstance(ref, list) else [ref]


def assert_same_answers(got: list[dict], ref: list[dict]) -> None:
    assert [(a["answer"], a["start"], a["end"]) for a in got] == [(a["answer"], a["start"], a["end"]) for a in ref]
    for g, r in zip(got, ref):
        assert g["score"] == pytest.approx(r["score"], abs=1e-4)


# --- export -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_export_infers_the_task_and_validates_start_and_end_logits(arch, qa_export):
    manifest = json.loads((qa_export(arch) / "onnxpipe.json").read_text(encoding="utf-8"))
    assert manifest["task"] == QA and manifest["architecture"].endswith("ForQuestionAnswering")
    assert manifest["graph"]["outputs"] == ["start_logits", "end_logits"]
    validation = manifest["validation"]
    assert validation["passed"]
    for name in ("start_logits", "end_logits"):
        assert validation["outputs"][name]["max_abs_diff"] < 1e-4


# --- parity with transformers' pipeline -----------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_answers_match_the_pipeline(arch, options, qa_export, oracle):
    got, items = _ours(qa_export(arch), options, CASES)
    for (question, context), answers in zip(CASES, got):
        ref = _theirs(oracle(arch), options, question, context)
        assert_same_answers(answers, ref)
        for a in answers:  # offsets index the context as given
            assert context[a["start"] : a["end"]] == a["answer"]
    if not options:  # the long context really was read in several windows
        assert len(items[1].data) > 1


# The other encoder families optimum exports for question answering (ModernBERT it does not).
FAMILY_ARCHS = ["xlm-roberta", "deberta-v2", "electra", "albert", "mpnet"]


@pytest.fixture(scope="module")
def family_qa(tmp_path_factory):
    """(checkpoint, export) of tiny_families' ARCH with a question-answering head, built once."""
    import tiny_families

    from onnxpipe.export import export_model

    cache: dict = {}

    def make(arch: str):
        if arch not in cache:
            ckpt = tiny_families.build(arch, tmp_path_factory.mktemp("qa-family") / arch, QA)
            out = tmp_path_factory.mktemp("qa-family-exports") / arch
            export_model(ckpt, out, task=QA)
            cache[arch] = ckpt, out
        return cache[arch]

    return make


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_other_encoder_families_match_the_pipeline(arch, family_qa):
    from transformers import pipeline

    ckpt, folder = family_qa(arch)
    pipe = pipeline(QA, model=str(ckpt), tokenizer=str(ckpt), device="cpu")
    for options in (OPTIONS[2], OPTIONS[3]):  # windows and top_k; the impossible answer
        got, _ = _ours(folder, options, CASES)
        for (question, context), answers in zip(CASES, got):
            assert_same_answers(answers, _theirs(pipe, options, question, context))


@pytest.mark.parametrize("arch", ARCHS)
def test_windows_are_the_fast_tokenizers_overflowing_windows(arch, qa_export, checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint(arch, QA)))
    question, context = CASES[1]
    _, items = _ours(qa_export(arch), {"max_seq_len": 40, "doc_stride": 10}, [(question, context)])
    ref = tok(question, context, truncation="only_second", max_length=40, stride=10, return_overflowing_tokens=True)
    assert [w.ids for w in items[0].data] == ref["input_ids"]
    assert len(ref["input_ids"]) > 5


def test_the_impossible_answer_wins_when_it_scores_highest(qa_export, oracle):
    """The null score is the smallest CLS score over the windows: with --handle-impossible the empty answer
    wins where it is highest. Random weights decide where that is, so one-word contexts are tried until the
    pipeline gives the empty answer for some (about one in eight does on these tiny models)."""
    import tiny_models

    options = {"handle_impossible_answer": True, "max_seq_len": 40, "doc_stride": 10, "top_k": 2}
    words = list(dict.fromkeys(w.strip('.,:;!"') for line in tiny_models.CORPUS for w in line.split()))[:60]
    cases = [*((q, w) for w in words for q in ("Who?", "What?")), *CASES]
    got, _ = _ours(qa_export("bert"), options, cases)
    refs = [_theirs(oracle("bert"), options, q, c) for q, c in cases]
    for answers, ref in zip(got, refs):
        assert_same_answers(answers, ref)
    empty = [answers for answers, ref in zip(got, refs) if ref[0]["answer"] == ""]
    assert empty, "no case exercised the impossible answer"
    assert all(answers[0]["start"] == answers[0]["end"] == 0 for answers in empty)
    assert any(ref[0]["answer"] and ref[1]["answer"] == "" for ref in refs)  # and second, under top_k


def test_a_question_too_long_for_the_window_is_a_record_error(qa_export):
    task = FAMILIES["answer"].make_task(load_model(qa_export("bert"), device="cpu"), {"max_seq_len": 16})
    [item] = task.encode([Record(0, "Paris.", pair="what " * 30)])
    assert item.error and "leaves 0 of 16 tokens" in item.error
    # a question that leaves the context no more than the stride: transformers' tokenizer panics, we refuse it
    question = next(q for q in ("is " * k for k in range(1, 16)) if len(task.tokenizer.encode(q, "").ids) >= 10)
    [item] = task.encode([Record(0, "Paris. " * 20, pair=question)])
    assert item.error and "not more than the stride (8)" in item.error
    [item] = task.encode([Record(0, "a", pair=question)])  # it fits: no window needed
    assert item.error is None and len(item.data) == 1


def test_tasks_on_one_model_keep_their_own_windows(qa_export):
    """The API makes a task per set of options on one opened model: a second one's windows are not the first's."""
    model = load_model(qa_export("bert"), device="cpu")
    first = FAMILIES["answer"].make_task(model, {})
    FAMILIES["answer"].make_task(model, {"max_seq_len": 40, "doc_stride": 10})
    question, context = CASES[1]
    windows = first.encode([Record(0, context, pair=question)])[0].data
    assert max(len(w.ids) for w in windows) == 128 and len(windows) < 10


def test_bad_options_are_usage_errors(qa_export):
    from onnxpipe.errors import UsageError

    model = load_model(qa_export("bert"), device="cpu")
    for options in ({"max_seq_len": 10_000}, {"max_seq_len": 40, "doc_stride": 41}, {"top_k": 0}):
        with pytest.raises(UsageError):
            FAMILIES["answer"].make_task(model, options)


# --- the command --------------------------------------------------------------------------------


def _invoke(args, input=None):
    return CliRunner().invoke(cli, args, input=input)


def test_cli_tsv_input_answers_in_text(qa_export, oracle):
    lines = "".join(f"{q}\t{c}\n" for q, c in CASES)
    result = _invoke(["answer", "-m", str(qa_export("bert")), "--device", "cpu"], input=lines)
    assert result.exit_code == 0, result.stderr
    expected = [_theirs(oracle("bert"), {}, q, c)[0]["answer"] for q, c in CASES]
    assert result.stdout.splitlines() == expected
    assert "4 records" in result.stderr


def test_cli_jsonl_fields_and_top_k(qa_export, oracle):
    records = [{"id": i, "q": q, "ctx": c} for i, (q, c) in enumerate(CASES)]
    args = ["answer", "-m", str(qa_export("roberta")), "--question-field", "q", "--context-field", "ctx", "-k", "2"]
    result = _invoke(args, input="".join(json.dumps(r) + "\n" for r in records))
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2, 3]
    for row, (q, c) in zip(rows, CASES):
        ref = _theirs(oracle("roberta"), {"top_k": 2}, q, c)
        assert_same_answers(row["answers"], ref)
        assert (row["answer"], row["start"], row["end"]) == (ref[0]["answer"], ref[0]["start"], ref[0]["end"])


def test_cli_plain_lines_with_one_question_and_tsv_output(qa_export, oracle):
    contexts = [c for _, c in CASES]
    args = ["answer", "-m", str(qa_export("distilbert")), "--question", "Where?", "--format", "tsv"]
    result = _invoke(args, input="\n".join(contexts) + "\n")
    assert result.exit_code == 0, result.stderr
    for line, context in zip(result.stdout.splitlines(), contexts):
        ref = _theirs(oracle("distilbert"), {}, "Where?", context)[0]
        text, answer, start, end, score = line.split("\t")
        assert (text, answer, int(start), int(end)) == (context, ref["answer"], ref["start"], ref["end"])
        assert float(score) == pytest.approx(ref["score"], rel=1e-5, abs=1e-6)


def test_cli_keeps_the_line_contract_under_hostile_input(qa_export):
    hostile = (
        b"Where is Paris?\tParis is the capital of France.\n"
        b"\n"  # empty: empty result
        b"no tab at all\n"  # one column: an error record
        b"\tcontext without a question\n"  # empty question: an error record
        b"question without a context\t\n"  # empty context: empty result
        b"\xff\xfe bad utf-8?\tsome \xc3 text\n"
        b"a\tb\tc\td\n"  # extra columns pass through
        b"Long?\t" + b"word " * 5000 + b"\n"
    )
    result = CliRunner().invoke(cli, ["answer", "-m", str(qa_export("bert")), "--on-error", "null"], input=hostile)
    assert result.exit_code == 3, result.stderr
    lines = result.stdout.split("\n")
    assert len(lines) == 9 and lines[-1] == ""  # one line per input line
    assert lines[1] == lines[2] == lines[3] == lines[4] == ""
    assert lines[0] and set(lines[7].split()) == {"word"}
    assert "2 record(s) failed" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--question", ""], "--question is empty"),
        (["--question", "x", "--question-field", "q"], "not with --question-field"),
        (["--question-field", "q", "--context-column", "2"], "takes no TSV columns"),
        (["--field", "x"], "--field needs --question"),
        (["--question-column", "2"], "both in column 2"),
        (["--max-seq-len", "100000"], "max_seq_len 100000"),
        (["--max-seq-len", "40", "--stride", "41"], "doc_stride (41)"),
        (["--top-k", "0"], "0 is not in the range"),
    ],
)
def test_cli_bad_flags_are_one_line_on_stderr(qa_export, args, message):
    result = _invoke(["answer", "-m", str(qa_export("bert")), *args], input="")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_refuses_an_export_of_another_task(exported):
    result = _invoke(["answer", "-m", str(exported("bert", "text-classification")), "--question", "x"], input="a\n")
    assert result.exit_code != 0 and result.stdout == ""
    assert "question-answering" in result.stderr


# --- eval: SQuAD exact match and F1 ---------------------------------------------------------------


@pytest.mark.parametrize(
    "gold, pred",
    [
        ("France", "france"),
        ("the capital of France", "Capital, of France!"),
        ("Denver Broncos", "the Broncos"),
        ("a b c d", "c d e"),
        ("", ""),
        ("", "something"),
        ("An apple", "apple an"),
        ("Zürich  São Paulo", "zürich"),
        ("1,000", "1000"),
        ("the", ""),
    ],
)
def test_squad_metric_is_the_official_scripts(gold, pred):
    """transformers ships the official SQuAD 2.0 script's functions: ours must give the same values."""
    from transformers.data.metrics import squad_metrics as official

    from onnxpipe.measure.metrics import normalize_answer, squad_exact, squad_f1

    assert normalize_answer(gold) == official.normalize_answer(gold)
    assert squad_exact(gold, pred) == official.compute_exact(gold, pred)
    assert squad_f1(gold, pred) == pytest.approx(official.compute_f1(gold, pred))


def test_squad_metrics_by_hand():
    from onnxpipe.measure.metrics import squad_metrics

    golds = [["Denver Broncos", "The Denver Broncos"], ["a b c d"], [], ["x"]]
    preds = ["the broncos", "c d e", "", "y"]
    # F1: broncos vs {denver broncos}: p=1, r=1/2 -> 2/3; c d e vs (a, an article, goes) b c d: p=r=2/3 -> 2/3;
    # no answer against no answer: 1; y vs x: 0
    scores = squad_metrics(golds, preds)
    assert scores["total"] == 4
    assert scores["exact_match"] == pytest.approx(100 * 1 / 4)
    assert scores["f1"] == pytest.approx(100 * (2 / 3 + 2 / 3 + 1 + 0) / 4)
    assert scores["no_answer"] == {"exact_match": 100.0, "f1": 100.0, "total": 1}
    assert scores["has_answer"]["total"] == 3
    assert scores["has_answer"]["f1"] == pytest.approx(100 * (2 / 3 + 2 / 3) / 3)


@pytest.mark.parametrize("impossible", [False, True])
def test_eval_scores_the_pipelines_answers(tmp_path, qa_export, oracle, impossible):
    from onnxpipe.measure.metrics import squad_metrics

    examples = [
        ("Where is Paris?", "Paris is the capital of France.", {"text": ["France", "capital of France"]}),
        ("Who left?", 'She said: "hello, world" and left the room.', [{"text": "She", "answer_start": 0}]),
        (CASES[1][0], CASES[1][1], ["quick brown fox"]),
        ("What is on Mars?", "The quick brown fox jumps over the lazy dog.", {"text": [], "answer_start": []}),
    ]
    data = tmp_path / "squad.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "context": c, "answers": a}) + "\n" for q, c, a in examples),
        encoding="utf-8",
    )
    args = ["eval", "-m", str(qa_export("bert")), str(data), "--json", "--device", "cpu"]
    result = _invoke(args + (["--handle-impossible"] if impossible else []))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    options = {"handle_impossible_answer": impossible}
    preds = [_theirs(oracle("bert"), options, q, c)[0]["answer"] for q, c, _ in examples]
    golds = [["France", "capital of France"], ["She"], ["quick brown fox"], []]
    expected = squad_metrics(golds, preds)
    for part in ("has_answer", "no_answer"):
        assert report["scores"].pop(part) == pytest.approx(expected.pop(part))
    assert report["scores"] == pytest.approx(expected)
    assert report["examples"] == 4 and report["task"] == QA
    assert "exact match" in result.stderr and "F1" in result.stderr
    if impossible:  # a second export on the same questions: the same answers here
        result = _invoke([*args, "--handle-impossible", "--against", str(qa_export("bert"))])
        against = json.loads(result.stdout)["against"]
        assert against["agreement"] == {"examples": 4, "same": 4, "differ": 0, "agreement": 1.0}
        assert against["scores"]["f1"] == pytest.approx(report["scores"]["f1"])


def test_eval_refuses_squad_flags_on_other_exports_and_bad_data(tmp_path, exported, qa_export):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": "positive"}\n', encoding="utf-8")
    result = _invoke(["eval", "-m", str(exported("bert", "text-classification")), str(data), "--handle-impossible"])
    assert result.exit_code == 2 and "--handle-impossible: only for question-answering exports" in result.stderr
    result = _invoke(["eval", "-m", str(qa_export("bert")), str(data)])
    assert result.exit_code != 0 and result.stdout == ""
    assert "d.jsonl:1" in result.stderr and "'question'" in result.stderr


# --- the Python API ---------------------------------------------------------------------------------


def test_api_takes_the_pipelines_input_forms(qa_export, oracle):
    import onnxpipe

    qa = onnxpipe.load(qa_export("roberta"), device="cpu")
    pipe = oracle("roberta")
    (q1, c1), (q2, c2) = CASES[0], CASES[1]
    ref1, ref2 = _theirs(pipe, {}, q1, c1)[0], _theirs(pipe, {}, q2, c2)[0]

    def same(result, ref):
        assert (result.answer, result.start, result.end) == (ref["answer"], ref["start"], ref["end"])
        assert result.score == pytest.approx(ref["score"], abs=1e-4)

    same(qa(question=q1, context=c1), ref1)
    same(qa({"question": q1, "context": c1}), ref1)
    same(qa((q1, c1)), ref1)
    same(qa(c1, question=q1), ref1)
    for result, ref in zip(qa([{"question": q1, "context": c1}, (q2, c2)]), (ref1, ref2)):
        same(result, ref)
    for result, ref in zip(qa(question=[q1, q2], context=[c1, c2]), (ref1, ref2)):
        same(result, ref)
    top = qa(question=q2, context=c2, top_k=3)
    assert_same_answers(top.answers, _theirs(pipe, {"top_k": 3}, q2, c2))
    assert top.to_dict()["text"] == c2
    from onnxpipe.errors import UsageError

    with pytest.raises(UsageError, match="1 questions and 2 contexts"):
        qa(question=[q1], context=[c1, c2])
    with pytest.raises(UsageError, match="'question' and 'context'"):
        qa({"question": q1})


# --- the line contract in a real process and under the suite's hostile inputs -----------------------


def test_hostile_inputs_keep_the_line_contract(qa_export):
    from test_line_contract import expected_texts, hostile_inputs

    for name, data in hostile_inputs().items():
        for args in (["--question", "What?"], []):  # lines of context; TSV question<TAB>context
            result = _invoke(
                ["answer", "-m", str(qa_export("bert")), "--format", "jsonl", "--on-error", "null", *args], data
            )
            assert result.exit_code in (0, 3), (name, args, result.stderr)
            assert "Traceback" not in result.stderr, name
            rows = [json.loads(line) for line in result.stdout.splitlines()]
            if args:
                assert [row.get("text") for row in rows] == expected_texts(data), name
            else:  # one record per line; a line without a tab is an error record that keeps it
                assert len(rows) == len(expected_texts(data)), name


def test_head_ends_a_run_quietly_and_ctrl_c_exits_130(qa_export):
    import signal
    import subprocess
    import sys

    onnxpipe = [sys.executable, "-m", "onnxpipe", "answer", "-m", str(qa_export("bert"))]
    proc = subprocess.run(
        [
            "bash",
            "-c",
            f"yes 'Where?\tParis is in France.' | {' '.join(onnxpipe)} | head -2; echo rc=${{PIPESTATUS[1]}} >&2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.count("\n") == 2
    assert proc.stderr.strip().splitlines()[-1] in ("rc=0", "rc=141")
    assert "Traceback" not in proc.stderr
    run = subprocess.Popen(
        [*onnxpipe, "--question", "x"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    run.stdin.write(b"Paris is in France.\n")
    run.stdin.flush()
    assert run.stdout.readline().strip(), run.communicate(timeout=60)[1].decode(errors="replace")[-2000:]
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130 and b"Traceback" not in err
