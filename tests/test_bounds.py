"""Arguments that could exhaust the machine are bounded, and say so in one line.

- --threads above the usable CPUs (the affinity mask) is capped, with one warning line, wherever threads
  are taken: the streaming commands, eval, bench; the Python API caps with a RuntimeWarning, never prints;
- --num-beams / --num-return-sequences above MAX_NUM_BEAMS are refused in one line (exit 2), before the
  model loads, in generate, translate, summarize and eval; the API refuses them with UsageError;
- generation that stops at the model's positions before max_new_tokens is counted and reported once
  (decoder-only: the positions minus the prompt; T5, relative positions: onnxpipe's stated bound, the
  input length; BART/Marian: the position table).

The oracles: os.sched_getaffinity for the CPUs, the sessions' own intra_op_num_threads, the checkpoints'
configs and tokenizers for the positions.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
from click.testing import CliRunner

import onnxpipe
from onnxpipe.errors import UsageError
from onnxpipe.main import cli

USABLE = len(os.sched_getaffinity(0))
HUGE = 10**6


def _invoke(*args, input: str | None = None):
    return CliRunner().invoke(cli, ["-q", *map(str, args)], input=input)


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("onnxpipe: warning: ")]


@pytest.fixture
def threads_seen(monkeypatch):
    """The threads every load_model call passes on, and the intra-op threads of every session made."""
    import onnxpipe.runtime as runtime
    from onnxpipe.runtime.model import ExportedModel

    seen: dict[str, list] = {"load_model": [], "session": []}
    real_load, real_make = runtime.load_model, ExportedModel._make_session

    def load_model(ref, device="auto", threads=None):
        seen["load_model"].append(threads)
        return real_load(ref, device=device, threads=threads)

    def make_session(self, path):
        session = real_make(self, path)
        seen["session"].append(session.get_session_options().intra_op_num_threads)
        return session

    monkeypatch.setattr(runtime, "load_model", load_model)
    monkeypatch.setattr(ExportedModel, "_make_session", make_session)
    return seen


# --- --threads -------------------------------------------------------------------------------


def test_threads_above_the_cpus_are_capped_with_one_warning(exported, threads_seen):
    folder = exported("bert", "text-classification")
    plain = _invoke("classify", "-m", folder, "--device", "cpu", input="good movie\nbad film\n")
    result = _invoke("classify", "-m", folder, "--device", "cpu", "--threads", HUGE, input="good movie\nbad film\n")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == plain.stdout and len(result.stdout.splitlines()) == 2
    assert result.stderr == (
        f"onnxpipe: warning: --threads {HUGE}: only {USABLE} CPU(s) usable here; using {USABLE} threads\n"
    )
    assert threads_seen["load_model"][-1] == USABLE and threads_seen["session"][-1] == USABLE


def test_threads_within_the_cpus_are_kept_without_a_word(exported, threads_seen):
    result = _invoke(
        "classify",
        "-m",
        exported("bert", "text-classification"),
        "--device",
        "cpu",
        "--threads",
        USABLE,
        input="good movie\n",
    )
    assert result.exit_code == 0 and result.stderr == ""
    assert threads_seen["session"] == [USABLE]


def test_eval_takes_threads_and_caps_them(exported, threads_seen, tmp_path):
    data = tmp_path / "eval.tsv"
    folder = exported("bert", "text-classification")
    labels = json.loads((folder / "onnxpipe.json").read_text())["labels"]
    data.write_text(f"text\tlabel\ngood movie\t{labels[0]}\nbad film\t{labels[-1]}\n")
    result = _invoke("eval", "-m", folder, "--device", "cpu", "--threads", HUGE, "--json", data)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["metrics"]
    assert _warnings(result.stderr) == [
        f"onnxpipe: warning: --threads {HUGE}: only {USABLE} CPU(s) usable here; using {USABLE} threads"
    ]
    assert threads_seen["session"] and set(threads_seen["session"]) == {USABLE}


def test_bench_reports_the_capped_threads(exported):
    result = _invoke(
        "bench",
        "-m",
        exported("bert", "text-classification"),
        "-b",
        "1",
        "-s",
        "4",
        "--repeat",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--threads",
        HUGE,
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["threads"] == USABLE
    assert len(_warnings(result.stderr)) == 1 and f"--threads {HUGE}" in result.stderr


def test_the_api_caps_threads_with_a_runtime_warning_and_prints_nothing(exported, capfd):
    folder = exported("bert", "text-classification")
    with pytest.warns(RuntimeWarning, match=f"threads={HUGE}: only {USABLE} CPU"):
        pipe = onnxpipe.load(folder, device="cpu", threads=HUGE)
    assert pipe.threads == USABLE
    assert pipe.model.session().get_session_options().intra_op_num_threads == USABLE
    assert pipe(["good movie"])[0].label
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the CPUs: no warning at all
        assert onnxpipe.load(folder, device="cpu", threads=1).threads == 1
    for bad in (0, -2, 1.5, "4", True):
        with pytest.raises(UsageError, match="threads must be a positive int"):
            onnxpipe.load(folder, device="cpu", threads=bad)
    assert capfd.readouterr() == ("", "")


# --- --num-beams / --num-return-sequences ------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "translate", "summarize", "eval"])
@pytest.mark.parametrize("flag", ["--num-beams", "--num-return-sequences"])
def test_too_many_beams_are_one_line_before_the_model_loads(command, flag, tmp_path):
    from onnxpipe.decoding.config import MAX_NUM_BEAMS

    extra = [str(tmp_path / "data.tsv")] if command == "eval" else []
    result = _invoke(command, "-m", tmp_path / "no-such-export", flag, MAX_NUM_BEAMS + 1, *extra)
    assert result.exit_code == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr == (
        f"onnxpipe: error: {flag} {MAX_NUM_BEAMS + 1}: at most {MAX_NUM_BEAMS} (each beam "
        "keeps its own cache and a vocabulary of scores per step)\n"
    )


def test_the_beam_bound_is_inclusive_and_runs(exported):
    from onnxpipe.decoding.config import MAX_NUM_BEAMS

    result = _invoke(
        "generate",
        "-m",
        exported("gpt2"),
        "--device",
        "cpu",
        "--threads",
        "1",
        "-p",
        "Paris is",
        "--max-new-tokens",
        "2",
        "--num-beams",
        MAX_NUM_BEAMS,
        "--num-return-sequences",
        MAX_NUM_BEAMS,
        "--format",
        "jsonl",
    )
    assert result.exit_code == 0, result.stderr
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(record["sequences"]) == MAX_NUM_BEAMS


def test_the_api_refuses_too_many_beams(exported):
    pipe = onnxpipe.load(exported("gpt2"), device="cpu", threads=1)
    with pytest.raises(UsageError, match=r"num_beams \(65\) must be between 1 and 64"):
        pipe("Paris is", num_beams=65, max_new_tokens=2)


# --- generation stopped by the model's positions ------------------------------------------------


def test_generate_counts_the_records_cut_at_the_last_position(exported, checkpoint):
    import transformers

    ckpt = checkpoint("gpt2")
    positions = transformers.AutoConfig.from_pretrained(ckpt).n_positions
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    long = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)
    ids = tokenizer(long)["input_ids"]
    long = tokenizer.decode(ids[: positions - 5])  # leaves 5 positions, fewer than --max-new-tokens
    prompt_tokens = len(tokenizer(long)["input_ids"])
    assert prompt_tokens < positions - 1
    result = _invoke(
        "generate",
        "-m",
        exported("gpt2"),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--format",
        "jsonl",
        "--max-new-tokens",
        "20",
        input=f"Paris is\n{long}\n{long}\nShort.\n",
    )
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records[1]["prompt_tokens"] == prompt_tokens
    assert [r["generated_tokens"] for r in records] == [20, positions - prompt_tokens, positions - prompt_tokens, 20]
    assert [r["finish_reason"] for r in records] == ["length"] * 4
    assert _warnings(result.stderr) == [
        f"onnxpipe: warning: 2 record(s) stopped at the model's {positions} positions (prompt + completion), "
        "before max_new_tokens 20"
    ]


def test_generate_says_nothing_when_the_positions_suffice(exported):
    result = _invoke(
        "generate",
        "-m",
        exported("gpt2"),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--max-new-tokens",
        "8",
        input="Paris is\nShort.\n",
    )
    assert result.exit_code == 0 and result.stderr == ""


@pytest.mark.parametrize(
    ("arch", "command", "why"),
    [
        ("t5", "translate", "(relative positions: onnxpipe's bound, the model's input length)"),
        ("bart", "summarize", "({limit1} positions, the start token included)"),
    ],
)
def test_seq2seq_states_its_decoder_limit(arch, command, why, exported, checkpoint):
    import transformers

    ckpt = checkpoint(arch)
    config = transformers.AutoConfig.from_pretrained(ckpt)
    if arch == "t5":  # no position table: the bound is the input limit, model_max_length
        limit = transformers.AutoTokenizer.from_pretrained(ckpt).model_max_length
    else:
        limit = config.max_position_embeddings
    request = limit + 50
    # --min-length bans the end of text, so every output runs into the limit.
    result = _invoke(
        command,
        "-m",
        exported(arch),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--format",
        "jsonl",
        "--num-beams",
        "1",
        "--max-new-tokens",
        request,
        "--min-length",
        request,
        input="a short line\n\nanother one\n",
    )
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["generated_tokens"] for r in records] == [limit - 1, 0, limit - 1]
    assert _warnings(result.stderr) == [
        f"onnxpipe: warning: 2 record(s) stopped at {arch}'s limit of {limit - 1} decoder tokens "
        + why.format(limit1=limit)
        + f", before max_new_tokens {request}"
    ]
    within = _invoke(
        command,
        "-m",
        exported(arch),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--num-beams",
        "1",
        "--max-new-tokens",
        limit - 1,
        "--min-length",
        limit,
        input="a short line\n",
    )
    assert within.exit_code == 0 and within.stderr == ""


def test_eval_reports_outputs_stopped_at_the_decoder_limit(exported, checkpoint, tmp_path):
    import transformers

    limit = transformers.AutoTokenizer.from_pretrained(checkpoint("t5")).model_max_length
    (tmp_path / "src.txt").write_text("a short line\nanother one\n")
    (tmp_path / "ref.txt").write_text("eine kurze Zeile\nnoch eine\n")
    result = _invoke(
        "eval",
        "-m",
        exported("t5"),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--num-beams",
        "1",
        "--max-new-tokens",
        limit + 10,
        "--min-length",
        limit + 10,
        "--json",
        tmp_path / "src.txt",
        "--references",
        tmp_path / "ref.txt",
    )
    assert result.exit_code == 0, result.stderr
    expected = (
        f"2 output(s) stopped at t5's limit of {limit - 1} decoder tokens (relative positions: onnxpipe's "
        f"bound, the model's input length), before max_new_tokens {limit + 10}"
    )
    assert json.loads(result.stdout)["warnings"] == [expected]
    assert _warnings(result.stderr) == [f"onnxpipe: warning: {expected}"]
