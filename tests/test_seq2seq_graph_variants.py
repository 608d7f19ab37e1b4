"""Config variants of the fused encoder-decoder graph's families (export.seq2seq_graph) that hub
checkpoints have, each against transformers' `generate`: the graph must give exactly its ids, or
`--graph auto` must fall back to optimum's graph.

Each variant changes many things at once (one export per family keeps the module fast): untied and
unshared embeddings, embeddings scaled or not, other activations, encoder and decoder of different
depths, widths and head counts, a small max_position_embeddings that the longest input and the output
both reach, and generation settings as bart-large-cnn's. tiny_seq2seq.sharpen redraws only the weight
matrices; here the LayerNorm weights, the biases and final_logits_bias are random too, so a graph that
read one of them from the wrong place would not pass with their initial ones and zeros.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import tiny_models
import tiny_seq2seq

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MAX_POSITIONS = 24
SHAPE = dict(encoder_attention_heads=8, decoder_attention_heads=2, encoder_layers=1, decoder_layers=3)
# name -> (tiny family, config overrides, generation_config overrides, eos row scale for sharpen)
VARIANTS = {
    "bart": (
        "bart",
        dict(
            SHAPE,
            scale_embedding=True,
            activation_function="gelu_new",
            tie_word_embeddings=False,
            encoder_ffn_dim=20,
            decoder_ffn_dim=50,
            max_position_embeddings=MAX_POSITIONS,
        ),
        dict(no_repeat_ngram_size=3, length_penalty=2.0, early_stopping=True, min_length=3, num_beams=4),
        -3.0,
    ),
    "marian": (
        "marian",
        dict(
            SHAPE,
            tie_word_embeddings=False,
            share_encoder_decoder_embeddings=False,
            scale_embedding=False,
            activation_function="relu",
            max_position_embeddings=MAX_POSITIONS,
        ),
        {},
        2.0,
    ),
    "mbart": ("mbart", dict(SHAPE, scale_embedding=True, decoder_layerdrop=0.3, encoder_layerdrop=0.2), {}, -3.0),
    "nllb": ("nllb", dict(SHAPE, scale_embedding=False, max_position_embeddings=MAX_POSITIONS), {}, 16.0),
    "pegasus": ("pegasus", dict(SHAPE, scale_embedding=False, max_position_embeddings=MAX_POSITIONS), {}, 5.0),
    # relu, tied (the output reads the state x d**-0.5); 4 buckets within max_distance 6, so the longer
    # sources and outputs reach the clipped far bucket of both directions
    # (encoder and decoder depths stay equal: transformers 4.57 sizes T5's generate cache by num_layers)
    "t5": ("t5", dict(relative_attention_num_buckets=8, relative_attention_max_distance=6), {}, 2.0),
    # t5 v1.1-small's shape: heads x d_kv (2 x 8 = 16) narrower than d_model (32); gated silu
    "t5-narrow": (
        "t5",
        dict(
            d_kv=8,
            num_heads=2,
            dense_act_fn="silu",
            is_gated_act=True,
            relative_attention_num_buckets=16,
            relative_attention_max_distance=9,
        ),
        {},
        2.0,
    ),
    # flan-t5 / mt5: gated gelu_new, untied output layer, head size 16 (d_kv) x 2 heads
    "flan-t5": (
        "t5",
        dict(
            dense_act_fn="gelu_new",
            is_gated_act=True,
            tie_word_embeddings=False,
            d_kv=16,
            num_heads=2,
            num_layers=3,
            num_decoder_layers=3,
            relative_attention_num_buckets=16,
            relative_attention_max_distance=10,
        ),
        dict(no_repeat_ngram_size=2, num_beams=4),
        2.0,
    ),
}
TARGET = {"mbart": "de_DE", "nllb": "deu_Latn"}
# A 1-token source (eos only), a short one, and one longer than MAX_POSITIONS (truncated to it).
TEXTS = ["", "yes", tiny_models.CORPUS[3], " ".join(tiny_models.CORPUS[:6])]


@pytest.fixture(scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _variant(base: Path, out: Path, family: str, config_kw: dict, generation_kw: dict, eos_scale: float) -> Path:
    """A sharpened copy of BASE with CONFIG_KW and GENERATION_KW, and random 1-D parameters and logits bias."""
    shutil.copytree(base, out / "raw")
    config = transformers.AutoConfig.from_pretrained(base)
    for key, value in config_kw.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = transformers.AutoModelForSeq2SeqLM.from_config(config)
    model.generation_config = transformers.GenerationConfig.from_pretrained(base)
    for key, value in generation_kw.items():
        setattr(model.generation_config, key, value)
    model.save_pretrained(out / "raw", safe_serialization=True)
    ckpt = tiny_seq2seq.sharpen(out / "raw", out / "ckpt", 1.0, keep_positions=family == "pegasus")
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(ckpt)
    torch.manual_seed(2)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
        if getattr(model, "final_logits_bias", None) is not None:
            model.final_logits_bias.normal_(0.0, 0.3)
        model.get_output_embeddings().weight[model.generation_config.eos_token_id] *= eos_scale
    model.save_pretrained(ckpt, safe_serialization=True)
    return ckpt


@pytest.fixture(scope="module")
def variant(tmp_path_factory, checkpoint):
    """variant(name) -> (checkpoint, export with --graph auto), built once per module."""
    from onnxpipe.export import export_model

    root = tmp_path_factory.mktemp("s2s-variants")
    made: dict[str, tuple[Path, Path]] = {}

    def make(name: str) -> tuple[Path, Path]:
        if name not in made:
            family, config_kw, generation_kw, eos_scale = VARIANTS[name]
            if family in tiny_seq2seq.BUILDERS:
                base = tiny_seq2seq.build(family, root / f"{name}-base")
            else:
                base = checkpoint(family)
            ckpt = _variant(base, root / name, family, config_kw, generation_kw, eos_scale)
            export_model(ckpt, root / name / "export")
            made[name] = (ckpt, root / name / "export")
        return made[name]

    return make


def _task(export: Path, name: str, **kw):
    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.seq2seq import Seq2SeqTask

    if name in TARGET:
        kw["target_lang"] = TARGET[name]
    return Seq2SeqTask(load_model(export, device="cpu"), **kw)


def _ours(task, texts: list[str]) -> list[list[int]]:
    """Every hypothesis of every n-best list, in order."""
    sources = [task.tokenizer.encode(task.source_text(t)).ids for t in texts]
    hyps = task.runner.generate(sources, task.generation_config, task.pad_id, task.max_new_tokens)
    return [h.token_ids for nbest in hyps for h in nbest]


def _reference(ckpt: Path, task, texts: list[str], **generate_kw) -> list[list[int]]:
    """transformers' ids for the same (truncated) sources, without the decoder start and what follows eos."""
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(ckpt).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    sources = [task.source_text(t) for t in texts]
    batch = tokenizer(sources, return_tensors="pt", padding=True, truncation=True, max_length=task.max_length)
    if task.generation_config.forced_bos_token_id is not None:
        generate_kw.setdefault("forced_bos_token_id", task.generation_config.forced_bos_token_id)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=task.max_new_tokens, **generate_kw)
    eos = set(task.generation_config.eos_token_id)
    result = []
    for row in out.tolist():
        ids = row[1:]
        end = next((i for i, t in enumerate(ids) if t in eos), None)
        result.append(ids[: end + 1] if end is not None else ids)
    return result


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("num_beams", [1, 4])
def test_variant_ids_match_transformers(variant, name, num_beams, one_torch_thread):
    """Greedy and beam 4 at batch 4 (a 1-token source beside one at the position limit) and batch 1."""
    ckpt, export = variant(name)
    manifest = json.loads((export / "onnxpipe.json").read_text())
    assert manifest["graph"]["builder"] == "onnxpipe-fused-seq2seq"
    task = _task(export, name, num_beams=num_beams, max_new_tokens=30)
    if "max_position_embeddings" in VARIANTS[name][1]:  # the output runs into the position table's end
        assert task.max_new_tokens == MAX_POSITIONS - 1 and task.max_length <= MAX_POSITIONS
    got = _ours(task, TEXTS)
    assert got == _reference(ckpt, task, TEXTS, num_beams=num_beams)
    assert len({len(ids) for ids in got}) > 1  # rows that end early beside rows that run on
    for text in TEXTS[2:]:
        assert _ours(task, [text]) == _reference(ckpt, task, [text], num_beams=num_beams)


