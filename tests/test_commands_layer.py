"""The commands layer: no command imports a sibling command, the registry drives the task lists,
and the decoding flags' two spellings of a length mean what transformers means by them."""

from __future__ import annotations

import ast
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import onnxpipe.commands
from onnxpipe import registry
from onnxpipe.main import cli

COMMANDS = Path(onnxpipe.commands.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_no_command_imports_a_sibling_command():
    commands = {f"onnxpipe.commands.{p.stem}" for p in COMMANDS.glob("*.py") if not p.stem.startswith("_")}
    assert "onnxpipe.commands.translate" in commands and "onnxpipe.commands.info" in commands
    offenders = {
        p.name: sorted(_imported_modules(p) & (commands - {f"onnxpipe.commands.{p.stem}"}))
        for p in COMMANDS.glob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def _command(name: str) -> click.Command:
    ctx = click.Context(cli)
    command = cli.get_command(ctx, name)
    assert command is not None
    return command


def test_export_task_choices_are_the_registry_export_tasks(monkeypatch):
    task = next(p for p in _command("export").params if p.name == "task")
    assert tuple(task.type.choices) == registry.export_tasks()
    assert set(registry.export_tasks()) == {t for f in registry.FAMILIES.values() for t in f.export_tasks}
    from onnxpipe.export import tasks
    from onnxpipe.measure import speed

    assert tasks.TASKS == speed.TASKS == registry.export_tasks()
    assert tasks.FAMILY == {
        "text-classification": "encoder",
        "token-classification": "encoder",
        "feature-extraction": "encoder",
        "fill-mask": "encoder",
        "question-answering": "encoder",
        "text-generation": "decoder",
        "text2text-generation": "seq2seq",
    }


@pytest.mark.parametrize("name", sorted(registry.FAMILIES))
def test_each_command_checks_its_export_against_the_registry(name, monkeypatch):
    """A family's command refuses an export of another task, and the message comes from the registry's list."""
    from onnxpipe.stream import run

    family = registry.FAMILIES[name]
    seen = {}

    class Stop(Exception):
        pass

    def fake(model_ref, stream, make_task, tasks, **kw):
        seen["tasks"] = tasks
        raise Stop

    monkeypatch.setattr(run, "run_stream_command", fake)
    required = {"rerank": ["--query", "q"]}.get(name, [])  # a command's own required options
    result = CliRunner().invoke(cli, [name, "-m", "x", *required, "-"], input="a\n")
    assert "unexpected Stop" in result.stderr  # the run got as far as the engine's call
    assert seen["tasks"] == family.export_tasks
    # and the task classes name the same tasks (the engine's own checks)
    assert family.load_class().task_names == family.export_tasks


@pytest.mark.parametrize("name", ["generate", "translate", "summarize", "eval"])
def test_decoding_flags_are_one_definition(name):
    from onnxpipe.commands._decoding import DECODING_FLAGS, decoding_names

    params = {p.name: p for p in _command(name).params}
    family = "translate" if name == "eval" else name
    names = decoding_names(family)
    for flag in names:
        reference = DECODING_FLAGS[flag](lambda: None).__click_params__[0]
        assert params[flag].opts == reference.opts and params[flag].help == reference.help
    assert {"max_new_tokens", "min_new_tokens", "min_length"} <= set(names)
    if family != "generate":
        assert "max_length" in names


def test_decoding_overrides_share_the_api_sampling_rule():
    from onnxpipe.commands._decoding import decoding_overrides

    assert decoding_overrides({"temperature": 0.7, "do_sample": None})["do_sample"] is True
    assert decoding_overrides({"temperature": 0.0, "do_sample": True}) == {"temperature": None, "do_sample": False}
    assert decoding_overrides({"top_p": 1.0, "do_sample": None})["do_sample"] is None
    assert decoding_overrides({"early_stopping": "never"}) == {"early_stopping": "never"}
    assert decoding_overrides({"early_stopping": None}) == {"early_stopping": None}


def test_npy_writer_header_is_numpys_and_rewritten_with_the_row_count(tmp_path):
    """numpy.load reads the file (shape, NaN rows for empty records), and the header bytes are numpy's own."""
    import io

    import numpy as np
    from numpy.lib import format as npy_format

    from onnxpipe.stream.records import Record, Result
    from onnxpipe.stream.writers import NpyWriter

    class Vectors:
        def to_vector(self, result):
            return result

    path = tmp_path / "v.npy"
    rows = [None] + [np.arange(5, dtype=np.float32) * i for i in range(1, 1200)] + [None]
    with open(path, "w+b") as stream:
        writer = NpyWriter(stream, Vectors())
        for i, row in enumerate(rows):
            writer.write(Result(Record(seq=i, text="x", source="-", line=i + 1), row, None, writer.task))
        writer.close()
    got = np.load(path)
    assert got.shape == (1201, 5) and got.dtype == np.float32
    assert np.isnan(got[0]).all() and np.isnan(got[-1]).all()
    np.testing.assert_array_equal(got[1:-1], np.stack(rows[1:-1]))
    expected = io.BytesIO()
    npy_format.write_array_header_1_0(expected, {"descr": "<f4", "fortran_order": False, "shape": (1201, 5)})
    assert path.read_bytes()[: len(expected.getvalue())] == expected.getvalue()
