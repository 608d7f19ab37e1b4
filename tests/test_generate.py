"""`onnxpipe generate` on the streaming engine: prompts, chat template, output formats, stop strings, sampling.

The ids themselves are checked against transformers in test_decoding.py; here the command is checked
end to end (CliRunner, stdout and stderr apart), with transformers as the oracle where it has one
(chat template rendering, greedy text through the engine's sorting and order restoration).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxpipe.main import cli
from onnxpipe.stream.writers import escape_text, unescape_text

PROMPTS = [
    "The quick brown fox",
    "Paris is",
    "A good movie with a great cast and a moving story about",
    "Short.",
    "Numbers like 42",
    "I loved",
    "Machine translation turns English sentences into",
    "She said",
]


def invoke(*args, input=None):
    return CliRunner().invoke(
        cli, ["generate", *map(str, args), "--device", "cpu", "--threads", "1"], input=input, catch_exceptions=False
    )


def jsonl(result):
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def hf(checkpoint):
    """transformers' tokenizer and model for an arch (the oracle), one torch thread (shared cores)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cache = {}

    def get(arch):
        if arch not in cache:
            folder = checkpoint(arch)
            cache[arch] = (
                transformers.AutoTokenizer.from_pretrained(folder),
                transformers.AutoModelForCausalLM.from_pretrained(folder).eval(),
            )
        return cache[arch]

    yield get
    torch.set_num_threads(before)


def test_prompt_option_jsonl_fields(exported):
    result = invoke("-m", exported("gpt2"), "-p", "The quick brown fox", "--max-new-tokens", 12, "--format", "jsonl")
    (record,) = jsonl(result)
    assert record["text"] == "The quick brown fox"
    assert record["finish_reason"] == "length" and record["generated_tokens"] == 12
    assert record["prompt_tokens"] > 0 and record["provider"] == "CPUExecutionProvider"
    assert isinstance(record["generated_text"], str) and record["generated_text"]
    assert "tokens generated" in result.stderr and "tokens generated" not in result.stdout


def test_greedy_text_matches_transformers_through_the_engine(exported, hf):
    """Eight prompts from stdin, sorted by length into batches of 3 and put back in input order."""
    tokenizer, model = hf("gpt2")
    result = invoke(
        "-m",
        exported("gpt2"),
        "--max-new-tokens",
        16,
        "--greedy",
        "--format",
        "jsonl",
        "--batch-size",
        3,
        input="".join(p + "\n" for p in PROMPTS),
    )
    records = jsonl(result)
    assert [r["text"] for r in records] == PROMPTS
    import torch

    for prompt, record in zip(PROMPTS, records):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=16,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        assert record["generated_text"] == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    text = invoke(
        "-m", exported("gpt2"), "--max-new-tokens", 16, "--batch-size", 5, input="".join(p + "\n" for p in PROMPTS)
    )
    assert text.stdout.splitlines() == [escape_text(r["generated_text"]) for r in records]


def test_max_length_and_min_length_count_the_prompt_as_transformers_does(exported, hf):
    """generate's --max-length/--min-length are transformers' max_length/min_length (prompt included), for each
    row's own prompt, whatever its batch-mates: --max-length P+N gives what --max-new-tokens N gives."""
    import torch

    tokenizer, model = hf("gpt2")
    result = invoke(
        "-m",
        exported("gpt2"),
        "--max-length",
        27,
        "--min-length",
        25,
        "--greedy",
        "--format",
        "jsonl",
        "--batch-size",
        3,
        "--on-error",
        "null",
        input="".join(p + "\n" for p in PROMPTS),
    )
    assert result.exit_code == 3, result.stderr  # a prompt that leaves no room: transformers raises,
    records = [json.loads(line) for line in result.stdout.splitlines()]  # onnxpipe makes it an error record
    long = [r for r in records if "error" in r]
    assert len(long) == 1 and "--max-length 27" in long[0]["error"] and len(records) == len(PROMPTS)
    eos = tokenizer.eos_token_id
    for prompt, record in zip(PROMPTS, records):
        if "error" in record:
            continue
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_length=27,
                min_length=25,
                do_sample=False,
                pad_token_id=eos,
            )
        assert record["generated_text"] == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), prompt
        assert record["prompt_tokens"] + record["generated_tokens"] <= 27
    # The same completions from the new-token spellings, row by row.
    for prompt, record in zip(PROMPTS, records):
        if "error" in record:
            continue
        new = 27 - record["prompt_tokens"]
        (alone,) = jsonl(
            invoke(
                "-m",
                exported("gpt2"),
                "-p",
                prompt,
                "--max-new-tokens",
                new,
                "--min-new-tokens",
                max(0, 25 - record["prompt_tokens"]),
                "--greedy",
                "--format",
                "jsonl",
            )
        )
        assert alone["generated_text"] == record["generated_text"]


