"""onnxpipe's own encoder-decoder graphs (export.seq2seq_graph, runtime.seq2seq.FusedSeq2SeqRunner).

`--graph auto` picks them for Marian, BART, mBART, M2M100/NLLB, Pegasus and T5 on the CPU; what they
cannot express (UMT5, LongT5, a head size GroupQueryAttention refuses) keeps optimum's merged decoder. The oracle is transformers' `generate` on the sharpened tiny checkpoints of
tests/tiny_seq2seq.py: ids identical for greedy and beam 4, a padded batch of 8 (rows that end early and
rows that run to the limit) and batch 1, with each family's forced BOS/EOS (mBART/NLLB: the target
language), banned words, no_repeat_ngram_size and min/max length. test_seq2seq.py and
test_families_seq2seq.py run the same exports through the task and the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tiny_models
import tiny_seq2seq

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FAMILIES = ("marian", "bart", "mbart", "nllb", "pegasus", "t5")
TARGET = {"mbart": "de_DE", "nllb": "deu_Latn"}
BATCH = [tiny_models.CORPUS[i] for i in (0, 3, 5, 9, 10, 12, 14, 15)]  # 8 lines of 2 to 20 words


@pytest.fixture(scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fused(tmp_path_factory, checkpoint):
    """fused(arch) -> (checkpoint, export) of the sharpened tiny model, exported with --graph auto (cached)."""
    root = tmp_path_factory.mktemp("s2s-graph")
    return lambda arch: tiny_seq2seq.sharpened_export(arch, root, checkpoint)


def _task(export: Path, arch: str, **kw):
    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.seq2seq import Seq2SeqTask

    if arch in TARGET:
        kw.setdefault("target_lang", TARGET[arch])
    return Seq2SeqTask(load_model(export, device="cpu"), **kw)


_MODELS: dict = {}


def _reference(ckpt: Path, task, texts: list[str], **generate_kw) -> list[list[int]]:
    """transformers' ids (one padded batch), without the decoder start and what follows eos."""
    if ckpt not in _MODELS:
        _MODELS[ckpt] = transformers.AutoModelForSeq2SeqLM.from_pretrained(ckpt).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    batch = tokenizer([task.source_text(t) for t in texts], return_tensors="pt", padding=True)
    if task.generation_config.forced_bos_token_id is not None:
        generate_kw.setdefault("forced_bos_token_id", task.generation_config.forced_bos_token_id)
    with torch.no_grad():
        out = _MODELS[ckpt].generate(**batch, **generate_kw)
    eos = set(task.generation_config.eos_token_id)
    result = []
    for row in out.tolist():
        ids = row[1:]
        end = next((i for i, t in enumerate(ids) if t in eos), None)
        result.append(ids[: end + 1] if end is not None else ids)
    return result


def _ours(task, texts: list[str]) -> list[list[int]]:
    sources = [task.tokenizer.encode(task.source_text(t)).ids for t in texts]
    hyps = task.runner.generate(sources, task.generation_config, task.pad_id, task.max_new_tokens)
    return [nbest[0].token_ids for nbest in hyps]


@pytest.mark.parametrize("arch", FAMILIES)
def test_auto_picks_the_fused_graph(fused, arch):
    from onnxpipe.runtime.seq2seq import FusedSeq2SeqRunner

    _, export = fused(arch)
    manifest = json.loads((export / "onnxpipe.json").read_text())
    assert manifest["graph"]["builder"] == "onnxpipe-fused-seq2seq"
    assert manifest["device"] == "cpu"
    assert manifest["files"] == {"encoder": "encoder_model.onnx", "decoder": "decoder_model.onnx"}
    assert manifest["validation"]["passed"] and manifest["validation"]["greedy"]["agreement"] == 1.0
    assert sorted(p.name for p in export.glob("*.onnx")) == ["decoder_model.onnx", "encoder_model.onnx"]
    # the tied token table is one file that both sessions read from one array
    assert manifest["graph"]["shared_initializer"]["file"] == "embed_tokens.bin"
    runner = _task(export, arch).runner
    assert isinstance(runner, FusedSeq2SeqRunner) and runner.shared is not None


