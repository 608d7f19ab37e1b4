"""Token classification (named entities): per-token scores -> entity spans over the original line.

This is transformers' TokenClassificationPipeline postprocessing, step for step (its
`gather_pre_entities`, `aggregate`, `aggregate_words`, `group_entities`), so that spans, labels and
scores are the pipeline's for the same model and input: softmax per token, special tokens
dropped, sub-words found by the tokenizer's continuing-subword prefix (or, for tokenizers without
one such as byte-level BPE, the pipeline's space heuristic), "O" left out. Offsets are character
offsets into the line as read (after UTF-8 decoding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from onnxpipe.registry import FAMILIES
from onnxpipe.stream.records import Item
from onnxpipe.tasks.encoder import EncoderTask, softmax

AGGREGATIONS = ("none", "simple", "first", "average", "max")
IGNORE_LABELS = ("O",)


class TagTask(EncoderTask):
    task_names = FAMILIES["tag"].export_tasks  # the registry's

    def __init__(self, model: Any, aggregation: str = "simple"):
        super().__init__(model)
        self.aggregation = aggregation
        self.labels = model.labels
        unk = model.special_tokens.get("unk_token_id")
        self.unk_id = unk if isinstance(unk, int) else None
        self.word_aware = bool(getattr(self.tokenizer.model, "continuing_subword_prefix", None))
        self.decoder = self.tokenizer.decoder

    def postprocess(
        self, outputs: dict[str, np.ndarray], batch: Sequence[Item], lengths: list[int]
    ) -> list[list[dict]]:
        logits = outputs.get("logits", next(iter(outputs.values()))).astype(np.float32)
        all_scores = softmax(logits)  # per token, so padding does not change a row's values
        results = []
        for row, (item, n) in enumerate(zip(batch, lengths)):
            pre = self._pre_entities(item.record.text, item.data, all_scores[row, :n])
            entities = self._aggregate(pre)
            results.append([e for e in entities if e.get("entity", e.get("entity_group")) not in IGNORE_LABELS])
        return results

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

    def run(self, batch: Sequence[Item]) -> list[Any]:
        return [[self._clean(e) for e in entities] for entities in super().run(batch)]

    def to_text(self, result: list[dict]) -> str:
        return "\t".join(f"{e['word']}/{e.get('entity_group', e.get('entity'))}" for e in result)

    def to_fields(self, result: list[dict] | None) -> dict[str, Any]:
        return {"entities": result, "provider": self.provider}

    def to_columns(self, result: list[dict] | None) -> list[str]:
        if not result:
            return [""]
        return [f"{e['word']}/{e.get('entity_group', e.get('entity'))}/{e['start']}-{e['end']}" for e in result]
