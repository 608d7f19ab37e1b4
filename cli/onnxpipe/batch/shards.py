"""Reading one input file as records, and writing one output shard so that it is complete or absent.

Text and JSONL lines go through the streaming commands' own RecordParser, so hostile bytes (invalid
UTF-8, CRLF, a BOM, NUL, empty lines) make the same records as in `onnxpipe classify`. CSV and TSV are
read with the csv module (the first row is the header: it names the columns, and every column passes
through); Parquet with pyarrow, a batch of rows at a time. A shard is written to a temporary file in
DIR, then fsynced and renamed to its final name: a shard that exists is complete.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from onnxpipe.batch.plan import Plan, Shard
from onnxpipe.errors import InputError, UsageError, require_extra
from onnxpipe.stream.readers import RecordParser
from onnxpipe.stream.records import Record

SOURCE_KEY = "_source"  # the input file, as given (a folder's files: joined to the folder as given)
LINE_KEY = "_line"  # text and JSONL: the 1-based line
ROW_KEY = "_row"  # CSV, TSV, Parquet: the 1-based data row (the header is not counted)
_READ_SIZE = 1 << 16
_PARQUET_BATCH = 1024


@dataclass(frozen=True)
class InputSpec:
    """Where the text is: `field` in JSONL objects; `column` in CSV/TSV (a header name, or a 1-based
    index as digits) and Parquet (a column name, or a 1-based index). With `pair_field` / `pair_column`
    each record is a text pair, its second text in Record.pair (as the streaming --pair-field)."""

    field: str | None = None
    column: str | None = None
    pair_field: str | None = None
    pair_column: str | None = None

    def check(self, plan: Plan) -> None:
        """Refuse (UsageError) a plan whose files this spec cannot read, before any model loads."""
        kinds = plan.kinds
        if "jsonl" in kinds and self.field is None:
            first = next(s for s in plan.shards if s.kind == "jsonl")
            raise UsageError(f"{first.source} is JSONL: give --field NAME (the field that holds the text)")
        for kind in ("csv", "tsv", "parquet"):
            if kind in kinds and self.column is None:
                first = next(s for s in plan.shards if s.kind == kind)
                raise UsageError(f"{first.source} is {kind.upper()}: give --column NAME (or its 1-based index)")
        if "parquet" in kinds:
            _require_pyarrow("reading Parquet input")
        if self.pair_field is not None or self.pair_column is not None:
            for shard in plan.shards:
                if shard.kind == "text":
                    raise UsageError(f"{shard.source} is text: text pairs need JSONL, CSV, TSV or Parquet input")
                if shard.kind == "jsonl" and self.pair_field is None:
                    raise UsageError(f"{shard.source} is JSONL: give --pair-field NAME for the second text")
                if shard.kind != "jsonl" and self.pair_column is None:
                    raise UsageError(
                        f"{shard.source} is {shard.kind.upper()}: give --pair-column NAME for the second text"
                    )


def number_key(shard: Shard) -> str:
    """The output record's key for the record's place in its file: `_line` or `_row`."""
    return LINE_KEY if shard.kind in ("text", "jsonl") else ROW_KEY


def read_rows(shard: Shard, spec: InputSpec) -> Iterator[Record]:
    """SHARD's records in file order. `line` is the 1-based line (text, JSONL) or data row (CSV, TSV,
    Parquet), `seq` the 0-based record index, `source` the path as given; `fields` carries the
    pass-through fields (JSONL) or columns (CSV, TSV, Parquet: by header name). A record that cannot
    be read (malformed JSON, a missing field or column) has `error` set, as in the streaming commands."""
    if shard.kind == "text":
        return _read_lines(shard, None, None)
    if shard.kind == "jsonl":
        return _read_lines(shard, spec.field, spec.pair_field)
    if shard.kind in ("csv", "tsv"):
        return _read_delimited(shard, spec.column, spec.pair_column, "," if shard.kind == "csv" else "\t")
    if shard.kind == "parquet":
        return _read_parquet(shard, spec.column, spec.pair_column)
    raise UsageError(f"unknown input kind {shard.kind!r}")


def _open(shard: Shard) -> IO[bytes]:
    try:
        return open(shard.source, "rb")
    except OSError as exc:
        raise InputError(f"cannot read {shard.source}: {exc.strerror or exc}") from None


def _read_lines(shard: Shard, field: str | None, pair_field: str | None) -> Iterator[Record]:
    """Lines split on b"\\n" only, as stream.readers.LineSource splits them; a last line without one counts."""
    parser = RecordParser(field=field, pair_field=pair_field)
    source = str(shard.source)
    line = 1
    with _open(shard) as stream:
        partial = b""
        while True:
            data = stream.read(_READ_SIZE)
            if not data:
                break
            parts = (partial + data).split(b"\n")
            partial = parts.pop()
            for raw in parts:
                yield parser.parse_line(raw, source, line)
                line += 1
        if partial:
            yield parser.parse_line(partial, source, line)


def _column_index(column: str, header: list[str], shard: Shard) -> int:
    if column in header:
        return header.index(column)
    if column.isdigit() and 1 <= int(column) <= len(header):
        return int(column) - 1
    raise InputError(f"{shard.source}: no column {column!r} (columns: {', '.join(header) or 'none'})")


def _read_delimited(shard: Shard, column: str | None, pair_column: str | None, delimiter: str) -> Iterator[Record]:
    source = str(shard.source)
    with _open(shard) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
        reader = csv.reader(text, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise InputError(f"{source}: header: {exc}") from None
        index = _column_index(column or "", header, shard)
        pair = None if pair_column is None else _column_index(pair_column, header, shard)
        seq = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise InputError(f"{source}: row {seq + 1}: {exc}") from None
            record = Record(seq=seq, text="", source=source, line=seq + 1, replaced=any("\ufffd" in c for c in row))
            seq += 1
            if row:
                record.fields = dict(zip(header, row))
                if len(row) != len(header):
                    record.error = f"has {len(row)} column(s), the header has {len(header)}"
                    record.raw = delimiter.join(row)
                    record.fields = None
                else:
                    record.text = row[index]
                    if pair is not None:
                        record.pair = row[pair]
            else:
                record.fields = {}  # an empty line: an empty record, as in the streaming commands
            yield record


def _require_pyarrow(what: str) -> None:
    require_extra("parquet", what, "pyarrow", "pyarrow.parquet")


def _plain(value: Any) -> Any:
    """A Parquet value as JSON can hold it: dates, decimals and bytes become their text."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _read_parquet(shard: Shard, column: str | None, pair_column: str | None) -> Iterator[Record]:
    _require_pyarrow("reading Parquet input")
    import pyarrow.parquet as pq

    source = str(shard.source)
    try:
        pf = pq.ParquetFile(shard.source)
    except Exception as exc:  # pyarrow's own errors: not Parquet, truncated, unreadable
        raise InputError(f"cannot read {source} as Parquet: {exc}") from None
    names = list(pf.schema_arrow.names)
    name = names[_column_index(column or "", names, shard)]
    pair = None if pair_column is None else names[_column_index(pair_column, names, shard)]
    seq = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH):
        for row in batch.to_pylist():
            record = Record(seq=seq, text="", source=source, line=seq + 1, fields=_plain(row))
            seq += 1
            value = row.get(name)
            if value is None:
                pass  # null: an empty record, as a null JSONL field
            elif not isinstance(value, str):
                record.error = f"column {name!r} is a {type(value).__name__}, not a string"
            elif pair is None:
                record.text = value
            else:
                second = row.get(pair)
                if isinstance(second, str):
                    record.text, record.pair = value, second
                else:
                    what = "null" if second is None else f"a {type(second).__name__}, not a string"
                    record.error = f"column {pair!r} is {what}"
            yield record