@pytest.mark.parametrize("arch", ["marian", "t5"])
def test_a_second_task_on_one_model_reads_the_shared_table(fused, arch):
    """The token table both sessions read in place belongs to the model: a runner made after the first one
    is gone (a server's next request, the API's next task) once read freed memory and generated garbage."""
    import gc

    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.seq2seq import Seq2SeqTask

    _, export = fused(arch)
    model = load_model(export, device="cpu")
    first = Seq2SeqTask(model, max_new_tokens=12, num_beams=1)
    expected = _ours(first, BATCH)
    size = int(np.prod(model.manifest["graph"]["shared_initializer"]["shape"]))
    del first
    gc.collect()
    junk = [np.full(size, np.nan, np.float32) for _ in range(32)]  # what freed memory would be reused for
    assert _ours(Seq2SeqTask(model, max_new_tokens=12, num_beams=1), BATCH) == expected
    del junk


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("num_beams", [1, 4])
def test_ids_match_transformers(fused, arch, num_beams, one_torch_thread):
    """Greedy and beam 4 at batch 8 and 1, with banned words, no_repeat_ngram_size and min/max length."""
    ckpt, export = fused(arch)
    settings = dict(num_beams=num_beams, max_new_tokens=20, min_length=4, no_repeat_ngram_size=3)
    task = _task(export, arch, **settings)
    bad = sorted({_ours(task, [BATCH[2]])[0][1], _ours(task, [BATCH[5]])[0][2]})  # ids it would produce
    task = _task(export, arch, **settings, bad_words_ids=[[b] for b in bad])
    got = _ours(task, BATCH)
    assert got == _reference(ckpt, task, BATCH, do_sample=False, bad_words_ids=[[b] for b in bad], **settings)
    assert not any(b in row for row in got for b in bad)
    lengths = sorted(len(row) for row in got)
    assert lengths[0] < lengths[-1], lengths  # rows of different lengths in one batch
    if arch in TARGET:  # the target language is the forced first token
        assert {row[0] for row in got} == {task.generation_config.forced_bos_token_id}
    for text in (BATCH[1], BATCH[6]):
        assert _ours(task, [text]) == _reference(
            ckpt, task, [text], do_sample=False, bad_words_ids=[[b] for b in bad], **settings
        )


def test_beams_share_their_input_cross_attention(fused):
    """The cross-attention keys are per input, not per beam: after beams fan out and inputs finish, the
    bound arrays have one row per live input."""
    _, export = fused("marian")
    task = _task(export, "marian", num_beams=4, max_new_tokens=12)
    runner = task.runner
    sources = [task.tokenizer.encode(t).ids for t in BATCH]
    start = int(task.generation_config.decoder_start_token_id)
    logits, step = runner.start(*_padded(sources, task.pad_id), start, 32, 8, True)
    assert logits.shape[0] == 8
    cross = runner.cross_names[0]
    logits = step(np.full(32, 5, dtype=np.int64), np.repeat(np.arange(8), 4))  # beams fan out
    assert logits.shape[0] == 32 and runner.last_cross_rows == 8
    logits = step(np.full(4, 5, dtype=np.int64), np.arange(28, 32))  # only the last input is left
    assert logits.shape[0] == 4 and runner.last_cross_rows == 1
    assert cross.startswith("cross_key.")


def _padded(sources: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(s) for s in sources)
    ids = np.full((len(sources), width), pad, dtype=np.int64)
    mask = np.zeros_like(ids)
    for r, s in enumerate(sources):
        ids[r, : len(s)], mask[r, : len(s)] = s, 1
    return ids, mask


