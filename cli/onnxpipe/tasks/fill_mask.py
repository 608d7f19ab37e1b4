"""Fill-mask: the top-k tokens for each mask token in a line, as transformers' FillMaskPipeline gives them.

Per mask: softmax over the vocabulary, the k best ids, `token_str` = the id decoded alone,
`sequence` = the line's ids with the candidate in place (padding dropped) decoded, special
tokens skipped when there is one mask only, then the tokenizer's `clean_up_tokenization_spaces`
when its tokenizer_config.json asks for it. A line without a mask token is a record error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from onnxpipe.errors import ModelNotFoundError
from onnxpipe.registry import FAMILIES
from onnxpipe.stream.records import Item, Record
from onnxpipe.tasks.encoder import EncoderTask, softmax

DEFAULT_TOP_K = 5


class FillMaskTask(EncoderTask):
    task_names = FAMILIES["fill-mask"].export_tasks  # the registry's

    def __init__(self, model: Any, top_k: int = DEFAULT_TOP_K, truncation: str = "truncate"):
        super().__init__(model, truncation)
        self.top_k = top_k
        mask = model.special_tokens.get("mask_token_id")
        if not isinstance(mask, int):
            mask = next(
                (
                    self.tokenizer.token_to_id(t)
                    for t in ("[MASK]", "<mask>")
                    if self.tokenizer.token_to_id(t) is not None
                ),
                None,
            )
        if mask is None:
            raise ModelNotFoundError(f"{model.name} has no mask token", hint="is it a fill-mask export?")
        self.mask_id = int(mask)
        self.mask_token = self.tokenizer.id_to_token(self.mask_id)
        cleanup = (model.manifest.get("tokenizer") or {}).get("clean_up_tokenization_spaces")
        if cleanup is None:
            cleanup = model.tokenizer_config.get("clean_up_tokenization_spaces", False)
        self.cleanup = bool(cleanup)

    def make_item(self, record: Record, encoding: Any) -> Item:
        item = super().make_item(record, encoding)
        if item.error is None and self.mask_id not in encoding.ids:
            cut = f" within the first {self.max_length} tokens" if item.truncated else ""
            item.error = f"no mask token {self.mask_token}{cut}"
        return item

    def postprocess(self, outputs: dict[str, np.ndarray], batch: Sequence[Item], lengths: list[int]) -> list[Any]:
        logits = outputs.get("logits", next(iter(outputs.values())))
        results = []
        for row, item in enumerate(batch):
            ids = np.asarray(item.data.ids, dtype=np.int64)
            positions = np.flatnonzero(ids == self.mask_id)
            probs = softmax(logits[row, positions].astype(np.float32))
            single = len(positions) == 1
            masks = []
            for position, p in zip(positions, probs):
                k = min(self.top_k, p.shape[-1])
                best = np.argpartition(-p, k - 1)[:k]
                best = best[np.argsort(-p[best], kind="stable")]
                candidates = []
                for token in best.tolist():
                    filled = ids.copy()
                    filled[position] = token
                    filled = filled[filled != self.pad_id]
                    candidates.append(
                        {
                            "score": float(p[token]),
                            "token": int(token),
                            "token_str": self._decode([token], False),
                            "sequence": self._decode(filled.tolist(), single),
                        }
                    )
                masks.append(candidates)
            results.append(masks[0] if single else masks)
        return results

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.cleanup:  # transformers' clean_up_tokenization
            text = (
                text.replace(" .", ".")
                .replace(" ?", "?")
                .replace(" !", "!")
                .replace(" ,", ",")
                .replace(" ' ", "'")
                .replace(" n't", "n't")
                .replace(" 'm", "'m")
                .replace(" 's", "'s")
                .replace(" 've", "'ve")
                .replace(" 're", "'re")
            )
        return text

    # --- formatters ---------------------------------------------------------------------------
    @staticmethod
    def _groups(result: list) -> list[list[dict]]:
        return result if result and isinstance(result[0], list) else [result]

    def to_text(self, result: list) -> str:
        return "\t|\t".join("\t".join(c["token_str"].strip() for c in group) for group in self._groups(result))

    def to_fields(self, result: list | None) -> dict[str, Any]:
        return {"candidates": result, "provider": self.provider}

    def to_columns(self, result: list | None) -> list[str]:
        if not result:
            return [""]
        return self.to_text(result).split("\t")
