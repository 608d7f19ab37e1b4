"""Hostile environments, in real subprocesses: closed stdin/stdout/stderr, stdout on a full disk,
an output that cannot be written, signals at start-up and during a run, and hostile JSONL records.

Every case asserts the documented exit status (README "exit status", man/text/common.txt), no
traceback, and exactly one line on stderr when it fails (runs use -q, so only errors speak).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxpipe.main import COMMANDS, cli

PY = sys.executable
MODES = {  # mode -> shell redirections
    "stdin-closed": "<&-",
    "stdout-closed": "<input.txt >&-",
    "stderr-closed": "<input.txt 2>&-",
    "stdout-full": "<input.txt >/dev/full",
}


def _shell(args: list[str], redirect: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """onnxpipe ARGS with REDIRECT; stderr (when open) is captured through a file, stdout likewise."""
    quoted = " ".join(_quote(a) for a in [PY, "-m", "onnxpipe", "-q", *args])
    script = f'{quoted} {redirect}; echo "rc=$?" >&3'
    out, err, rc = cwd / "stdout.txt", cwd / "stderr.txt", cwd / "rc.txt"
    for f in (out, err):
        f.write_bytes(b"")
    with open(out, "wb") as o, open(err, "wb") as e, open(rc, "wb") as r:
        subprocess.run(
            ["bash", "-c", f"exec 3>&{r.fileno()}; {script}"],
            stdout=o,
            stderr=e,
            cwd=cwd,
            pass_fds=(r.fileno(),),
            timeout=300,
            env={**os.environ, **(env or {})},
        )
    code = int(rc.read_text().strip().split("=")[1])
    return subprocess.CompletedProcess(args, code, out.read_text(errors="replace"), err.read_text(errors="replace"))


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(str(arg))


@pytest.fixture(scope="module")
def walk_setup(exported, checkpoint, tmp_path_factory):
    """Exports for every command, an export home holding one, and the input files."""
    root = tmp_path_factory.mktemp("hostile")
    home = root / "home"
    home.mkdir()
    shutil.copytree(exported("bert", "text-classification"), home / "cls")
    (root / "input.txt").write_text("good [MASK] movie\nthe [MASK] movie\n")
    (root / "eval.tsv").write_text("text\tlabel\ngood movie\tpositive\nbad film\tnegative\n")
    (root / "train.tsv").write_text("text\tlabel\n" + "good movie\tpos\nbad film\tneg\n" * 4)
    exports = {
        "cls": home / "cls",
        "emb": exported("distilbert", "feature-extraction"),
        "tag": exported("roberta", "token-classification"),
        "mask": exported("bert", "fill-mask"),
        "gpt2": exported("gpt2"),
        "t5": exported("t5"),
        "qa": exported("bert", "question-answering"),
    }
    return root, home, exports, checkpoint("bert", "feature-extraction")


def _command_args(name: str, exports: dict, source: Path) -> tuple[list[str], bool, bool]:
    """(arguments that reach the command's output, reads stdin, writes stdout)."""
    table = {
        "export": (["export", str(source), "-o", "exp-out", "--force"], False, False),
        "models": (["models"], False, True),
        "info": (["info", "cls"], False, True),
        "verify": (["verify", "cls"], False, True),
        "classify": (["classify", "-m", str(exports["cls"])], True, True),
        "rerank": (["rerank", "-m", str(exports["cls"]), "--query", "q", "--label", "0"], True, True),
        "answer": (["answer", "-m", str(exports["qa"]), "--question", "which movie?"], True, True),
        "embed": (["embed", "-m", str(exports["emb"])], True, True),
        "tag": (["tag", "-m", str(exports["tag"])], True, True),
        "fill-mask": (["fill-mask", "-m", str(exports["mask"])], True, True),
        "generate": (["generate", "-m", str(exports["gpt2"]), "--max-new-tokens", "3"], True, True),
        "translate": (["translate", "-m", str(exports["t5"]), "--max-new-tokens", "3"], True, True),
        "summarize": (["summarize", "-m", str(exports["t5"]), "--max-new-tokens", "3"], True, True),
        "finetune": (
            ["finetune", str(source), "--data", "train.tsv", "--output", "ft-out", "--epochs", "1", "--force"],
            False,
            False,
        ),
        # batch reads its input files and writes shards: no stdin, no stdout
        "batch": (
            ["batch", "classify", "-m", str(exports["cls"]), "input.txt", "--output-dir", "batch-out", "--force"],
            False,
            False,
        ),
        "eval": (["eval", "-m", str(exports["cls"]), "--json", "eval.tsv"], False, True),
        "bench": (
            [
                "bench",
                "-m",
                str(exports["cls"]),
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
                "1",
                "--json",
            ],
            False,
            True,
        ),
        "doctor": (["doctor", "--device", "cpu", "--json"], False, True),
    }
    return table[name]


# export and finetune never touch stdin or stdout and take ~15 s each: one run with all three
# standard streams hostile at once covers them.
HEAVY = ("export", "finetune")


def _cases():
    for name in COMMANDS:
        if name == "serve":
            continue  # runs until stopped: test_serve_with_every_standard_stream_closed
        if name in HEAVY:
            yield name, "all-hostile"
        else:
            for mode in MODES:
                yield name, mode


@pytest.mark.parametrize(("command", "mode"), list(_cases()))
def test_every_command_in_a_hostile_environment(command, mode, walk_setup):
    root, home, exports, source = walk_setup
    args, reads_stdin, writes_stdout = _command_args(command, exports, source)
    redirect = "<&- >/dev/full 2>&-" if mode == "all-hostile" else MODES[mode]
    result = _shell(args, redirect, root, env={"ONNXPIPE_HOME": str(home)})
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr[-2000:]
    should_fail = (mode == "stdin-closed" and reads_stdin) or (
        mode in ("stdout-closed", "stdout-full") and writes_stdout
    )
    if should_fail:
        assert result.returncode == 1, (result.returncode, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnxpipe: error: "), result.stderr
        expected = {"stdin-closed": "stdin", "stdout-closed": "closed", "stdout-full": "No space left on device"}
        assert expected[mode] in lines[0]
    else:
        assert result.returncode == 0, (result.returncode, result.stderr)
        if mode == "stderr-closed" and writes_stdout:
            assert result.stdout.strip()  # the run went on and wrote its results


def test_serve_with_every_standard_stream_closed(walk_setup):
    """The server starts, answers and stops on SIGTERM (exit 0) with stdin, stdout and stderr closed."""
    import socket
    import time
    import urllib.request

    root, home, exports, _ = walk_setup
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = " ".join(_quote(a) for a in [PY, "-m", "onnxpipe", "serve", "-m", str(exports["cls"]), "--port", str(port)])
    proc = subprocess.Popen(["bash", "-c", f"exec {args} <&- >&- 2>&-"], cwd=root, env={**os.environ})
    try:
        deadline, answer = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/classify",
                    data=json.dumps({"model": "cls", "input": ["good movie"]}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                time.sleep(0.5)
        assert answer is not None, f"no answer (exit status {proc.poll()})"
        assert answer["data"][0]["label"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_closed_stderr_does_not_change_the_results(walk_setup):
    root, home, exports, _ = walk_setup
    args = ["classify", "-m", str(exports["cls"]), "--format", "jsonl"]
    normal = _shell(args, "<input.txt", root)
    quiet = _shell(args, "<input.txt 2>&-", root)
    assert normal.returncode == quiet.returncode == 0
    assert quiet.stdout == normal.stdout and len(normal.stdout.splitlines()) == 2


def test_an_output_file_that_cannot_be_written(exported, tmp_path):
    folder = exported("bert", "text-classification")
    for target in (tmp_path / "missing" / "out.txt", "/dev/full"):
        result = CliRunner().invoke(cli, ["-q", "classify", "-m", str(folder), "-o", str(target)], input="good\n")
        assert result.exit_code == 1, result.stderr
        assert result.stderr.count("\n") == 1 and "cannot write" in result.stderr and str(target) in result.stderr


# --- signals ------------------------------------------------------------------------------


def _start_up_script(signum: int) -> str:
    """onnxpipe's entry sequence, with the signal raised at a known start-up moment (after our
    handlers are installed, before click has parsed anything): no timing involved."""
    return (
        "from onnxpipe import signals; signals.install(); import os; "
        f"os.kill(os.getpid(), {int(signum)}); import time; time.sleep(5); "
        "from onnxpipe.main import main; main()"
    )


@pytest.mark.parametrize(
    ("signum", "status", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_a_signal_during_start_up_is_one_line(signum, status, word):
    proc = subprocess.run([PY, "-c", _start_up_script(signum), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == status and proc.stderr == f"onnxpipe: {word}\n" and proc.stdout == ""


def test_sigint_is_taken_even_when_the_parent_ignored_it():
    """A background job of a non-interactive shell inherits SIGINT ignored: `make test &` made the
    Ctrl-C test exit 0 (the signal was ignored, stdin then closed). onnxpipe takes SIGINT anyway."""
    script = (
        "import signal, subprocess, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        f"sys.exit(subprocess.run([sys.executable, '-c', {_start_up_script(signal.SIGINT)!r}]).returncode)"
    )
    proc = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and proc.stderr == "onnxpipe: interrupted\n"


@pytest.mark.parametrize(
    ("signum", "status", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_a_signal_while_the_engine_waits_on_stdin(signum, status, word, exported):
    folder = exported("bert", "text-classification")
    proc = subprocess.Popen(
        [PY, "-m", "onnxpipe", "-q", "classify", "-m", str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # as under `&`
    try:
        proc.stdin.write(b"good movie\n")
        proc.stdin.flush()
        # Loaded, and now blocked on an open stdin (else the run ended early: show why).
        assert proc.stdout.readline().strip(), proc.communicate(timeout=60)[1].decode(errors="replace")[-2000:]
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)  # closes stdin: a lost signal would exit 0 here
    finally:
        proc.kill()
    assert proc.returncode == status, err.decode(errors="replace")[-800:]
    assert err.decode() == f"onnxpipe: {word}\n" and out == b""


# --- hostile JSONL records -------------------------------------------------------------------


def test_hostile_jsonl_records_are_one_bad_record_each(exported):
    big = "9" * 5000
    lines = [
        '{"text": "good", "big": ' + big + ', "huge": 1e400, "small": -2.5e-3}',
        "[1,2]",
        '"str"',
        "3",
        "null",
        '{"text": "x", "v": NaN}',
        '{"text": "x", "v": -Infinity}',
        "[" * 1500 + "]" * 1500,
        '{"text": "x", "d": ' + '{"a": ' * 1200 + "1" + "}" * 1200 + "}",
        '{"text": "after"}',
    ]
    data = "\n".join(lines) + "\n"
    folder = exported("bert", "text-classification")
    result = CliRunner().invoke(
        cli, ["-q", "classify", "-m", str(folder), "--field", "text", "--on-error", "null"], input=data
    )
    assert result.exit_code == 3, result.stderr
    assert "Traceback" not in result.stderr
    out = result.stdout.splitlines()
    assert len(out) == len(lines)
    rows = [json.loads(line, parse_int=str) for line in out]  # Python itself refuses 5,000 digits
    assert out[0].count(big) == 1 and f'"big": {big},' in out[0] and '"huge": 1e400' in out[0]
    assert rows[0]["small"] == -2.5e-3 and rows[0]["label"] and "error" not in rows[0]
    for i in range(1, 9):
        assert rows[i]["input"] == lines[i] and rows[i]["error"], i
    assert "got an array" in rows[1]["error"] and "got a number" in rows[3]["error"]
    assert "NaN is not a JSON number" in rows[5]["error"] and "-Infinity" in rows[6]["error"]
    assert "nested deeper than" in rows[7]["error"] and "nested deeper than" in rows[8]["error"]
    assert rows[9]["text"] == "after" and rows[9]["label"]
    assert "<stdin>:2: expected a JSON object, got an array" in result.stderr


def test_a_bad_tsv_row_keeps_its_input(exported):
    folder = exported("bert", "text-classification")
    result = CliRunner().invoke(
        cli,
        ["-q", "classify", "-m", str(folder), "--column", "2", "--format", "jsonl", "--on-error", "null"],
        input="a\tgood\nonly-one\n",
    )
    assert result.exit_code == 3
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows[1]["input"] == "only-one" and "has 1 column(s)" in rows[1]["error"]


def test_a_recursion_error_in_the_json_parser_is_a_value_error(monkeypatch):
    """The depth guard refuses deep lines before Python's parser sees them; were it ever passed (a
    larger MAX_JSON_DEPTH), the parser's RecursionError must still be one bad record, not the run's end."""
    from onnxpipe.stream import readers

    monkeypatch.setattr(readers, "MAX_JSON_DEPTH", 10**9)
    with pytest.raises(ValueError, match="nested deeper than"):
        readers.loads_record("[" * 100_000 + "]" * 100_000)


def test_a_file_opened_after_start_up_never_takes_a_closed_standard_descriptor(tmp_path):
    """With 0, 1 and 2 closed, the next file opened would get descriptor 0, and whatever a C library
    writes to "stdout" or "stderr" would land in it (an -o FILE, an export's model.onnx). install()
    fills them with /dev/null first; the probe records which descriptor it got."""
    script = (
        "import os, sys; from onnxpipe import signals; signals.install(); "
        "fd = os.open('probe', os.O_WRONLY | os.O_CREAT, 0o644); "
        "os.write(fd, f'{fd} {signals.is_closed(sys.stdin)} {signals.is_closed(sys.stdout)}'.encode())"
    )
    subprocess.run(
        ["bash", "-c", f"{_quote(PY)} -c {_quote(script)} <&- >&- 2>&-"], cwd=tmp_path, timeout=60, check=True
    )
    fd, stdin_closed, stdout_closed = (tmp_path / "probe").read_text().split()
    assert int(fd) > 2 and stdin_closed == stdout_closed == "True"
