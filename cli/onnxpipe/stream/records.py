"""The units that flow through the engine: a Record (one input line), an Item (a tokenized record) and a
Result (a record's outcome: what the writers render and the Python API returns)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol


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
    pair: str | None = None  # the second text of a text pair (--pair-field / --pair-column), else None

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


class Formatter(Protocol):
    """What a task provides to turn its results into output. `value` is None for an empty or failed record."""

    def to_text(self, value: Any) -> str: ...
    def to_fields(self, value: Any) -> dict[str, Any]: ...
    def to_columns(self, value: Any) -> list[str]: ...


class Result:
    """One record's outcome: the CLI's writers render it and the Python API (`onnxpipe.load`) returns it.

    `value` is the task's own typed result (a Classification, an embedding, a list of Completions, ...;
    None for an empty or failed record), `error` why the record failed, `fields` the task's JSONL fields
    (computed on first use), also readable as attributes (`result.label`). `to_dict()` is the record
    that `--format jsonl` writes: the input object (JSONL input) or {"text": ...}, the fields, "error".
    """

    __slots__ = ("record", "value", "error", "formatter", "__dict__")

    def __init__(self, record: Record, value: Any, error: str | None, formatter: Formatter):
        self.record = record
        self.value = value
        self.error = error
        self.formatter = formatter

    @property
    def text(self) -> str:
        """The input text."""
        return self.record.text

    @cached_property
    def fields(self) -> dict[str, Any]:
        return self.formatter.to_fields(self.value)

    def to_dict(self) -> dict[str, Any]:
        record = self.record
        if record.fields is not None:
            obj = dict(record.fields)
        elif record.raw is not None:  # a line that could not be read as a record: kept as it came
            obj = {"input": record.raw}
        else:
            obj = {"text": record.text}
        obj.update(self.fields)
        if self.error is not None:
            obj["error"] = self.error
        return obj

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        fields = self.fields
        if name in fields:
            return fields[name]
        raise AttributeError(f"Result has no field {name!r} (fields: {', '.join(fields) or 'none'})")

    def __repr__(self) -> str:
        return f"Result(text={self.text!r}, fields={self.fields!r}, error={self.error!r})"
