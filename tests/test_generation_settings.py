"""Generation settings of generation_config.json beyond the everyday ones, against transformers' generate:
encoder_no_repeat_ngram_size (blenderbot ships 3), begin_suppress_tokens, renormalize_logits, and the
settings onnxpipe refuses rather than silently decode differently."""

from __future__ import annotations

import json

import pytest
import tiny_models
import tiny_seq2seq
from test_seq2seq import _task, _torch_model

pytest.importorskip("torch")
pytest.importorskip("transformers")

MAX_NEW = 20
COPIED = [3, 7, 10]  # lines of CORPUS whose source (line + its own output) the tiny BART copies from


@pytest.fixture(scope="module")
def bart(tmp_path_factory, checkpoint):
    """(checkpoint, export, sources): sources are each line's ids followed by what the model makes of
    the line, so that the sharpened random BART repeats n-grams of its input (it rarely does otherwise)."""
    ckpt, export = tiny_seq2seq.sharpened_export("bart", tmp_path_factory.mktemp("gen-settings"), checkpoint)
    task = _task(export, "bart")
    lines = [task.tokenizer.encode(task.source_text(tiny_models.CORPUS[i])).ids for i in COPIED]
    outs = _generate(task, lines, max_new_tokens=MAX_NEW)
    return ckpt, export, [s[:-1] + o[1:-1] + s[-1:] for s, o in zip(lines, outs)]


@pytest.fixture(scope="module")
def bart_optimum(bart, tmp_path_factory):
    """optimum's graph of the same checkpoint (Seq2SeqRunner; blenderbot, which ships the setting, gets it)."""
    from onnxpipe.export import export_model

    ckpt, _, sources = bart
    export = tmp_path_factory.mktemp("gen-settings-optimum") / "export"
    export_model(ckpt, export, graph="optimum")
    return ckpt, export, sources


def _generate(task, sources: list[list[int]], **settings) -> list[list[int]]:
    config = task.generation_config.update(**settings)
    return [n[0].token_ids for n in task.runner.generate(sources, config, task.pad_id, MAX_NEW)]


def _reference(ckpt, task, sources: list[list[int]], **settings) -> list[list[int]]:
    """transformers' ids for SOURCES (one right-padded batch), without the decoder start and pads after eos."""
    import torch

    width = max(len(s) for s in sources)
    ids = torch.tensor([s + [task.pad_id] * (width - len(s)) for s in sources])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sources])
    with torch.no_grad():
        out = _torch_model(ckpt).generate(input_ids=ids, attention_mask=mask, do_sample=False, **settings)
    eos = set(task.generation_config.eos_token_id)
    result = []
    for row in out.tolist():
        row = row[1:]
        end = next((i for i, t in enumerate(row) if t in eos), None)
        result.append(row[: end + 1] if end is not None else row)
    return result


def _copies(source: list[int], out: list[int], n: int) -> bool:
    """OUT repeats an n-gram of SOURCE (its last id left out: BART's eos, forced at the length limit)."""
    out = out[:-1]
    grams = {tuple(source[i : i + n]) for i in range(len(source) - n + 1)}
    return any(tuple(out[i : i + n]) in grams for i in range(len(out) - n + 1))


# (3, beam 4) is left out: beam 4's hypotheses for these sources hold no trigram of them.
@pytest.mark.parametrize(
    ("graph", "ngram", "num_beams"),
    [("fused", 2, 1), ("fused", 2, 4), ("fused", 3, 1), ("optimum", 2, 4), ("optimum", 3, 1)],
)
def test_encoder_no_repeat_ngram_size(request, graph, ngram, num_beams):
    ckpt, export, sources = request.getfixturevalue("bart" if graph == "fused" else "bart_optimum")
    task = _task(export, "bart")
    settings = dict(num_beams=num_beams, max_new_tokens=MAX_NEW)
    without = _generate(task, sources, **settings)
    got = _generate(task, sources, encoder_no_repeat_ngram_size=ngram, **settings)
    assert got != without  # else the test proves nothing
    assert any(_copies(s, o, ngram) for s, o in zip(sources, without))
    assert not any(_copies(s, o, ngram) for s, o in zip(sources, got))
    assert got == _reference(ckpt, task, sources, encoder_no_repeat_ngram_size=ngram, **settings)  # batch 3
    for source in sources[1:2]:  # batch 1
        alone = _generate(task, [source], encoder_no_repeat_ngram_size=ngram, **settings)
        assert alone == _reference(ckpt, task, [source], encoder_no_repeat_ngram_size=ngram, **settings)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_begin_suppress_tokens_and_renormalize(bart, num_beams):
    """BART forces bos first, so begin_suppress_tokens acts on the second id (transformers' begin_index)."""
    ckpt, export, sources = bart
    task = _task(export, "bart")
    settings = dict(num_beams=num_beams, max_new_tokens=MAX_NEW)
    without = _generate(task, sources, **settings)
    second = sorted({o[1] for o in without})
    kw = dict(begin_suppress_tokens=second, renormalize_logits=True, **settings)
    got = _generate(task, sources, **kw)
    assert not {o[1] for o in got} & set(second)
    assert got == _reference(ckpt, task, sources, **kw)


