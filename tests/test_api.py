"""The Python API (`onnxpipe.load`): one result per input, in order, and each result's to_dict() is
exactly the record the CLI's --format jsonl writes for the same line and options."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

import onnxpipe
from onnxpipe.errors import InputError, ModelNotFoundError, UsageError
from onnxpipe.main import cli

LINES = [
    "A good movie with a great cast.",
    "",
    "Paris is the capital of France.",
    "Short.",
    "The quick brown fox jumps over the lazy dog, again and again and again.",
]
MASKED = ["The capital of France is [MASK].", "", "A [MASK] movie.", "[MASK] [MASK] fox."]

# family -> (arch, export task, CLI arguments, API options, inputs)
CASES = {
    "classify": ("bert", "text-classification", ["--top-k", "2"], {"top_k": 2}, LINES),
    "embed": ("distilbert", "feature-extraction", ["--pooling", "cls"], {"pooling": "cls"}, LINES),
    "tag": ("roberta", "token-classification", ["--aggregation", "first"], {"aggregation": "first"}, LINES),
    "fill-mask": ("bert", "fill-mask", ["-k", "3"], {"top_k": 3}, MASKED),
    "generate": (
        "gpt2",
        None,
        ["--max-new-tokens", "6", "--num-beams", "2"],
        {"max_new_tokens": 6, "num_beams": 2},
        LINES,
    ),
    "translate": ("marian", None, ["--max-new-tokens", "6"], {"max_new_tokens": 6}, LINES),
    "summarize": (
        "bart",
        None,
        ["--max-new-tokens", "6", "--num-beams", "2"],
        {"max_new_tokens": 6, "num_beams": 2},
        LINES,
    ),
}


def _cli_records(command: str, folder, args: list[str], lines: list[str]) -> list[dict]:
    result = CliRunner().invoke(
        cli,
        [command, "-m", str(folder), "--device", "cpu", "--format", "jsonl", *args],
        input="".join(f"{line}\n" for line in lines),
    )
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("family", list(CASES))
def test_api_results_are_the_cli_records(family, exported):
    arch, export_task, cli_args, options, lines = CASES[family]
    folder = exported(arch, export_task)
    pipe = onnxpipe.load(str(folder), device="cpu", threads=1, task=family if family == "summarize" else None)
    assert pipe.task == family and pipe.provider == "CPUExecutionProvider"
    results = pipe(lines, **options)
    assert [r.text for r in results] == lines
    assert [r.to_dict() for r in results] == _cli_records(family, folder, cli_args, lines)
    # One text in, one result out; alone or in a batch, the same record (batching never changes a result).
    alone = pipe(lines[2], **options)
    assert isinstance(alone, onnxpipe.Result)
    assert _same(alone.to_dict(), results[2].to_dict())
    # stream(): any iterable (a generator here), the same results in the same order.
    assert [r.to_dict() for r in pipe.stream(iter(lines), **options)] == [r.to_dict() for r in results]


def _same(a: dict, b: dict) -> bool:
    """Equal, floats within 1e-5 (a different batch pads differently: last-bit float noise)."""
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, list) and x and isinstance(x[0], float):
            if max(abs(p - q) for p, q in zip(x, y)) > 1e-5 or len(x) != len(y):
                return False
        elif isinstance(x, float):
            if abs(x - y) > 1e-5:
                return False
        elif x != y:
            return False
    return True


def test_fields_are_attributes_and_values_are_typed(exported):
    clf = onnxpipe.load(str(exported("bert", "text-classification")), device="cpu")
    good, empty = clf(["great film", ""], top_k=2)
    assert good.label == good.labels[0] and len(good.scores) == 2 and good.value.labels == good.labels
    assert empty.label is None and empty.value is None and empty.error is None
    with pytest.raises(AttributeError, match="no field 'nope'"):
        good.nope  # noqa: B018


def test_generate_chat_equals_the_cli(exported):
    folder = exported("llama")
    gen = onnxpipe.load(folder, device="cpu")
    result = gen("Hello", max_new_tokens=5, chat=True)
    cli_result = _cli_records("generate", folder, ["--chat", "--max-new-tokens", "5"], ["Hello"])[0]
    assert result.to_dict() == cli_result and result.generated_text == cli_result["generated_text"]
    assert result.prompt_tokens > 3  # the template's tokens were added around "Hello"


def test_sampling_settings_imply_sampling_as_the_cli_flags_do(exported):
    folder = exported("gpt2")
    gen = onnxpipe.load(folder, device="cpu")
    api = gen(LINES[:3], max_new_tokens=6, temperature=0.8, seed=3)
    cli_records = _cli_records(
        "generate", folder, ["--max-new-tokens", "6", "--temperature", "0.8", "--seed", "3"], LINES[:3]
    )
    assert [r.to_dict() for r in api] == cli_records
    greedy = gen(LINES[:3], max_new_tokens=6)
    assert [r.to_dict() for r in gen(LINES[:3], max_new_tokens=6, temperature=0.0)] == [r.to_dict() for r in greedy]


def test_errors(exported):
    folder = exported("bert", "fill-mask")
    fill = onnxpipe.load(folder, device="cpu")
    with pytest.raises(InputError, match="mask"):
        fill(["no mask here"])
    lenient = onnxpipe.load(folder, device="cpu", on_error="null")
    (failed,) = lenient(["no mask here"])
    assert failed.error and "mask" in failed.error and failed.to_dict()["error"] == failed.error
    with pytest.raises(UsageError, match="fill-mask takes no option 'temperature'"):
        fill(["[MASK]"], temperature=1.0)
    with pytest.raises(UsageError, match="not a str"):
        fill([b"bytes"])  # type: ignore[list-item]
    with pytest.raises(ModelNotFoundError):
        onnxpipe.load("no-such-export")
    with pytest.raises(UsageError, match="summarize needs a text2text-generation export"):
        onnxpipe.load(folder, task="summarize")


def test_importing_onnxpipe_stays_light():
    code = (
        "import sys, onnxpipe; "
        "print(sorted(m for m in ('onnxruntime', 'numpy', 'tokenizers', 'onnxpipe.api', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_the_cli_writers_receive_the_api_result(exported, monkeypatch):
    """One result model: what --format jsonl writes is the to_dict() of the Result the writer was handed,
    the same class the API returns."""
    from onnxpipe.stream import writers

    seen = []
    real = writers.JsonlWriter.write
    monkeypatch.setattr(writers.JsonlWriter, "write", lambda self, result: (seen.append(result), real(self, result)))
    folder = exported("bert", "text-classification")
    records = _cli_records("classify", folder, ["--top-k", "2"], LINES)
    assert all(type(r) is onnxpipe.Result for r in seen) and len(seen) == len(LINES)
    assert [r.to_dict() for r in seen] == records
    api = onnxpipe.load(folder, device="cpu")(LINES, top_k=2)
    assert [r.to_dict() for r in api] == records
