"""Tiny random encoders of the families users bring (XLM-RoBERTa, DeBERTa-v3, ELECTRA, ALBERT, MPNet,
ModernBERT), built like tiny_models: seeded random weights, tokenizers trained on tiny_models.CORPUS,
nothing downloaded.

The SentencePiece families keep their .model file in the checkpoint (as the hub's do), so a test can
load the slow tokenizer beside the fast one and compare their ids.
"""

from __future__ import annotations

from pathlib import Path

from tiny_models import CORPUS, _labels, _save, _torch_seed, train_bytelevel_bpe, train_sentencepiece

ENCODERS = ("xlm-roberta", "deberta-v2", "electra", "albert", "mpnet", "modernbert")
SENTENCEPIECE = ("xlm-roberta", "deberta-v2", "albert")
_HEADS = {
    "text-classification": "ForSequenceClassification",
    "token-classification": "ForTokenClassification",
    "fill-mask": "ForMaskedLM",
    "feature-extraction": "Model",
    "question-answering": "ForQuestionAnswering",
}
_PREFIX = {
    "xlm-roberta": "XLMRoberta",
    "deberta-v2": "DebertaV2",
    "electra": "Electra",
    "albert": "Albert",
    "mpnet": "MPNet",
    "modernbert": "ModernBert",
}
# initializer_range 0.2 (not 0.02): outputs that differ between inputs and labels that are not ties.
_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, initializer_range=0.2)


def _wordpiece(out: Path, specials: list[str], lowercase: bool = True, vocab_size: int = 300) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token=specials[1]))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    path = out / "vocab.txt"
    path.write_text("".join(f"{t}\n" for t, _ in vocab), encoding="utf-8")
    return path


def _tokenizer_and_config(arch: str, out: Path):
    import transformers

    if arch == "xlm-roberta":
        spm = train_sentencepiece(out, "spm", vocab_size=220)
        (out / "spm.vocab").unlink()
        tokenizer = transformers.XLMRobertaTokenizerFast(vocab_file=str(spm), from_slow=True)
        tokenizer.model_max_length = 126
        config = transformers.XLMRobertaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=130,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **_SIZES,
        )
    elif arch == "deberta-v2":
        # DeBERTa-v3's spm layout: [PAD] 0, [CLS] 1, [SEP] 2, [UNK] 3, [MASK] a user-defined piece.
        spm = train_sentencepiece(
            out,
            "spm",
            vocab_size=220,
            pad_id=0,
            bos_id=1,
            eos_id=2,
            unk_id=3,
            pad_piece="[PAD]",
            bos_piece="[CLS]",
            eos_piece="[SEP]",
            unk_piece="[UNK]",
            user_defined_symbols=["[MASK]"],
        )
        (out / "spm.vocab").unlink()
        tokenizer = transformers.DebertaV2TokenizerFast(vocab_file=str(spm), from_slow=True)
        tokenizer.model_max_length = 128
        # v3: relative positions only (position_buckets, shared keys, no absolute position embeddings).
        config = transformers.DebertaV2Config(
            vocab_size=len(tokenizer),
            max_position_embeddings=128,
            relative_attention=True,
            position_buckets=16,
            max_relative_positions=-1,
            pos_att_type=["p2c", "c2p"],
            position_biased_input=False,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            type_vocab_size=0,
            pad_token_id=0,
            **_SIZES,
        )
    elif arch == "electra":
        vocab = _wordpiece(out, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
        tokenizer = transformers.ElectraTokenizerFast(vocab_file=str(vocab))
        tokenizer.model_max_length = 128
        # embedding_size < hidden_size: ELECTRA-small's projection between the two.
        config = transformers.ElectraConfig(vocab_size=300, embedding_size=16, max_position_embeddings=128, **_SIZES)
    elif arch == "albert":
        spm = train_sentencepiece(
            out,
            "spiece",
            vocab_size=220,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            pad_piece="<pad>",
            unk_piece="<unk>",
            bos_piece="[CLS]",
            eos_piece="[SEP]",
            user_defined_symbols=["[MASK]"],
        )
        (out / "spiece.vocab").unlink()
        tokenizer = transformers.AlbertTokenizerFast(vocab_file=str(spm), from_slow=True)
        tokenizer.model_max_length = 128
        config = transformers.AlbertConfig(
            vocab_size=len(tokenizer), embedding_size=16, max_position_embeddings=128, num_hidden_groups=1, **_SIZES
        )
    elif arch == "mpnet":
        vocab = _wordpiece(out, ["<s>", "[UNK]", "<pad>", "</s>", "<mask>"])
        tokenizer = transformers.MPNetTokenizerFast(vocab_file=str(vocab))
        tokenizer.model_max_length = 126
        config = transformers.MPNetConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=130,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **_SIZES,
        )
    elif arch == "modernbert":
        tokenizer = _modernbert_tokenizer(out)
        config = transformers.ModernBertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=40,
            max_position_embeddings=128,
            local_attention=8,
            initializer_range=0.2,
            global_attn_every_n_layers=2,
            pad_token_id=tokenizer.pad_token_id,
            cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
        )
    else:
        raise ValueError(arch)
    return tokenizer, config


def _modernbert_tokenizer(out: Path):
    """ModernBERT ships a byte-level BPE with BERT's special tokens, as a PreTrainedTokenizerFast."""
    import transformers
    from tokenizers import Tokenizer, processors

    specials = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
    vocab, merges = train_bytelevel_bpe(out, special=specials)
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer(str(vocab), str(merges))
    tok.add_special_tokens(list(specials))
    backend = Tokenizer.from_str(tok._tokenizer.to_str())
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    vocab.unlink()
    merges.unlink()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        model_max_length=128,
        model_input_names=["input_ids", "attention_mask"],
    )


def build(arch: str, out: Path, task: str = "text-classification", num_labels: int = 3) -> Path:
    """Write a tiny random ARCH checkpoint with TASK's head into OUT and return OUT."""
    import transformers

    _torch_seed()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, config = _tokenizer_and_config(arch, out)
    if task in ("text-classification", "token-classification"):
        config.num_labels = num_labels
        config.update(_labels(task, num_labels))
    model = getattr(transformers, _PREFIX[arch] + _HEADS[task])(config)
    return _save(model, tokenizer, out)