# --- output -----------------------------------------------------------------------------------


def output_record(obj: dict[str, Any], shard: Shard, record: Record) -> dict[str, Any]:
    """OBJ (the streaming command's --format jsonl record) plus `_source` and `_line`/`_row`.

    An input field or column with one of those names would be overwritten: refused instead."""
    key = number_key(shard)
    for name in (SOURCE_KEY, key):
        if name in obj:
            raise InputError(f"{record.where}: the input has a field {name!r}, which batch writes itself (rename it)")
    obj[SOURCE_KEY] = str(shard.source)
    obj[key] = record.line
    return obj


def render_jsonl(obj: dict[str, Any], raw_numbers: bool) -> bytes:
    """One JSONL line, exactly as the streaming commands' JsonlWriter writes a record."""
    from onnxpipe.stream.writers import JsonlWriter, _hold_raw_numbers

    held: list[str] = []
    if raw_numbers:
        obj = _hold_raw_numbers(obj, held)
    try:
        return JsonlWriter._dumps(obj, held)
    except RecursionError:
        return JsonlWriter._dumps({"error": "result nested too deeply to write"}, [])


class ShardWriter:
    """Writes one shard's output to `DIR/.tmp-<hash>-<pid>`; commit() fsyncs and renames it to its final
    name, abort() removes it. JSONL lines are written as they come; Parquet rows are kept and written
    at commit (one table per shard)."""

    def __init__(self, shard: Shard, output_dir: Path, fmt: str):
        self.shard = shard
        self.fmt = fmt
        self.temp = output_dir / f"{shard.temp_prefix}{os.getpid()}"
        self.count = 0
        self._rows: list[dict[str, Any]] = []
        if fmt == "parquet":
            _require_pyarrow("--output-format parquet")
        self._stream: IO[bytes] | None = open(self.temp, "wb")

    def write_line(self, line: bytes) -> None:
        """A rendered JSONL line (render_jsonl)."""
        assert self._stream is not None
        self._stream.write(line)
        self.count += 1

    def write_row(self, obj: dict[str, Any]) -> None:
        """A record as a dict (Parquet output)."""
        self._rows.append(obj)
        self.count += 1

    def commit(self) -> None:
        """Make the shard appear at its final name, complete (fsync, then an atomic rename)."""
        assert self._stream is not None
        if self.fmt == "parquet":
            _write_parquet(self._rows, self._stream)
            self._rows = []
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        self._stream = None
        self.shard.output.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.temp, self.shard.output)
        _fsync_dir(self.shard.output.parent)

    def abort(self) -> None:
        if self._stream is not None:
            try:
                self._stream.close()
            except OSError:
                pass
            self._stream = None
        try:
            os.unlink(self.temp)
        except OSError:
            pass


def _write_parquet(rows: list[dict[str, Any]], stream: IO[bytes]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types in a field: keep the values as JSON text
        table = pa.Table.from_pylist([{k: json.dumps(v, ensure_ascii=False) for k, v in r.items()} for r in rows])
    pq.write_table(table, stream)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_temporaries(output_dir: Path, pid: int | None = None) -> int:
    """Remove the temporaries an interrupted run left in OUTPUT_DIR (the caller holds the job's lock).

    With PID, only that process's own (`.tmp-...-PID`): an engine stopping on a signal sweeps its own,
    since the signal may land after a ShardWriter opened its file and before the engine held the writer.
    """
    removed = 0
    if not output_dir.is_dir():
        return 0
    for entry in output_dir.iterdir():
        if pid is not None and not entry.name.endswith(f"-{pid}"):
            continue
        if entry.name.startswith(".tmp-") and entry.is_file():
            try:
                entry.unlink()
                removed += 1
            except OSError:
                pass
    return removed
