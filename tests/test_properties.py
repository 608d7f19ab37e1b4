"""Property-based tests (hypothesis) for the line contract: readers, parser, writers, engine.

For any bytes, cut into any chunks, any batching and any output format: N records in give N
results out, in input order, each the same as the record processed alone; escaping round-trips;
no exception escapes the engine except the documented InputError under --on-error fail. A fake
deterministic task keeps these fast (no ONNX); one property runs through the CLI on a tiny export.
"""

from __future__ import annotations

import io
import json

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxpipe.errors import InputError
from onnxpipe.main import cli
from onnxpipe.stream.engine import Engine, EngineOptions
from onnxpipe.stream.readers import LineSource, RecordParser
from onnxpipe.stream.records import Item, Result
from onnxpipe.stream.writers import escape_cell, escape_text, make_writer, unescape_text

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class FakeTask:
    """Deterministic per record: the result depends on the record's text only. 'boom' fails in
    run() (a whole batch fails, then the engine retries one by one); 'bad' fails in encode."""

    def encode(self, records):
        return [Item(r, len(r.text), error="bad record" if "bad" in r.text else None) for r in records]

    def run(self, batch):
        if any("boom" in item.record.text for item in batch):
            raise RuntimeError("exploded")
        return [item.record.text.swapcase()[::-1] for item in batch]

    def to_text(self, result):
        return result

    def to_fields(self, result):
        return {"out": result}

    def to_columns(self, result):
        return [result or ""]


class ChunkedStdin:
    """A stdin without a descriptor whose reads return pieces of the sizes hypothesis chose."""

    def __init__(self, data: bytes, sizes: list[int]):
        self.data, self.sizes, self.pos, self.i = data, sizes or [1], 0, 0

    def read(self, n: int = -1) -> bytes:
        size = min(n, self.sizes[self.i % len(self.sizes)])
        self.i += 1
        piece = self.data[self.pos : self.pos + size]
        self.pos += len(piece)
        return piece


def _split_lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return lines


def _run_stream(data: bytes, sizes, fmt, parser_kw, options) -> bytes:
    task, out = FakeTask(), io.BytesIO()
    engine = Engine(task, make_writer(fmt, out, task), EngineOptions(**options))
    engine.run(LineSource(["-"], stdin=ChunkedStdin(data, sizes)), RecordParser(**parser_kw))
    return out.getvalue()


def _run_alone(raw: bytes, line: int, fmt, parser_kw, options) -> bytes:
    task, out = FakeTask(), io.BytesIO()
    record = RecordParser(**parser_kw).parse_line(raw, "<stdin>", line)
    engine = Engine(task, make_writer(fmt, out, task), EngineOptions(**options))
    engine.run_records([record])
    return out.getvalue()


LINE_PIECES = st.sampled_from(
    [
        b"a",
        b"boom",
        b"bad",
        b"\t",
        b" ",
        b"\r",
        b"\xff",
        b"\xe2\x82",
        b"\x00",
        b"{",
        b"}",
        b'"text"',
        b":",
        b",",
        b"[",
        b"]",
        b'"x"',
        b"1e400",
        b"NaN",
        b"\xef\xbb\xbf",
        "é日🙂".encode(),
        b"\\",
        b"\\n",
        b"\xed\xa0\x80",
        b'"\\ud800"',
    ]
)
LINE = st.lists(LINE_PIECES, max_size=8).map(b"".join) | st.binary(max_size=30)
DATA = st.lists(LINE, max_size=25).flatmap(
    lambda lines: (
        st.sampled_from([b"\n", b"\r\n"])
        .map(lambda nl: nl.join(lines))
        .flatmap(lambda body: st.sampled_from([body, body + b"\n"]))
    )
)
JSON_LINES = st.lists(
    st.fixed_dictionaries(
        {"text": st.text(max_size=12) | st.none() | st.integers()},
        optional={"id": st.integers(), "x": st.floats(allow_nan=False, allow_infinity=False)},
    ).map(lambda o: json.dumps(o).encode())
    | LINE,
    max_size=20,
).map(lambda ls: b"\n".join(ls) + b"\n")
PARSERS = st.sampled_from([{}, {"field": "text"}, {"column": 1}, {"column": 2}])
FORMATS = st.sampled_from(["text", "jsonl", "tsv"])
OPTIONS = st.fixed_dictionaries(
    {
        "batch_size": st.integers(1, 9),
        "max_batch_tokens": st.none() | st.integers(1, 40),
        "window": st.integers(1, 12),
        "on_error": st.just("null"),
    }
)
SIZES = st.lists(st.integers(1, 17), min_size=1, max_size=6)


