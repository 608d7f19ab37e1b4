"""`onnxpipe batch`: the plan (inputs -> output shards), reading shards as the streaming commands read lines,
atomic shard writes, the job manifest (resume, refuse, --force), the local engine and the command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from onnxpipe.batch.plan import plan_job
from onnxpipe.batch.shards import InputSpec, ShardWriter, read_rows, remove_temporaries
from onnxpipe.errors import InputError, UsageError
from onnxpipe.stream.readers import RecordParser

# --- plan -------------------------------------------------------------------------------------


def _touch(path: Path, text: str = "x\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_plan_expands_folders_globs_and_names_outputs_by_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _touch(tmp_path / "data/a/x.txt")
    _touch(tmp_path / "data/b/x.txt")  # the same basename in another folder
    _touch(tmp_path / "data/b/deeper/y.jsonl")
    _touch(tmp_path / "data/.hidden.txt")
    _touch(tmp_path / "data/.git/z.txt")
    _touch(tmp_path / "data/c.csv")
    _touch(tmp_path / "more/p.parquet")
    plan = plan_job(["data", "more/*.parquet", "data/a/x.txt"], "out")
    keys = [s.key for s in plan.shards]
    assert keys == ["data/a/x.txt", "data/b/deeper/y.jsonl", "data/b/x.txt", "data/c.csv", "more/p.parquet"]
    assert [s.kind for s in plan.shards] == ["text", "jsonl", "text", "csv", "parquet"]
    assert [str(s.source) for s in plan.shards] == [
        "data/a/x.txt",
        "data/b/deeper/y.jsonl",
        "data/b/x.txt",
        "data/c.csv",
        "more/p.parquet",
    ]
    assert len({s.output for s in plan.shards}) == len(plan.shards)
    assert all(s.output.parent.resolve().is_relative_to((tmp_path / "out").resolve()) for s in plan.shards)
    assert plan.shards[0].output == Path("out/data/a/x.txt.jsonl")
    one = plan_job(["data/a/x.txt"], "out", "parquet")
    assert [(s.key, s.output) for s in one.shards] == [("x.txt", Path("out/x.txt.parquet"))]


def test_plan_skips_the_output_folder_inside_an_input_folder_and_refuses_bad_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _touch(tmp_path / "data/a.txt")
    _touch(tmp_path / "data/out/a.txt.jsonl")  # a previous run's output, inside the input folder
    assert [s.key for s in plan_job(["data"], "data/out").shards] == ["a.txt"]
    with pytest.raises(UsageError, match="inside the output folder"):
        plan_job(["data/out/a.txt.jsonl"], "data/out")
    with pytest.raises(UsageError, match="is the output folder"):
        plan_job(["data/out"], "data/out")
    with pytest.raises(UsageError, match="no such file"):
        plan_job(["nope.txt"], "out")
    with pytest.raises(UsageError, match="no file matches"):
        plan_job(["data/*.nope"], "out")
    with pytest.raises(UsageError, match="stdin"):
        plan_job(["-"], "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no input files"):
        plan_job(["empty"], "out")


# --- reading shards ---------------------------------------------------------------------------

HOSTILE = b'{"t": "caf\xc3\xa9"}\r\n\n{"t": "a\\u2028b", "id": 3}\n{"t": 5}\nnot json\n\xef\xbb\xbf{"t": "bom"}\n{"t": "x\xffy"}\n{"t": "nul\\u0000"}'


@pytest.mark.parametrize("kind,field", [("text", None), ("jsonl", "t")])
def test_text_and_jsonl_rows_are_the_streaming_records(tmp_path, kind, field):
    raw = (b"\xef\xbb\xbfbom first\r\nplain\n\nx\xffy\nnul\x00here\n" if kind == "text" else HOSTILE) + b"\nlast"
    path = tmp_path / ("in.txt" if kind == "text" else "in.jsonl")
    path.write_bytes(raw)
    (shard,) = plan_job([str(path)], tmp_path / "out").shards
    rows = list(read_rows(shard, InputSpec(field=field)))
    parser = RecordParser(field=field)
    expected = [parser.parse_line(line, str(path), i + 1) for i, line in enumerate(raw.split(b"\n"))]
    assert rows == expected
    assert [r.line for r in rows] == list(range(1, len(expected) + 1))


def test_csv_tsv_rows_pass_every_column_through(tmp_path):
    (tmp_path / "a.csv").write_text('id,text,note\n1,"hello, world",x\n2,"two\nlines",y\n\n3,short\n4,é,z\n')
    (tmp_path / "a.tsv").write_text("id\ttext\n1\thi\n")
    plan = plan_job([str(tmp_path / "a.csv"), str(tmp_path / "a.tsv")], tmp_path / "out")
    csv_rows = list(read_rows(plan.shards[0], InputSpec(column="text")))
    assert [(r.line, r.text, r.fields, r.error) for r in csv_rows] == [
        (1, "hello, world", {"id": "1", "text": "hello, world", "note": "x"}, None),
        (2, "two\nlines", {"id": "2", "text": "two\nlines", "note": "y"}, None),
        (3, "", {}, None),
        (4, "", None, "has 2 column(s), the header has 3"),
        (5, "é", {"id": "4", "text": "é", "note": "z"}, None),
    ]
    assert [r.text for r in read_rows(plan.shards[0], InputSpec(column="2"))][:2] == ["hello, world", "two\nlines"]
    assert [(r.text, r.fields) for r in read_rows(plan.shards[1], InputSpec(column="text"))] == [
        ("hi", {"id": "1", "text": "hi"})
    ]
    with pytest.raises(InputError, match="no column 'body'"):
        list(read_rows(plan.shards[0], InputSpec(column="body")))


def test_parquet_rows_in_batches_with_pass_through(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"text {i}" for i in range(2500)]
    texts[7] = None
    table = pa.table({"id": list(range(2500)), "body": texts, "n": [1.5] * 2500})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=1000)
    (shard,) = plan_job([str(tmp_path / "a.parquet")], tmp_path / "out").shards
    rows = list(read_rows(shard, InputSpec(column="body")))
    assert [r.text for r in rows] == [t or "" for t in texts]
    assert [r.line for r in rows] == list(range(1, 2501))
    assert rows[3].fields == {"id": 3, "body": "text 3", "n": 1.5}
    bad = list(read_rows(shard, InputSpec(column="id")))
    assert bad[0].error == "column 'id' is a int, not a string"


def test_shard_writer_is_atomic_and_temporaries_are_removed(tmp_path):
    _touch(tmp_path / "in/a.txt")
    plan = plan_job([str(tmp_path / "in/a.txt")], tmp_path / "out")
    (shard,) = plan.shards
    (tmp_path / "out").mkdir()
    writer = ShardWriter(shard, plan.output_dir, "jsonl")
    writer.write_line(b'{"a": 1}\n')
    assert not shard.output.exists() and writer.temp.exists()
    assert writer.temp.parent == plan.output_dir and writer.temp.name.startswith(".tmp-")
    writer.commit()
    assert shard.output.read_bytes() == b'{"a": 1}\n' and not writer.temp.exists()
    left = ShardWriter(shard, plan.output_dir, "jsonl")
    left.write_line(b"partial")
    assert remove_temporaries(plan.output_dir) == 1
    assert sorted(os.listdir(plan.output_dir)) == ["a.txt.jsonl"]
    aborted = ShardWriter(shard, plan.output_dir, "jsonl")
    aborted.abort()
    assert not aborted.temp.exists() and json.loads(shard.output.read_text()) == {"a": 1}


# --- the command: every task family gives the streaming command's records ---------------------

LINES = [
    "A good movie with a great cast.",
    "",
    "Paris is the capital of France.",
    "Short.",
    "The quick brown fox jumps over the lazy dog, again and again and again.",
]
MASKED = ["The capital of France is [MASK].", "", "A [MASK] movie.", "[MASK] [MASK] fox."]

# family -> (arch, export task, task arguments, inputs); the tiny models of tests/test_api.py
FAMILIES = {
    "classify": ("bert", "text-classification", ["--top-k", "2"], LINES),
    "embed": ("distilbert", "feature-extraction", ["--pooling", "cls"], LINES),
    "tag": ("roberta", "token-classification", ["--aggregation", "first"], LINES),
    "fill-mask": ("bert", "fill-mask", ["-k", "3"], MASKED),
    "generate": ("gpt2", None, ["--max-new-tokens", "6", "--num-beams", "2"], LINES),
    "translate": ("marian", None, ["--max-new-tokens", "6"], LINES),
    "summarize": ("bart", None, ["--max-new-tokens", "6", "--num-beams", "2"], LINES),
}


def _invoke(args: list[str], **kw):
    from click.testing import CliRunner

    from onnxpipe.main import cli

    return CliRunner().invoke(cli, args, **kw)


def _stream_records(family: str, folder: Path, args: list[str], path: Path, extra: tuple[str, ...] = ()) -> list:
    result = _invoke([family, "-m", str(folder), "--device", "cpu", "--format", "jsonl", *extra, *args, str(path)])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def _batch(family: str, folder: Path, args: list[str], inputs: list, out: Path, *more: str):
    return _invoke(
        [
            "batch",
            family,
            "-m",
            str(folder),
            "--device",
            "cpu",
            *args,
            *map(str, inputs),
            "--output-dir",
            str(out),
            *more,
        ]
    )


def _shard(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_writes_the_streaming_records_plus_source_and_line(family, exported, tmp_path, monkeypatch):
    arch, export_task, args, lines = FAMILIES[family]
    folder = exported(arch, export_task)
    monkeypatch.chdir(tmp_path)
    Path("in").mkdir()
    Path("in/lines.txt").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    result = _batch(family, folder, args, ["in"], tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "5 records" in result.stderr or f"{len(lines)} records" in result.stderr
    assert "1 shard(s) done, 0 skipped" in result.stderr
    got = _shard(tmp_path / "out/lines.txt.jsonl")
    assert [(r.pop("_source"), r.pop("_line")) for r in got] == [("in/lines.txt", i + 1) for i in range(len(lines))]
    assert got == _stream_records(family, folder, args, Path("in/lines.txt"))
    assert (tmp_path / "out/_SUCCESS").is_file()
    manifest = json.loads((tmp_path / "out/onnxpipe-batch.json").read_text())
    assert manifest["status"] == "done" and manifest["task"] == family and manifest["shards"] == 1


# --- formats, pass-through, resume --------------------------------------------------------------


@pytest.fixture
def classifier(exported) -> Path:
    return exported("bert", "text-classification")


def test_jsonl_csv_tsv_parquet_inputs_pass_everything_through(classifier, tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    monkeypatch.chdir(tmp_path)
    texts = ["good film", "bad, sad film", "", "ok"]
    Path("a").mkdir()
    Path("b").mkdir()
    Path("a/rows.jsonl").write_text(
        "".join(json.dumps({"id": i, "body": t, "meta": {"n": [i]}}) + "\n" for i, t in enumerate(texts))
    )
    Path("b/rows.csv").write_text("id,body\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(texts)))
    Path("b/rows.tsv").write_text("id\tbody\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(texts)))
    pq.write_table(pa.table({"id": list(range(4)), "body": texts}), "b/rows.parquet")
    Path("texts.txt").write_text("".join(t + "\n" for t in texts))
    result = _batch("classify", classifier, ["--field", "body", "--column", "body"], ["a", "b"], tmp_path / "out")
    assert result.exit_code == 0, result.output
    plain = _stream_records("classify", classifier, [], Path("texts.txt"))
    task_fields = [{k: v for k, v in r.items() if k != "text"} for r in plain]
    jsonl = _shard(tmp_path / "out/a/rows.jsonl.jsonl")
    assert jsonl == [
        {"id": i, "body": t, "meta": {"n": [i]}, **f, "_source": "a/rows.jsonl", "_line": i + 1}
        for i, (t, f) in enumerate(zip(texts, task_fields))
    ]
    assert jsonl[:4] == [
        {**r, "_source": "a/rows.jsonl", "_line": i + 1}
        for i, r in enumerate(_stream_records("classify", classifier, [], Path("a/rows.jsonl"), ("--field", "body")))
    ]
    for name, ident in (("csv", str), ("tsv", str), ("parquet", int)):
        rows = _shard(tmp_path / f"out/b/rows.{name}.jsonl")
        assert rows == [
            {"id": ident(i), "body": t, **f, "_source": f"b/rows.{name}", "_row": i + 1}
            for i, (t, f) in enumerate(zip(texts, task_fields))
        ], name


def test_text_pairs_are_the_streaming_pairs(classifier, exported, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pairs = [("A man sleeps.", "Someone rests."), ("", "empty first"), ("Cats purr.", "Dogs bark loudly.")]
    Path("p.jsonl").write_text("".join(json.dumps({"a": a, "b": b}) + "\n" for a, b in pairs))
    Path("p.csv").write_text("a,b\n" + "".join(f"{a},{b}\n" for a, b in pairs))
    result = _batch("classify", classifier, ["--field", "a", "--pair-field", "b"], ["p.jsonl"], tmp_path / "j")
    assert result.exit_code == 0, result.output
    streamed = _stream_records("classify", classifier, [], Path("p.jsonl"), ("--field", "a", "--pair-field", "b"))
    assert _shard(tmp_path / "j/p.jsonl.jsonl") == [
        {**r, "_source": "p.jsonl", "_line": i + 1} for i, r in enumerate(streamed)
    ]
    result = _batch("classify", classifier, ["--column", "a", "--pair-column", "b"], ["p.csv"], tmp_path / "c")
    assert result.exit_code == 0, result.output
    got = [
        {k: v for k, v in r.items() if k not in ("a", "b", "_source", "_row")}
        for r in _shard(tmp_path / "c/p.csv.jsonl")
    ]
    assert got == [{k: v for k, v in r.items() if k not in ("a", "b")} for r in streamed]
    refused = _batch("classify", classifier, ["--pair-column", "b"], ["p.jsonl", "--field", "a"], tmp_path / "r")
    assert refused.exit_code == 2 and "give --pair-field NAME" in refused.stderr
    # answer: the pair is the question
    squad = exported("bert", "question-answering")
    Path("qa.jsonl").write_text(json.dumps({"q": "Where is Paris?", "c": "Paris is the capital of France."}) + "\n")
    result = _batch("answer", squad, ["--field", "c", "--pair-field", "q"], ["qa.jsonl"], tmp_path / "qa")
    assert result.exit_code == 0, result.output
    expected = _stream_records("answer", squad, [], Path("qa.jsonl"), ("--question-field", "q", "--context-field", "c"))
    assert _shard(tmp_path / "qa/qa.jsonl.jsonl") == [{**expected[0], "_source": "qa.jsonl", "_line": 1}]


def test_parquet_output_holds_the_jsonl_records(classifier, tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "in.txt").write_text("good\n\nbad film\n")
    args = ["-k", "2"]
    assert _batch("classify", classifier, args, [tmp_path / "in.txt"], tmp_path / "j").exit_code == 0
    result = _batch("classify", classifier, args, [tmp_path / "in.txt"], tmp_path / "p", "--output-format", "parquet")
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "p/in.txt.parquet").to_pylist() == _shard(tmp_path / "j/in.txt.jsonl")


def _state(out: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(out).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.rglob("*.jsonl"))
    }


def test_a_rerun_skips_done_shards_and_redoes_the_rest(classifier, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in ("x", "y"):  # the same basenames in two folders
        for name in ("a", "b"):
            _touch(tmp_path / f"in/{folder}/{name}.txt", f"{folder} {name} good\nbad\n")
    out = tmp_path / "out"
    first = _batch("classify", classifier, [], ["in"], out, "--progress")  # the bar, where stderr is no terminal
    assert first.exit_code == 0, first.output
    assert sorted(_state(out)) == ["x/a.txt.jsonl", "x/b.txt.jsonl", "y/a.txt.jsonl", "y/b.txt.jsonl"]
    assert _shard(out / "y/a.txt.jsonl")[0]["_source"] == "in/y/a.txt"
    before = _state(out)
    reference = (out / "y/b.txt.jsonl").read_bytes()
    # an interrupted run: one shard missing, a temporary left behind, no _SUCCESS
    (out / "y/b.txt.jsonl").unlink()
    (out / "_SUCCESS").unlink()
    (out / ".tmp-0123456789abcdef-99999").write_text('{"half": ')
    again = _batch("classify", classifier, [], ["in"], out)
    assert again.exit_code == 0, again.output
    assert "skipped 3 shard(s) already done" in again.stderr
    assert "2 records in" in again.stderr and "1 shard(s) done, 3 skipped" in again.stderr
    after = _state(out)
    from onnxpipe.batch import local

    def no_model(*args):
        raise AssertionError("a job with every shard done opened the export")

    monkeypatch.setattr(local, "_open_pipeline", no_model)
    done = _batch("classify", classifier, [], ["in"], out)
    assert done.exit_code == 0 and "skipped 4 shard(s) already done" in done.stderr, done.output
    assert {k: after[k] for k in before if k != "y/b.txt.jsonl"} == {
        k: v for k, v in before.items() if k != "y/b.txt.jsonl"
    }
    assert (out / "y/b.txt.jsonl").read_bytes() == reference
    assert not list(out.glob(".tmp-*")) and (out / "_SUCCESS").is_file()


def test_a_signal_just_after_a_shard_file_opens_leaves_no_temporary(classifier, tmp_path, monkeypatch):
    """The race the SIGTERM test met once under load: the signal's exception lands after ShardWriter opened
    its temporary and before the engine held the writer, so no abort() knew the file."""
    from onnxpipe.batch import local

    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        _touch(tmp_path / f"in/{name}.txt", "good\nbad\n")
    opened = []

    class SignalledWriter(ShardWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self.temp)
            if len(opened) == 2:  # the second shard's file exists; the engine never gets its writer
                raise KeyboardInterrupt

    monkeypatch.setattr(local, "ShardWriter", SignalledWriter)
    out = tmp_path / "out"
    result = _batch("classify", classifier, [], ["in"], out)
    assert result.exit_code == 130, result.output
    assert len(opened) == 2 and not opened[1].exists()
    assert not list(out.glob(".tmp-*")) and sorted(p.name for p in out.glob("*.jsonl")) == ["a.txt.jsonl"]
    (out / ".tmp-0123456789abcdef-1").write_text("another process's")  # only its own are swept
    assert remove_temporaries(out, os.getpid()) == 0 and remove_temporaries(out, 1) == 1


def test_other_options_or_model_refuse_and_force_redoes(classifier, exported, tmp_path):
    _touch(tmp_path / "in.txt", "good\nbad\n")
    out = tmp_path / "out"
    assert _batch("classify", classifier, [], [tmp_path / "in.txt"], out).exit_code == 0
    before = _state(out)
    refused = _batch("classify", classifier, ["--top-k", "2"], [tmp_path / "in.txt"], out)
    assert refused.exit_code == 2
    assert refused.stderr.count("\n") == 1 and "options.top_k was null, now 2" in refused.stderr
    assert "--force" in refused.stderr and refused.stdout == ""
    other = exported("bert", "fill-mask")
    wrong = _batch("fill-mask", other, [], [tmp_path / "in.txt"], out)
    assert wrong.exit_code == 2 and 'task was "classify", now "fill-mask"' in wrong.stderr
    assert _state(out) == before
    forced = _batch("classify", classifier, ["--top-k", "2"], [tmp_path / "in.txt"], out, "--force")
    assert forced.exit_code == 0, forced.output
    assert _state(out)["in.txt.jsonl"] != before["in.txt.jsonl"]
    assert [len(r["labels"]) for r in _shard(out / "in.txt.jsonl")] == [2, 2]
    assert json.loads((out / "onnxpipe-batch.json").read_text())["options"]["top_k"] == 2


def test_a_folder_with_other_files_refuses_and_usage_errors_are_one_line(classifier, tmp_path):
    _touch(tmp_path / "in.jsonl", '{"t": "good"}\n')
    _touch(tmp_path / "out/notes.txt")
    cases = [
        ([tmp_path / "in.jsonl"], "give --field NAME"),
        ([tmp_path / "in.jsonl", "--field", "t"], "holds files but no onnxpipe-batch.json"),
    ]
    for inputs, message in cases:
        result = _batch("classify", classifier, [], inputs, tmp_path / "out")
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert result.stderr.count("\n") == 1 and result.stdout == ""


def test_on_error_null_writes_error_records_and_exits_3(classifier, tmp_path):
    _touch(tmp_path / "in.jsonl", '{"t": "good"}\nnot json\n{"x": 1}\n')
    failed = _batch("classify", classifier, ["--field", "t"], [tmp_path / "in.jsonl"], tmp_path / "a")
    assert failed.exit_code == 1 and "in.jsonl:2: malformed JSON" in failed.stderr
    assert not (tmp_path / "a/in.jsonl.jsonl").exists() and not list((tmp_path / "a").glob(".tmp-*"))
    result = _batch(
        "classify", classifier, ["--field", "t", "--on-error", "null"], [tmp_path / "in.jsonl"], tmp_path / "b"
    )
    assert result.exit_code == 3, result.output
    rows = _shard(tmp_path / "b/in.jsonl.jsonl")
    assert [r["_line"] for r in rows] == [1, 2, 3]
    assert rows[1]["input"] == "not json" and rows[1]["error"].startswith("malformed JSON")
    assert rows[2]["error"].startswith("no field 't'")
    assert "2 failed" in result.stderr


def test_engine_ray_without_its_engine_or_ray_fails_in_one_line(classifier, tmp_path, monkeypatch):
    import sys

    _touch(tmp_path / "in.txt", "good\n")
    monkeypatch.setitem(sys.modules, "onnxpipe.batch.ray_engine", None)
    result = _batch("classify", classifier, [], [tmp_path / "in.txt"], tmp_path / "out", "--engine", "ray")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    monkeypatch.setitem(sys.modules, "ray", None)
    result = _batch("classify", classifier, [], [tmp_path / "in.txt"], tmp_path / "out", "--engine", "ray")
    assert result.exit_code == 1 and "install onnxpipe[ray]" in result.stderr, result.output


# --- real processes: kill -9, SIGTERM, Ctrl-C, several workers ----------------------------------


def _corpus(root: Path, files: int = 12, lines: int = 60) -> Path:
    words = ["good", "bad", "film", "cast", "plot", "dull", "great", "slow", "fun", "long"]
    for f in range(files):
        body = "".join(
            " ".join(words[(f * 7 + i * j) % len(words)] for j in range(1 + i % 9)) + "\n" for i in range(lines)
        )
        _touch(root / f"part-{f:02d}" / "data.txt", body)
    return root


def _command(model: Path, out: Path, *more: str) -> list[str]:
    import sys

    return [
        sys.executable, "-m", "onnxpipe", "batch", "classify", "-m", str(model), "--device", "cpu",
        "--threads", "1", "--batch-size", "4", "-k", "2", "corpus", "--output-dir", str(out), *more,
    ]  # fmt: skip


def _files(out: Path) -> dict[str, bytes]:
    """Every shard and _SUCCESS, by path (the manifest and the lock file aside)."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in ("onnxpipe-batch.json", ".onnxpipe-batch.lock")
    }


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, exported):
    """A corpus and an uninterrupted run over it: (the folder the runs start in, its files, its shards' time)."""
    import re
    import subprocess

    root = tmp_path_factory.mktemp("corpus")
    _corpus(root / "corpus")
    model = exported("bert", "text-classification")
    proc = subprocess.run(_command(model, root / "whole"), capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    files = _files(root / "whole")
    assert len(files) == 13 and "_SUCCESS" in files
    seconds = float(re.search(r"720 records in ([0-9.]+)s", proc.stderr).group(1))  # the shards' time, start-up aside
    return root, files, seconds


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_kill_9_at_a_random_moment_then_a_rerun_gives_the_uninterrupted_output(classifier, corpus_run, tmp_path, seed):
    import random
    import signal
    import subprocess
    import time

    root, whole, seconds = corpus_run
    out = tmp_path / f"killed-{seed}"
    rng = random.Random(seed)
    proc = subprocess.Popen(_command(classifier, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root)
    if seed == 1:  # during start-up
        time.sleep(rng.uniform(0.05, 0.5))
    else:  # while the shards are written: from the job's manifest on, over the time an uninterrupted run takes
        deadline = time.monotonic() + 120
        while not (out / "onnxpipe-batch.json").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, seconds))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    if out.exists():  # whatever the kill left: only complete shards under their final names
        for name, data in _files(out).items():
            if not name.startswith(".tmp-"):
                assert data == whole[name], name
    rerun = subprocess.run(_command(classifier, out), capture_output=True, text=True, timeout=300, cwd=root)
    assert rerun.returncode == 0, rerun.stderr
    assert _files(out) == whole
    assert not list(out.glob(".tmp-*"))


