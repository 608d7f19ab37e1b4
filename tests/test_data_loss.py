"""`onnxpipe export` never deletes what is not its own: --force, the source, symlinks, stale temporaries.

Every refusal is one line on stderr before anything is written, and the victim's files are
compared byte for byte afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxpipe.main import cli


def run(*args: str, **kw):
    return CliRunner().invoke(cli, list(args), **kw)


def assert_one_line(result, exit_code: int, *fragments: str) -> str:
    """Exactly one line on stderr, the error; nothing on stdout; no traceback."""
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxpipe: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every file (bytes) and link (target) under FOLDER, links not followed."""
    found: dict[str, bytes | str] = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                found[rel] = path.read_bytes()
    return found


@pytest.fixture
def victim(tmp_path) -> Path:
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "notes.txt").write_bytes(b"precious\n\x00\xff")
    return folder


# --- --force replaces an export and nothing else ------------------------------------------


def test_force_refuses_a_folder_that_is_not_an_export(checkpoint, victim):
    before = snapshot(victim)
    for flags in (["--force"], []):
        result = run("export", str(checkpoint("bert")), "-o", str(victim), *flags)
        assert_one_line(result, 2, "holds 1 file that is not an onnxpipe export (notes.txt)", "refusing")
        assert snapshot(victim) == before
    assert [p.name for p in victim.parent.iterdir()] == ["victim"]  # no temporary left beside it


def test_force_refuses_a_folder_with_a_foreign_manifest(checkpoint, victim):
    (victim / "onnxpipe.json").write_text('{"some": "other tool"}')
    before = snapshot(victim)
    result = run("export", str(checkpoint("bert")), "-o", str(victim), "--force")
    assert_one_line(result, 2, "2 files", "not an onnxpipe export", "notes.txt, onnxpipe.json")
    assert snapshot(victim) == before


