"""The units that flow through the engine: a Record (one input line) and an Item (a tokenized record)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Record:
    """One input record, in input order.

    `seq` is the 0-based position across all inputs (the output order); `line` the 1-based line in
    `source`. `fields` is the parsed JSONL object (passed through to JSONL output), `columns` the
    TSV row (passed through to TSV output). `error` is set when the record could not be read
    (malformed JSON, missing field): it then gets an error result, never a model run.
    """

    seq: int
    text: str
    source: str = "<stdin>"
    line: int = 0
    fields: dict[str, Any] | None = None
    columns: list[str] | None = None
    error: str | None = None
    nbytes: int = 0
    replaced: bool = False  # invalid UTF-8 was replaced with U+FFFD
    raw: str | None = None  # the input line, kept when it could not be parsed (error records carry it)
    raw_numbers: bool = False  # `fields` holds numbers kept as written (readers.RawNumber)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.line else self.source


@dataclass
class Item:
    """A record as a task encoded it. `cost` is its length in tokens (what the batcher sorts and budgets by).

    `data` belongs to the task (token ids, offsets, ...). A task sets `truncated` when it had to
    cut the input to the model's limit, and `error` when this record cannot be run (e.g. fill-mask
    without a mask token); the engine counts and reports both.
    """

    record: Record
    cost: int
    data: Any = None
    truncated: bool = False
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
