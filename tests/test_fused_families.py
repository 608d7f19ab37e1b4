"""onnxpipe's fused graph (export.fused) for Qwen2, Qwen3, Mistral, Phi-3, Gemma and Gemma 3, against
transformers.

The tiny random checkpoints of tests/tiny_decoders.py carry what sets each family apart from Llama
(Qwen2's q/k/v biases, Qwen3's q/k norms, Mistral's window of 4 shorter than every prompt, Phi-3's
packed projections and window of 8, Gemma's scaled embeddings, gelu, (1 + weight) norms and head_dim
16, Gemma 3's norms after attention and MLP, q/k norms and windowed layers with their own rotary
base), plus variants: Qwen2 with yarn rope scaling and with a window on one layer of two, Phi-3 with
partial rotary embeddings, Gemma 2 without its attention soft-capping (output logits still capped).
Each is exported once with the default --graph auto, which must pick the fused graph on this CPU
machine; greedy and beam ids equal transformers' `generate` at batch 1 and at batch 8 with left
padding. The same families through optimum's graph are test_families_decoders.py's. Phi-3's longrope
and Gemma 2's attention soft-capping stay refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tiny_decoders  # noqa: E402
from test_families_decoders import (  # noqa: E402
    CASES,
    GREEDY,
    PROMPTS,
    _ours,
    _reference,
    assert_ids_at_batch_1,
    assert_ids_at_batch_8,
)

from onnxpipe.main import cli  # noqa: E402

FAMILIES = ["qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma3"]
VARIANTS = ["qwen2-linear", "qwen2-yarn", "qwen2-window", "phi3-partial", "gemma2-nocap"]
SHORT = ["Hello", "The cat sat on the mat", "Pipes and tools"]  # prompts of about the windows' length

_BUILT: dict[str, tuple[Path, Path, dict]] = {}


@pytest.fixture(scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: a second torch thread only spins
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """family(arch) -> (checkpoint, export, manifest), each built and exported (--graph auto) once."""

    def get(arch: str):
        if arch not in _BUILT:
            from onnxpipe.export import export_model

            root = tmp_path_factory.mktemp(f"fused-{arch}")
            ckpt = tiny_decoders.build(arch, root / "ckpt")
            manifest = export_model(ckpt, root / "export", task="text-generation")
            _BUILT[arch] = (ckpt, root / "export", manifest)
        return _BUILT[arch]

    return get


def _tiny(family, arch):
    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.causal import CausalLM

    ckpt, export, manifest = family(arch)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = CausalLM.from_model(load_model(export, device="cpu", threads=1))
    # "fused:" keeps test_families_decoders' choice of eos ids (its own checkpoints) apart from these
    return f"fused:{arch}", model, tokenizer, lm, manifest


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, family, one_torch_thread):
    return _tiny(family, request.param)


def test_auto_picks_the_fused_graph(tiny):
    arch, model, tokenizer, lm, manifest = tiny
    assert manifest["graph"]["builder"] == "onnxpipe-fused"
    assert manifest["model_type"] == model.config.model_type
    validation = manifest["validation"]
    assert validation["passed"] and validation["greedy"]["identical"] == validation["greedy"]["sequences"]
    assert validation["outputs"]["logits"]["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_ids_identical_to_transformers_at_batch_1(tiny, case):
    assert_ids_at_batch_1(tiny, case)


@pytest.mark.parametrize("case", list(CASES))
def test_ids_identical_to_transformers_at_batch_8(tiny, case):
    assert_ids_at_batch_8(tiny, case)


@pytest.mark.parametrize("arch", VARIANTS)
def test_variants_ids_identical_to_transformers(family, one_torch_thread, arch):
    """Greedy and beam at batch 8, and greedy at batch 1 and 3 on short prompts (their generation passes the
    windows) and at batch 1 on two long ones; the eos is the model's own, so rows run long."""
    name, model, tokenizer, lm, manifest = _tiny(family, arch)
    assert manifest["graph"]["builder"] == "onnxpipe-fused"
    eos = manifest["special_tokens"]["eos_token_id"]
    for kw in CASES.values():
        assert _ours(lm, tokenizer, PROMPTS, eos, **kw) == _reference(model, tokenizer, PROMPTS, eos, **kw), kw
    for prompt in SHORT + PROMPTS[:2]:
        ours = _ours(lm, tokenizer, [prompt], eos, **GREEDY)
        assert ours == _reference(model, tokenizer, [prompt], eos, **GREEDY), prompt
    assert _ours(lm, tokenizer, SHORT, eos, **GREEDY) == _reference(model, tokenizer, SHORT, eos, **GREEDY)


