"""Man pages: generated from the click definitions, committed, current, complete, and clean roff.

A stale page fails here: change an option's help (or add an option) and forget `make man`, and
test_committed_pages_are_current says which pages to regenerate.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from shell_examples import check_invocation, commands_of, invocations, man_examples

from onnxpipe.main import COMMANDS, cli

REPO = Path(__file__).resolve().parent.parent
MAN = REPO / "man"
SECTIONS = ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXAMPLES", "EXIT STATUS", "ENVIRONMENT", "FILES", "SEE ALSO"]
PAGES = ["onnxpipe", *(f"onnxpipe-{c}" for c in COMMANDS)]
# The macros the generator writes; anything else in a page is a typo or a hand edit.
MACROS = {"TH", "nh", "SH", "PP", "TP", "B", "BR", "IP", "RS", "RE", "nf", "fi"}
ENVIRONMENT = ["ONNXPIPE_HOME", "ONNXPIPE_DEVICE", "ONNXPIPE_TRACEBACK", "NO_COLOR", "HF_HUB_OFFLINE"]


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("man_build", MAN / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _page(name: str) -> str:
    return (MAN / f"{name}.1").read_text(encoding="utf-8")


def test_committed_pages_are_current(build):
    assert build.stale() == [], "man pages are stale: run `make man` and commit man/*.1"


def test_changing_an_option_makes_its_page_stale(build, monkeypatch):
    classify = cli.get_command(None, "classify")
    top_k = next(p for p in classify.params if p.name == "top_k")
    monkeypatch.setattr(top_k, "help", "Keep the K best labels, said differently.")
    assert build.stale() == ["onnxpipe-classify.1"]


def test_a_new_command_needs_a_page(build, monkeypatch, tmp_path):
    for f in MAN.glob("*.1"):
        shutil.copy(f, tmp_path / f.name)
    monkeypatch.setitem(COMMANDS, "models2", COMMANDS["models"])
    pages = build.build()
    assert "onnxpipe-models2.1" in pages
    assert build.stale(pages, tmp_path) == [
        "onnxpipe.1",
        "onnxpipe-models2.1",
    ]  # the new page, and the list in onnxpipe.1
    (tmp_path / "onnxpipe-gone.1").write_text("")
    assert "onnxpipe-gone.1" in build.stale(pages, tmp_path)


def test_check_mode(build, monkeypatch, capsys):
    """`python man/build.py --check` (what a CI step or a hook would run): 0 when current, else 1 and the names."""
    import sys

    proc = subprocess.run([sys.executable, str(MAN / "build.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    monkeypatch.setattr(sys, "argv", ["build.py", "--check"])
    monkeypatch.setattr(build, "stale", lambda pages: ["onnxpipe-classify.1"])
    assert build.main() == 1
    assert "onnxpipe-classify.1 (run: make man)" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help_and_a_page(name):
    command = cli.get_command(None, name)
    assert command.help and command.get_short_help_str(), name
    assert (MAN / f"onnxpipe-{name}.1").is_file(), name
    assert (MAN / "text" / f"onnxpipe-{name}.txt").is_file(), f"man/text/onnxpipe-{name}.txt: EXAMPLES, SEE ALSO"
    run, _ = man_examples(f"onnxpipe-{name}")
    assert any(args[:1] == [name] or name in args for line in run for args in invocations(line)), (
        f"the EXAMPLES of onnxpipe-{name}(1) never run onnxpipe {name}"
    )


@pytest.mark.parametrize("page", PAGES)
def test_page_has_every_section(page):
    text = _page(page)
    found = re.findall(r"^\.SH (.+)$", text, flags=re.M)
    assert [s for s in found if s in SECTIONS] == SECTIONS, found
    env = text[text.index(".SH ENVIRONMENT") :]
    for var in ENVIRONMENT:
        assert var in env, var
    assert ".BR onnxpipe (1)" in text or page == "onnxpipe"


@pytest.mark.parametrize("page", PAGES)
def test_roff_is_clean(page):
    """A lint of what the generator may write, so a bad page fails even where groff is missing."""
    text = _page(page)
    lines = text.split("\n")
    assert lines[0].startswith(f".TH {page.upper()} 1 ")
    assert text.endswith("\n") and not text.endswith("\n\n")
    for number, line in enumerate(lines[:-1], 1):
        where = f"{page}.1:{number}: {line[:60]!r}"
        assert line.strip(), f"{where}: blank line (groff turns it into vertical space)"
        assert line.isascii(), f"{where}: non-ASCII (escape it as \\[uXXXX])"
        assert not line.startswith("'"), where
        assert line == line.rstrip(), f"{where}: trailing space"
        if line.startswith("."):
            assert line[1:].split(" ", 1)[0] in MACROS, f"{where}: unknown macro"
        else:
            # a bare hyphen is a hyphen, not the minus sign of an option; the generator escapes them all
            assert not re.search(r"(?<!\\)-", line), f"{where}: unescaped '-'"


@pytest.mark.skipif(not shutil.which("groff"), reason="groff is not installed (the roff lint above still runs)")
@pytest.mark.parametrize("page", PAGES)
def test_page_renders_without_warnings(page):
    proc = subprocess.run(["groff", "-man", "-ww", "-z", str(MAN / f"{page}.1")], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@pytest.mark.skipif(not shutil.which("man"), reason="man is not installed")
def test_man_renders_the_classify_page():
    proc = subprocess.run(
        ["man", "-l", str(MAN / "onnxpipe-classify.1")],
        capture_output=True,
        text=True,
        env={**os.environ, "MANWIDTH": "80", "MANPAGER": "cat", "PAGER": "cat"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    for section in SECTIONS:
        assert f"\n{section}\n" in out, section
    assert "--top-k K" in out and "cat reviews.txt | onnxpipe classify -m sentiment" in out


@pytest.mark.parametrize("page", PAGES)
def test_examples_use_real_options(page):
    """Every onnxpipe invocation in a page (the examples from man/text and the help text) names real
    commands, options and choices. Running them is test_readme.py's job."""
    run, shown = man_examples(page)
    command = cli if page == "onnxpipe" else cli.get_command(None, page.removeprefix("onnxpipe-"))
    blocks = [b for b in (command.help or "").split("\n\n") if b.strip().startswith("\b")]
    help_lines = [c for b in blocks for c in commands_of("\n".join(b.strip().split("\n")[1:]))]
    problems = []
    for line in run + shown + help_lines:
        for args in invocations(line):
            problems += [f"{line}: {p}" for p in check_invocation(args)]
    assert not problems, problems