def test_step_logits_follow_their_parents(fused):
    """A beam that moves to another row carries its self-attention rows: the logits after following
    parents equal those of a fresh run of the same prefixes, and log_probs are log_softmax(logits)."""
    _, export = fused("bart")
    task = _task(export, "bart")
    runner = task.runner
    start = int(task.generation_config.decoder_start_token_id)
    ids, mask = _padded([task.tokenizer.encode(t).ids for t in BATCH[:2]], task.pad_id)
    rng = np.random.default_rng(0)
    tokens = [rng.integers(5, 60, size=4) for _ in range(3)]
    parents = [np.array([0, 0, 1, 1]), np.array([1, 0, 3, 2]), np.array([1, 1, 2, 3])]
    _, step = runner.start(ids, mask, start, 4, 8, False)
    for tok, par in zip(tokens, parents):
        moved = step(tok, par).copy()
    # The prefix of each final row, replayed without any reordering (one row per beam from the start).
    rows = np.arange(4)
    prefixes = np.zeros((4, 3), dtype=np.int64)
    for t in range(2, -1, -1):
        prefixes[:, t] = tokens[t][rows]
        rows = parents[t][rows]
    inputs = rows  # each final row's input
    _, fresh_step = runner.start(ids[inputs], mask[inputs], start, 4, 8, True)
    for t in range(3):
        fresh = fresh_step(prefixes[:, t], None)
    expected = torch.log_softmax(torch.from_numpy(moved), dim=-1).numpy()
    np.testing.assert_allclose(fresh, expected, atol=1e-4)


def test_families_it_cannot_express_keep_optimums_graph(checkpoint):
    from types import SimpleNamespace

    from onnxpipe.export import seq2seq_graph

    config = json.loads((Path(checkpoint("t5")) / "config.json").read_text())
    assert seq2seq_graph.unsupported_reason(SimpleNamespace(**config)) is None
    for model_type, why in (("umt5", "a relative position bias in every layer"), ("longt5", "local and transient")):
        assert why in seq2seq_graph.unsupported_reason(SimpleNamespace(**{**config, "model_type": model_type}))
    reason = seq2seq_graph.unsupported_reason(SimpleNamespace(**{**config, "d_kv": 12}))
    assert reason == "decoder head size 12 (GroupQueryAttention needs a multiple of 8)"
    # buckets past the exact ones that keep moving with the distance: no finite table holds them
    odd = {**config, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 9}
    assert "max_distance 9 below the 16 exact buckets" in seq2seq_graph.unsupported_reason(SimpleNamespace(**odd))


def test_graph_flag(fused, checkpoint, tmp_path):
    import shutil

    from onnxpipe.errors import UsageError
    from onnxpipe.export import export_model

    # a T5 with 4 heads of 4: GroupQueryAttention would refuse it at run time, so the export refuses it
    small_heads = tmp_path / "t5-heads-of-4"
    shutil.copytree(checkpoint("t5"), small_heads)
    config = transformers.AutoConfig.from_pretrained(small_heads)
    config.d_kv = 4
    transformers.AutoModelForSeq2SeqLM.from_config(config).save_pretrained(small_heads, safe_serialization=True)
    with pytest.raises(UsageError, match="--graph fused is not available here: decoder head size 4"):
        export_model(small_heads, tmp_path / "t5", graph="fused")
    manifest = export_model(small_heads, tmp_path / "t5-auto")
    assert manifest["graph"]["builder"] == "optimum"
    ckpt, _ = fused("marian")
    manifest = export_model(ckpt, tmp_path / "optimum", graph="optimum")
    assert manifest["graph"]["builder"] == "optimum"
    assert manifest["files"]["decoder"] == "decoder_model_merged.onnx"


def test_log_probs_are_for_beam_search():
    from onnxpipe.decoding import GenerationConfig, generate

    with pytest.raises(ValueError, match="beam search"):
        generate(
            lambda t, p: np.zeros((1, 4), np.float32),
            np.zeros((1, 4), np.float32),
            [[0]],
            GenerationConfig(max_new_tokens=2),
            log_probs=True,
        )