def test_force_replaces_an_export_but_not_files_added_to_it(checkpoint, exported, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(exported("bert"), out)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    result = run("export", str(checkpoint("bert")), "-o", str(out), "--force")
    assert_one_line(result, 2, "onnxpipe did not write (notes.txt)")
    assert snapshot(out) == before
    (out / "notes.txt").unlink()
    result = run("-q", "export", str(checkpoint("bert")), "-o", str(out), "--force")
    assert result.exit_code == 0, result.output
    assert json.loads(before["onnxpipe.json"])["name"] == "bert-default"
    assert json.loads((out / "onnxpipe.json").read_text())["name"] == "o"  # replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_an_empty_folder_is_used(checkpoint, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    result = run("-q", "export", str(checkpoint("bert")), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "onnxpipe.json").is_file()


def test_a_symlinked_target_is_refused_and_its_tree_kept(checkpoint, exported, tmp_path, victim):
    real = tmp_path / "real-export"
    shutil.copytree(exported("bert"), real)
    for target in (real, victim):
        link = tmp_path / f"link-to-{target.name}"
        link.symlink_to(target)
        before = snapshot(target)
        result = run("export", str(checkpoint("bert")), "-o", str(link), "--force")
        assert_one_line(result, 2, "is a symbolic link", "refusing")
        assert link.is_symlink() and snapshot(target) == before
    assert not [p for p in tmp_path.iterdir() if ".onnxpipe-tmp-" in p.name]


# --- the source checkpoint --------------------------------------------------------------


@pytest.mark.parametrize("where", ["itself", "inside", "parent"])
def test_output_that_is_inside_or_holds_the_source_is_refused(checkpoint, tmp_path, where):
    parent = tmp_path / "work"
    source = parent / "ckpt"
    shutil.copytree(checkpoint("bert"), source)
    before = snapshot(parent)
    output = {"itself": source, "inside": source / "onnx", "parent": parent}[where]
    result = run("export", str(source), "-o", str(output), "--force")
    fragment = {"itself": " is the source", "inside": "is inside the source", "parent": "holds the source"}[where]
    assert_one_line(result, 2, fragment, "refusing")
    assert snapshot(parent) == before


def test_gguf_file_inside_the_output_is_refused(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    gguf = folder / "tiny.gguf"
    gguf.write_bytes(b"GGUF not really")
    result = run("export", str(gguf), "-o", str(folder), "--force")
    assert_one_line(result, 2, "holds the source", "refusing")
    assert gguf.read_bytes() == b"GGUF not really"


def test_output_dot_is_refused_unless_it_is_an_export(checkpoint, victim, tmp_path, monkeypatch):
    monkeypatch.chdir(victim)
    before = snapshot(victim)
    result = run("export", str(checkpoint("bert")), "-o", ".", "--force")
    assert_one_line(result, 2, "the current folder", "notes.txt", "refusing")
    assert snapshot(victim) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    result = run("export", str(checkpoint("bert")), "-o", ".")
    assert_one_line(result, 2, "is the current folder", "refusing")
    assert list(empty.iterdir()) == []


# --- stale temporaries and signals ------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_processes_are_removed_links_unlinked(checkpoint, tmp_path, victim):
    home = tmp_path / "home"
    home.mkdir()
    dead = _dead_pid()
    stale_dir = home / f".m.onnxpipe-tmp-{dead}-abcd1234"
    (stale_dir / "export").mkdir(parents=True)
    (stale_dir / "export" / "model.onnx").write_bytes(b"half")
    stale_link = home / f".m.onnxpipe-tmp-{dead}-old"
    stale_link.symlink_to(victim)  # a `-old` swap that is a link: unlink it, never follow it
    stale_file_link = home / f".n.onnxpipe-tmp-{dead}-old"
    stale_file_link.symlink_to(victim / "notes.txt")
    alive = home / f".m.onnxpipe-tmp-{os.getppid()}-running"  # a running export's temporary stays
    alive.mkdir()
    before = snapshot(victim)
    result = run("-q", "export", str(checkpoint("bert")), "-o", str(home / "m"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in home.iterdir()) == sorted(["m", alive.name])
    assert snapshot(victim) == before


@pytest.mark.parametrize("way", ["cli", "api"])
def test_sigterm_mid_export_removes_its_temporary(checkpoint, tmp_path, way):
    parent = tmp_path / "exports"
    parent.mkdir()
    out = parent / "termed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = {
        "cli": ["-m", "onnxpipe", "export", str(checkpoint("t5")), "--output", str(out)],
        "api": [
            "-c",
            f"from onnxpipe.export import export_model; export_model({str(checkpoint('t5'))!r}, {str(out)!r})",
        ],
    }[way]
    proc = subprocess.Popen(
        [sys.executable, *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if any(parent.glob(".termed.onnxpipe-tmp-*/export/*.onnx")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the export finished before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(parent.iterdir()) == []  # the temporary went with it
    assert stdout == ""
    if way == "api":  # the library raises KeyboardInterrupt to its caller, after the cleanup
        assert proc.returncode != 0 and stderr.strip().endswith("KeyboardInterrupt"), stderr
        return
    # 130 where export's own handler took SIGTERM, 143 where the CLI's does (onnxpipe.signals): both clean up.
    assert (proc.returncode, stderr.strip().splitlines()[-1]) in (
        (130, "onnxpipe: interrupted"),
        (143, "onnxpipe: terminated"),
    ), stderr
    assert "Traceback" not in stderr


# --- pickled checkpoints ----------------------------------------------------------------


class _Trap:
    """Unpickling this writes a file: what a hostile pytorch_model.bin could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


@pytest.mark.parametrize("layout", ["single", "index"])
def test_pickled_checkpoint_is_refused_unopened(checkpoint, tmp_path, layout):
    import pickle

    source = tmp_path / "ckpt"
    shutil.copytree(checkpoint("bert"), source)
    (source / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    bin_name = "pytorch_model.bin" if layout == "single" else "pytorch_model-00001-of-00001.bin"
    (source / bin_name).write_bytes(pickle.dumps(_Trap(str(marker))))
    if layout == "index":
        (source / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": bin_name}}))
    shown = "pytorch_model.bin" if layout == "single" else "pytorch_model.bin.index.json"
    result = run("-q", "export", str(source), "-o", str(tmp_path / "out"))
    assert_one_line(result, 1, shown, "unsafe pickle checkpoint; convert it to safetensors")
    assert "from_tf" not in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


# --- names and paths --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("", "is empty"),
        ("a\nb", "control character"),
        ("tab\there", "control character"),
        ("bell\x07", "control character"),
        ("x" * 101, "101 characters long; the limit is 100"),
        (".hidden", "starts with '.'"),
        ("a/b", "slash"),
    ],
)
def test_bad_export_names_are_refused(checkpoint, name, fragment):
    result = run("export", str(checkpoint("bert")), "--name", name)
    assert_one_line(result, 2, "--name", fragment)
    home = Path(os.environ["ONNXPIPE_HOME"])
    assert not home.exists() or list(home.iterdir()) == []


def test_a_name_of_100_characters_is_fine(checkpoint):
    name = "n" * 100
    result = run("-q", "export", str(checkpoint("bert")), "--name", name)
    assert result.exit_code == 0, result.output
    assert run("info", "--json", name + "/").exit_code == 0  # a trailing slash finds it too


def test_a_path_component_too_long_for_the_file_system_is_one_line(checkpoint, tmp_path):
    result = run("export", str(checkpoint("bert")), "-o", str(tmp_path / ("a" * 300)))
    assert_one_line(result, 2, "longer than the file system allows")
    assert list(tmp_path.iterdir()) == []
    result = run("info", str(tmp_path / ("a" * 300)))
    assert_one_line(result, 1, "cannot use")


def test_an_unwritable_output_folder_is_one_line(checkpoint, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = run("export", str(checkpoint("bert")), "-o", str(locked / "out"))
        assert_one_line(result, 1, "cannot write into", "Permission denied")
    finally:
        locked.chmod(0o700)


# --- --validate-with ---------------------------------------------------------------------


def test_validate_with_cuts_long_lines_and_caps_their_number(tmp_path):
    from onnxpipe.export.core import VALIDATION_LINE_CHARS, VALIDATION_LINES, _validation_texts

    path = tmp_path / "big.txt"
    with open(path, "w", encoding="utf-8") as f:
        f.write("é" * (20 << 20) + "\n")  # a 20 M-character line (40 MB of UTF-8)
        f.write("short line\n\n")
        for i in range(1000):
            f.write(f"line {i}\n")
    texts, note = _validation_texts(path)
    assert len(texts) == VALIDATION_LINES
    assert texts[0] == "é" * VALIDATION_LINE_CHARS and texts[1] == "short line" and texts[2] == "line 0"
    assert texts[-1] == f"line {VALIDATION_LINES - 3}"
    assert note.endswith(f"+ {VALIDATION_LINES} lines of big.txt, 1 cut to 16,000 characters")


def test_validate_with_a_device_or_an_endless_line_is_bounded(tmp_path, monkeypatch):
    import onnxpipe.export.core as core

    with pytest.raises(core.UsageError, match="not a regular file"):
        core._validation_texts("/dev/zero")
    monkeypatch.setattr(core, "VALIDATION_BYTES", 1 << 20)
    path = tmp_path / "endless.txt"
    path.write_bytes(b"x" * (3 << 20) + b"\nnever read\n")
    texts, note = core._validation_texts(path)
    assert texts == ["x" * core.VALIDATION_LINE_CHARS] and "1 cut" in note


def test_validate_with_a_20mb_line_exports(checkpoint, tmp_path):
    path = tmp_path / "huge.txt"
    path.write_text("a good movie " * ((20 << 20) // 13) + "\nthe worst film\n", encoding="utf-8")
    result = run("-q", "export", str(checkpoint("bert")), "-o", str(tmp_path / "o"), "--validate-with", str(path))
    assert result.exit_code == 0, result.output
    inputs = json.loads((tmp_path / "o" / "onnxpipe.json").read_text())["validation"]["inputs"]
    assert "2 lines of huge.txt, 1 cut to 16,000 characters" in inputs
