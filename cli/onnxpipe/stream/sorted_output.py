"""Output written best first instead of in input order (rerank --sort): the results are held until the
input ends, then sorted and written through the command's own writer.

This is the one place that holds a whole run's results in memory; the commands that use it say so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from onnxpipe.stream.records import Result
from onnxpipe.stream.writers import TextWriter, Writer, escape_text


class SortedWriter:
    """Wraps WRITER: holds every Result, and at close writes them by KEY, highest first.

    The sort is stable (equal keys keep their input order); results without a key (empty or failed
    records) come last, in input order. Text output writes the record's own text: the input line
    as it was read, or a JSONL field's text escaped as text output escapes it.
    """

    def __init__(self, writer: Writer, key: Callable[[Result], float | None], limit: int | None = None):
        self.writer = writer
        self.key = key
        self.limit = limit  # write only the LIMIT best (no empty or failed records then)
        self.held: list[Result] = []

    @classmethod
    def by_score(cls, writer: Writer, limit: int | None = None) -> SortedWriter:
        return cls(writer, lambda result: None if result.value is None else result.value.score, limit)

    def write(self, result: Result) -> None:
        self.held.append(result)

    def write_partial(self, text: str) -> None:  # pragma: no cover - no streamed task sorts
        self.writer.write_partial(text)

    def flush(self) -> None:
        pass  # nothing is written before the input ends

    def close(self) -> None:
        keyed = [(_finite(self.key(r)), r) for r in self.held]
        scored = sorted((kr for kr in keyed if kr[0] is not None), key=lambda kr: -kr[0])  # type: ignore[operator]
        rest = [kr for kr in keyed if kr[0] is None]
        self.held = []
        ranked = scored + rest if self.limit is None else scored[: self.limit]
        text = isinstance(self.writer, TextWriter)
        for _, result in ranked:
            if text:
                self.writer._lines.append((_line_text(result) + "\n").encode("utf-8", "replace"))
                self.writer.count += 1
            else:
                self.writer.write(result)
        self.writer.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.writer, name)


def _finite(key: float | None) -> float | None:
    return None if key is None or key != key else key  # NaN sorts with the empty results, last


def _line_text(result: Result) -> str:
    record = result.record
    if record.raw is not None:
        return escape_text(record.raw)
    if record.fields is None and record.columns is None:
        return record.text  # a line as read: it holds no newline
    return escape_text(record.text)