def test_chat_template_renders_as_transformers_does(exported, hf):
    tokenizer, model = hf("llama")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    expected_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    result = invoke(
        "-m",
        exported("llama"),
        "--chat",
        "--system",
        "Be brief.",
        "-p",
        "What is the capital of France?",
        "--max-new-tokens",
        10,
        "--format",
        "jsonl",
    )
    (record,) = jsonl(result)
    assert record["prompt_tokens"] == len(expected_ids)

    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.causal import CausalLM

    lm = CausalLM.from_model(load_model(exported("llama"), device="cpu", threads=1))
    assert lm.encode(lm.render_chat("What is the capital of France?", "Be brief."), chat=True) == expected_ids
    import torch

    ids = torch.tensor([expected_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert record["generated_text"] == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_chat_template_from_tokenizer_config(exported, tmp_path):
    """Exports that keep the template only in tokenizer_config.json (older transformers) work the same."""
    import shutil

    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.causal import CausalLM

    folder = tmp_path / "llama"
    shutil.copytree(exported("llama"), folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": template}, {"name": "tool_use", "template": "x"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    manifest = json.loads((folder / "onnxpipe.json").read_text())
    manifest["tokenizer"]["chat_template"] = None
    (folder / "onnxpipe.json").write_text(json.dumps(manifest))
    assert CausalLM.from_model(load_model(folder, device="cpu")).render_chat("hi") == CausalLM.from_model(
        load_model(exported("llama"), device="cpu")
    ).render_chat("hi")


def test_chat_without_template_fails_clearly(exported):
    result = invoke("-m", exported("gpt2"), "--chat", "-p", "hello")
    assert result.exit_code == 2
    assert "has no chat template" in result.stderr and result.stdout == ""


def test_usage_errors(exported):
    assert invoke("-m", exported("gpt2"), "--system", "x", "-p", "hi").exit_code == 2
    result = invoke("-m", exported("gpt2"), "--num-beams", 2, "--num-return-sequences", 2, "-p", "hi")
    assert result.exit_code == 2 and "--format jsonl" in result.stderr


def _sampled(exported, seed, batch_size, prompts=PROMPTS, **extra):
    args = [
        "-m",
        exported("llama"),
        "--do-sample",
        "--top-k",
        0,
        "--temperature",
        1.5,
        "--seed",
        seed,
        "--max-new-tokens",
        24,
        "--batch-size",
        batch_size,
        "--format",
        "jsonl",
    ]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", v]
    return jsonl(invoke(*args, input="".join(p + "\n" for p in prompts)))


def test_sampling_is_seeded_and_independent_of_batch_size(exported):
    one = _sampled(exported, 3, 1)
    eight = _sampled(exported, 3, 8)
    assert [r["generated_text"] for r in one] == [r["generated_text"] for r in eight]
    assert one == _sampled(exported, 3, 3)
    other = _sampled(exported, 4, 8)
    assert [r["generated_text"] for r in other] != [r["generated_text"] for r in eight]
    assert len({r["generated_text"] for r in eight}) == len(PROMPTS)


def test_newlines_are_escaped_one_line_per_prompt(exported):
    """Sampling from a byte-fallback vocabulary: find a seed whose text has a newline, then check the
    text output escapes it reversibly (the seed makes the output deterministic)."""
    prompts = PROMPTS[:4]
    for seed in range(40):
        records = _sampled(exported, seed, 4, prompts)
        if any("\n" in r["generated_text"] or "\\" in r["generated_text"] for r in records):
            break
    else:
        pytest.fail("no sampled text with a newline or backslash in 40 seeds")
    args = [
        "-m",
        exported("llama"),
        "--do-sample",
        "--top-k",
        0,
        "--temperature",
        1.5,
        "--seed",
        seed,
        "--max-new-tokens",
        24,
        "--batch-size",
        4,
    ]
    result = invoke(*args, input="".join(p + "\n" for p in prompts))
    lines = result.stdout.split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(prompts)
    assert [unescape_text(line) for line in lines[:-1]] == [r["generated_text"] for r in records]


def test_empty_lines_get_empty_results(exported):
    result = invoke("-m", exported("gpt2"), "--max-new-tokens", 5, input="Paris is\n\nShort.\n")
    assert result.exit_code == 0
    lines = result.stdout.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[0] and lines[2]
    records = jsonl(invoke("-m", exported("gpt2"), "--max-new-tokens", 5, "--format", "jsonl", input="\n"))
    assert records == [
        {
            "text": "",
            "generated_text": "",
            "finish_reason": None,
            "prompt_tokens": 0,
            "generated_tokens": 0,
            "provider": "CPUExecutionProvider",
        }
    ]


def test_stop_string_cuts_before_it(exported):
    (full,) = jsonl(invoke("-m", exported("gpt2"), "-p", "Paris is", "--max-new-tokens", 30, "--format", "jsonl"))
    text = full["generated_text"]
    stop = text[8:11]
    assert len(stop) == 3 and stop in text
    (cut,) = jsonl(
        invoke(
            "-m",
            exported("gpt2"),
            "-p",
            "Paris is",
            "--max-new-tokens",
            30,
            "--format",
            "jsonl",
            "--stop",
            "never there",
            "--stop",
            stop,
        )
    )
    assert cut["generated_text"] == text[: text.index(stop)]
    assert cut["finish_reason"] == "stop" and cut["generated_tokens"] < 30
    # Beam search applies stop strings to the finished text.
    (beam,) = jsonl(
        invoke("-m", exported("gpt2"), "-p", "Paris is", "--max-new-tokens", 30, "--format", "jsonl", "--num-beams", 3)
    )
    beam_stop = beam["generated_text"][5:8]
    (beam_cut,) = jsonl(
        invoke(
            "-m",
            exported("gpt2"),
            "-p",
            "Paris is",
            "--max-new-tokens",
            30,
            "--format",
            "jsonl",
            "--num-beams",
            3,
            "--stop",
            beam_stop,
        )
    )
    assert beam_cut["generated_text"] == beam["generated_text"][: beam["generated_text"].index(beam_stop)]
    assert beam_cut["finish_reason"] == "stop"


def test_stop_strings_survive_bytes_that_form_no_utf8(exported):
    """The tiny Llama's byte-fallback pieces often form no valid UTF-8; tokenizers' DecodeStream refused such
    a window ('Invalid prefix encountered'), which ended every streamed or --stop record with an error."""
    prompts = ["The quick brown fox", "A good movie with a great cast and a moving story about"]
    args = ("-m", exported("llama"), "--greedy", "--max-new-tokens", 30, "--format", "jsonl")
    plain = jsonl(invoke(*args, input="".join(p + "\n" for p in prompts)))
    assert any("\ufffd" in r["generated_text"] for r in plain)  # the case in question
    stopped = jsonl(invoke(*args, "--stop", "never there", input="".join(p + "\n" for p in prompts)))
    assert [r["generated_text"] for r in stopped] == [r["generated_text"] for r in plain]


def test_streaming_to_a_terminal_prints_the_same_line(exported, monkeypatch):
    import onnxpipe.commands.generate as command
    from onnxpipe.stream.writers import TextWriter

    args = ("-m", exported("gpt2"), "-p", "Paris is", "--max-new-tokens", 20, "--stop", "xyz-not-there")
    plain = invoke(*args)
    pieces = []
    original = TextWriter.write_partial
    monkeypatch.setattr(TextWriter, "write_partial", lambda self, text: (pieces.append(text), original(self, text)))
    monkeypatch.setattr(command, "_isatty", lambda stream: True)
    streamed = invoke(*args)
    assert streamed.exit_code == 0
    assert len(pieces) > 3  # token by token, not one piece at the end
    assert streamed.stdout == plain.stdout and "".join(map(escape_text, pieces)) + "\n" == plain.stdout


def test_beam_n_best_in_jsonl(exported):
    (record,) = jsonl(
        invoke(
            "-m",
            exported("llama"),
            "-p",
            "Paris is",
            "--num-beams",
            4,
            "--num-return-sequences",
            3,
            "--max-new-tokens",
            12,
            "--format",
            "jsonl",
        )
    )
    seqs = record["sequences"]
    assert len(seqs) == 3 and seqs[0]["generated_text"] == record["generated_text"]
    assert [s["score"] for s in seqs] == sorted((s["score"] for s in seqs), reverse=True)


def test_verbose_reports_copies_per_step(exported):
    result = CliRunner().invoke(
        cli, ["-v", "generate", "-m", str(exported("gpt2")), "-p", "hi", "--device", "cpu", "--max-new-tokens", 8]
    )
    assert result.exit_code == 0
    line = next(l for l in result.stderr.splitlines() if l.startswith("decoding:"))
    assert "'steps': 8" in line and "'copies_per_step': 4.0" in line


# --- the real model (make models) ---------------------------------------------------------------

SMOLLM2 = Path(__file__).resolve().parent.parent / "exports" / "smollm2"


@pytest.fixture(scope="module")
def smollm2_oracle(tmp_path_factory):
    """The export's own GGUF converted for transformers (the export keeps no PyTorch weights)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onnxpipe.export.gguf import gguf_to_checkpoint

    gguf = Path(json.loads((SMOLLM2 / "onnxpipe.json").read_text())["source"]["path"])
    if not gguf.is_file():
        pytest.skip(f"{gguf} is missing")
    folder = gguf_to_checkpoint(gguf, tmp_path_factory.mktemp("smollm2"))
    torch.set_num_threads(1)
    return AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.real_model
@pytest.mark.skipif(not (SMOLLM2 / "onnxpipe.json").is_file(), reason="needs exports/smollm2: run make models")
def test_smollm2_chat_answers_paris():
    (record,) = jsonl(
        invoke(
            "-m", SMOLLM2, "--chat", "-p", "What is the capital of France?", "--max-new-tokens", 32, "--format", "jsonl"
        )
    )
    assert "Paris" in record["generated_text"]
    assert record["finish_reason"] == "eos"


@pytest.mark.real_model
@pytest.mark.skipif(not (SMOLLM2 / "onnxpipe.json").is_file(), reason="needs exports/smollm2: run make models")
def test_smollm2_rotary_tables_are_exact_at_every_position(smollm2_oracle):
    """cos/sin of transformers' float32 angles, to float32 rounding, for all 8192 positions: torch's own
    cos of the whole table was up to 1.5e-4 off past position 4096 in some exports."""
    import onnx
    from onnx import numpy_helper

    _, model = smollm2_oracle
    tables = {
        t.name: numpy_helper.to_array(t)
        for t in onnx.load(str(SMOLLM2 / "model.onnx")).graph.initializer
        if t.name.startswith("rotary.")
    }
    inv_freq = model.model.rotary_emb.inv_freq.float().numpy()
    angles = (np.arange(model.config.max_position_embeddings, dtype=np.float32)[:, None] * inv_freq).astype(np.float64)
    assert np.abs(tables["rotary.cos"] - np.cos(angles)).max() < 1e-7
    assert np.abs(tables["rotary.sin"] - np.sin(angles)).max() < 1e-7


@pytest.mark.real_model
@pytest.mark.skipif(not (SMOLLM2 / "onnxpipe.json").is_file(), reason="needs exports/smollm2: run make models")
def test_smollm2_greedy_ids_match_transformers_for_64_tokens(smollm2_oracle):
    import torch

    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.causal import CausalLM

    tokenizer, model = smollm2_oracle
    lm = CausalLM.from_model(load_model(SMOLLM2, device="cpu", threads=min(2, os.cpu_count() or 1)))
    # The export under test is the fast one: the fused graph with the GGUF's blocks as 4-bit MatMulNBits.
    assert lm.manifest["graph"]["builder"] == "onnxpipe-fused"
    assert lm.manifest["graph"]["weights"] == {"float32": 0, "q4_0": 0, "q4_1": 120, "q8_0": 2}
    prompts = ["The history of the Roman Empire", "def fibonacci(n):", "Once upon a time, in a small village"]
    config = lm.defaults.update(max_new_tokens=64, min_new_tokens=64, do_sample=False)
    ours = [c[0].token_ids for c in lm.generate([lm.encode(p) for p in prompts], config)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = model.generate(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            max_new_tokens=64,
            min_new_tokens=64,
            do_sample=False,
        )
    theirs = out[:, enc.input_ids.shape[1] :].tolist()
    assert [len(ids) for ids in ours] == [64, 64, 64]
    assert ours == theirs