def test_the_variants_features_are_there(family):
    """What the variant tests above stand on: a window on Qwen2's second layer only, Mistral's on both,
    half of Phi-3's head rotated, Gemma 3's windowed layer on its own rotary table."""
    import onnx

    def attrs(arch, op):
        proto = onnx.load(str(family(arch)[1] / "model.onnx"))
        return [
            {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            for n in proto.graph.node
            if n.op_type == op
        ]

    windows = [a.get("local_window_size") for a in attrs("qwen2-window", "GroupQueryAttention")]
    assert windows == [None, tiny_decoders.SLIDING_WINDOW]
    assert [a.get("local_window_size") for a in attrs("mistral", "GroupQueryAttention")] == [4, 4]
    assert {a.get("rotary_embedding_dim") for a in attrs("phi3-partial", "RotaryEmbedding")} == {4}  # of 8
    # Gemma 3: the windowed layer (0 of 2) rotates with its local table, the global one with the other
    proto = onnx.load(str(family("gemma3")[1] / "model.onnx"))
    tables = {n.name: n.input[2] for n in proto.graph.node if n.op_type == "RotaryEmbedding"}
    assert tables == {"l0.rotary_q": "rotary_local.cos", "l0.rotary_k": "rotary_local.cos"} | {
        "l1.rotary_q": "rotary.cos",
        "l1.rotary_k": "rotary.cos",
    }
    assert [a.get("local_window_size") for a in attrs("gemma3", "GroupQueryAttention")] == [4, None]


@pytest.mark.parametrize("arch", ["qwen2-window", "phi3-partial"])
def test_the_variants_change_the_output(family, one_torch_thread, arch):
    """Without the window or the partial rotary, transformers itself generates other ids
    for these prompts: the parity above would notice a graph that ignored them."""
    ckpt, export, manifest = family(arch)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    changed = {
        "qwen2-window": {"layer_types": ["full_attention"] * 2},
        "phi3-partial": {"partial_rotary_factor": 1.0},
    }[arch]
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    other = transformers.AutoModelForCausalLM.from_pretrained(ckpt, **changed).eval()
    eos = manifest["special_tokens"]["eos_token_id"]
    assert _reference(model, tokenizer, PROMPTS, eos, **GREEDY) != _reference(other, tokenizer, PROMPTS, eos, **GREEDY)


def test_gemma_with_tied_embeddings(tmp_path, family):
    """Gemma ties its output layer to the embedding table, which the graph scales only after the lookup:
    the tied Gemm reads the unscaled table, and the last position's logits equal transformers'."""
    import onnx

    from onnxpipe.export import fused
    from onnxpipe.runtime.sessions import make_session

    ckpt, _, _ = family("gemma")
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, tie_word_embeddings=True).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    fused.build(model, tmp_path)
    proto = onnx.load(str(tmp_path / "model.onnx"))
    assert [n.op_type for n in proto.graph.node if n.name == "lm_head"] == ["Gemm"]
    cfg = model.config
    ids = np.array([[5, 9, 33, 7, 2, 11], [1, 2, 3, 4, 5, 6]])
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.tile(np.arange(ids.shape[1]), (2, 1)),
    }
    for i in range(cfg.num_hidden_layers):
        feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = np.zeros(
            (2, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32
        )
    (logits,) = make_session(tmp_path / "model.onnx").run(["logits"], feeds)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids)).logits[:, -1:].numpy()
    assert logits.shape == ref.shape and np.abs(logits - ref).max() < 1e-4


def test_graph_fused_builds_them(family, tmp_path):
    """--graph fused asks for what auto picks here."""
    from onnxpipe.export import export_model

    ckpt, _, _ = family("mistral")
    manifest = export_model(ckpt, tmp_path / "fused", task="text-generation", graph="fused")
    assert manifest["graph"]["builder"] == "onnxpipe-fused"
    assert manifest["graph"]["weights"]["float32"] == 2 * 4 + 2  # 2 layers x 4 projections, lm_head, embedding


