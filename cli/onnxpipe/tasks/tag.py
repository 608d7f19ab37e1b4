"""Token classification (named entities): per-token scores -> entity spans over the original line.

This is transformers' TokenClassificationPipeline postprocessing, step for step (its
`gather_pre_entities`, `aggregate`, `aggregate_words`, `group_entities`), so that spans, labels and
scores are the pipeline's for the same model and input: softmax per token, special tokens
dropped, sub-words found by the tokenizer's continuing-subword prefix (or, for tokenizers without
one such as byte-level BPE, the pipeline's space heuristic), "O" left out. Offsets are character
offsets into the line as read (after UTF-8 decoding).

A line longer than the model's window is read whole by default: the tokenizer cuts it into windows that
overlap by `stride` tokens (the pipeline's `stride=`, return_overflowing_tokens), each window is tagged and
aggregated on its own with offsets into the whole line, and the entities of all windows are merged as the
pipeline's `aggregate_overlapping_entities` does (of overlapping entities the longer wins, then the more
confident). `truncation="truncate"` keeps only the first window, as the pipeline does without a stride.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from onnxpipe.errors import UsageError
from onnxpipe.registry import FAMILIES
from onnxpipe.stream.records import Item, Record
from onnxpipe.tasks.encoder import EncoderTask, softmax

AGGREGATIONS = ("none", "simple", "first", "average", "max")
IGNORE_LABELS = ("O",)
# Padded tokens per session run when the windows of long lines are run: a batch of a few long lines can
# hold many windows, and they are run in slices of this size so memory does not grow with the line.
WINDOW_RUN_TOKENS = 16384


def default_stride(max_length: int) -> int:
    """A quarter of the window: 128 tokens of overlap for 512-token models, about what question
    answering's default doc_stride (128 on 384-token windows) gives, so an entity cut by one window's
    edge is seen whole, with context on both sides, in the next."""
    return max_length // 4


class TagTask(EncoderTask):
    task_names = FAMILIES["tag"].export_tasks  # the registry's
    truncations = ("window", "truncate", "error")

    def __init__(
        self, model: Any, aggregation: str = "simple", truncation: str | None = None, stride: int | None = None
    ):
        if aggregation not in AGGREGATIONS:
            raise UsageError(f"unknown aggregation {aggregation!r}", hint="one of: " + ", ".join(AGGREGATIONS))
        if truncation is None:  # windows, except for aggregation none, which the pipeline cannot window
            truncation = "truncate" if aggregation == "none" and stride is None else "window"
        super().__init__(model, truncation)
        self.stride = 0
        if truncation == "window":
            if aggregation == "none":  # transformers' pipeline refuses stride= with aggregation_strategy="none"
                raise UsageError(
                    "windows over long lines (--stride) need an aggregation: per-token results (--aggregation none) "
                    "cannot be merged across windows",
                    hint="use --aggregation simple/first/average/max, or --truncation truncate",
                )
            specials = (
                self.tokenizer.post_processor.num_special_tokens_to_add(False) if self.tokenizer.post_processor else 0
            )
            room = self.max_length - specials  # the tokenizer refuses a stride that leaves no new tokens per window
            stride = min(default_stride(self.max_length), room - 1) if stride is None else stride
            if not 0 <= stride < room:
                raise UsageError(
                    f"--stride {stride}: must be at least 0 and less than {room} "
                    f"(the model's {self.max_length} tokens less {specials} special tokens)"
                )
            self.stride = stride
        elif stride is not None:
            raise UsageError("--stride is for --truncation window (the default)")
        self.aggregation = aggregation
        self.labels = model.labels
        unk = model.special_tokens.get("unk_token_id")
        self.unk_id = unk if isinstance(unk, int) else None
        self.word_aware = bool(getattr(self.tokenizer.model, "continuing_subword_prefix", None))
        self.decoder = self.tokenizer.decoder

    # --- windows ------------------------------------------------------------------------------
    def encode(self, records: Sequence[Record]) -> list[Item]:
        # The tokenizer is the export's, shared by every task made on it: set this task's windows each time.
        self.tokenizer.enable_truncation(self.max_length, stride=self.stride)
        return super().encode(records)

    def make_item(self, record: Record, encoding: Any) -> Item:
        if self.truncation != "window":
            return super().make_item(record, encoding)
        return Item(record, len(encoding) + sum(len(w) for w in encoding.overflowing), data=encoding)

    def windows(self, item: Item) -> list[Any]:
        """The encodings the model runs for ITEM: the first window, then the overflowing ones (windows only)."""
        return [item.data, *item.data.overflowing] if self.truncation == "window" else [item.data]

    @property
    def truncation_hint(self) -> str:
        if self.aggregation == "none":
            return "windows over the whole line need an --aggregation other than none"
        return "the default --truncation window reads them whole"

    def run(self, batch: Sequence[Item]) -> list[Any]:
        windows = [self.windows(item) for item in batch]
        rows = [Item(item.record, len(w), data=w) for item, ws in zip(batch, windows) for w in ws]
        scores: list[np.ndarray] = []
        start = 0
        while start < len(rows):  # slices of at most WINDOW_RUN_TOKENS padded tokens (one row at least)
            end, width = start + 1, rows[start].cost
            while end < len(rows) and max(width, rows[end].cost) * (end - start + 1) <= WINDOW_RUN_TOKENS:
                width = max(width, rows[end].cost)
                end += 1
            feed, lengths = self.feed(rows[start:end])
            outputs = dict(zip(self.output_names, self.session.run(None, feed)))
            logits = outputs.get("logits", next(iter(outputs.values()))).astype(np.float32)
            probs = softmax(logits)  # per token, so padding does not change a row's values
            scores += [probs[row, :n] for row, n in enumerate(lengths)]
            start = end
        results, row = [], 0
        for item, ws in zip(batch, windows):
            entities: list[dict] = []
            for window in ws:
                pre = self._pre_entities(item.record.text, window, scores[row])
                row += 1
                entities += [
                    e for e in self._aggregate(pre) if e.get("entity", e.get("entity_group")) not in IGNORE_LABELS
                ]
            if len(ws) > 1:
                entities = self._aggregate_overlapping(entities)
            results.append([self._clean(e) for e in entities])
        return results

    @staticmethod
    def _aggregate_overlapping(entities: list[dict]) -> list[dict]:
        """transformers' aggregate_overlapping_entities: of entities that overlap (in start order), keep the
        longer one, or the more confident one of equal length."""
        if not entities:
            return entities
        entities = sorted(entities, key=lambda e: e["start"])
        kept = []
        previous = entities[0]
        for entity in entities:
            if previous["start"] <= entity["start"] < previous["end"]:
                length, previous_length = entity["end"] - entity["start"], previous["end"] - previous["start"]
                if length > previous_length or length == previous_length and entity["score"] > previous["score"]:
                    previous = entity
            else:
                kept.append(previous)
                previous = entity
        kept.append(previous)
        return kept

    # --- transformers' TokenClassificationPipeline, for one chunk ---------------------------
    def _pre_entities(self, sentence: str, encoding: Any, scores: np.ndarray) -> list[dict]:
        pre = []
        for idx, (token_id, special, (start, end)) in enumerate(
            zip(encoding.ids, encoding.special_tokens_mask, encoding.offsets)
        ):
            if special:
                continue
            word = self.tokenizer.id_to_token(token_id)
            word_ref = sentence[start:end]
            if self.word_aware:
                is_subword = len(word) != len(word_ref)
            else:
                is_subword = start > 0 and " " not in sentence[start - 1 : start + 1]
            if token_id == self.unk_id:
                word = word_ref
                is_subword = False
            pre.append(
                {
                    "word": word,
                    "scores": scores[idx],
                    "start": start,
                    "end": end,
                    "index": idx,
                    "is_subword": is_subword,
                }
            )
        return pre

    def _label(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else f"LABEL_{index}"

    def _aggregate(self, pre: list[dict]) -> list[dict]:
        if self.aggregation in ("none", "simple"):
            entities = []
            for p in pre:
                i = int(p["scores"].argmax())
                entities.append(
                    {
                        "entity": self._label(i),
                        "score": p["scores"][i],
                        "index": p["index"],
                        "word": p["word"],
                        "start": p["start"],
                        "end": p["end"],
                    }
                )
        else:
            entities = self._aggregate_words(pre)
        if self.aggregation == "none":
            return entities
        return self._group_entities(entities)

    def _tokens_to_string(self, tokens: list[str]) -> str:
        return self.decoder.decode(tokens) if self.decoder is not None else " ".join(tokens)

    def _aggregate_word(self, entities: list[dict]) -> dict:
        word = self._tokens_to_string([e["word"] for e in entities])
        if self.aggregation == "first":
            scores = entities[0]["scores"]
            i = int(scores.argmax())
            score = scores[i]
        elif self.aggregation == "max":
            scores = max(entities, key=lambda e: e["scores"].max())["scores"]
            i = int(scores.argmax())
            score = scores[i]
        else:  # average
            average = np.nanmean(np.stack([e["scores"] for e in entities]), axis=0)
            i = int(average.argmax())
            score = average[i]
        return {
            "entity": self._label(i),
            "score": score,
            "word": word,
            "start": entities[0]["start"],
            "end": entities[-1]["end"],
        }

    def _aggregate_words(self, entities: list[dict]) -> list[dict]:
        words, group = [], None
        for entity in entities:
            if group is None:
                group = [entity]
            elif entity["is_subword"]:
                group.append(entity)
            else:
                words.append(self._aggregate_word(group))
                group = [entity]
        if group is not None:
            words.append(self._aggregate_word(group))
        return words

    def _group_sub_entities(self, entities: list[dict]) -> dict:
        scores = [float(e["score"]) for e in entities]
        if len(scores) == 1:
            score = scores[0]
        elif any(x != x for x in scores):
            score = float(np.nanmean(scores))
        else:
            score = sum(scores) / len(scores)  # np.nanmean's value, without its per-call cost
        return {
            "entity_group": entities[0]["entity"].split("-", 1)[-1],
            "score": score,
            "word": self._tokens_to_string([e["word"] for e in entities]),
            "start": entities[0]["start"],
            "end": entities[-1]["end"],
        }

    @staticmethod
    def _tag(name: str) -> tuple[str, str]:
        if name.startswith("B-"):
            return "B", name[2:]
        if name.startswith("I-"):
            return "I", name[2:]
        return "I", name

    def _group_entities(self, entities: list[dict]) -> list[dict]:
        groups: list[dict] = []
        current: list[dict] = []
        for entity in entities:
            if not current:
                current.append(entity)
                continue
            bi, tag = self._tag(entity["entity"])
            _, last_tag = self._tag(current[-1]["entity"])
            if tag == last_tag and bi != "B":
                current.append(entity)
            else:
                groups.append(self._group_sub_entities(current))
                current = [entity]
        if current:
            groups.append(self._group_sub_entities(current))
        return groups

    # --- formatters ---------------------------------------------------------------------------
    def _clean(self, entity: dict) -> dict:
        out = dict(entity)
        out["score"] = float(out["score"])
        return out

    def to_text(self, result: list[dict]) -> str:
        return "\t".join(f"{e['word']}/{e.get('entity_group', e.get('entity'))}" for e in result)

    def to_fields(self, result: list[dict] | None) -> dict[str, Any]:
        return {"entities": result, "provider": self.provider}

    def to_columns(self, result: list[dict] | None) -> list[str]:
        if not result:
            return [""]
        return [f"{e['word']}/{e.get('entity_group', e.get('entity'))}/{e['start']}-{e['end']}" for e in result]