@pytest.mark.parametrize(
    "setting",
    [
        {"num_beam_groups": 2, "diversity_penalty": 0.5},
        {"sequence_bias": [[[5], 2.0]]},
        {"exponential_decay_length_penalty": [5, 1.5]},
        {"encoder_repetition_penalty": 1.3},
        {"do_sample": True, "typical_p": 0.9},
    ],
)
def test_unapplied_settings_are_refused(bart, tmp_path, setting):
    """A generation_config.json with a setting onnxpipe does not apply fails in one line (usage, exit 2)."""
    import shutil

    from click.testing import CliRunner

    from onnxpipe.main import cli

    _, export, _ = bart
    folder = tmp_path / "export"
    shutil.copytree(export, folder)
    path = folder / "generation_config.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**data, **setting}))
    result = CliRunner().invoke(cli, ["translate", "--model", str(folder)], input="A line.\n")
    key = next(k for k in setting if k != "do_sample" and k != "diversity_penalty")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "generation_config.json" in lines[0], lines
    assert result.stdout == ""


def test_defaults_that_leave_ids_alone_are_accepted():
    from onnxpipe.decoding import GenerationConfig

    neutral = {
        "num_beam_groups": 1,
        "diversity_penalty": 0.0,
        "typical_p": 1.0,
        "epsilon_cutoff": 0.0,
        "eta_cutoff": 0.0,
        "guidance_scale": 1.0,
        "encoder_repetition_penalty": 1.0,
        "sequence_bias": None,
        "low_memory": True,
        "remove_invalid_values": True,
    }
    GenerationConfig.from_dict(neutral).validate()
    GenerationConfig.from_dict({"typical_p": 0.9, "min_p": 0.1}).validate()  # warpers, and greedy runs none
    with pytest.raises(ValueError, match="typical_p"):
        GenerationConfig.from_dict({"typical_p": 0.9, "do_sample": True}).validate()


@pytest.mark.parametrize("ngram", [1, 2, 3])
def test_encoder_no_repeat_processor_matches_transformers(ngram):
    """Processor level, on ids with many repeats: explicit encoder ids per input (rows = inputs x beams, some
    inputs finished), and a decoder-only model's prompt standing in for them, as transformers does."""
    import numpy as np
    import torch
    from transformers.generation.logits_process import EncoderNoRepeatNGramLogitsProcessor

    from onnxpipe.decoding.processors import EncoderNoRepeatNGram, History

    rng = np.random.default_rng(ngram)
    vocab, beams = 7, 2
    sources = [rng.integers(0, vocab, 12).tolist() for _ in range(3)]
    decoded = rng.integers(0, vocab, (3 * beams, 5))
    scores = rng.standard_normal((3 * beams, vocab)).astype(np.float32)
    theirs = EncoderNoRepeatNGramLogitsProcessor(ngram, torch.tensor(sources))(
        torch.tensor(decoded), torch.tensor(scores)
    ).numpy()
    ours = EncoderNoRepeatNGram(ngram, sources)
    live = np.array([0, 2])  # input 1 finished: its rows are gone, the others keep their input's source
    rows = np.repeat(live, beams) * beams + np.tile(np.arange(beams), len(live))
    history = History(decoded[rows], np.zeros(len(rows), np.int64), 1, np.repeat(live, beams))
    got = ours(history, scores[rows].copy())
    np.testing.assert_array_equal(got, theirs[rows])
    assert np.isinf(theirs).any()

    prompt = np.array(sources[0])  # decoder-only: the prompt is the encoder input, and the row's start
    row = np.concatenate([prompt, decoded[0]])[None, :]
    expected = EncoderNoRepeatNGramLogitsProcessor(ngram, torch.tensor(prompt[None, :]))(
        torch.tensor(row), torch.tensor(scores[:1])
    ).numpy()
    got = EncoderNoRepeatNGram(ngram)(History(row, np.zeros(1, np.int64), len(prompt)), scores[:1].copy())
    np.testing.assert_array_equal(got, expected)