@pytest.mark.parametrize("arch", ["qwen2", "gemma"])
def test_info_names_the_fused_graph_and_its_family(family, arch):
    ckpt, export, manifest = family(arch)
    result = CliRunner().invoke(cli, ["info", str(export)], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert f"onnxpipe-fused ({arch})" in " ".join(result.stdout.split())
    assert result.stderr == ""


def test_longrope_is_refused_where_its_factors_can_switch(tmp_path):
    """Phi-3's longrope switches to its long factors past original_max_position_embeddings (16 here), and
    transformers' generate then reruns the whole sequence without its cache: no graph over a growing cache
    gives those ids, so --graph fused refuses (and auto falls back to optimum's graph, which refuses too).
    Where the switch is out of reach (original = max positions) the short factors are all there is."""
    from types import SimpleNamespace

    from onnxpipe.errors import UsageError
    from onnxpipe.export import export_model, fused

    ckpt = tiny_decoders.build("phi3-longrope", tmp_path / "ckpt")
    with pytest.raises(UsageError) as info:
        export_model(ckpt, tmp_path / "fused", task="text-generation", graph="fused")
    message = str(info.value)
    assert "\n" not in message and "longrope" in message and "16" in message
    assert not (tmp_path / "fused").exists()
    config = json.loads((ckpt / "config.json").read_text())
    config["original_max_position_embeddings"] = config["max_position_embeddings"]
    assert fused.unsupported_reason(SimpleNamespace(**config)) is None


@pytest.mark.parametrize("arch", ["qwen2", "gemma"])
def test_gguf_blocks_stay_exact_4_bit(family, tmp_path, one_torch_thread, arch):
    """A checkpoint whose matrices hold GGUF blocks' values (layer 0 Q4_1, layer 1 Q4_0, the output layer
    and the embedding Q8_0: tiny_models.gguf_blocks) keeps them as MatMulNBits and GatherBlockQuantized
    beside Qwen2's biases and Gemma's embedding scale, and generates transformers' ids."""
    pytest.importorskip("gguf")
    import tiny_models

    from onnxpipe.export import export_model
    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.causal import CausalLM

    ckpt, _, _ = family(arch)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    tiny_models.gguf_blocks(model)
    blocks = tmp_path / "ckpt"
    model.save_pretrained(blocks)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    tokenizer.save_pretrained(blocks)
    manifest = export_model(blocks, tmp_path / "export", task="text-generation")
    assert manifest["graph"]["builder"] == "onnxpipe-fused"
    weights = manifest["graph"]["weights"]
    assert (weights["float32"], weights["q4_1"], weights["q4_0"], weights["q8_0"]) == (0, 4, 4, 2)
    lm = CausalLM.from_model(load_model(tmp_path / "export", device="cpu", threads=1))
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    eos = manifest["special_tokens"]["eos_token_id"]
    assert _ours(lm, tokenizer, PROMPTS, eos, **GREEDY) == _reference(model, tokenizer, PROMPTS, eos, **GREEDY)


def test_a_window_in_a_llama_config_is_not_applied(tmp_path, one_torch_thread):
    """transformers' Llama (and Gemma) attention ignores a sliding_window that a config.json carries (a
    converted checkpoint's leftover); the fused graph must too. With the window applied, the export failed
    validation on this tiny window, and a window longer than the validation prompts would pass it and be
    wrong past it."""
    import shutil

    import tiny_models

    from onnxpipe.export import export_model
    from onnxpipe.measure import lm_quality

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_models.build("llama", tmp_path / "source"), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "sliding_window": 4}))
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    assert model.config.sliding_window == 4
    manifest = export_model(ckpt, tmp_path / "export", task="text-generation")
    assert manifest["graph"]["builder"] == "onnxpipe-fused" and manifest["validation"]["passed"]
    ids = [int(i) for i in np.random.default_rng(0).integers(3, model.config.vocab_size, 24)]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = lm_quality.open_scorer(tmp_path / "export", "cpu", threads=1).logits(ids)
    assert np.abs(got - ref).max() < 1e-4  # every position sees all the keys before it, as in transformers
