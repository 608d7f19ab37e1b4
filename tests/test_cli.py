"""The root command: help, version, start-up cost, error mapping."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from onnxpipe.main import COMMANDS, cli

HEAVY = ("torch", "transformers", "optimum")


def test_help_lists_every_command():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.stdout


def test_every_command_has_help():
    runner = CliRunner()
    for name in COMMANDS:
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage:" in result.stdout
        command = cli.get_command(None, name)
        summary = command.get_short_help_str(limit=200)  # what `onnxpipe --help` lists beside the name
        assert command.help and len(summary.split()) >= 3 and summary[0].isupper(), (name, summary)
    listing = runner.invoke(cli, ["--help"]).stdout.split("Commands:", 1)[1]
    for name in COMMANDS:  # each listed with its summary, not a bare name
        row = next(line for line in listing.splitlines() if line.split()[:1] == [name])
        assert len(row.split()) >= 3, row


def test_version_names_onnxruntime_and_providers():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("onnxpipe ")
    assert "onnxruntime 1." in result.stdout and "CPUExecutionProvider" in result.stdout


def _imported_modules(*args: str) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "onnxpipe", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_help_imports_no_export_stack():
    for args in (["--help"], *([name, "--help"] for name in COMMANDS)):
        heavy = _imported_modules(*args) & set(HEAVY)
        assert not heavy, (args, heavy)
