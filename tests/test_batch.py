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
