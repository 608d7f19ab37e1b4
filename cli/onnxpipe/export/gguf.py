"""A `.gguf` file -> an ordinary local Hugging Face checkpoint folder that the export can read.

transformers can load GGUF files (dequantizing to fp32), but its tokenizer conversion gets several
things wrong that matter for generation (transformers 4.57, `integrations/ggml.py`):

- `GGUFLlamaConverter` reads the eos token with the *bos* id and then swaps the two, so both
  `bos_token` and `eos_token` become `tokens[bos_token_id]` (SmolLM2: both `<|im_start|>`).
- `tokenizer.ggml.add_bos_token` / `add_eos_token` are not read at all, and `LlamaTokenizerFast`
  defaults to `add_bos_token=True`: a BOS is prepended that the model never saw (SmolLM2's GGUF
  says `add_bos_token = False`).
- `tokenizer.ggml.padding_token_id` does not reach the tokenizer (pad stays None).
- `tokenizer.ggml.pre` is ignored: every byte-level BPE gets the GPT-2 split, while llama.cpp
  (and the original tokenizer.json) split digits one by one for `smollm`, `starcoder`, ...

We let transformers build the vocabulary and merges, then set the special tokens, the
post-processor and the pre-tokenizer from the GGUF's own metadata, and make config.json and
generation_config.json agree with the tokenizer.

The folder's weights are the dequantized float32 values; for Llama-family models export.fused finds
the GGUF blocks in them again, exactly, and keeps those 4-bit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxpipe.errors import SourceError

GGUF_MAGIC = b"GGUF"

# llama.cpp pre-tokenizer types whose regex starts with "\p{N}" (each digit its own piece)
# before the GPT-2 pattern: llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_{STARCODER,REFACT,...}.
_DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})
# Pre types that are the plain GPT-2 pattern, which transformers already builds.
_GPT2_PRE = frozenset({"gpt2", "gpt-2", "default", "mpt", "olmo", "jais", "trillion"})


@dataclass
class GGUFTokenizerInfo:
    """The tokenizer facts a GGUF file states about itself (`tokenizer.ggml.*`, `tokenizer.chat_template`)."""

    model: str | None
    pre: str | None
    tokens: list[str]
    token_type: list[int]
    bos_token_id: int | None
    eos_token_id: int | None
    eot_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool | None
    add_eos_token: bool | None
    chat_template: str | None
    architecture: str
    context_length: int | None
    extra: dict[str, Any] = field(default_factory=dict)

    def token(self, token_id: int | None) -> str | None:
        if token_id is None or not 0 <= token_id < len(self.tokens):
            return None
        return self.tokens[token_id]

    @property
    def special_tokens(self) -> set[str]:
        # 3 = CONTROL, 4 = USER_DEFINED (gguf.TokenType)
        return {t for t, kind in zip(self.tokens, self.token_type) if kind in (3, 4)}


def gguf_to_checkpoint(gguf_path: Path, workdir: Path) -> Path:
    """Convert GGUF_PATH into a Hugging Face folder inside WORKDIR and return the folder.

    The folder holds fp32 safetensors weights, config.json, generation_config.json and a fast
    tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja where there is one).
    """
    gguf_path = Path(gguf_path)
    info = read_gguf_tokenizer_info(gguf_path)
    _check_supported(gguf_path, info)

    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoModelForSeq2SeqLM, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    out = Path(workdir) / (gguf_path.stem + "-hf")
    out.mkdir(parents=True, exist_ok=True)
    try:
        params = load_gguf_checkpoint(str(gguf_path), return_tensors=False)
        tokenizer = _fixed_tokenizer(params, info)
        # The config as AutoConfig would build it, without reading the file again (each read is seconds).
        config = CONFIG_MAPPING[params["config"]["model_type"]].from_dict(params["config"])
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, config=config, dtype=torch.float32)
    except SourceError:
        raise
    except Exception as exc:  # transformers raises anything from KeyError to RuntimeError here
        raise SourceError(f"{gguf_path}: cannot load this GGUF with transformers: {_one_line(exc)}") from exc

    eos_ids = _eos_ids(info, tokenizer)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": None if not eos_ids else eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        "pad_token_id": tokenizer.pad_token_id,
    }
    for key, value in ids.items():
        setattr(model.config, key, value)
    generation_config = GenerationConfig.from_model_config(model.config)
    for key, value in ids.items():
        setattr(generation_config, key, value)
    model.generation_config = generation_config

    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# --- reading the GGUF ---------------------------------------------------------------------


def read_gguf_tokenizer_info(gguf_path: Path) -> GGUFTokenizerInfo:
    """Read the metadata of GGUF_PATH, or raise SourceError naming the file."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise SourceError(f"{gguf_path}: no such GGUF file")
    with gguf_path.open("rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise SourceError(f"{gguf_path}: not a GGUF file (no GGUF magic at the start)")

    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_path)
    except Exception as exc:  # numpy slicing past the end raises ValueError/IndexError/...
        raise SourceError(f"{gguf_path}: corrupt or truncated GGUF: {_one_line(exc)}") from exc
    size = gguf_path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise SourceError(f"{gguf_path}: truncated GGUF: tensor {tensor.name} runs past the end of the file")

    def get(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as exc:
            raise SourceError(f"{gguf_path}: corrupt GGUF metadata field {key}: {_one_line(exc)}") from exc

    arch = get("general.architecture")
    if not isinstance(arch, str):
        raise SourceError(f"{gguf_path}: GGUF has no general.architecture")
    tokens = get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise SourceError(f"{gguf_path}: GGUF has no tokenizer (tokenizer.ggml.tokens is missing)")
    token_type = get("tokenizer.ggml.token_type") or [1] * len(tokens)
    return GGUFTokenizerInfo(
        model=get("tokenizer.ggml.model"),
        pre=get("tokenizer.ggml.pre"),
        tokens=list(tokens),
        token_type=[int(t) for t in token_type],
        bos_token_id=get("tokenizer.ggml.bos_token_id"),
        eos_token_id=get("tokenizer.ggml.eos_token_id"),
        eot_token_id=get("tokenizer.ggml.eot_token_id"),
        unk_token_id=get("tokenizer.ggml.unknown_token_id"),
        pad_token_id=get("tokenizer.ggml.padding_token_id"),
        add_bos_token=get("tokenizer.ggml.add_bos_token"),
        add_eos_token=get("tokenizer.ggml.add_eos_token"),
        chat_template=get("tokenizer.chat_template"),
        architecture=arch,
        context_length=get(f"{arch}.context_length"),
    )


def _check_supported(gguf_path: Path, info: GGUFTokenizerInfo) -> None:
    from transformers.integrations.ggml import GGUF_TO_FAST_CONVERTERS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # transformers renames a few llama.cpp architectures before it picks a tokenizer converter.
    renamed = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "t5encoder": "t5", "gemma3": "gemma3_text"}
    names = set(GGUF_SUPPORTED_ARCHITECTURES) | set(renamed)
    supported = sorted(a for a in names if renamed.get(a, a) in GGUF_TO_FAST_CONVERTERS)
    if info.architecture not in supported:
        raise SourceError(
            f"{gguf_path}: GGUF architecture {info.architecture!r} cannot be loaded by transformers",
            hint="supported: " + ", ".join(supported),
        )


