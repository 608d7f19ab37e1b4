"""Input: raw lines from files and stdin, read in a background thread, parsed into Records.

The thread reads with `os.read` on the file descriptor, which returns what the producer has written
so far instead of waiting for a full buffer. It never reads through sys.stdin's BufferedReader: a
daemon thread blocked inside it holds the buffer's lock, and the interpreter aborts (SIGABRT, "could
not acquire lock ... at interpreter shutdown") when Ctrl-C ends the main thread while the producer
is still open. The thread hands over whole lines in chunks through a bounded queue. So memory stays
bounded (a few chunks plus the line being read), and the engine can tell "the producer is slow" (no
chunk within the idle time: run what is buffered) from "the producer is fast" (chunks keep coming:
fill the window). Lines are split on b"\\n" only: CR, form feeds, U+2028 and other characters that
str.splitlines() treats as breaks stay inside their record.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import re
import stat
import sys
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, cast

from onnxpipe.errors import InputError
from onnxpipe.stream.records import Record

STDIN = "-"
IDLE = object()  # yielded by LineSource.chunks when no input arrived within the idle time
_EOF = object()
_READ_SIZE = 1 << 16
_WAKE = 0.25  # seconds: the longest the main thread blocks on the queue before it checks for signals


@dataclass
class RawChunk:
    """Consecutive lines of one source; `first_line` is the 1-based number of lines[0]."""

    source: str
    first_line: int
    lines: list[bytes]
    nbytes: int


class LineSource:
    """Lines of PATHS in order (`-` is stdin), read ahead in a daemon thread."""

    def __init__(self, paths: Sequence[str] = (STDIN,), stdin: IO[bytes] | None = None, max_chunks: int = 16):
        self.paths = list(paths) or [STDIN]
        self._stdin = stdin
        self._queue: queue.Queue = queue.Queue(maxsize=max_chunks)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.total_bytes = _total_size(self.paths)  # None when a source is a pipe or a terminal

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._read_all, name="onnxpipe-reader", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Let the reader thread end (it may be blocked on a slow producer; it is a daemon then)."""
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def chunks(self, idle: float | None = None) -> Iterator[RawChunk | object]:
        """RawChunks in input order; IDLE once per quiet spell longer than `idle` seconds."""
        self.start()
        quiet = False
        while True:
            try:
                # Never an unbounded wait: a signal that the kernel delivered to another thread
                # (the reader, ONNX Runtime's pool) runs its Python handler only when the main
                # thread wakes up, so it wakes up at least every _WAKE seconds (Ctrl-C wins).
                waiting_for_idle = not quiet and idle is not None
                item = self._queue.get(timeout=idle if waiting_for_idle else _WAKE)
            except queue.Empty:
                if waiting_for_idle:
                    quiet = True
                    yield IDLE
                continue
            quiet = False
            if item is _EOF:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    # --- the reader thread --------------------------------------------------------------------
    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _read_all(self) -> None:
        try:
            for path in self.paths:
                if path == STDIN:
                    self._read_one(self._stdin or _binary_stdin(), "<stdin>")
                else:
                    try:
                        stream = open(path, "rb")
                    except OSError as exc:
                        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
                    with stream:
                        self._read_one(stream, path)
                if self._stop.is_set():
                    return
            self._put(_EOF)
        except BaseException as exc:  # handed to the main thread, which raises it
            self._put(exc if isinstance(exc, Exception) else InputError(f"reading input failed: {exc!r}"))

    def _read_one(self, stream: IO[bytes], name: str) -> None:
        read = _reader(stream)
        partial: list[bytes] = []
        line_no = 1
        while not self._stop.is_set():
            try:
                data = read(_READ_SIZE)
            except InterruptedError:
                continue
            if not data:
                break
            parts = data.split(b"\n")
            if len(parts) == 1:
                partial.append(data)
                continue
            if partial:
                partial.append(parts[0])
                parts[0] = b"".join(partial)
                partial = []
            tail = parts.pop()
            if tail:
                partial.append(tail)
            if not self._put(RawChunk(name, line_no, parts, len(data))):
                return
            line_no += len(parts)
        if partial:  # a last line without a newline is still a record
            self._put(RawChunk(name, line_no, [b"".join(partial)], 0))


def _binary_stdin() -> IO[bytes]:
    if stdin_is_closed():
        raise InputError(STDIN_CLOSED)
    stdin: Any = sys.stdin  # a replaced sys.stdin (a test's BytesIO) may have no .buffer
    return cast(IO[bytes], getattr(stdin, "buffer", stdin))