@FAST
@given(data=DATA | JSON_LINES, sizes=SIZES, fmt=FORMATS, parser_kw=PARSERS, options=OPTIONS)
def test_n_in_n_out_in_order_each_as_if_alone(data, sizes, fmt, parser_kw, options):
    out = _run_stream(data, sizes, fmt, parser_kw, options)
    lines = _split_lines(data)
    alone = b"".join(_run_alone(raw, i + 1, fmt, parser_kw, options) for i, raw in enumerate(lines))
    assert out == alone
    assert out.count(b"\n") == len(lines)
    if fmt == "jsonl":
        assert all(isinstance(json.loads(line), dict) for line in out.splitlines())


@FAST
@given(
    data=DATA | JSON_LINES,
    sizes=SIZES,
    fmt=FORMATS,
    parser_kw=PARSERS,
    options=OPTIONS.map(lambda o: {**o, "on_error": "fail"}),
)
def test_only_input_errors_escape_the_engine(data, sizes, fmt, parser_kw, options):
    try:
        out = _run_stream(data, sizes, fmt, parser_kw, options)
    except InputError as exc:
        assert str(exc).startswith("<stdin>:")
    else:
        assert out.count(b"\n") == len(_split_lines(data))


# Texts made mostly of what the escaping rewrites: plain st.text() seldom draws a backslash followed
# by n, r, t or another backslash, the cases that break an escaping which forgets to double backslashes.
ESCAPABLE = st.text(alphabet=st.sampled_from(["\\", "n", "r", "t", "\n", "\r", "\t", "a", "\u00e9"]))


@FAST
@given(ESCAPABLE | st.text())
def test_escaping_round_trips(text):
    escaped = escape_text(text)
    assert "\n" not in escaped and "\r" not in escaped and unescape_text(escaped) == text
    cell = escape_cell(text)
    assert "\t" not in cell and "\n" not in cell and unescape_text(cell) == text


@FAST
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=12,
    )
)
def test_jsonl_pass_through_is_exact(value):
    """Whatever JSON object comes in, the fields come out equal (json.loads of the output line)."""
    obj = {"text": "t", "v": value}
    record = RecordParser(field="text").parse_line(json.dumps(obj).encode(), "<stdin>", 1)
    out = io.BytesIO()
    writer = make_writer("jsonl", out, FakeTask())
    writer.write(Result(record, "T", None, writer.task))
    writer.flush()
    assert json.loads(out.getvalue()) == {**obj, "out": "T"}


@pytest.mark.slow
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(
        st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), max_size=40),
        min_size=1,
        max_size=6,
    ),
    batch_size=st.integers(1, 8),
)
def test_cli_classify_gives_each_record_its_own_result(texts, batch_size, exported):
    folder = str(exported("bert", "text-classification"))
    data = "\n".join(texts) + "\n"
    batched = CliRunner().invoke(
        cli, ["classify", "-m", folder, "--format", "jsonl", "--batch-size", str(batch_size)], input=data
    )
    assert batched.exit_code == 0, batched.stderr
    rows = [json.loads(line) for line in batched.stdout.splitlines()]
    assert [row["text"] for row in rows] == [
        t[1:] if i == 0 and t.startswith("\ufeff") else t for i, t in enumerate(texts)
    ]
    for text, row in zip(texts, rows):
        alone = CliRunner().invoke(cli, ["classify", "-m", folder, "--format", "jsonl"], input=text + "\n")
        expected = json.loads(alone.stdout)
        assert row["label"] == expected["label"]
        assert row["score"] == pytest.approx(expected["score"], abs=1e-5)
