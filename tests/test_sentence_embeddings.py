"""sentence-transformers models embed as sentence-transformers does: modules.json, Pooling modes, Dense,
Normalize and max_seq_length are read at export, and `embed` applies them by default.

Each model is built here from sentence-transformers' own modules (Transformer over a tiny random
checkpoint + Pooling [+ Dense] [+ Normalize]) and saved with its own save(), like BGE (CLS +
normalize), E5 (mean + normalize), GTE (mean), all-mpnet (MPNet, mean + normalize, a short
max_seq_length) and a model with Dense layers. The oracle is SentenceTransformer.encode.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tiny_families
from click.testing import CliRunner

from onnxpipe.main import cli

TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "Short.",
    "Émile a visité Zürich et São Paulo en été.",
    ("Paris is the capital of France, and Berlin is the capital of Germany. " * 4).strip(),
    "The quick brown fox jumps over the lazy dog.",
]
# name -> (base checkpoint, Pooling keywords, Dense layers (out_features, activation), normalize, max_seq_length)
MODELS = {
    "bge": ("bert", {"pooling_mode": "cls"}, [], True, None),
    "e5": ("xlm-roberta", {"pooling_mode": "mean"}, [], True, None),
    "gte": ("bert", {"pooling_mode": "mean"}, [], False, None),
    "all-mpnet": ("mpnet", {"pooling_mode": "mean"}, [], True, 12),
    "dense": ("bert", {"pooling_mode": "mean"}, [(24, "tanh"), (16, "identity")], True, None),
    "lasttoken": ("roberta", {"pooling_mode": "lasttoken"}, [], False, None),
    "concat": (
        "bert",
        {
            "pooling_mode_cls_token": True,
            "pooling_mode_max_tokens": True,
            "pooling_mode_mean_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": True,
            "pooling_mode_weightedmean_tokens": True,
        },
        [(20, "relu")],
        False,
        None,
    ),
}


def invoke(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


@pytest.fixture(scope="session")
def st_model(tmp_path_factory, checkpoint):
    """st_model(name) -> a sentence-transformers folder saved by its own save() (cached)."""
    cache: dict = {}

    def make(name: str):
        if name not in cache:
            import torch
            from sentence_transformers import SentenceTransformer, models

            base, pooling, dense, normalize, max_seq_length = MODELS[name]
            if base in tiny_families.ENCODERS:
                folder = tiny_families.build(base, tmp_path_factory.mktemp("st-base") / base, "feature-extraction")
            else:
                folder = checkpoint(base, "feature-extraction")
            torch.manual_seed(1)
            transformer = models.Transformer(str(folder), max_seq_length=max_seq_length)
            modules = [transformer, models.Pooling(transformer.get_word_embedding_dimension(), **pooling)]
            width = modules[-1].get_sentence_embedding_dimension()
            activations = {"tanh": torch.nn.Tanh(), "identity": torch.nn.Identity(), "relu": torch.nn.ReLU()}
            for out_features, activation in dense:
                modules.append(models.Dense(width, out_features, activation_function=activations[activation]))
                width = out_features
            if normalize:
                modules.append(models.Normalize())
            out = tmp_path_factory.mktemp("st") / name
            SentenceTransformer(modules=modules, device="cpu").save(str(out))
            if max_seq_length:  # as all-mpnet-base-v2 ships: tokenizer 512, sentence-transformers 384
                config = json.loads((out / "tokenizer_config.json").read_text())
                (out / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 126}))
            cache[name] = out
        return cache[name]

    return make


@pytest.fixture(scope="session")
def st_export(tmp_path_factory, st_model):
    cache: dict = {}

    def make(name: str):
        if name not in cache:
            from onnxpipe.export import export_model

            out = tmp_path_factory.mktemp("st-exports") / name
            export_model(st_model(name), out)
            cache[name] = out
        return cache[name]

    return make


def encode(folder, texts):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_numpy=True, batch_size=4)


def embed(folder, texts, *args):
    result = invoke("embed", "-m", str(folder), "--format", "jsonl", *args, input="\n".join(texts) + "\n")
    assert result.exit_code == 0, result.stderr
    return np.array([json.loads(line)["embedding"] for line in result.stdout.splitlines()], dtype=np.float32)


def assert_same_vectors(got, want):
    assert got.shape == want.shape
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.min() >= 1 - 1e-5, cosine
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("name", list(MODELS))
def test_embed_matches_sentence_transformers_encode(name, st_model, st_export):
    want = encode(st_model(name), TEXTS)
    got = embed(st_export(name), TEXTS)
    assert_same_vectors(got, want)
    _, _, dense, normalize, _ = MODELS[name]
    if normalize:
        assert np.linalg.norm(got, axis=1) == pytest.approx(1.0, abs=1e-5)
    if dense:
        assert got.shape[1] == dense[-1][0]


def test_the_manifest_records_what_sentence_transformers_declares(st_export):
    from onnxpipe.manifest import read_manifest

    bge, dense, mpnet, concat = (read_manifest(st_export(n)) for n in ("bge", "dense", "all-mpnet", "concat"))
    assert (bge["pooling"], bge["normalize"], bge.get("dense")) == ("cls", True, None)
    assert dense["pooling"] == "mean" and [d["activation"] for d in dense["dense"]] == ["tanh", "identity"]
    assert [d["shape"] for d in dense["dense"]] == [[24, 32], [16, 24]]
    assert mpnet["max_seq_length"] == 12
    assert concat["pooling"] == "cls+max+mean_sqrt_len+weightedmean"


def test_max_seq_length_truncates_and_is_reported(st_export):
    result = invoke("embed", "-m", str(st_export("all-mpnet")), "--format", "jsonl", input="\n".join(TEXTS) + "\n")
    assert result.exit_code == 0
    assert re.search(r"truncat", result.stderr)  # the long lines were cut at 12 tokens, and counted


def test_flags_override_the_declared_pooling(st_export, st_model):
    import torch
    from sentence_transformers import SentenceTransformer

    folder = st_export("bge")
    got = embed(folder, TEXTS, "--pooling", "mean", "--no-normalize")
    model = SentenceTransformer(str(st_model("bge")), device="cpu")
    with torch.no_grad():
        features = model.tokenize(TEXTS)
        states = model[0](features)["token_embeddings"]
        mask = features["attention_mask"].unsqueeze(-1).float()
        want = ((states * mask).sum(1) / mask.sum(1)).numpy()
    assert_same_vectors(got, want)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)


def test_info_shows_the_pooling(st_export):
    result = invoke("info", str(st_export("dense")))
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())  # rich wraps long rows
    assert "pooling mean, 2 dense layers (32 -> 24 tanh, 24 -> 16 identity), normalized, max 128 tokens" in text


def test_an_unsupported_module_fails_in_one_line(st_model, tmp_path):
    import shutil

    from onnxpipe.errors import UsageError
    from onnxpipe.export import export_model

    folder = tmp_path / "odd"
    shutil.copytree(st_model("gte"), folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": len(modules), "name": "9", "path": "", "type": "sentence_transformers.models.LayerNorm"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UsageError, match="module 'sentence_transformers.models.LayerNorm' is not supported"):
        export_model(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
