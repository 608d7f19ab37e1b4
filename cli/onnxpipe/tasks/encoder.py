"""The part every encoder task shares: tokenize with truncation, pad a batch to its longest row, run.

Subclasses implement `postprocess(outputs, batch)` and the three formatters. Inputs are fed as
int64 numpy arrays with exactly the names the graph declares (DistilBERT has no token_type_ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from onnxpipe.errors import UsageError
from onnxpipe.stream.records import Item, Record

# A line longer than this many characters per allowed token is cut (at a space) before
# tokenizing: no tokenizer we support makes fewer tokens than that from real text, and a
# 10 MB line would otherwise cost seconds and a large Encoding. If the cut text turns out
# not to need truncation after all, the whole line is tokenized.
CHARS_PER_TOKEN_CAP = 32

# What an encoder task does with a record longer than the model's window: cut it (and count it), or make
# it an error record (--truncation error). tag adds "window": strided windows over the whole line.
TRUNCATIONS = ("truncate", "error")


class EncoderTask:
    """Base of classify, embed, tag and fill-mask: one session, one forward pass per batch."""

    task_names: tuple[str, ...] = ()
    truncations: tuple[str, ...] = TRUNCATIONS

    def __init__(self, model: Any, truncation: str = "truncate"):
        if truncation not in self.truncations:
            raise UsageError(
                f"unknown truncation {truncation!r}", hint="one of: " + ", ".join(map(repr, self.truncations))
            )
        self.truncation = truncation
        self.model = model
        self.session = model.session()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.max_length = model.max_length
        pad = model.special_tokens.get("pad_token_id")
        self.pad_id = int(pad) if isinstance(pad, int) else 0
        self.tokenizer = model.tokenizer
        self.tokenizer.enable_truncation(self.max_length)

    @property
    def provider(self) -> str | None:
        return self.model.provider

    # --- the Task protocol --------------------------------------------------------------------
    def encode(self, records: Sequence[Record]) -> list[Item]:
        cap = max(self.max_length * CHARS_PER_TOKEN_CAP, 4096)
        texts, cut = [], []
        for record in records:
            text = record.text
            if len(text) > cap and self.truncation != "window":  # windows read the whole line
                space = text.rfind(" ", cap - 256, cap)
                text = text[: space if space > 0 else cap]
                cut.append(True)
            else:
                cut.append(False)
            texts.append(text)
        encodings = self.tokenizer.encode_batch(texts)
        items = []
        for record, encoding, was_cut in zip(records, encodings, cut):
            if was_cut and not encoding.overflowing:
                encoding = self.tokenizer.encode(record.text)
            items.append(self.make_item(record, encoding))
        return items

    def make_item(self, record: Record, encoding: Any) -> Item:
        if encoding.overflowing and self.truncation == "error":
            return Item(record, len(encoding), data=encoding, error=self.too_long)
        return Item(record, len(encoding), data=encoding, truncated=bool(encoding.overflowing))

    @property
    def too_long(self) -> str:
        """The error of a record longer than the model's window, under --truncation error."""
        return f"longer than the model's {self.max_length} tokens (--truncation error)"

    @property
    def truncation_hint(self) -> str:
        """What the end-of-run count of truncated records suggests."""
        return "--truncation error refuses them"

    def run(self, batch: Sequence[Item]) -> list[Any]:
        feed, lengths = self.feed(batch)
        outputs = self.session.run(None, feed)
        return self.postprocess(dict(zip(self.output_names, outputs)), batch, lengths)

    def postprocess(self, outputs: dict[str, np.ndarray], batch: Sequence[Item], lengths: list[int]) -> list[Any]:
        raise NotImplementedError

    # --- helpers ------------------------------------------------------------------------------
    def feed(self, batch: Sequence[Item]) -> tuple[dict[str, np.ndarray], list[int]]:
        """Pad to the longest row of this batch (not to max_length): int64 ids, mask, type ids."""
        lengths = [len(item.data.ids) for item in batch]
        width = max(lengths)
        ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        types = np.zeros((len(batch), width), dtype=np.int64) if "token_type_ids" in self.input_names else None
        for row, (item, n) in enumerate(zip(batch, lengths)):
            ids[row, :n] = item.data.ids
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = item.data.type_ids
        feed = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            feed["token_type_ids"] = types
        if "position_ids" in self.input_names:
            feed["position_ids"] = np.broadcast_to(np.arange(width, dtype=np.int64), ids.shape).copy()
        return {k: v for k, v in feed.items() if k in self.input_names}, lengths


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """As transformers' pipelines compute it (numpy, shifted by the max)."""
    shifted = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
