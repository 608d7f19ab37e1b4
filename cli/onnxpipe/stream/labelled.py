"""Labelled examples (text + label) from CSV, TSV or JSONL, for `finetune` and `eval`.

Unlike the streaming readers, these files are read whole: a training or evaluation set has to be
split, counted and shuffled anyway. What the user can get wrong (a missing column, an empty file,
a bad encoding, an empty label) fails here with the file and line named, before any model loads.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from onnxpipe.errors import InputError, UsageError

FORMATS = ("csv", "tsv", "jsonl")
_SUFFIX_FORMAT = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


@dataclass
class Labelled:
    """Examples in file order. `lines[i]` is the line where example i starts (1-based)."""

    texts: list[str]
    labels: list[str]
    lines: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.texts)


def detect_format(path: Path, fmt: str | None = None) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise UsageError(f"unknown data format {fmt!r}", hint="one of: " + ", ".join(FORMATS))
        return fmt
    found = _SUFFIX_FORMAT.get(path.suffix.lower())
    if found is None:
        raise UsageError(
            f"cannot tell the format of {path} from its name", hint="name it .csv, .tsv or .jsonl, or pass --format"
        )
    return found


def decode_utf8(raw: bytes, source: str) -> str:
    """RAW as UTF-8 (a BOM dropped), or an InputError naming SOURCE's line with the bad byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(
            f"not valid UTF-8 (byte 0x{raw[exc.start]:02x}); re-save the file as UTF-8, e.g. iconv -f latin1 -t utf-8",
            line=line,
            source=source,
        ) from None


def _label(value: object) -> str:
    """Labels are names: 1, 1.0 and "1" are the same label; a bool is not a number here."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def read_labelled(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    fmt: str | None = None,
    label_option: str = "--label-column",
) -> Labelled:
    """Read every (text, label) pair of PATH. CSV/TSV need a header row naming the columns.

    CSV follows RFC 4180 (quotes, doubled quotes, newlines inside quotes); TSV has no quoting.
    """
    path = Path(path)
    source = str(path)
    fmt = detect_format(path, fmt)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {source}: {exc.strerror}") from None
    text = decode_utf8(raw, source)
    if not text.strip():
        raise InputError(f"{source} is empty: it needs a header row and labelled examples")
    if fmt == "jsonl":
        from onnxpipe.stream.readers import read_text_lines

        return _read_jsonl(read_text_lines(path, strict=True), source, text_column, label_column, label_option)
    return _read_delimited(text, source, "," if fmt == "csv" else "\t", text_column, label_column, label_option)


def _read_delimited(
    text: str, source: str, delimiter: str, text_column: str, label_column: str, label_option: str = "--label-column"
) -> Labelled:
    if delimiter == "\t":
        # TSV as the shell tools read it (cut, paste, awk -F'\t'): no quoting, a quote is a character.
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=",", strict=True)
    try:
        header = next(reader)
    except csv.Error as exc:
        raise InputError(f"malformed header: {exc}", line=1, source=source) from None
    header = [h.strip() for h in header]
    columns = {}
    for wanted, option in ((text_column, "--text-column"), (label_column, label_option)):
        if wanted not in header:
            raise InputError(
                f"no column {wanted!r} in the header (columns: {', '.join(header)}); pass {option}",
                line=1,
                source=source,
            )
        columns[wanted] = header.index(wanted)
    ti, li = columns[text_column], columns[label_column]
    out = Labelled([], [], [], source)
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise InputError(f"malformed row: {exc}", line=start, source=source) from None
        if not row or row == [""]:
            start = reader.line_num + 1
            continue
        if len(row) <= max(ti, li):
            raise InputError(
                f"{len(row)} field(s), the header has {len(header)} "
                f"(a {'tab' if delimiter == chr(9) else 'comma'} missing, or an unquoted one too many?)",
                line=start,
                source=source,
            )
        _append(out, row[ti], row[li], start, source, label_column)
        start = reader.line_num + 1
    return _nonempty(out, source)


def _read_jsonl(
    lines: list[str], source: str, text_column: str, label_column: str, label_option: str = "--label-column"
) -> Labelled:
    out = Labelled([], [], [], source)
    for number, line in enumerate(lines, 1):  # split on "\n" only: U+2028 inside a JSON string stays in it
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"malformed JSON: {exc.msg} (column {exc.colno})", line=number, source=source) from None
        if not isinstance(record, dict):
            raise InputError("a JSONL record must be an object", line=number, source=source)
        for wanted, option in ((text_column, "--text-column"), (label_column, label_option)):
            if wanted not in record:
                raise InputError(
                    f"no field {wanted!r} (fields: {', '.join(record)}); pass {option}", line=number, source=source
                )
        value = record[label_column]
        if value is None or isinstance(value, (list, dict)) or (isinstance(value, float) and math.isnan(value)):
            raise InputError(f"{label_column} {value!r} is not a single string or number", line=number, source=source)
        _append(out, str(record[text_column] or ""), _label(value), number, source, label_column)
    return _nonempty(out, source)


def _append(out: Labelled, text: str, label: str, line: int, source: str, label_column: str) -> None:
    label = _label(label)
    if not label:
        raise InputError(f"empty value in column {label_column!r}", line=line, source=source)
    out.texts.append(text.strip())
    out.labels.append(label)
    out.lines.append(line)


def _nonempty(out: Labelled, source: str) -> Labelled:
    if not out.texts:
        raise InputError(f"{source} has a header but no examples")
    return out


def parse_label_map(spec: str | None) -> dict[str, str]:
    """`"1=positive,-1=negative"` -> {"1": "positive", "-1": "negative"}."""
    if not spec:
        return {}
    mapping: dict[str, str] = {}
    for item in spec.split(","):
        raw, sep, name = item.partition("=")
        raw, name = raw.strip(), name.strip()
        if not sep or not raw or not name:
            raise UsageError(f"bad --label-map entry {item.strip()!r}", hint='write it as "1=positive,-1=negative"')
        if raw in mapping:
            raise UsageError(f"--label-map maps {raw!r} twice")
        mapping[_label(raw)] = name
    if len(set(mapping.values())) != len(mapping):
        raise UsageError("--label-map gives two values the same name")
    return mapping


def apply_label_map(data: Labelled, mapping: dict[str, str]) -> Labelled:
    """Rename the labels; a label the map does not cover is an error that names its first line."""
    if not mapping:
        return data
    names = []
    for label, line in zip(data.labels, data.lines):
        if label not in mapping:
            raise InputError(
                f"label {label!r} is not in --label-map (it maps {', '.join(map(repr, mapping))})",
                line=line,
                source=data.source,
            )
        names.append(mapping[label])
    return Labelled(data.texts, names, data.lines, data.source)


def sorted_labels(labels: list[str]) -> list[str]:
    """Distinct labels in id order: numerically when they are all numbers (-1 < 1), else by name."""
    distinct = set(labels)
    try:
        return sorted(distinct, key=float)
    except ValueError:
        return sorted(distinct)