STDIN_CLOSED = "cannot read <stdin>: it is closed (give FILE arguments, or redirect stdin)"


def stdin_is_closed() -> bool:
    """stdin was closed when onnxpipe started (`<&-`)."""
    from onnxpipe.signals import is_closed

    return is_closed(sys.stdin)


def _reader(stream: IO[bytes]):
    """A read(n) that returns what is there: os.read on a real descriptor, else read1 or read.

    Nothing reads stdin before the reader thread, so its BufferedReader holds no bytes to bypass.
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return getattr(stream, "read1", stream.read)
    return functools.partial(os.read, fd)


def _total_size(paths: Sequence[str]) -> int | None:
    total = 0
    for path in paths:
        if path == STDIN:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        total += st.st_size
    return total


# --- parsing ---------------------------------------------------------------------------------


class RecordParser:
    """Raw lines -> Records: text lines, JSONL (`field`) or TSV (`column`, 1-based).

    With `pair_field` (JSONL) or `pair_column` (TSV), each record is a text pair: the second text
    goes to `Record.pair` (a missing or non-string one makes an error record, as for `field`).
    """

    def __init__(
        self,
        field: str | None = None,
        column: int | None = None,
        pair_field: str | None = None,
        pair_column: int | None = None,
    ):
        self.field = field
        self.column = column
        self.pair_field = pair_field
        self.pair_column = pair_column
        self.seq = 0
        self.replaced = 0  # records with invalid UTF-8 (or lone surrogates in JSON) replaced

    def parse(self, chunk: RawChunk) -> list[Record]:
        out = []
        for offset, raw in enumerate(chunk.lines):
            out.append(self.parse_line(raw, chunk.source, chunk.first_line + offset))
        return out

    def parse_line(self, raw: bytes, source: str, line: int) -> Record:
        nbytes = len(raw) + 1
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        replaced = False
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", "replace")
            replaced = True
        if line == 1 and text.startswith("\ufeff"):
            text = text[1:]
        record = Record(seq=self.seq, text=text, source=source, line=line, nbytes=nbytes, replaced=replaced)
        self.seq += 1
        if self.field is not None:
            self._parse_json(record)
        elif self.column is not None:
            self._parse_tsv(record, self.column)
        if record.replaced:
            self.replaced += 1
        return record

    def _parse_json(self, record: Record) -> None:
        text, record.text = record.text, ""
        if not text.strip():
            record.fields = {}
            return
        try:
            obj, record.raw_numbers = _loads(text)
        except ValueError as exc:
            record.error = f"malformed JSON: {exc}"
            record.raw = text
            return
        if not isinstance(obj, dict):
            record.error = f"expected a JSON object, got {_json_type(obj)}"
            record.raw = text
            return
        record.fields = obj
        value = self._json_text(record, obj, self.field)
        if value is None:
            return
        if self.pair_field is not None:
            pair = self._json_text(record, obj, self.pair_field)
            if pair is None:
                if record.error is None:
                    record.error = f"field {self.pair_field!r} is null"
                return
            record.pair = pair
        record.text = value

    @staticmethod
    def _json_text(record: Record, obj: dict, name: str | None) -> str | None:
        """The string in field NAME; None (with record.error set when it is missing or not a string) else."""
        if name not in obj:
            record.error = f"no field {name!r} (fields: {', '.join(map(str, obj)) or 'none'})"
            return None
        value = obj[name]
        if value is None:
            return None
        if not isinstance(value, str):
            record.error = f"field {name!r} is a {type(value).__name__}, not a string"
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from \\ud800-style escapes
            value = value.encode("utf-8", "replace").decode("utf-8")
            record.replaced = True
        return value

    def _parse_tsv(self, record: Record, column: int) -> None:
        line, record.text = record.text, ""
        record.columns = line.split("\t") if line else []
        if not line:
            return
        index = column - 1
        if index >= len(record.columns):
            record.error = f"has {len(record.columns)} column(s), --column {column} asked"
            record.raw = line
            return
        if self.pair_column is not None:
            if self.pair_column > len(record.columns):
                record.error = f"has {len(record.columns)} column(s), --pair-column {self.pair_column} asked"
                record.raw = line
                return
            record.pair = record.columns[self.pair_column - 1]
        record.text = record.columns[index]


# --- JSON records -----------------------------------------------------------------------------

MAX_JSON_DEPTH = 256  # arrays/objects inside each other; deeper is refused (Python's parser and
# writer recurse, and a RecursionError would end the whole run, not one record)
_BRACKETS = re.compile(r'"(?:[^"\\]|\\.)*"|([\[{])|([\]}])')


_BIG_EXPONENT = re.compile(r"[eE][+-]?0*[0-9]{3,}")  # 1e400 would be parsed as inf


class RawNumber(str):
    """A JSON number Python cannot hold exactly (over 4,300 digits, or beyond a double's range):
    kept as written, and written back as written (see JsonlWriter)."""


def loads_record(text: str):
    """json.loads for one input record: one ValueError for anything that is not plain JSON.

    NaN, Infinity and -Infinity are refused (they are not JSON, and JSON output could not carry
    them); numbers Python cannot represent exactly pass through as RawNumber.
    """
    return _loads(text)[0]


def _loads(text: str) -> tuple[object, bool]:
    """(the value, whether it may hold RawNumbers)."""
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _depth(text) > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        if _BIG_EXPONENT.search(text) is None:  # the fast path: numbers parsed in C
            try:
                return json.loads(text, parse_constant=_refuse_constant), False
            except ValueError as exc:
                if "digits" not in str(exc):  # not Python's int length limit
                    raise
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_refuse_constant), True
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None


def _depth(text: str) -> int:
    depth = deepest = 0
    for match in _BRACKETS.finditer(text):
        if match.group(1):
            depth += 1
            deepest = max(deepest, depth)
        elif match.group(2):
            depth -= 1
    return deepest


def _parse_int(digits: str):
    return int(digits) if len(digits) <= 4000 else RawNumber(digits)


def _parse_float(literal: str):
    value = float(literal)
    return value if value not in (float("inf"), float("-inf")) else RawNumber(literal)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number (write it as a string or null)")


def _json_type(value) -> str:
    if isinstance(value, RawNumber) or isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def read_text_lines(
    path: str | os.PathLike, *, strict: bool = False, skip_empty: bool = False, limit: int | None = None
) -> list[str]:
    """The lines of a small file read whole (eval's sources and references, bench's --input, labelled
    JSONL), split as the streaming reader splits: on "\\n" only, a CR before it dropped, a BOM at the
    start dropped, a last line without a newline kept. '-' is stdin. Invalid UTF-8 is replaced, or with
    STRICT an InputError that names the line. SKIP_EMPTY drops empty lines; LIMIT stops after that many."""
    lines: list[str] = []
    with contextlib.closing(iter_text_lines(path, strict=strict, skip_empty=skip_empty)) as each:
        for text in each:
            lines.append(text)
            if limit is not None and len(lines) >= limit:
                break
    return lines


def iter_text_lines(
    path: str | os.PathLike, *, strict: bool = False, skip_empty: bool = False
) -> Generator[str, None, None]:
    """read_text_lines' lines one at a time, for a reader that may stop early (eval's --max-tokens of a
    corpus): what is not asked for is never read. Close it (contextlib.closing) to close the file early."""
    source = "<stdin>" if str(path) == STDIN else str(path)
    try:
        stream = _binary_stdin() if str(path) == STDIN else open(path, "rb")
    except OSError as exc:
        raise InputError(f"cannot read {source}: {exc.strerror or exc}") from None
    try:
        for number, raw in enumerate(stream, 1):  # binary iteration splits on b"\n" only
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            raw = raw[:-1] if raw.endswith(b"\r") else raw
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if strict:
                    raise InputError(
                        f"not valid UTF-8 (byte 0x{raw[exc.start]:02x}); re-save the file as UTF-8, "
                        "e.g. iconv -f latin1 -t utf-8",
                        line=number,
                        source=source,
                    ) from None
                text = raw.decode("utf-8", "replace")
            if number == 1 and text.startswith("\ufeff"):
                text = text[1:]
            if text or not skip_empty:
                yield text
    except OSError as exc:
        raise InputError(f"cannot read {source}: {exc.strerror or exc}") from None
    finally:
        if str(path) != STDIN:
            stream.close()


def records_from_texts(texts: Sequence[str], source: str = "<args>") -> list[Record]:
    """Records for texts that did not come from a stream (`-p PROMPT`, tests)."""
    return [Record(seq=i, text=t, source=source, line=i + 1, nbytes=len(t) + 1) for i, t in enumerate(texts)]
