"""Generation settings: Hugging Face's `GenerationConfig` names and defaults, read from JSON, no torch.

Only the entries that change the output are kept. Defaults are transformers' (4.57): `top_k` is 50 when
sampling, `length_penalty` 1.0, `early_stopping` False. Lengths are counted in generated tokens
(`max_new_tokens`, `min_new_tokens`); `max_length`/`min_length` count the whole decoder sequence, as for
encoder-decoders, where the decoder starts from `decoder_start_token_id`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

EarlyStopping = bool | str  # True, False or "never", as in transformers

# At most this many beams (and so n-best outputs). transformers and CTranslate2 set no bound; serving
# front-ends bound it tightly (TGI's --max-best-of defaults to 2). Each step holds rows x beams x vocab
# float32 scores and a key/value cache per beam: 64 beams of a 256k vocabulary are 64 MB of scores per
# input row per step (1 GB for a batch of 16), and beam-search quality stops improving well before that.
MAX_NUM_BEAMS = 64
# When neither the command nor the model sets a length (transformers would stop at 20 tokens).
DEFAULT_MAX_NEW_TOKENS = 256

# transformers' GenerationConfig settings (4.57) that change the ids and that onnxpipe does not apply,
# with the value that leaves them off: a JSON that sets another value is refused by `validate`, not
# silently decoded differently. (`diversity_penalty` only acts with num_beam_groups > 1, `penalty_alpha`
# only with top_k > 1; `low_memory` and `remove_invalid_values` leave the ids as they are; torch's
# generate ignores `forced_decoder_ids`.)
UNSUPPORTED: dict[str, Any] = {
    "num_beam_groups": 1,
    "exponential_decay_length_penalty": None,
    "sequence_bias": None,
    "guidance_scale": 1.0,
    "constraints": None,
    "force_words_ids": None,
    "encoder_repetition_penalty": 1.0,
    "penalty_alpha": 0.0,
    "dola_layers": None,
    "token_healing": False,
    "watermarking_config": None,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
}
SAMPLING_ONLY = {"min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"}


@dataclass
class GenerationConfig:
    max_new_tokens: int | None = None
    max_length: int | None = None  # whole decoder sequence (seq2seq); ignored by causal generation
    min_new_tokens: int = 0
    min_length: int = 0  # whole sequence, as transformers' MinLengthLogitsProcessor counts it
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False
    num_return_sequences: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: list[list[int]] | None = None
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    encoder_no_repeat_ngram_size: int = 0  # encoder-decoders only: n-grams of the source are not copied
    renormalize_logits: bool = False
    forced_bos_token_id: int | None = None
    forced_eos_token_id: list[int] | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    # Settings of the JSON that onnxpipe does not apply, with values that would change the ids:
    # `validate` refuses them rather than decode differently from transformers.
    unsupported: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        """Keep the known keys of a `generation_config.json` (unknown ones are ignored, None means default).

        Keys that transformers applies and onnxpipe does not are kept aside in `unsupported` when their
        value changes the ids (see `UNSUPPORTED`), for `validate` to refuse.
        """
        names = {f.name for f in fields(cls)} - {"unsupported"}
        kw: dict[str, Any] = {k: v for k, v in data.items() if k in names and v is not None}
        kw["unsupported"] = {
            k: v for k, v in data.items() if k in UNSUPPORTED and v not in (None, [], {}, UNSUPPORTED[k])
        }
        for key in ("eos_token_id", "forced_eos_token_id"):
            if isinstance(kw.get(key), int):
                kw[key] = [kw[key]]
        if isinstance(kw.get("decoder_start_token_id"), list):  # multi-codebook models; not ours
            kw.pop("decoder_start_token_id")
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str | Path) -> GenerationConfig:
        path = Path(path)
        if not path.is_file():
            return cls()
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def update(self, **overrides: Any) -> GenerationConfig:
        """A copy with the given settings replaced; None leaves a setting as it is (unset CLI flags)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def validate(self) -> None:
        """Raise ValueError with a one-line reason for settings that cannot work."""
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if not 1 <= self.num_beams <= MAX_NUM_BEAMS:
            raise ValueError(f"num_beams ({self.num_beams}) must be between 1 and {MAX_NUM_BEAMS}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise ValueError(
                f"num_return_sequences ({self.num_return_sequences}) must be between 1 and num_beams ({self.num_beams})"
            )
        if self.do_sample and not self.temperature > 0:
            raise ValueError("temperature must be > 0 (use greedy decoding for temperature 0)")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 disables it)")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError("top_p must be between 0 and 1")
        if not self.repetition_penalty > 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.no_repeat_ngram_size < 0 or self.min_new_tokens < 0 or self.min_length < 0:
            raise ValueError("no_repeat_ngram_size, min_new_tokens and min_length must be >= 0")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError("early_stopping must be true, false or 'never'")
        if self.encoder_no_repeat_ngram_size < 0:
            raise ValueError("encoder_no_repeat_ngram_size must be >= 0")
        for key, value in self.unsupported.items():
            if key in SAMPLING_ONLY and not self.do_sample:
                continue  # a warper: greedy and beam search never run it
            if key == "num_beam_groups" and int(value) <= 1:
                continue
            if key in ("epsilon_cutoff", "eta_cutoff") and not 0.0 < float(value) < 1.0:
                continue
            if key == "typical_p" and float(value) >= 1.0:
                continue
            raise ValueError(
                f"{key}={json.dumps(value)[:40]} (generation setting) is not supported by onnxpipe; "
                "remove it from generation_config.json or use transformers"
            )