# --- the tokenizer ------------------------------------------------------------------------


def _fixed_tokenizer(params: dict[str, Any], info: GGUFTokenizerInfo):
    """transformers' vocabulary and merges, with the special tokens and flags the GGUF states."""
    from tokenizers import decoders, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.ggml import convert_gguf_tokenizer

    # What AutoTokenizer.from_pretrained(gguf_file=...) does, minus its special-token kwargs.
    backend, _ = convert_gguf_tokenizer(params["config"]["model_type"], params["tokenizer"])

    bos = info.token(info.bos_token_id)
    eos = info.token(info.eos_token_id) or _end_of_turn_token(info)
    unk = info.token(info.unk_token_id)
    pad = info.token(info.pad_token_id)
    add_bos = info.add_bos_token
    if add_bos is None:
        # llama.cpp's defaults when the flag is absent: SentencePiece vocabularies add BOS,
        # byte-level BPE ones do not (Llama 3's "llama-bpe" being the exception).
        add_bos = info.model == "llama" or info.pre in ("llama3", "llama-bpe")
    add_bos = bool(add_bos and bos is not None)
    add_eos = bool(info.add_eos_token and eos is not None)

    byte_level = info.model == "gpt2"
    if byte_level:
        # A byte-level BPE decodes bytes and nothing else; the converter's SentencePiece steps
        # (and its Strip when add_space_prefix is absent) would eat a leading space.
        backend.decoder = decoders.ByteLevel()
        if info.pre in _DIGIT_SPLIT_PRE:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
                ]
            )

    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    specials = [(t, backend.token_to_id(t)) for t in {bos if add_bos else None, eos if add_eos else None} if t]
    template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    if byte_level:
        backend.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
    else:
        backend.post_processor = template

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad if pad is not None else eos,
        chat_template=info.chat_template,
        model_max_length=int(info.context_length or params["config"].get("max_position_embeddings") or 1 << 30),
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def _end_of_turn_token(info: GGUFTokenizerInfo) -> str | None:
    """The special token that the chat template writes right after a message's content.

    That is the token a chat model emits to end its turn (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`).
    """
    if not info.chat_template:
        return None
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    probe = "\x00onnxpipe-probe\x00"
    try:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        text = env.from_string(info.chat_template).render(
            messages=[{"role": "user", "content": probe}, {"role": "assistant", "content": probe}],
            add_generation_prompt=False,
            bos_token="",
            eos_token="",
        )
    except Exception:
        return None
    after = text.rsplit(probe, 1)[-1] if probe in text else ""
    for tok in sorted(info.special_tokens, key=len, reverse=True):
        if after.lstrip(" ").startswith(tok):
            return tok
    return None


def _eos_ids(info: GGUFTokenizerInfo, tokenizer) -> list[int]:
    """The ids generation must stop at: the eos, then the end-of-turn (eot) token where it differs."""
    ids: list[int] = []
    candidates = [tokenizer.eos_token, info.token(info.eot_token_id), _end_of_turn_token(info)]
    for tok in candidates:
        if tok is None:
            continue
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is not None and tid not in ids:
            ids.append(tid)
    return ids


def _one_line(exc: BaseException) -> str:
    text = re.sub(r"\s+", " ", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
