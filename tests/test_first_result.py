"""The first result of a stream is written after the first small batch, not after the first window's sorted pass.

No timing: a spy task records what it was asked to encode and run, and what the writer had flushed to
the output at each run. The first batch must hold record 0, in input order, and its results must be on
the output before the second batch runs; the rest of the window stays length-sorted.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import tiny_models

from onnxpipe.registry import family_named
from onnxpipe.runtime import load_model
from onnxpipe.stream.engine import Engine, EngineOptions
from onnxpipe.stream.readers import LineSource, RecordParser
from onnxpipe.stream.records import Item
from onnxpipe.stream.writers import make_writer


class Spy:
    """Wraps a task: records each encode call's record numbers, each batch's, and the output so far."""

    def __init__(self, task, out: io.BytesIO):
        self.task = task
        self.out = out
        self.encoded: list[list[int]] = []
        self.batches: list[list[int]] = []
        self.flushed_before: list[bytes] = []  # the output as it stood when each batch started

    def encode(self, records):
        self.encoded.append([r.seq for r in records])
        return self.task.encode(records)

    def run(self, batch):
        self.batches.append([item.record.seq for item in batch])
        self.flushed_before.append(self.out.getvalue())
        return self.task.run(batch)

    def __getattr__(self, name):
        return getattr(self.task, name)


class Reverse:
    """Result = the text reversed; cost = its length."""

    def encode(self, records):
        return [Item(r, len(r.text)) for r in records]

    def run(self, batch):
        return [item.record.text[::-1] for item in batch]

    def to_text(self, result):
        return result

    def to_fields(self, result):
        return {"reversed": result}

    def to_columns(self, result):
        return [result or ""]


def run_spied(task, data: bytes, fmt: str = "text", **options) -> tuple[Spy, bytes]:
    out = io.BytesIO()
    spy = Spy(task, out)
    writer = make_writer(fmt, out, spy)
    Engine(spy, writer, EngineOptions(**options)).run(LineSource(["-"], stdin=io.BytesIO(data)), RecordParser())
    writer.close()
    return spy, out.getvalue()


# Record 0 is the longest, so a plain sorted pass would run it last.
LINES = ["x" * 60] + [("ab" * (i % 23)) + str(i) for i in range(1, 300)]
DATA = "".join(line + "\n" for line in LINES).encode()


def test_first_batch_is_the_head_in_input_order_and_written_before_the_next():
    spy, out = run_spied(Reverse(), DATA, batch_size=8, first_batch=4)
    assert out.decode().splitlines() == [line[::-1] for line in LINES]
    assert spy.batches[0] == [0, 1, 2, 3]
    assert spy.encoded[0] == [0, 1, 2, 3]  # the rest of the window is tokenized after the head ran
    assert spy.flushed_before[0] == b""
    assert spy.flushed_before[1].decode().splitlines() == [line[::-1] for line in LINES[:4]]
    rest = [len(LINES[seq]) for batch in spy.batches[1:] for seq in batch]
    assert rest == sorted(rest)  # one window: everything after the head is length-sorted
    assert sorted(seq for batch in spy.batches for seq in batch) == list(range(len(LINES)))


def test_head_is_at_most_one_batch_and_within_the_token_budget():
    spy, out = run_spied(Reverse(), DATA, batch_size=2, first_batch=8, max_batch_tokens=70)
    assert out.decode().splitlines() == [line[::-1] for line in LINES]
    # The head is min(first_batch, batch_size) = 2 records; record 0 (60) and record 1 exceed 70 together.
    assert spy.batches[:2] == [[0], [1]] and spy.encoded[0] == [0, 1]
    assert spy.flushed_before[1].decode() == LINES[0][::-1] + "\n"
    assert all(len(b) <= 2 and max(len(LINES[s]) for s in b) * len(b) <= 70 for b in spy.batches)


def test_later_windows_and_small_inputs_keep_the_sorted_pass():
    spy, _ = run_spied(Reverse(), DATA, batch_size=8, first_batch=4, window=100)
    assert spy.encoded[0] == [0, 1, 2, 3]
    assert [len(e) for e in spy.encoded[1:]] == [100, 100, 96]  # full windows, then what is left
    small = b"ccc\na\nbb\ndddd\nee\n"  # no more than two batches: the head would gain nothing
    spy, out = run_spied(Reverse(), small, batch_size=4, first_batch=4)
    assert spy.batches == [[1, 2, 4, 0], [3]]
    assert out == b"ccc\na\nbb\ndddd\nee\n"


def test_off_and_streaming_runs_have_no_head():
    spy, out = run_spied(Reverse(), DATA, batch_size=8, first_batch=0)
    assert spy.batches[0] != [0, 1, 2, 3] and len(spy.encoded) == 1
    assert out.decode().splitlines() == [line[::-1] for line in LINES]


def test_empty_and_unreadable_records_in_the_head_keep_their_place():
    lines = ["", "x" * 50, "", *LINES[1:]]
    data = "".join(line + "\n" for line in lines).encode() + b"bad \xff\n"
    spy, out = run_spied(Reverse(), data, fmt="jsonl", batch_size=8, first_batch=4)
    assert spy.batches[0] == [1, 3]  # the head's runnable records; the empty ones never reach the task
    got = out.decode().splitlines()
    assert len(got) == len(lines) + 1 and got[0] == '{"text": "", "reversed": null}'


# --- every streaming task through the real engine -----------------------------------------------------

TEXTS = [tiny_models.CORPUS[i % len(tiny_models.CORPUS)] + " " + "word " * (i % 7) for i in range(24)]
TEXT_DATA = "".join(t.strip() + "\n" for t in TEXTS).encode()
MASKED_DATA = "".join(t.strip() + " [MASK] .\n" for t in TEXTS).encode()


@pytest.fixture(scope="module")
def real_tasks(exported, checkpoint, tmp_path_factory):
    import tiny_seq2seq

    pytest.importorskip("transformers")
    exports = {
        "classify": exported("bert", "text-classification"),
        "embed": exported("bert", "feature-extraction"),
        "tag": exported("bert", "token-classification"),
        "fill-mask": exported("bert", "fill-mask"),
        "translate": tiny_seq2seq.sharpened_export("marian", tmp_path_factory.mktemp("s2s"), checkpoint)[1],
    }
    return {
        family: family_named(family).make_task(load_model(path, device="cpu"), {}) for family, path in exports.items()
    }


@pytest.mark.parametrize("family", ["classify", "embed", "tag", "fill-mask", "translate"])
def test_every_task_writes_its_head_first_with_the_results_of_a_sorted_run(real_tasks, family):
    task = real_tasks[family]
    data = MASKED_DATA if family == "fill-mask" else TEXT_DATA
    spy, out = run_spied(task, data, fmt="jsonl", batch_size=4, first_batch=3, max_batch_tokens=None)
    assert spy.batches[0] == [0, 1, 2]
    assert len(spy.flushed_before[1].decode().splitlines()) == 3
    _, plain = run_spied(task, data, fmt="jsonl", batch_size=4, first_batch=0, max_batch_tokens=None)
    got, expected = _rows(out), _rows(plain)
    assert len(got) == len(TEXTS)
    if family == "embed":  # the vectors, whatever their batch-mates
        np.testing.assert_allclose([r["embedding"] for r in got], [r["embedding"] for r in expected], atol=1e-5)
    else:
        assert _labels(got) == _labels(expected)


def _rows(out: bytes) -> list[dict]:
    import json

    return [json.loads(line) for line in out.decode().splitlines()]


def _labels(rows: list[dict]) -> list:
    """What a record's result says, without its float scores (which move in the last bits with padding)."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("score", "scores")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(rows)
