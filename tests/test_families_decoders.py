"""Decoder families beyond GPT-2 and Llama: Qwen2, Mistral, Phi-3, Gemma (tests/tiny_decoders.py).

Each tiny random checkpoint is exported once (text-generation, --graph optimum: the graph they get where
CUDA runs; test_fused_families.py has onnxpipe's fused graph, which --graph auto picks on a CPU) and
checked against transformers: the export validates, the greedy and beam (4) ids equal
`generate`'s at batch 1 and at batch 8 with left padding, `info` names the graph, and `generate --chat`
renders the chat template as transformers does. The features that set each family apart are in the
checkpoints: Qwen2's q/k/v biases and a vocabulary padded past the tokenizer's, Mistral's sliding window
(4) shorter than every prompt (10-30 tokens) and than the generation, Phi-3's packed projections, Gemma's
scaled embeddings, gelu and independent head_dim; Qwen2s with linear and yarn rope scaling; and the
newer Qwen3 (q/k norms), Gemma2 (soft-capping, windowed layers) and Gemma3 (local/global layers).

As in test_decoding.py, random tiny models seldom produce their own eos, so each comparison declares a
frequent id as eos (with the model's own as a second id) such that some rows end on it and some run to
the length limit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tiny_decoders  # noqa: E402

from onnxpipe.main import cli  # noqa: E402

# 10-60 tokens each in every tokenizer here: longer than Mistral's window of 4, and of different lengths.
PROMPTS = [
    "The quick brown fox jumps over the lazy dog and",
    "Paris is the capital of France, and Berlin is the capital of Germany. London",
    "A good movie with a great cast and a moving story about",
    "Numbers like 42, 3.14 and 2026 appear in text too; so",
    "Pipelines of small tools make the shell a pleasant place",
    "Machine translation turns English sentences into German ones, while summaries should be short",
    'She said: "hello, world" and left the room.',
    "Tokenizers split words into pieces: un-break-able, re-think-ing, and",
]
FAMILIES = ["qwen2", "mistral", "phi3", "gemma", "qwen2-linear", "qwen2-yarn", "qwen3", "gemma2", "gemma3"]
GREEDY = dict(do_sample=False, max_new_tokens=24)
BEAM = dict(do_sample=False, num_beams=4, num_return_sequences=2, max_new_tokens=16)
CASES = {"greedy": GREEDY, "beam": BEAM}


@pytest.fixture(scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: a second torch thread only spins
    yield
    torch.set_num_threads(before)


_BUILT: dict[str, tuple[Path, Path, dict]] = {}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """family(arch) -> (checkpoint, export, manifest), each built and exported once per session."""

    def get(arch: str):
        if arch not in _BUILT:
            from onnxpipe.export import export_model

            root = tmp_path_factory.mktemp(arch)
            ckpt = tiny_decoders.build(arch, root / "ckpt")
            manifest = export_model(ckpt, root / "export", task="text-generation", graph="optimum")
            _BUILT[arch] = (ckpt, root / "export", manifest)
        return _BUILT[arch]

    return get


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, family, one_torch_thread):
    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.causal import CausalLM

    ckpt, export, manifest = family(request.param)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return request.param, model, tokenizer, CausalLM.from_model(load_model(export, device="cpu", threads=1)), manifest


def _reference(model, tokenizer, prompts, eos, **kw):
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, **kw)
    n = kw.get("num_return_sequences", 1)
    rows = []
    for row in out[:, enc.input_ids.shape[1] :].tolist():
        cut = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return [rows[i : i + n] for i in range(0, len(rows), n)]


def _ours(lm, tokenizer, prompts, eos, **kw):
    out = lm.generate([tokenizer(p).input_ids for p in prompts], lm.defaults.update(eos_token_id=eos, **kw))
    return [[c.token_ids for c in nbest] for nbest in out]


_EOS: dict = {}


def _eos_for(tiny, case) -> list[int]:
    """[a frequent id, the model's own eos]: at batch 8 some hypotheses end on it, some run to the limit."""
    arch, model, tokenizer, lm, manifest = tiny
    if (arch, case) not in _EOS:
        kw = CASES[case]
        enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(
                **enc,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=None,
                **{k: v for k, v in kw.items() if k != "num_return_sequences"},
            )
        counts: dict[int, int] = {}
        for row in out[:, enc.input_ids.shape[1] :].tolist():
            for t in set(row[4:]):
                counts[t] = counts.get(t, 0) + 1
        own = manifest["special_tokens"]["eos_token_id"][0]
        for token in sorted(counts, key=lambda t: (-counts[t], t))[:30]:
            eos = [token, own]
            ended = [
                bool(ids) and ids[-1] in eos
                for nbest in _reference(model, tokenizer, PROMPTS, eos, **kw)
                for ids in nbest
            ]
            if 1 <= sum(ended) <= len(ended) - 1:
                _EOS[arch, case] = eos
                break
        else:
            pytest.fail(f"no frequent id of {arch} ends some but not all rows ({case})")
    return _EOS[arch, case]


def test_export_validated_on_optimums_graph(tiny):
    arch, model, tokenizer, lm, manifest = tiny
    assert manifest["validation"]["passed"]
    assert manifest["validation"]["greedy"]["identical"] == manifest["validation"]["greedy"]["sequences"]
    assert manifest["graph"]["builder"] == "optimum"
    assert manifest["model_type"] == model.config.model_type


def assert_ids_at_batch_1(tiny, case: str) -> None:
    """Each prompt alone: ids equal transformers' generate (this file's tests and test_fused_families')."""
    arch, model, tokenizer, lm, manifest = tiny
    kw, eos = CASES[case], _eos_for(tiny, case)
    total = 0
    for prompt in PROMPTS:
        ours = _ours(lm, tokenizer, [prompt], eos, **kw)
        assert ours == _reference(model, tokenizer, [prompt], eos, **kw), (arch, case, prompt)
        total += sum(len(ids) for ids in ours[0])
    assert total >= 4 * len(PROMPTS)


def assert_ids_at_batch_8(tiny, case: str) -> None:
    """Eight prompts of different lengths, left-padded, rows ending at different steps."""
    arch, model, tokenizer, lm, manifest = tiny
    kw, eos = CASES[case], _eos_for(tiny, case)
    ours = _ours(lm, tokenizer, PROMPTS, eos, **kw)
    assert ours == _reference(model, tokenizer, PROMPTS, eos, **kw), (arch, case)
    flat = [ids for nbest in ours for ids in nbest]
    ended = [bool(ids) and ids[-1] in eos for ids in flat]
    assert any(ended) and not all(ended)
    assert len({len(tokenizer(p).input_ids) for p in PROMPTS}) >= 5  # the padding differs row to row


@pytest.mark.parametrize("case", list(CASES))
def test_ids_identical_to_transformers_at_batch_1(tiny, case):
    assert_ids_at_batch_1(tiny, case)


@pytest.mark.parametrize("case", list(CASES))
def test_ids_identical_to_transformers_at_batch_8(tiny, case):
    assert_ids_at_batch_8(tiny, case)


def test_prompts_exceed_mistrals_window(family):
    ckpt, export, manifest = family("mistral")
    config = json.loads((export / "config.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    assert config["sliding_window"] == tiny_decoders.SLIDING_WINDOW
    lengths = [len(tokenizer(p).input_ids) for p in PROMPTS]
    assert min(lengths) > 5 * tiny_decoders.SLIDING_WINDOW and max(lengths) < 64


@pytest.mark.parametrize("arch", ["mistral", "phi3", "gemma2"])
def test_the_window_changes_the_output(family, arch, one_torch_thread):
    """The comparisons above would not notice a graph that ignored the window if the window did not
    matter: without it, transformers itself generates other ids for these prompts."""
    ckpt, export, manifest = family(arch)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token
    windowed = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    unwindowed = transformers.AutoModelForCausalLM.from_pretrained(ckpt, sliding_window=1024).eval()  # wider than all
    eos = [manifest["special_tokens"]["eos_token_id"][0]]
    assert _reference(windowed, tokenizer, PROMPTS, eos, **GREEDY) != _reference(
        unwindowed, tokenizer, PROMPTS, eos, **GREEDY
    )


def test_qwen2_biases_and_padded_vocabulary(family):
    ckpt, export, manifest = family("qwen2")
    config = json.loads((export / "config.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    assert config["vocab_size"] == len(tokenizer) + tiny_decoders.VOCAB_PADDING
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    assert float(model.model.layers[0].self_attn.q_proj.bias.detach().abs().min()) > 0
    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.causal import CausalLM

    lm = CausalLM.from_model(load_model(export, device="cpu", threads=1))
    assert lm.decoder.vocab_size == config["vocab_size"]
    # two eos ids from the generation config, the chat template's end of turn first
    assert manifest["special_tokens"]["eos_token_id"] == tokenizer.convert_tokens_to_ids(
        ["<|im_end|>", "<|endoftext|>"]
    )


def test_qwen2_ids_past_the_tokenizer_decode_like_transformers(family, one_torch_thread):
    """Ids no token uses (the padded columns) can be generated; the text is transformers' decode of the ids."""
    ckpt, export, manifest = family("qwen2")
    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.causal import CausalLM

    lm = CausalLM.from_model(load_model(export, device="cpu", threads=1))
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    config = lm.defaults.update(do_sample=True, seed=3, temperature=3.0, top_k=0, max_new_tokens=40, eos_token_id=[])
    out = lm.generate([tokenizer(p).input_ids for p in PROMPTS], config)
    padded = [t for nbest in out for t in nbest[0].token_ids if t >= len(tokenizer)]
    assert padded, "no padded id was generated: the test does not cover them"
    for nbest in out:
        c = nbest[0]
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_rope_scaling_matters(family, kind, one_torch_thread):
    """The rope-scaled Qwen2s pass their parity tests (above); their ids differ from the unscaled one's."""
    base_ckpt, _, _ = family("qwen2")
    ckpt, export, manifest = family(f"qwen2-{kind}")
    assert json.loads((export / "config.json").read_text())["rope_scaling"]["rope_type"] == kind
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    tokenizer.padding_side = "left"
    scaled = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    plain = transformers.AutoModelForCausalLM.from_pretrained(base_ckpt).eval()
    eos = manifest["special_tokens"]["eos_token_id"]
    assert _reference(scaled, tokenizer, PROMPTS, eos, **GREEDY) != _reference(plain, tokenizer, PROMPTS, eos, **GREEDY)


# --- the commands ----------------------------------------------------------------------------------


def _invoke(*args, input=None):
    return CliRunner().invoke(cli, [*map(str, args)], input=input, catch_exceptions=False)


@pytest.mark.parametrize("arch", ["qwen2", "gemma"])
def test_info_names_the_graph(family, arch):
    ckpt, export, manifest = family(arch)
    result = _invoke("info", export)
    assert result.exit_code == 0, result.stderr
    assert "optimum's graph" in " ".join(result.stdout.split())
    assert "fused" not in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_generate_chat_uses_the_template(family, arch, one_torch_thread):
    ckpt, export, manifest = family(arch)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    result = _invoke(
        "generate",
        "-m",
        export,
        "--device",
        "cpu",
        "--threads",
        1,
        "--chat",
        "--system",
        "Be brief.",
        "-p",
        "What is the capital of France?",
        "--max-new-tokens",
        12,
        "--greedy",
        "--format",
        "jsonl",
    )
    assert result.exit_code == 0, result.stderr
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["prompt_tokens"] == len(ids)
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    generated = out[0, prompt.shape[1] :].tolist()
    assert record["generated_text"] == tokenizer.decode(generated, skip_special_tokens=True)
    plain = _invoke(
        "generate",
        "-m",
        export,
        "--device",
        "cpu",
        "--threads",
        1,
        "-p",
        "What is the capital of France?",
        "--max-new-tokens",
        12,
        "--greedy",
        "--format",
        "jsonl",
    )
    assert json.loads(plain.stdout)["prompt_tokens"] < len(ids)  # without --chat, no template


@pytest.mark.parametrize("arch", ["gemma2"])
def test_fused_graph_refuses_with_the_difference(family, arch):
    """--graph fused fails in one line naming what the fused builder cannot express, before loading."""
    from onnxpipe.errors import UsageError
    from onnxpipe.export import export_model

    ckpt, export, manifest = family(arch)
    with pytest.raises(UsageError) as info:
        export_model(ckpt, export.parent / "fused", task="text-generation", graph="fused")
    message = str(info.value)
    assert "\n" not in message
    assert {"gemma2": "soft-capping"}[arch] in message
    assert not (export.parent / "fused").exists()


def test_phi3_longrope_is_refused_in_one_line(tmp_path):
    """longrope switches factors past original_max_position_embeddings (16 here) in a Python branch that the
    trace fixes: the export must refuse, not write a graph that is wrong for long prompts."""
    from onnxpipe.errors import ExportError
    from onnxpipe.export import export_model

    ckpt = tiny_decoders.build("phi3-longrope", tmp_path / "ckpt")
    with pytest.raises(ExportError) as info:
        export_model(ckpt, tmp_path / "export", task="text-generation")
    message = str(info.value)
    assert "\n" not in message and "longrope" in message and "original_max_position_embeddings (16)" in message
    assert not (tmp_path / "export").exists()
