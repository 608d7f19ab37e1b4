"""Tiny random decoder-only checkpoints of the families beyond GPT-2 and Llama (tiny_models has those):
Qwen2, Mistral, Phi-3 and Gemma, each with what makes its family differ from Llama, so that an export
that ignored it would give other ids:

- Qwen2: non-zero q/k/v biases (and variants with linear and yarn rope scaling, and with a sliding window
  on its second layer); a config vocabulary padded past the tokenizer's (the logits have columns
  no token uses, as Qwen2.5's 151,936 vs 151,665); a ChatML chat template and two eos ids (<|im_end|>,
  <|endoftext|>) in the generation config.
- Mistral: a sliding window (4) shorter than every prompt, so attention outside the window matters.
- Phi-3: packed qkv_proj and gate_up_proj, and a sliding window (8) as Phi-3-mini-4k has (2047); variants
  with longrope scaling and with partial rotary embeddings.
- Gemma: embeddings scaled by sqrt(hidden), gelu (tanh), head_dim independent of hidden / heads, and
  RMSNorm weights offset by one.
- Qwen3, Gemma2, Gemma3 (text): q/k RMSNorm, soft-capping, sliding windows on some layers (_newer).

Like tiny_models._llama, the q and k projections are sharpened (x12), so the logits depend on the rotary
phases and on which positions attend to which: with the random init they barely do.
"""

from __future__ import annotations

from pathlib import Path

from tiny_models import _save, _torch_seed, train_bytelevel_bpe, train_sentencepiece

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SLIDING_WINDOW = 4
VOCAB_PADDING = 37  # Qwen2's config vocabulary is the tokenizer's plus this


def _spm_llama_tokenizer(out: Path, cls_name: str = "LlamaTokenizerFast"):
    import transformers

    spm_file = train_sentencepiece(
        out, "spm", vocab_size=400, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1
    )
    tokenizer = getattr(transformers, cls_name)(vocab_file=str(spm_file), legacy=False, from_slow=True)
    tokenizer.model_max_length = 256
    (out / "spm.model").unlink()
    (out / "spm.vocab").unlink()
    return tokenizer


def _sharpen(model, projections=("q_proj", "k_proj")) -> None:
    import torch

    with torch.no_grad():
        for layer in model.model.layers:
            for name in projections:
                getattr(layer.self_attn, name).weight.mul_(12)


def _qwen2(out: Path, rope: dict | None = None, window: int | None = None) -> Path:
    import torch
    import transformers

    _torch_seed()
    out.mkdir(parents=True, exist_ok=True)
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    vocab, merges = train_bytelevel_bpe(out, special=specials)
    tokenizer = transformers.Qwen2TokenizerFast(
        vocab_file=str(vocab),
        merges_file=str(merges),
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.model_max_length = 256
    tokenizer.chat_template = CHATML
    (out / "vocab.json").unlink()
    (out / "merges.txt").unlink()
    endoftext, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer) + VOCAB_PADDING,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=im_end,
        pad_token_id=endoftext,
        rope_scaling=rope,
        use_sliding_window=window is not None,
        # a window on the layers from max_window_layers on: layer 1 of 2
        **({"sliding_window": window, "max_window_layers": 1} if window else {}),
    )
    model = transformers.Qwen2ForCausalLM(config)
    _sharpen(model)
    with torch.no_grad():  # transformers initialises biases to zero: give them values that matter
        gen = torch.Generator().manual_seed(1)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.copy_(torch.randn(proj.bias.shape, generator=gen) * 0.5)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=None,
        eos_token_id=[im_end, endoftext],
        pad_token_id=endoftext,
    )
    return _save(model, tokenizer, out)


def _mistral(out: Path) -> Path:
    import transformers

    _torch_seed()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _spm_llama_tokenizer(out)
    config = transformers.MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=SLIDING_WINDOW,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = transformers.MistralForCausalLM(config)
    _sharpen(model)
    return _save(model, tokenizer, out)