def test_num_return_sequences(variant, one_torch_thread):
    ckpt, export = variant("bart")
    task = _task(export, "bart", num_beams=4, num_return_sequences=3, max_new_tokens=30)
    got = _ours(task, TEXTS[1:])
    assert len(got) == 9
    assert got == _reference(ckpt, task, TEXTS[1:], num_beams=4, num_return_sequences=3)


def test_max_new_tokens_one(variant, one_torch_thread):
    ckpt, export = variant("marian")
    for num_beams in (1, 4):
        task = _task(export, "marian", num_beams=num_beams, max_new_tokens=1)
        got = _ours(task, TEXTS)
        assert got == _reference(ckpt, task, TEXTS, num_beams=num_beams)
        assert all(len(ids) == 1 for ids in got)


@pytest.mark.parametrize("heads", [4, 8])  # d_model 32: head sizes 8 and 4
def test_decoder_head_size_not_a_multiple_of_8_keeps_optimums_graph(heads):
    """ONNX Runtime's CPU GroupQueryAttention (the decoder's self-attention) refuses head sizes that are not
    a multiple of 8 when it runs: the fused graph is refused up front, so --graph auto takes optimum's."""
    from onnxpipe.export import seq2seq_graph

    config = transformers.BartConfig(d_model=32, decoder_attention_heads=heads, encoder_attention_heads=8)
    reason = seq2seq_graph.unsupported_reason(config)
    if heads == 4:
        assert reason is None
    else:
        assert reason == "decoder head size 4 (GroupQueryAttention needs a multiple of 8)"


def test_decoder_head_size_refusal_under_graph_fused(checkpoint, tmp_path):
    from onnxpipe.errors import UsageError
    from onnxpipe.export import export_model

    base = checkpoint("bart")
    ckpt = shutil.copytree(base, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["decoder_attention_heads"] = 8
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="--graph fused is not available here: decoder head size 4"):
        export_model(ckpt, tmp_path / "export", graph="fused")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize(
    "model_type",
    ["blenderbot", "blenderbot-small", "plbart", "fsmt", "led", "bigbird_pegasus", "pegasus_x", "prophetnet", "mvp"],
)
def test_other_bart_like_families_keep_optimums_graph(model_type):
    """BART-like families the graph was not checked against: optimum's graph (or optimum's one-line refusal)."""
    from onnxpipe.export import seq2seq_graph

    config = SimpleNamespace(model_type=model_type, activation_function="gelu", d_model=32, decoder_attention_heads=4)
    assert seq2seq_graph.unsupported_reason(config).startswith(f"model type {model_type} ")