@pytest.mark.parametrize(
    "signum,status,line,workers", [("SIGTERM", 143, "terminated", "2"), ("SIGINT", 130, "interrupted", "1")]
)
def test_a_signal_stops_the_job_keeps_done_shards_and_removes_its_temporaries(
    classifier, corpus_run, tmp_path, signum, status, line, workers
):
    import signal
    import subprocess
    import time

    root, whole, _ = corpus_run
    out = tmp_path / "signalled"
    proc = subprocess.Popen(
        _command(classifier, out, "--workers", workers),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=root,
    )
    deadline = time.monotonic() + 120
    while not list(out.rglob("data.txt.jsonl")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(getattr(signal, signum))
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == status, stderr
    assert stderr.splitlines()[-1] == f"onnxpipe: {line}" and "Traceback" not in stderr
    assert stdout == ""
    done = _files(out)
    assert "_SUCCESS" not in done and not list(out.glob(".tmp-*"))
    assert 1 <= len(done) < 12 and all(data == whole[name] for name, data in done.items())
    rerun = subprocess.run(_command(classifier, out), capture_output=True, text=True, timeout=300, cwd=root)
    assert rerun.returncode == 0 and f"skipped {len(done)} shard(s) already done" in rerun.stderr
    assert _files(out) == whole


def test_two_workers_write_what_one_writes(classifier, corpus_run, tmp_path):
    import subprocess

    root, whole, _ = corpus_run
    proc = subprocess.run(
        _command(classifier, tmp_path / "two", "--workers", "2"), capture_output=True, text=True, timeout=300, cwd=root
    )
    assert proc.returncode == 0, proc.stderr
    assert _files(tmp_path / "two") == whole
    assert "720 records" in proc.stderr and "12 shard(s) done, 0 skipped" in proc.stderr


def test_a_worker_that_cannot_open_the_export_stops_the_job_in_one_line(classifier, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(classifier, broken)
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    _touch(tmp_path / "in/a.txt", "good\n")
    _touch(tmp_path / "in/b.txt", "bad\n")
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        result = _batch("classify", broken, [], [tmp_path / "in"], out, "--workers", workers)
        assert result.exit_code == 1, result.output
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("onnxpipe: error: ")
        assert not list(out.glob("*.jsonl")) and not list(out.glob(".tmp-*")) and not (out / "_SUCCESS").exists()


def test_several_workers_share_the_cpus_unless_threads_is_given(monkeypatch):
    from onnxpipe.commands.batch import _worker_threads
    from onnxpipe.runtime import machine

    monkeypatch.setattr(machine, "usable_cpus", lambda: 8)
    assert [_worker_threads(None, w) for w in (1, 2, 3, 16)] == [None, 4, 2, 1]
    assert _worker_threads(3, 2) == 3


def test_invalid_utf8_is_replaced_and_counted_as_the_streaming_command_counts_it(classifier, tmp_path):
    (tmp_path / "in.txt").write_bytes(b"good \xff film\nfine\nbad \xc3\n")
    result = _batch("classify", classifier, [], [tmp_path / "in.txt"], tmp_path / "out")
    assert result.exit_code == 0, result.output
    rows = _shard(tmp_path / "out/in.txt.jsonl")
    assert [r["text"] for r in rows] == ["good \ufffd film", "fine", "bad \ufffd"]
    assert "2 record(s) had invalid UTF-8, replaced with U+FFFD" in result.stderr
