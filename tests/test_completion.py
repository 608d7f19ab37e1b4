"""Everyday comfort: shell completion (export names for -m), the root options and environment defaults
meaning the same for every command, and plain stderr without a terminal or with NO_COLOR."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxpipe import console
from onnxpipe.main import COMMANDS, cli

ROOT_OPTIONS = {"-v", "--verbose", "-q", "--quiet", "--traceback", "--version"}


def _fake_export(home: Path, name: str, task: str) -> None:
    (home / name).mkdir(parents=True)
    (home / name / "onnxpipe.json").write_text(json.dumps({"format": 1, "name": name, "task": task}))


@pytest.fixture
def home(tmp_path) -> Path:
    """The export home of conftest's _isolated_home, with two exports and two folders that are not."""
    home = Path(os.environ["ONNXPIPE_HOME"])
    _fake_export(home, "sentiment", "text-classification")
    _fake_export(home, "minilm", "feature-extraction")
    (home / "notes").mkdir()  # no manifest: not an export
    _fake_export(home, ".sentiment2.onnxpipe-tmp-1-x", "text-classification")  # an unfinished export
    return home


def _complete(shell: str, words: str, cword: str | None = None) -> list[str]:
    env = {
        "_ONNXPIPE_COMPLETE": f"{shell}_complete",
        "COMP_WORDS": words,
        "COMP_CWORD": cword if cword is not None else str(len(words.split()) - (0 if words.endswith(" ") else 1)),
    }
    result = CliRunner().invoke(cli, [], env=env, prog_name="onnxpipe")
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


@pytest.mark.parametrize("command", ["classify", "embed", "generate", "translate", "bench", "serve"])
def test_model_option_completes_the_export_names(home, command):
    if command not in COMMANDS:
        pytest.skip(f"{command} is not a command here")
    assert _complete("bash", f"onnxpipe {command} -m ") == ["plain,minilm", "plain,sentiment"]
    assert _complete("bash", f"onnxpipe {command} --model s") == ["plain,sentiment"]


def test_every_model_reference_completes(home):
    assert _complete("bash", "onnxpipe info ") == ["plain,minilm", "plain,sentiment"]
    assert _complete("bash", "onnxpipe eval -m sentiment --against m") == ["plain,minilm"]


def test_zsh_and_fish_get_the_task_as_description(home):
    assert _complete("zsh", "onnxpipe classify -m ") == [
        "plain",
        "minilm",
        "feature-extraction",
        "plain",
        "sentiment",
        "text-classification",
    ]
    # fish passes the word being completed itself as COMP_CWORD
    assert _complete("fish", "onnxpipe classify -m ", cword="") == [
        "plain,minilm\tfeature-extraction",
        "plain,sentiment\ttext-classification",
    ]


def test_a_path_or_no_match_completes_folders(home):
    assert _complete("bash", "onnxpipe classify -m ./") == ["dir,./"]
    assert _complete("bash", "onnxpipe classify -m zzz") == ["dir,zzz"]


def test_completion_without_an_export_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXPIPE_HOME", str(tmp_path / "does-not-exist"))
    assert _complete("bash", "onnxpipe classify -m ") == ["dir,"]


def test_command_names_and_choices_complete():
    names = [line.split(",", 1)[1] for line in _complete("bash", "onnxpipe ")]
    assert names == list(COMMANDS)
    assert _complete("bash", "onnxpipe classify --format j") == ["plain,jsonl"]


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(shell):
    result = CliRunner().invoke(cli, [], env={"_ONNXPIPE_COMPLETE": f"{shell}_source"}, prog_name="onnxpipe")
    assert result.exit_code == 0
    assert "_onnxpipe_completion" in result.stdout and "_ONNXPIPE_COMPLETE" in result.stdout


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
def test_bash_completion_end_to_end(home):
    """The script that README tells people to eval, driven the way bash drives it."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "onnxpipe").exists():
        pytest.skip("the onnxpipe console script is not installed next to this Python")
    script = (
        'eval "$(_ONNXPIPE_COMPLETE=bash_source onnxpipe)"\n'
        "complete -p onnxpipe\n"
        'COMP_WORDS=(onnxpipe classify -m ""); COMP_CWORD=3\n'
        "_onnxpipe_completion onnxpipe\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("complete ") and lines[0].endswith(" onnxpipe")
    assert lines[1:] == ["minilm", "sentiment"]


# --- the same meaning everywhere ------------------------------------------------------------


def _commands():
    return [(name, cli.get_command(None, name)) for name in COMMANDS]


def test_root_options_are_not_redefined_by_any_command():
    """-v, -q and --traceback belong to the root group (onnxpipe -q classify ...), so no command shadows them."""
    for name, command in _commands():
        clash = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)} & ROOT_OPTIONS
        assert not clash, (name, clash)


def test_every_device_option_reads_onnxpipe_device():
    for name, command in _commands():
        for p in command.params:
            # doctor's --device names what must work (default cuda), export's the device an export is for: neither
            # is where this run goes, so neither follows the environment's device
            if p.name == "device" and name not in ("doctor", "export"):
                assert p.envvar == "ONNXPIPE_DEVICE", name
                assert "ONNXPIPE_DEVICE" in (p.help or ""), name


def test_onnxpipe_device_is_the_default(monkeypatch, home):
    monkeypatch.setenv("ONNXPIPE_DEVICE", "tpu")
    result = CliRunner().invoke(cli, ["classify", "-m", "sentiment"], input="a\n")
    assert result.exit_code == 2
    assert "unknown device 'tpu'" in result.stderr


def test_traceback_flag_and_environment(monkeypatch):
    plain = CliRunner().invoke(cli, ["info", "nope"])
    assert plain.exit_code == 1 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    flagged = CliRunner().invoke(cli, ["--traceback", "info", "nope"])
    assert type(flagged.exception).__name__ == "ModelNotFoundError"
    monkeypatch.setenv("ONNXPIPE_TRACEBACK", "1")
    assert type(CliRunner().invoke(cli, ["info", "nope"]).exception).__name__ == "ModelNotFoundError"


def test_quiet_silences_status_lines_of_every_kind(home):
    empty = Path(os.environ["ONNXPIPE_HOME"]).parent / "empty"
    loud = CliRunner().invoke(cli, ["models"], env={"ONNXPIPE_HOME": str(empty)})
    assert loud.exit_code == 0 and "no exports" in loud.stderr
    quiet = CliRunner().invoke(cli, ["-q", "models"], env={"ONNXPIPE_HOME": str(empty)})
    assert quiet.exit_code == 0 and quiet.stderr == ""


@pytest.fixture
def fresh_console(monkeypatch):
    console.stderr.cache_clear()
    yield
    console.stderr.cache_clear()


def test_no_color_gives_plain_stderr_even_on_a_terminal(monkeypatch, capsys, fresh_console):
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    console.warn("careful")
    err = capsys.readouterr().err
    assert err == "onnxpipe: warning: careful\n"


def test_a_stderr_that_is_not_a_terminal_gets_plain_text(monkeypatch, fresh_console):
    monkeypatch.delenv("NO_COLOR", raising=False)
    proc = subprocess.run(
        [sys.executable, "-m", "onnxpipe", "models"],
        capture_output=True,
        text=True,
        env={**os.environ, "ONNXPIPE_HOME": str(Path(os.environ["ONNXPIPE_HOME"]) / "none")},
    )
    assert proc.returncode == 0
    assert "no exports" in proc.stderr and "\x1b[" not in proc.stderr
