"""The engine without a model: readers, batcher, order restoration, writers, errors, idle flush."""

from __future__ import annotations

import io
import json
import os
import random
import threading

import numpy as np
import pytest

from onnxpipe.errors import InputError
from onnxpipe.stream.engine import Engine, EngineOptions
from onnxpipe.stream.readers import LineSource, RecordParser
from onnxpipe.stream.records import Item
from onnxpipe.stream.writers import NpyWriter, escape_text, make_writer, unescape_text


class EchoTask:
    """Result = the text reversed; cost = its length; 'boom' fails in run()."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def encode(self, records):
        return [
            Item(r, len(r.text), truncated=len(r.text) > 50, error="no x" if r.text == "needs-x" else None)
            for r in records
        ]

    def run(self, batch):
        self.batches.append([item.cost for item in batch])
        if any(item.record.text == "boom" for item in batch):
            raise RuntimeError("exploded")
        return [item.record.text[::-1] for item in batch]

    def to_text(self, result):
        return result

    def to_fields(self, result):
        return {"reversed": result}

    def to_columns(self, result):
        return [result or ""]

    def to_vector(self, result):
        return [float(len(result)), 1.0]


def run_engine(data: bytes, fmt="text", field=None, column=None, **options):
    task = EchoTask()
    out = io.BytesIO()
    writer = make_writer(fmt, out, task)
    reports = []
    engine = Engine(task, writer, EngineOptions(**options), report=reports.append)
    source = LineSource(["-"], stdin=io.BytesIO(data))
    summary = engine.run(source, RecordParser(field=field, column=column))
    writer.close()
    return out.getvalue().decode("utf-8"), summary, task, reports


def test_order_is_restored_whatever_the_batching():
    rng = random.Random(0)
    lines = ["".join(rng.choice("abcdef") for _ in range(rng.randint(1, 40))) for _ in range(500)]
    data = "".join(line + "\n" for line in lines).encode()
    expected = "".join(line[::-1] + "\n" for line in lines)
    for batch_size, budget, window in [(1, None, 1), (3, None, 7), (32, 64, 100), (64, 10_000, 1024)]:
        out, summary, task, _ = run_engine(data, batch_size=batch_size, max_batch_tokens=budget, window=window)
        assert out == expected
        assert summary.records == 500
        for costs in task.batches:
            assert len(costs) <= batch_size
            if budget and len(costs) > 1:
                assert max(costs) * len(costs) <= budget


def test_batches_are_sorted_by_length_within_a_window():
    data = b"ccc\na\nbb\ndddd\n"
    _, _, task, _ = run_engine(data, batch_size=2)
    assert task.batches == [[1, 2], [3, 4]]


def test_empty_lines_crlf_nul_and_invalid_utf8():
    data = b"ab\r\n\r\n\n\x00x\nbad \xff\xfe\nlast-without-newline"
    out, summary, task, _ = run_engine(data)
    lines = out.split("\n")
    assert lines[:-1] == ["ba", "", "", "x\x00", "\ufffd\ufffd dab", "enilwen-tuohtiw-tsal"]
    assert summary.records == 6 and summary.replaced == 1
    assert all(cost > 0 for batch in task.batches for cost in batch)  # empty lines never reach the task


def test_only_newline_splits_records():
    data = "a\x0bb\x0cc\x1cd\u2028e\u0085f\rg\n".encode()
    out, summary, _, _ = run_engine(data)
    assert summary.records == 1
    assert unescape_text(out.rstrip("\n")) == "a\x0bb\x0cc\x1cd\u2028e\u0085f\rg"[::-1]


def test_text_output_escapes_newlines_reversibly():
    for text in ["a\nb", "a\\nb", "back\\slash", "cr\r\nlf", "\\", "plain"]:
        escaped = escape_text(text)
        assert "\n" not in escaped and "\r" not in escaped
        assert unescape_text(escaped) == text


def test_jsonl_fields_pass_through_and_null_is_empty():
    data = b'{"id": 1, "text": "abc"}\n{"id": 2, "text": null}\n\n{"id": 3, "text": "x", "text2": 5}\n'
    out, summary, _, _ = run_engine(data, fmt="jsonl", field="text")
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[0] == {"id": 1, "text": "abc", "reversed": "cba"}
    assert rows[1] == {"id": 2, "text": None, "reversed": None}
    assert rows[2] == {"reversed": None}
    assert rows[3]["reversed"] == "x" and rows[3]["text2"] == 5


def test_malformed_jsonl_names_its_line_and_keeps_what_came_before():
    data = b'{"text": "ok"}\n{"text": "fine"}\nnot json\n{"text": "after"}\n'
    task = EchoTask()
    out = io.BytesIO()
    engine = Engine(task, make_writer("jsonl", out, task), EngineOptions())
    with pytest.raises(InputError, match=r"<stdin>:3: malformed JSON"):
        engine.run(LineSource(["-"], stdin=io.BytesIO(data)), RecordParser(field="text"))
    assert [json.loads(line)["reversed"] for line in out.getvalue().decode().splitlines()] == ["ko", "enif"]


def test_on_error_null_writes_error_records_and_counts_them():
    data = b'{"text": "ok"}\nnot json\n{"body": "x"}\n{"text": "boom"}\n{"text": "needs-x"}\n{"text": "z"}\n'
    out, summary, _, reports = run_engine(data, fmt="jsonl", field="text", on_error="null")
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 6 and summary.errors == 4
    assert [r["reversed"] for r in rows] == ["ko", None, None, None, None, "z"]
    assert "malformed JSON" in rows[1]["error"] and "no field 'text'" in rows[2]["error"]
    assert "exploded" in rows[3]["error"] and rows[4]["error"] == "no x"
    assert any("<stdin>:2" in r for r in reports)


def test_a_failing_record_does_not_take_its_batch_down():
    data = b"aa\nboom\nbb\n"
    out, summary, _, _ = run_engine(data, on_error="null", batch_size=8)
    assert out.splitlines() == ["aa", "", "bb"] and summary.errors == 1


def test_run_failure_with_on_error_fail_names_the_line():
    with pytest.raises(InputError, match=r"<stdin>:2: model run failed: RuntimeError: exploded"):
        run_engine(b"aa\nboom\n")


def test_tsv_column_passes_the_row_through():
    data = b"1\thello\tx\n\n2\tworld\n3\n"
    out, summary, _, _ = run_engine(data, fmt="tsv", column=2, on_error="null")
    assert out.splitlines() == ["1\thello\tx\tolleh", "", "2\tworld\tdlrow", "3\t"]
    assert summary.errors == 1


def test_truncation_is_counted_with_where():
    data = b"short\n" + b"y" * 60 + b"\n"
    _, summary, _, _ = run_engine(data)
    assert summary.truncated == 1 and summary.truncated_where == ["<stdin>:2"]


def test_many_lines_in_bounded_windows():
    data = b"".join(b"line %d\n" % i for i in range(20000))
    out, summary, task, _ = run_engine(data, batch_size=500, window=2000)
    assert summary.records == 20000
    assert out.splitlines()[12345] == "line 12345"[::-1]


def test_files_and_stdin_in_order(tmp_path):
    a = tmp_path / "a.txt"
    a.write_bytes(b"a1\na2")  # no final newline: still a record, and not merged with the next file
    b = tmp_path / "b.txt"
    b.write_bytes(b"b1\n")
    task = EchoTask()
    out = io.BytesIO()
    engine = Engine(task, make_writer("text", out, task), EngineOptions())
    source = LineSource([str(a), "-", str(b)], stdin=io.BytesIO(b"s1\n"))
    assert source.total_bytes is None
    engine.run(source, RecordParser())
    assert out.getvalue().decode().splitlines() == ["1a", "2a", "1s", "1b"]
    assert LineSource([str(a), str(b)]).total_bytes == 8


def test_slow_producer_gets_results_before_the_next_line():
    read_fd, write_fd = os.pipe()
    task = EchoTask()
    out = _NotifyingBuffer()
    engine = Engine(task, make_writer("text", out, task), EngineOptions(idle=0.05))
    with os.fdopen(read_fd, "rb", buffering=0) as reader:
        thread = threading.Thread(target=engine.run, args=(LineSource(["-"], stdin=reader), RecordParser()))
        thread.start()
        os.write(write_fd, b"first\n")
        assert out.wait_for(b"tsrif\n", timeout=30), "the first result did not arrive while the producer waited"
        os.write(write_fd, b"second\n")
        os.close(write_fd)
        thread.join(30)
    assert out.getvalue() == b"tsrif\ndnoces\n"


class _NotifyingBuffer(io.BytesIO):
    def __init__(self):
        super().__init__()
        self.changed = threading.Condition()

    def flush(self):
        super().flush()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, data: bytes, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.getvalue() == data, timeout=timeout)


def test_npy_writer_rows_and_nan_for_empty(tmp_path):
    path = tmp_path / "out.npy"
    data = b"\nab\n\nabcd\n"
    task = EchoTask()
    with open(path, "w+b") as stream:
        writer = NpyWriter(stream, task)
        Engine(task, writer, EngineOptions()).run(LineSource(["-"], stdin=io.BytesIO(data)), RecordParser())
        writer.close()
    matrix = np.load(path)
    assert matrix.dtype == np.float32 and matrix.shape == (4, 2)
    assert np.isnan(matrix[0]).all() and np.isnan(matrix[2]).all()
    assert matrix[1].tolist() == [2.0, 1.0] and matrix[3].tolist() == [4.0, 1.0]


def test_streaming_hook_writes_pieces_then_ends_the_line():
    class Streaming(EchoTask):
        def run_streaming(self, item, emit):
            for ch in item.record.text:
                emit(ch.upper())
            return item.record.text.upper()

    task = Streaming()
    out = io.BytesIO()
    engine = Engine(task, make_writer("text", out, task), EngineOptions(streaming=True))
    engine.run(LineSource(["-"], stdin=io.BytesIO(b"ab\n\nc\nd\ne\n")), RecordParser())
    assert out.getvalue() == b"AB\n\nC\nD\nE\n"


def test_jsonl_output_escapes_unicode_line_separators():
    out, _, _, _ = run_engine("a\u2028b\x85c\u2029\n".encode(), fmt="jsonl")
    assert len(out.splitlines()) == 1
    assert json.loads(out)["text"] == "a\u2028b\x85c\u2029"


def test_read_text_lines_splits_as_the_stream_does(tmp_path):
    """The one reader of small whole files (eval, bench, labelled JSONL): "\\n" only, CR and BOM dropped."""
    from onnxpipe.errors import InputError
    from onnxpipe.stream.readers import read_text_lines

    path = tmp_path / "lines.txt"
    path.write_bytes("\ufeffone\r\n\ntwo\u2028still two\x85too\nbad \xff".encode("utf-8").replace(b"\xc3\xbf", b"\xff"))
    assert read_text_lines(path) == ["one", "", "two\u2028still two\x85too", "bad \ufffd"]
    assert read_text_lines(path, skip_empty=True, limit=2) == ["one", "two\u2028still two\x85too"]
    with pytest.raises(InputError, match=r"lines.txt:4: not valid UTF-8 \(byte 0xff\)"):
        read_text_lines(path, strict=True)
    with pytest.raises(InputError, match="cannot read"):
        read_text_lines(tmp_path / "missing.txt")


def test_labelled_jsonl_keeps_a_line_separator_inside_a_string(tmp_path):
    from onnxpipe.stream.labelled import read_labelled

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a\u2028b", "label": 1}\n{"text": "c", "label": 0}\n', encoding="utf-8")
    data = read_labelled(path)
    assert data.texts == ["a\u2028b", "c"] and data.labels == ["1", "0"] and data.lines == [1, 2]
