"""Tiny random Hugging Face checkpoints, built locally with tokenizers trained on a few sentences.

Nothing here downloads anything. Each builder writes a complete, loadable checkpoint folder
(config, weights as safetensors, tokenizer files) and returns its path. The weights are random
but seeded, so the PyTorch model is a deterministic oracle for the ONNX export.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A good movie with a great cast and a moving story.",
    "This film was boring, too long and badly acted.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Pipelines of small tools make the shell a pleasant place to work.",
    "I loved every minute of it!",
    "The worst thing I have seen this year.",
    "Machine translation turns English sentences into German ones.",
    "Summaries should be short, accurate and easy to read.",
    "Numbers like 42, 3.14 and 2026 appear in text too.",
    "Émile a visité Zürich et São Paulo en été.",
    "Tokenizers split words into pieces: un-break-able, re-think-ing.",
    'She said: "hello, world" and left the room.',
    "Onnx runtime sessions run the exported graphs on the CPU or the GPU.",
    "Short.",
    "Another line, with commas, semicolons; and dashes - everywhere.",
] * 4

SEED = 0


def _torch_seed() -> None:
    import torch

    torch.manual_seed(SEED)


def _save(model, tokenizer, out: Path) -> Path:
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


# --- tokenizers -------------------------------------------------------------------------


def train_wordpiece_vocab(out: Path, vocab_size: int = 300) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    )
    tok.train_from_iterator(CORPUS, trainer)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    path = out / "vocab.txt"
    path.write_text("".join(f"{t}\n" for t, _ in vocab), encoding="utf-8")
    return path


def train_bytelevel_bpe(out: Path, vocab_size: int = 400, special=("<s>", "<pad>", "</s>", "<unk>", "<mask>")):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(CORPUS, vocab_size=vocab_size, min_frequency=1, special_tokens=list(special))
    tok.save_model(str(out))
    return out / "vocab.json", out / "merges.txt"


def train_sentencepiece(out: Path, name: str, vocab_size: int = 200, model_type: str = "unigram", **kw) -> Path:
    import sentencepiece as spm

    prefix = out / name
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        hard_vocab_limit=False,
        character_coverage=1.0,
        minloglevel=2,
        **kw,
    )
    return prefix.with_suffix(".model")


# --- encoders ---------------------------------------------------------------------------


def _labels(task: str, n: int) -> dict:
    names = {
        "text-classification": ["negative", "positive", "neutral"],
        "token-classification": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"],
    }
    labels = names.get(task, [f"LABEL_{i}" for i in range(n)])[:n]
    return {"id2label": dict(enumerate(labels)), "label2id": {l: i for i, l in enumerate(labels)}}


_ENCODER_HEADS = {
    "text-classification": "ForSequenceClassification",
    "token-classification": "ForTokenClassification",
    "fill-mask": "ForMaskedLM",
    "question-answering": "ForQuestionAnswering",
    "feature-extraction": "Model",
}


def _encoder(arch: str, task: str, out: Path, num_labels: int, problem_type: str | None):
    import transformers

    _torch_seed()
    out.mkdir(parents=True, exist_ok=True)
    common = dict(hidden_size=32, num_attention_heads=4, intermediate_size=37, max_position_embeddings=128)
    if arch in ("bert", "distilbert"):
        vocab = train_wordpiece_vocab(out)
        if arch == "bert":
            config = transformers.BertConfig(vocab_size=300, num_hidden_layers=2, type_vocab_size=2, **common)
            tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
        else:
            config = transformers.DistilBertConfig(
                vocab_size=300, n_layers=2, dim=32, n_heads=4, hidden_dim=37, max_position_embeddings=128
            )
            tokenizer = transformers.DistilBertTokenizerFast(vocab_file=str(vocab))
        tokenizer.model_max_length = 128
    elif arch == "roberta":
        vocab, merges = train_bytelevel_bpe(out)
        tokenizer = transformers.RobertaTokenizerFast(vocab_file=str(vocab), merges_file=str(merges))
        tokenizer.model_max_length = 126
        config = transformers.RobertaConfig(
            vocab_size=len(tokenizer),
            num_hidden_layers=2,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **{**common, "max_position_embeddings": 130},
        )
    else:
        raise ValueError(arch)
    if task in ("text-classification", "token-classification"):
        config.num_labels = num_labels
        config.update(_labels(task, num_labels))
        if problem_type:
            config.problem_type = problem_type
    prefix = {"bert": "Bert", "distilbert": "DistilBert", "roberta": "Roberta"}[arch]
    cls = getattr(transformers, prefix + _ENCODER_HEADS[task])
    model = cls(config)
    return _save(model, tokenizer, out)


# --- decoders ---------------------------------------------------------------------------


def _gpt2(out: Path):
    import transformers

    _torch_seed()
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = train_bytelevel_bpe(out, special=("<|endoftext|>",))
    tokenizer = transformers.GPT2TokenizerFast(vocab_file=str(vocab), merges_file=str(merges))
    tokenizer.model_max_length = 256
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = transformers.GPT2LMHeadModel(config)
    return _save(model, tokenizer, out)


def gguf_blocks(model) -> None:
    """Give MODEL's weight matrices the values of GGUF blocks, as a converted .gguf holds: each matrix is
    quantized and dequantized by gguf-py, layer 0 as Q4_1, later layers as Q4_0, the output layer and the
    input embedding Q8_0."""
    import torch
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    def to_blocks(linear, kind) -> None:
        w = linear.weight.detach().numpy()
        linear.weight.data = torch.from_numpy(quants.dequantize(quants.quantize(w, kind), kind).reshape(w.shape))

    for i, layer in enumerate(model.model.layers):
        kind = T.Q4_1 if i == 0 else T.Q4_0
        for linear in (
            layer.self_attn.q_proj,
            layer.self_attn.k_proj,
            layer.self_attn.v_proj,
            layer.self_attn.o_proj,
            layer.mlp.gate_proj,
            layer.mlp.up_proj,
            layer.mlp.down_proj,
        ):
            to_blocks(linear, kind)
    to_blocks(model.lm_head, T.Q8_0)
    to_blocks(model.model.embed_tokens, T.Q8_0)


ROPE_SCALING = {
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


def _llama(out: Path, blocks: bool = False, rope: str | None = None):
    import torch
    import transformers

    _torch_seed()
    out.mkdir(parents=True, exist_ok=True)
    spm_file = train_sentencepiece(
        out, "spm", vocab_size=400, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1
    )
    tokenizer = transformers.LlamaTokenizerFast(vocab_file=str(spm_file), legacy=False, from_slow=True)
    tokenizer.model_max_length = 256
    (out / "spm.model").unlink()
    (out / "spm.vocab").unlink()
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        rope_scaling=ROPE_SCALING[rope] if rope else None,
    )
    model = transformers.LlamaForCausalLM(config)
    # Sharpen the attention, so that the logits depend on the rotary phases: with the random init they
    # barely do, and tables that ignore rope scaling still passed validation (4.5e-4 < 1e-3).
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12)
            layer.self_attn.k_proj.weight.mul_(12)
    if blocks:
        gguf_blocks(model)
    return _save(model, tokenizer, out)


# --- encoder-decoders -------------------------------------------------------------------


def _t5(out: Path):
    import transformers

    _torch_seed()
    out.mkdir(parents=True, exist_ok=True)
    spm_file = train_sentencepiece(out, "spiece", vocab_size=250, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    tokenizer = transformers.T5TokenizerFast(vocab_file=str(spm_file), extra_ids=10, from_slow=True)
    tokenizer.model_max_length = 128
    (out / "spiece.vocab").unlink()
    config = transformers.T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        task_specific_params={
            "translation_en_to_de": {"prefix": "translate English to German: ", "max_length": 40, "num_beams": 2}
        },
    )
    model = transformers.T5ForConditionalGeneration(config)
    return _save(model, tokenizer, out)


def _bart(out: Path):
    import transformers

    _torch_seed()
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = train_bytelevel_bpe(out)
    tokenizer = transformers.BartTokenizerFast(vocab_file=str(vocab), merges_file=str(merges))
    tokenizer.model_max_length = 128
    config = transformers.BartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
        forced_bos_token_id=tokenizer.bos_token_id,
    )
    model = transformers.BartForConditionalGeneration(config)
    return _save(model, tokenizer, out)


def _marian(out: Path):
    """A Marian checkpoint as Helsinki-NLP ships it: slow-only, source.spm + target.spm + vocab.json."""
    import sentencepiece as spm
    import transformers

    _torch_seed()
    out.mkdir(parents=True, exist_ok=True)
    src = train_sentencepiece(out, "src", vocab_size=150, unk_id=1, eos_id=0, bos_id=-1, pad_id=-1)
    tgt = train_sentencepiece(out, "tgt", vocab_size=180, unk_id=1, eos_id=0, bos_id=-1, pad_id=-1)
    src.rename(out / "source.spm")
    tgt.rename(out / "target.spm")
    for f in ("src.vocab", "tgt.vocab"):
        (out / f).unlink()
    vocab: dict[str, int] = {"</s>": 0, "<unk>": 1}
    for f in ("source.spm", "target.spm"):
        sp = spm.SentencePieceProcessor(model_file=str(out / f))
        for i in range(sp.get_piece_size()):
            vocab.setdefault(sp.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
    tokenizer = transformers.MarianTokenizer(
        source_spm=str(out / "source.spm"),
        target_spm=str(out / "target.spm"),
        vocab=str(out / "vocab.json"),
        source_lang="en",
        target_lang="de",
        model_max_length=128,
    )
    pad = vocab["<pad>"]
    config = transformers.MarianConfig(
        vocab_size=len(vocab),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_position_embeddings=128,
        pad_token_id=pad,
        eos_token_id=0,
        decoder_start_token_id=pad,
        forced_eos_token_id=0,
        bad_words_ids=[[pad]],
        num_beams=4,
        max_length=64,
    )
    model = transformers.MarianMTModel(config)
    model.generation_config = transformers.GenerationConfig.from_model_config(config)
    return _save(model, tokenizer, out)


ENCODERS = ("bert", "distilbert", "roberta")
DECODERS = ("gpt2", "llama")
SEQ2SEQ = ("t5", "bart", "marian")
ARCHITECTURES = ENCODERS + DECODERS + SEQ2SEQ


def build(
    arch: str,
    out: Path,
    task: str | None = None,
    num_labels: int = 3,
    problem_type: str | None = None,
    blocks: bool = False,
    rope: str | None = None,
) -> Path:
    """Write a tiny random checkpoint of ARCH for TASK into OUT and return OUT. Llama only: BLOCKS gives it
    the weights of GGUF blocks (see gguf_blocks), ROPE a rope_scaling type (ROPE_SCALING)."""
    out = Path(out)
    if blocks or rope:
        return _llama(out, blocks=blocks, rope=rope)
    if arch in ENCODERS:
        return _encoder(arch, task or "text-classification", out, num_labels, problem_type)
    builders = {"gpt2": _gpt2, "llama": _llama, "t5": _t5, "bart": _bart, "marian": _marian}
    return builders[arch](out)
