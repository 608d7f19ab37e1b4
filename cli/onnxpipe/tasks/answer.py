"""Extractive question answering: a question and a context in, answer spans of the context out.

This is transformers' QuestionAnsweringPipeline (fast tokenizer path), step for step, so answers,
character offsets and scores are the pipeline's for the same model and input: the pair encoding
truncated "only_second" (question first; "only_first" with the context first where the tokenizer pads
left) into windows of `max_seq_len` tokens overlapping by `doc_stride` (the tokenizer's own overflowing
windows), the p_mask that keeps question and special tokens (but CLS) out of answers, its
`select_starts_ends` / `decode_spans` softmax and span search in every window, spans widened to whole
words (`align_to_words`), answers with the same text (any case) summed across windows, and the null
answer's score (`handle_impossible_answer`) as the smallest CLS score over the windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from onnxpipe.errors import UsageError
from onnxpipe.registry import FAMILIES
from onnxpipe.stream.records import Item, Record
from onnxpipe.tasks.encoder import EncoderTask

DEFAULT_MAX_SEQ_LEN = 384  # the pipeline's cap on the model's limit
DEFAULT_DOC_STRIDE = 128
# Padded tokens per model run when one batch holds many windows (a long context is many rows).
WINDOW_TOKENS = 16384


class AnswerTask(EncoderTask):
    task_names = FAMILIES["answer"].export_tasks  # the registry's

    def __init__(
        self,
        model: Any,
        question: str | None = None,
        top_k: int = 1,
        doc_stride: int | None = None,
        max_answer_len: int = 15,
        max_seq_len: int | None = None,
        handle_impossible_answer: bool = False,
        align_to_words: bool = True,
    ):
        super().__init__(model)
        if top_k < 1:
            raise UsageError(f"top_k must be at least 1 (got {top_k})")
        if max_answer_len < 1:
            raise UsageError(f"max_answer_len must be at least 1 (got {max_answer_len})")
        if max_seq_len is None:
            max_seq_len = min(self.max_length, DEFAULT_MAX_SEQ_LEN)
        elif not 1 <= max_seq_len <= self.max_length:
            raise UsageError(f"max_seq_len {max_seq_len}: this model takes 1 to {self.max_length} tokens")
        if doc_stride is None:
            doc_stride = min(max_seq_len // 2, DEFAULT_DOC_STRIDE)
        if not 0 <= doc_stride <= max_seq_len:
            raise UsageError(f"doc_stride ({doc_stride}) must be between 0 and max_seq_len ({max_seq_len})")
        self.question = question  # asked of every record that has no question of its own (--question)
        self.top_k = top_k
        self.doc_stride = doc_stride
        self.max_answer_len = max_answer_len
        self.max_seq_len = max_seq_len
        self.handle_impossible_answer = handle_impossible_answer
        self.align_to_words = align_to_words
        padding_side = model.tokenizer_config.get("padding_side", "right")
        self.pad_left = padding_side == "left"
        self.question_first = not self.pad_left
        cls = model.special_tokens.get("cls_token_id")
        self.cls_id = cls if isinstance(cls, int) else None
        # Its own copies of the model's tokenizer: the windows' truncation is this task's (another task on the
        # same model, e.g. the API's with other options, keeps its own), and one that never cuts, to measure.
        self.tokenizer = type(self.tokenizer).from_str(self.tokenizer.to_str())
        self.tokenizer.no_padding()
        self._untruncated = type(self.tokenizer).from_str(self.tokenizer.to_str())
        self._untruncated.no_truncation()
        self._specials = self.tokenizer.num_special_tokens_to_add(True)
        self.tokenizer.enable_truncation(
            max_seq_len, stride=doc_stride, strategy="only_second" if self.question_first else "only_first"
        )

    # --- the Task protocol --------------------------------------------------------------------
    def encode(self, records: Sequence[Record]) -> list[Item]:
        return [self._encode_one(record) for record in records]

    def _encode_one(self, record: Record) -> Item:
        question, context = (record.pair if record.pair is not None else self.question), record.text
        if not question:
            return Item(record, 0, error="no question (an empty question cannot be answered)")
        pair = (question, context) if self.question_first else (context, question)
        room = self.max_seq_len - self._specials - len(self._untruncated.encode(question, add_special_tokens=False))
        if room <= self.doc_stride and len(self._untruncated.encode(*pair)) > self.max_seq_len:
            # tokenizers would panic (stride >= the context's share of a window) or refuse; transformers raises
            return Item(
                record,
                0,
                error=f"the question leaves {max(room, 0)} of {self.max_seq_len} tokens for the context, "
                f"not more than the stride ({self.doc_stride}): shorten the question or lower --stride",
            )
        encoding = self.tokenizer.encode(*pair)
        windows = [encoding, *encoding.overflowing]
        return Item(record, sum(len(w.ids) for w in windows), data=windows)

    def run(self, batch: Sequence[Item]) -> list[Any]:
        rows = [Item(item.record, len(w.ids), data=w) for item in batch for w in item.data]
        starts: list[np.ndarray] = []
        ends: list[np.ndarray] = []
        i = 0
        while i < len(rows):
            width, j = 0, i
            while j < len(rows) and (j == i or max(width, rows[j].cost) * (j - i + 1) <= WINDOW_TOKENS):
                width = max(width, rows[j].cost)
                j += 1
            feed, lengths = self.feed(rows[i:j])
            outputs = dict(zip(self.output_names, self.session.run(None, feed)))
            start_logits = outputs.get("start_logits", next(iter(outputs.values()))).astype(np.float32)
            end_logits = outputs["end_logits"].astype(np.float32)
            for row, n in enumerate(lengths):
                starts.append(start_logits[row, :n])
                ends.append(end_logits[row, :n])
            i = j
        results, at = [], 0
        for item in batch:
            count = len(item.data)
            results.append(self._answers(item.record.text, item.data, starts[at : at + count], ends[at : at + count]))
            at += count
        return results

    # --- transformers' QuestionAnsweringPipeline.postprocess, for one example -------------------
    def _answers(self, context: str, windows: list[Any], starts: list[np.ndarray], ends: list[np.ndarray]) -> list:
        min_null_score = 1000000.0  # large and positive
        answers: list[dict[str, Any]] = []
        by_text: dict[str, dict[str, Any]] = {}  # the pipeline's get_answer (first answer of the same text, any case)
        pre_topk = self.top_k * 2 + 10 if self.align_to_words else self.top_k
        sequence_index = 1 if self.question_first else 0
        for enc, start, end in zip(windows, starts, ends):
            p_mask = self._p_mask(enc)
            s_idx, e_idx, scores, min_null_score = select_starts_ends(
                start[None], end[None], p_mask, min_null_score, pre_topk, self.handle_impossible_answer,
                self.max_answer_len,
            )  # fmt: skip
            offset = sum(1 for t in enc.ids if t == self.pad_id) if self.pad_left else 0
            for s, e, score in zip(s_idx, e_idx, scores):
                start_index, end_index = self._indices(enc, int(s) - offset, int(e) - offset, sequence_index)
                target = context[start_index:end_index]
                same = by_text.get(target.lower())
                if same is not None:
                    same["score"] += score.item()
                else:
                    answer = {"score": score.item(), "start": start_index, "end": end_index, "answer": target}
                    answers.append(answer)
                    by_text[target.lower()] = answer
        if self.handle_impossible_answer:
            answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda a: a["score"], reverse=True)[: self.top_k]
        return [{"answer": a["answer"], "start": a["start"], "end": a["end"], "score": a["score"]} for a in answers]

    def _p_mask(self, enc: Any) -> np.ndarray:
        """1 where a token cannot be in the answer: the question and special tokens, except CLS."""
        if self.question_first:
            mask = np.array([s != 1 for s in enc.sequence_ids], dtype=np.int64)
        else:  # as the pipeline does: nothing masked when the context comes first
            mask = np.zeros(len(enc.ids), dtype=np.int64)
        if self.cls_id is not None:
            mask[np.asarray(enc.ids) == self.cls_id] = 0
        return mask

    def _indices(self, enc: Any, s: int, e: int, sequence_index: int) -> tuple[int, int]:
        if self.align_to_words:
            try:
                start_word = enc.token_to_word(s)
                end_word = enc.token_to_word(e)
                return (
                    enc.word_to_chars(start_word, sequence_index=sequence_index)[0],
                    enc.word_to_chars(end_word, sequence_index=sequence_index)[1],
                )
            except Exception:  # tokens without words (special tokens): keep to their offsets, as the pipeline
                pass
        return enc.offsets[s][0], enc.offsets[e][1]

    # --- formatters ---------------------------------------------------------------------------
    def to_text(self, result: list[dict]) -> str:
        return "\t".join(a["answer"] for a in result)

    def to_fields(self, result: list[dict] | None) -> dict[str, Any]:
        best = result[0] if result else {}
        fields: dict[str, Any] = {k: best.get(k) for k in ("answer", "start", "end", "score")}
        if self.top_k > 1:
            fields["answers"] = result
        fields["provider"] = self.provider
        return fields

    def to_columns(self, result: list[dict] | None) -> list[str]:
        if not result:
            return ["", "", "", ""]
        return [str(c) for a in result for c in (a["answer"], a["start"], a["end"], f"{a['score']:.6g}")]


def select_starts_ends(
    start: np.ndarray,
    end: np.ndarray,
    p_mask: np.ndarray,
    min_null_score: float,
    top_k: int,
    handle_impossible_answer: bool,
    max_answer_len: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """transformers' select_starts_ends for one unpadded window (its attention mask is all ones)."""
    # p_mask is (1, n) as the pipeline holds it: `nonzero()` below then also lists row 0, so decode_spans
    # keeps spans at token 0 (CLS) as the pipeline does.
    undesired_tokens = np.abs(p_mask[None] - 1)
    undesired_tokens_mask = undesired_tokens == 0.0
    # Non-context tokens cannot contribute to the softmax
    start = np.where(undesired_tokens_mask, -10000.0, start)
    end = np.where(undesired_tokens_mask, -10000.0, end)
    start = np.exp(start - start.max(axis=-1, keepdims=True))
    start = start / start.sum()
    end = np.exp(end - end.max(axis=-1, keepdims=True))
    end = end / end.sum()
    if handle_impossible_answer:
        min_null_score = min(min_null_score, (start[0, 0] * end[0, 0]).item())
    start[0, 0] = end[0, 0] = 0.0  # mask CLS
    starts, ends, scores = decode_spans(start, end, top_k, max_answer_len, undesired_tokens)
    return starts, ends, scores, min_null_score


def decode_spans(
    start: np.ndarray, end: np.ndarray, topk: int, max_answer_len: int, undesired_tokens: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """transformers' decode_spans: the TOPK best (start, end) pairs with start <= end < start + max_answer_len."""
    outer = np.matmul(np.expand_dims(start, -1), np.expand_dims(end, 1))
    candidates = np.tril(np.triu(outer), max_answer_len - 1)
    scores_flat = candidates.flatten()
    if topk == 1:
        idx_sort = np.array([np.argmax(scores_flat)])
    elif len(scores_flat) < topk:
        idx_sort = np.argsort(-scores_flat)
    else:
        idx = np.argpartition(-scores_flat, topk)[0:topk]
        idx_sort = idx[np.argsort(-scores_flat[idx])]
    starts, ends = np.unravel_index(idx_sort, candidates.shape)[1:]
    desired = np.isin(starts, undesired_tokens.nonzero()) & np.isin(ends, undesired_tokens.nonzero())
    starts, ends = starts[desired], ends[desired]
    return starts, ends, candidates[0, starts, ends]
