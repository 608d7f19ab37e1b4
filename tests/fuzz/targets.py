"""Fuzz targets: each checks "never anything but the documented outcome" for one input.

Two engines drive the same checks: hypothesis here (structured inputs: JSON tokens, mutated
manifests; what `make test` runs briefly), and atheris (coverage-guided byte mutation, libFuzzer;
tests/fuzz/atheris_run.py, what `make fuzz` runs). The checks:
- the record parser + JSONL writer: any bytes as a line, in each input format, give a Record, and
  writing it gives one valid JSON line (or the line as text/TSV) -- never an exception;
- the manifest loader: any bytes (random, or a mutated real manifest) in onnxpipe.json give a
  manifest or an OnnxpipeError (one line naming the file), never another exception.

`python tests/fuzz/run.py --seconds 60` (make fuzz) runs each for a bounded time;
tests/test_fuzz.py runs each for a few seconds in `make test`.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxpipe.errors import OnnxpipeError
from onnxpipe.stream.readers import RecordParser
from onnxpipe.stream.records import Result
from onnxpipe.stream.writers import make_writer

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))

JSON_TOKENS = st.sampled_from(
    [
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
        b":",
        b'"text"',
        b'"a"',
        b"1",
        b"-0",
        b"1e400",
        b"9" * 4400,
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"true",
        b"null",
        b'"\\ud800"',
        b'"\\u0000"',
        b"\xff",
        b" ",
        b"\t",
        b"\r",
        b"\\",
        b'"',
        "é🙂\u2028".encode(),
        b"[" * 300,
        b"]" * 300,
        b'{"text": ' * 50,
    ]
)
LINES = (st.binary(max_size=200) | st.lists(JSON_TOKENS, max_size=30).map(b"".join)).map(
    lambda b: b.replace(b"\n", b"")
)  # a line


class _Task:
    def to_text(self, result):
        return result

    def to_fields(self, result):
        return {"out": result}

    def to_columns(self, result):
        return [result or ""]


@FUZZ
@given(
    raw=LINES,
    parser_kw=st.sampled_from([{}, {"field": "text"}, {"column": 2}]),
    fmt=st.sampled_from(["text", "jsonl", "tsv"]),
    line=st.integers(1, 3),
)
def fuzz_record_parser(raw, parser_kw, fmt, line):
    check_record(raw, parser_kw, fmt, line)


def check_record(raw: bytes, parser_kw: dict, fmt: str, line: int) -> None:
    """RAW (one line, no newline) parsed with PARSER_KW and written as FMT: one valid output line."""
    record = RecordParser(**parser_kw).parse_line(raw, "<stdin>", line)
    out = io.BytesIO()
    writer = make_writer(fmt, out, _Task())
    writer.write(Result(record, None if record.error else "R", record.error, writer.task))
    writer.flush()
    text = out.getvalue().decode("utf-8")
    assert text.endswith("\n") and text.count("\n") == 1
    if fmt == "jsonl":
        obj = json.loads(text)
        assert isinstance(obj, dict) and (record.error is None) == ("error" not in obj)
        if record.error is not None and "field" in parser_kw and record.fields is None:
            assert obj["input"] == record.raw


def _manifest() -> dict:
    return {
        "format": 1,
        "task": "text-classification",
        "architecture": "BertForSequenceClassification",
        "files": {"model": "model.onnx"},
        "tokenizer": {"file": "tokenizer.json"},
        "labels": ["a", "b"],
        "opset": 17,
        "precision": "fp32",
    }


MUTATIONS = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=20)
    | st.sampled_from(["../x", "/etc/passwd", "model.onnx", "", ".", "a/../../b"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(
    content=st.binary(max_size=300)
    | st.tuples(
        st.sampled_from(["format", "task", "files", "tokenizer", "labels", "architecture", "opset", "extra"]),
        MUTATIONS,
        st.booleans(),
    ).map(
        lambda m: json.dumps(
            {**_manifest(), m[0]: m[1]} if m[2] else {k: v for k, v in _manifest().items() if k != m[0]}
        ).encode()
    )
)
def fuzz_manifest_loader(content):
    check_manifest(content)


def check_manifest(content: bytes) -> None:
    """CONTENT as onnxpipe.json beside a model and a tokenizer: a manifest or one-line OnnxpipeError."""
    from onnxpipe.manifest import read_manifest

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "export"
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"")
        (folder / "tokenizer.json").write_bytes(b"{}")
        (folder / "onnxpipe.json").write_bytes(content)
        try:
            manifest = read_manifest(folder)
        except OnnxpipeError as exc:
            assert "\n" not in str(exc)
        else:
            assert isinstance(manifest, dict)


TARGETS = {"record_parser": fuzz_record_parser, "manifest_loader": fuzz_manifest_loader}