def test_the_wheel_installs_the_pages_under_share_man(tmp_path):
    """pip install --prefix P puts every page in P/share/man/man1, where `man` finds it from P/bin."""
    import sys

    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ and egg-info there
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "cli", src / "cli", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(MAN, src / "man", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "wheel").glob("onnxpipe-*.whl")
    prefix = tmp_path / "prefix"
    # pip install --prefix run for this venv would first uninstall the venv's own (editable) onnxpipe:
    # aim it at an empty throwaway environment instead.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "empty")], check=True, timeout=120)
    subprocess.run(
        [
            *pip,
            "--python",
            str(tmp_path / "empty" / "bin" / "python"),
            "install",
            "--no-deps",
            "--no-index",
            "--prefix",
            str(prefix),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    installed = sorted(p.name for p in (prefix / "share" / "man" / "man1").glob("*.1"))
    assert installed == sorted(f"{p}.1" for p in PAGES)
    assert (prefix / "share" / "man" / "man1" / "onnxpipe.1").read_text() == _page("onnxpipe")
    if shutil.which("man"):
        found = subprocess.run(
            ["man", "-w", "onnxpipe-doctor"],
            capture_output=True,
            text=True,
            env={**os.environ, "PATH": f"{prefix / 'bin'}{os.pathsep}{os.environ['PATH']}"},
        )
        assert found.stdout.strip() == str(prefix / "share" / "man" / "man1" / "onnxpipe-doctor.1")