def _phi3(out: Path, rope: dict | None = None, original_max: int = 256, partial: float = 1.0) -> Path:
    import torch
    import transformers

    _torch_seed()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _spm_llama_tokenizer(out)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    config = transformers.Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        original_max_position_embeddings=original_max,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
        rope_scaling=rope,
        sliding_window=8,  # Phi-3-mini-4k has a window too (2047): shorter than the prompts here
        partial_rotary_factor=partial,
    )
    model = transformers.Phi3ForCausalLM(config)
    with torch.no_grad():  # qkv_proj packs q | k | v rows: sharpen q and k
        for layer in model.model.layers:
            layer.self_attn.qkv_proj.weight[: 32 + 2 * 8].mul_(12)  # q (4 heads x 8 rows), k (2 heads x 8)
    return _save(model, tokenizer, out)


def _gemma(out: Path) -> Path:
    import transformers

    _torch_seed()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _spm_llama_tokenizer(out, "GemmaTokenizerFast")
    config = transformers.GemmaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        hidden_activation="gelu_pytorch_tanh",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,  # tied, the scaled embedding outweighs the layers: every row repeats its last id
    )
    model = transformers.GemmaForCausalLM(config)
    _sharpen(model)
    return _save(model, tokenizer, out)


def _newer(out: Path, kind: str, **extra) -> Path:
    """Qwen3 (q/k RMSNorm), Gemma2 (soft-capped logits, sliding window on every other layer) and Gemma3
    (q/k RMSNorm, local/global layers with their own rope bases), Gemma's with a window of 4."""
    import transformers

    _torch_seed()
    out.mkdir(parents=True, exist_ok=True)
    if kind == "qwen3":  # Qwen's byte-level BPE, as _qwen2
        vocab, merges = train_bytelevel_bpe(out, special=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
        tokenizer = transformers.Qwen2TokenizerFast(
            vocab_file=str(vocab),
            merges_file=str(merges),
            unk_token=None,
            bos_token=None,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
        )
        tokenizer.model_max_length = 256
    else:
        tokenizer = _spm_llama_tokenizer(out, "GemmaTokenizerFast")
    eos, pad = (tokenizer.eos_token_id, tokenizer.pad_token_id)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )
    if kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    else:
        gemma = dict(sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=8, **common, **extra)
        model = (
            transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**gemma))
            if kind == "gemma2"
            else transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**gemma))
        )
    _sharpen(model)
    return _save(model, tokenizer, out)


LINEAR_ROPE = {"rope_type": "linear", "factor": 2.0}
# Qwen2.5's long-context scaling: static frequencies and an attention factor (0.1 ln 4 + 1), traced as constants
YARN_ROPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
# Phi-3 128k's scaling: short factors up to original_max_position_embeddings, long ones past it (head_dim 8: 4 each)
LONGROPE = {"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [4.0] * 4}

BUILDERS = {
    "qwen2": _qwen2,
    "qwen2-linear": lambda out: _qwen2(out, rope=LINEAR_ROPE),
    "qwen2-yarn": lambda out: _qwen2(out, rope=YARN_ROPE),
    "mistral": _mistral,
    "phi3": _phi3,
    "phi3-longrope": lambda out: _phi3(out, rope=LONGROPE, original_max=16),
    # Phi-4-mini's partial rotary (0.75 there): rotary on half of each head's 8 dimensions
    "phi3-partial": lambda out: _phi3(out, partial=0.5),
    "qwen2-window": lambda out: _qwen2(out, window=SLIDING_WINDOW),
    "gemma": _gemma,
    "qwen3": lambda out: _newer(out, "qwen3"),
    "gemma2": lambda out: _newer(out, "gemma2"),
    # one local layer and one global (Gemma 3's default pattern, five local in six, leaves two layers local)
    "gemma3": lambda out: _newer(out, "gemma3", layer_types=["sliding_attention", "full_attention"]),
    # Gemma 2 without attention soft-capping (the fused graph refuses it), its output logits still capped
    "gemma2-nocap": lambda out: _newer(out, "gemma2", attn_logit_softcapping=None),
}


def build(arch: str, out: Path) -> Path:
    return BUILDERS[arch](Path(out))
