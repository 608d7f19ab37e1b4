"""`onnxpipe batch --engine ray`: the plan on Ray Data gives, byte for byte, what the local engine writes
(and so the streaming commands' records), resumes as it does, and fails in one line.

One Ray for the module (`ray.init(num_cpus=2)`, shut down at the end); `run_ray` uses the Ray this process
already runs. Each Ray job costs seconds (actors start and open the export), so each test runs one job
over several shards at once.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest

from onnxpipe.batch.local import BatchSummary
from onnxpipe.batch.plan import plan_job
from onnxpipe.batch.ray_engine import END, FAILURE, RECORD, ShardAssembler
from onnxpipe.errors import OnnxpipeError

HOSTILE_TEXT = (
    b"\xef\xbb\xbfbom first\r\nplain line\n\nx\xffy invalid\nnul\x00here\nline\xe2\x80\xa8sep\rcr inside\n\n"
    b"The quick brown fox jumps over the lazy dog, again and again and again.\nlast without newline"
)
HOSTILE_JSONL = (
    b'{"t": "caf\xc3\xa9", "id": 1}\r\n\n{"t": "a\\u2028b", "id": 3}\n{"t": 5}\nnot json\n'
    b'{"t": "x\xffy", "big": 1e400}\n{"t": "nul\\u0000", "n": [1, {"k": null}]}\n{"other": 1}\n{"t": "good"}'
)
MASKED = b"The capital of France is [MASK].\n\nA [MASK] movie.\r\n[MASK] [MASK] fox.\nno mask here\n"

# family -> (arch, export task, task arguments); the tiny models of tests/test_batch.py
FAMILIES = {
    "classify": ("bert", "text-classification", ["--top-k", "2"]),
    "embed": ("distilbert", "feature-extraction", ["--pooling", "cls"]),
    "tag": ("roberta", "token-classification", ["--aggregation", "first"]),
    "fill-mask": ("bert", "fill-mask", ["-k", "3"]),
    "generate": ("gpt2", None, ["--max-new-tokens", "4", "--num-beams", "2"]),
    "translate": ("marian", None, ["--max-new-tokens", "4"]),
    "summarize": ("bart", None, ["--max-new-tokens", "4"]),
}


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module: 2 CPUs, no dashboard, workers' output not forwarded."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        yield ray
    finally:
        ray.shutdown()


def _invoke(args: list[str]):
    from click.testing import CliRunner

    from onnxpipe.main import cli

    return CliRunner().invoke(cli, args)


def _batch(family: str, model: Path, args: list[str], inputs: list, out: Path, *more: str):
    return _invoke(
        [
            "batch",
            family,
            "-m",
            str(model),
            "--device",
            "cpu",
            *args,
            *map(str, inputs),
            "--output-dir",
            str(out),
            *more,
        ]
    )


def _shards(out: Path) -> dict[str, bytes]:
    """Every output shard and _SUCCESS, by path (the manifest, which names the engine, aside)."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in ("onnxpipe-batch.json", ".onnxpipe-batch.lock")
    }


def _stream_records(family: str, model: Path, args: list[str], path: Path, *extra: str) -> list[dict]:
    result = _invoke([family, "-m", str(model), "--device", "cpu", "--format", "jsonl", *args, *extra, str(path)])
    assert result.exit_code in (0, 3), result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def _rows(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


# --- every family: Ray writes what local writes, and that is the streaming command's records ----


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ray_writes_the_local_engines_shards_and_the_streaming_records(
    family, ray_session, exported, tmp_path, monkeypatch
):
    arch, export_task, args = FAMILIES[family]
    model = exported(arch, export_task)
    monkeypatch.chdir(tmp_path)
    Path("in/sub").mkdir(parents=True)
    Path("in/hostile.txt").write_bytes(MASKED if family == "fill-mask" else HOSTILE_TEXT)
    Path("in/sub/rows.jsonl").write_bytes(HOSTILE_JSONL)
    Path("in/empty.txt").write_bytes(b"")
    more = ["--field", "t", "--on-error", "null"]
    local = _batch(family, model, args + more, ["in"], tmp_path / "local")
    ray = _batch(family, model, args + more, ["in"], tmp_path / "ray", "--engine", "ray", "--actors", "2")
    assert local.exit_code == 3, local.output  # --on-error null: the malformed JSONL lines failed
    assert ray.exit_code == 3, ray.output
    assert ray.stdout == ""
    assert "3 shard(s) done, 0 skipped" in ray.stderr
    assert ray.stderr.splitlines()[-1].split(" in ")[0] == local.stderr.splitlines()[-1].split(" in ")[0]
    assert _shards(tmp_path / "ray") == _shards(tmp_path / "local")
    assert sorted(_shards(tmp_path / "ray")) == [
        "_SUCCESS",
        "empty.txt.jsonl",
        "hostile.txt.jsonl",
        "sub/rows.jsonl.jsonl",
    ]
    # and those records are the streaming command's, plus _source and _line
    for name, extra in (("hostile.txt", ()), ("sub/rows.jsonl", ("--field", "t"))):
        rows = _rows((tmp_path / "ray" / f"{name}.jsonl").read_bytes())
        assert [(r.pop("_source"), r.pop("_line")) for r in rows] == [(f"in/{name}", i + 1) for i in range(len(rows))]
        assert rows == _stream_records(family, model, args, Path("in") / name, "--on-error", "null", *extra), name


def test_csv_tsv_parquet_and_many_blocks_come_back_in_input_order(ray_session, exported, tmp_path, monkeypatch):
    """CSV, TSV, Parquet and text shards of many chunks on two actors, Parquet out: the local engine's output."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    model = exported("bert", "text-classification")
    monkeypatch.chdir(tmp_path)
    words = ["good", "bad", "film", "cast", "plot", "dull", "great", "slow", "fun", "long"]
    texts = [" ".join(words[(i * j) % 10] for j in range(1 + i % 13)) for i in range(120)]
    texts[17] = ""
    Path("in").mkdir()
    Path("in/a.csv").write_text("id,body\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(texts)))
    Path("in/b.tsv").write_text("id\tbody\tnote\n" + "".join(f"{i}\t{t}\tn{i}\n" for i, t in enumerate(texts[:30])))
    pq.write_table(pa.table({"id": list(range(120)), "body": texts}), "in/c.parquet", row_group_size=50)
    Path("in/d.txt").write_text("".join(t + "\n" for t in reversed(texts)))
    common = ["--column", "body", "--batch-size", "3", "-k", "2"]
    # Parquet out: the rows travel from the actors as dicts (JSONL lines: the family tests)
    local = _batch("classify", model, common, ["in"], tmp_path / "local", "--output-format", "parquet")
    ray = _batch(
        "classify", model, common, ["in"], tmp_path / "ray", "--output-format", "parquet", "--engine", "ray",
        "--actors", "2",
    )  # fmt: skip
    assert local.exit_code == 0, local.output
    assert ray.exit_code == 0, ray.output
    assert "390 records" in ray.stderr and "4 shard(s) done" in ray.stderr
    for name in ("a.csv", "b.tsv", "c.parquet", "d.txt"):
        got = pq.read_table(tmp_path / f"ray/{name}.parquet").to_pylist()
        assert got == pq.read_table(tmp_path / f"local/{name}.parquet").to_pylist(), name
        assert [r.get("_row", r.get("_line")) for r in got] == list(range(1, len(got) + 1))


def test_each_actor_call_is_one_whole_local_chunk(ray_session, tmp_path, monkeypatch):
    """Records meet in the local engine's chunks (batch size x CHUNK_BATCHES rows from each shard's start),
    so results that depend on their batch-mates in the last bits (beam scores) are the local engine's:
    map_batches' batches must be the read blocks, whole, whatever the shard sizes."""
    import pyarrow as pa

    import onnxpipe.batch.ray_engine as ray_engine
    import onnxpipe.batch.worker as worker
    from onnxpipe.batch.shards import InputSpec

    def probe(options):
        class Probe:  # every row says which call it came in: the call's first (shard, seq) and its size
            def __call__(self, batch):
                rows = batch.to_pylist()
                records = [r for r in rows if r["kind"] == ray_engine.RECORD]
                tag = json.dumps([records[0]["shard"], records[0]["seq"], len(records)] if records else None)
                out = [{**r, "payload": tag.encode()} for r in rows if r["kind"] != ray_engine.PAD]
                table = pa.Table.from_pylist(out, schema=ray_engine._row_schema())
                for name in ("errors", "truncated", "replaced"):
                    table = table.append_column(name, pa.array([0] * len(out), pa.int64()))
                return table

        return Probe

    monkeypatch.setattr(ray_engine, "_predictor_class", probe)
    monkeypatch.setattr(worker, "CHUNK_BATCHES", 4)  # small chunks: shards of several chunks stay small
    sizes = [0, 1, 7, 8, 9, 23, 24, 50]
    for n in sizes:
        (tmp_path / f"s{n:02d}.txt").write_text("".join(f"line {i}\n" for i in range(n)))
    plan = plan_job([str(tmp_path / f"s{n:02d}.txt") for n in sizes], tmp_path / "out")
    options = ray_engine.RayOptions(model="unused", family="classify", options={}, batch_size=2, actors=2)
    assert options.chunk_rows == 8
    dataset = ray_engine._dataset(ray_session, list(plan.shards), InputSpec(), options)
    calls: dict[str, list[tuple[int, int]]] = {}
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            if row["kind"] == RECORD:
                calls.setdefault(row["payload"].decode(), []).append((row["shard"], row["seq"]))
    expected = {
        json.dumps([s, start, min(8, n - start)]): [(s, q) for q in range(start, min(start + 8, n))]
        for s, n in enumerate(sizes)
        for start in range(0, n, 8)
    }
    assert {tag: sorted(rows) for tag, rows in calls.items()} == expected


# --- resume, failures -------------------------------------------------------------------------


def _state(out: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(out).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.rglob("*.jsonl"))
    }


def test_a_rerun_on_ray_skips_complete_shards_and_redoes_the_rest(ray_session, exported, tmp_path):
    model = exported("bert", "text-classification")
    for name in ("a", "b", "c"):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / f"in/{name}.txt").write_text(f"{name} good film\n\nbad {name}\n")
    out = tmp_path / "out"
    first = _batch("classify", model, [], [tmp_path / "in"], out)  # the local engine starts the job
    assert first.exit_code == 0, first.output
    whole = _shards(out)
    before = _state(out)
    (out / "b.txt.jsonl").unlink()  # an interrupted run: one shard missing, a temporary left, no _SUCCESS
    (out / "_SUCCESS").unlink()
    (out / ".tmp-0123456789abcdef-99999").write_text('{"half": ')
    again = _batch("classify", model, [], [tmp_path / "in"], out, "--engine", "ray")
    assert again.exit_code == 0, again.output
    assert "skipped 2 shard(s) already done" in again.stderr
    assert "3 records in" in again.stderr and "1 shard(s) done, 2 skipped" in again.stderr
    after = _state(out)
    assert {k: after[k] for k in ("a.txt.jsonl", "c.txt.jsonl")} == {
        k: before[k] for k in ("a.txt.jsonl", "c.txt.jsonl")
    }
    assert _shards(out) == whole and not list(out.glob(".tmp-*"))
    done = _batch("classify", model, [], [tmp_path / "in"], out, "--engine", "ray")  # nothing left: no Ray job
    assert done.exit_code == 0 and "0 shard(s) done, 3 skipped" in done.stderr
    assert _state(out) == after


@pytest.mark.parametrize(
    "args,inputs,status,message",
    [
        (["--field", "t"], {"in.jsonl": b'{"t": "good"}\nnot json\n'}, 1, "in.jsonl:2: malformed JSON"),
        (["--device", "cuda"], {"in.txt": b"good\n"}, 1, "cuda"),
        (["--column", "body"], {"in.csv": b"id,text\n1,good\n"}, 1, "no column 'body'"),
    ],
    ids=["on-error-fail", "actor-cannot-load", "reader-fails"],
)
def test_a_failure_in_a_ray_task_is_one_line_and_leaves_no_shard(
    ray_session, exported, tmp_path, monkeypatch, args, inputs, status, message
):
    model = exported("bert", "text-classification")
    monkeypatch.chdir(tmp_path)
    for name, data in inputs.items():
        Path(name).write_bytes(data)
    if args[0] == "--device" and _cuda_runs():
        pytest.skip("CUDA runs here: the actor loads")
    result = _batch("classify", model, args, list(inputs), tmp_path / "out", "--engine", "ray")
    assert result.exit_code == status, result.output
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not list((tmp_path / "out").rglob("*.jsonl")) and not list((tmp_path / "out").glob(".tmp-*"))
    assert not (tmp_path / "out/_SUCCESS").exists()


def _cuda_runs() -> bool:
    from onnxpipe.export.variants import cuda_unusable_reason

    return cuda_unusable_reason() is None


def test_a_pool_the_cluster_cannot_hold_is_refused_before_it_waits_forever(ray_session, exported, tmp_path):
    model = exported("bert", "text-classification")
    (tmp_path / "in.txt").write_text("good\n")
    for more, need in (
        (["--actors", "3"], "need 3 CPU(s); the Ray cluster has 2"),
        (["--gpus-per-actor", "0.5", "--device", "auto"], "GPU"),  # the last --device wins: not _batch's cpu
    ):
        result = _batch("classify", model, [], [tmp_path / "in.txt"], tmp_path / "out", "--engine", "ray", *more)
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1 and need in result.stderr and "--actors" in result.stderr


def test_device_cpu_with_gpus_per_actor_is_refused():
    """--device cpu means CPU only (the device contract); an actor given a GPU ran on CUDA whatever --device
    said. The refusal comes before any Ray starts."""
    from onnxpipe.batch.ray_engine import RayOptions
    from onnxpipe.errors import UsageError

    base = {"model": "m", "family": "classify", "options": {}}
    with pytest.raises(UsageError, match="--device cpu runs on the CPU only, and --gpus-per-actor"):
        RayOptions(**base, device="cpu", gpus_per_actor=1)
    for device in ("auto", "cuda", "cuda:1"):
        assert RayOptions(**base, device=device, gpus_per_actor=0.5).actor_device == "cuda"
    assert RayOptions(**base, device="cpu").actor_device == "cpu"


# --- a real process: a signal mid-job; the Ray it started goes with it ------------------------------


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.isdigit():
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo.extend(children.get(pid, []))
    return out - {root}


def _shard_temporaries(out: Path) -> list[Path]:
    """A shard's temporary (.tmp-<hash>-<pid>), not the manifest's (.tmp-onnxpipe-batch.json-<pid>)."""
    return [p for p in out.glob(".tmp-*") if "onnxpipe-batch" not in p.name]


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace").replace("\0", " ")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("signum", ["SIGTERM"])  # SIGKILL too, by hand: Ray's agents take a minute to go
def test_a_signal_mid_job_stops_the_ray_it_started_and_a_rerun_completes(ray_session, exported, tmp_path, signum):
    """The job's own local Ray (no --ray-address) dies with it, even on kill -9; only complete shards stay."""
    import signal
    import time

    model = exported("bert", "text-classification")
    words = ["good", "bad", "film", "cast", "plot", "dull", "great", "slow", "fun", "long"]
    for f in range(6):
        lines = (" ".join(words[(f * 7 + i * j) % 10] for j in range(1 + i % 9)) for i in range(700))
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / f"in/part-{f}.txt").write_text("".join(line + "\n" for line in lines))
    reference = _batch("classify", model, [], [tmp_path / "in"], tmp_path / "reference")
    assert reference.exit_code == 0, reference.output
    whole = _shards(tmp_path / "reference")
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "onnxpipe", "batch", "classify", "-m", str(model), "--device", "cpu", "--threads", "1",
        "--batch-size", "1", str(tmp_path / "in"), "--output-dir", str(out), "--engine", "ray",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray, started by the job
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 180
    while not _shard_temporaries(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # rows are being written: the job is under way
    assert proc.poll() is None, "the job ended before it could be interrupted"
    ray_processes = {pid: _command_line(pid) for pid in _descendants(proc.pid)}
    assert any("raylet" in cmd for cmd in ray_processes.values())  # the Ray it started
    proc.send_signal(getattr(signal, signum))
    stdout, stderr = proc.communicate(timeout=120)
    if signum == "SIGTERM":
        assert proc.returncode == 143, stderr
        assert stderr.splitlines()[-1] == "onnxpipe: terminated" and "Traceback" not in stderr
        assert "SIGTERM received" not in stderr  # Ray's own handler (a stack dump) is not the one that ran
        assert stdout == "" and not list(out.glob(".tmp-*"))
    if signum == "SIGKILL":  # Ray's node agents see their raylet die at once, then wait out a GCS timeout
        ray_processes = {pid: cmd for pid, cmd in ray_processes.items() if "Agent" not in cmd}
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in ray_processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [cmd for pid, cmd in ray_processes.items() if _alive(pid)], "the job's Ray outlived it"
    done = {k: v for k, v in _shards(out).items() if not k.startswith(".tmp-")}
    assert "_SUCCESS" not in done and all(data == whole[name] for name, data in done.items())
    rerun = _batch("classify", model, [], [tmp_path / "in"], out, "--engine", "ray")
    assert rerun.exit_code == 0, rerun.output
    assert f"{6 - len(done)} shard(s) done, {len(done)} skipped" in rerun.stderr
    assert _shards(out) == whole and not list(out.glob(".tmp-*"))


# --- without Ray: no Ray job; ray imported by the engine only --------------------------------------


def test_engine_ray_without_ray_installed_says_what_to_install(exported, tmp_path):
    """ray hidden by an import hook in a fresh interpreter (ray may already be imported in this one)."""
    model = exported("bert", "text-classification")
    (tmp_path / "in.txt").write_text("good\n")
    code = (
        "import sys, importlib.abc\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ImportError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from onnxpipe.main import main\n"
        "sys.argv = ['onnxpipe'] + sys.argv[1:]\n"
        "main()\n"
    )
    args = ["batch", "classify", "-m", str(model), "in.txt", "--output-dir", "out", "--engine", "ray"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "--engine ray needs the [ray] extra" in proc.stderr
    assert "install onnxpipe[ray]" in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "out/in.txt.jsonl").exists()


def test_the_engine_module_does_not_import_ray():
    code = "import sys, onnxpipe.batch.ray_engine, onnxpipe.commands.batch; print('ray' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "False\n"


# --- the driver's reassembly, without Ray ----------------------------------------------------------


def test_rows_in_any_order_are_written_in_input_order_and_a_shard_commits_when_complete(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.txt").write_text("x\n")
    plan = plan_job([str(tmp_path / f"{n}.txt") for n in "abc"], tmp_path / "out")
    (tmp_path / "out").mkdir()
    counts = {0: 40, 1: 0, 2: 7}  # b is an empty file: only its END row
    rows = [(s, i, RECORD, f'{{"s": {s}, "i": {i}}}\n'.encode()) for s, n in counts.items() for i in range(n)]
    rows += [(s, n, END, b"") for s, n in counts.items()]
    random.Random(7).shuffle(rows)
    summary = BatchSummary()
    seen: list[tuple[str, int, bool]] = []
    assembler = ShardAssembler(
        list(plan.shards), plan, "jsonl", summary, lambda shard, n, nbytes, done: seen.append((shard.key, n, done))
    )
    a_end = next(k for k, row in enumerate(rows) if row[0] == 0 and row[2] == END)
    for k, row in enumerate(rows):
        assembler.add(*row)
        if k < a_end:
            assert not plan.shards[0].output.exists()  # not before its END row
    assembler.finish()
    for s, n in counts.items():
        assert _rows(plan.shards[s].output.read_bytes()) == [{"s": s, "i": i} for i in range(n)]
    assert summary.records == 47 and summary.shards_done == 3
    assert sorted(key for key, _, done in seen if done) == ["a.txt", "b.txt", "c.txt"]
    assert not list((tmp_path / "out").glob(".tmp-*"))


def test_a_failure_row_stops_with_its_status_and_incomplete_shards_are_not_written(tmp_path):
    (tmp_path / "a.txt").write_text("x\n")
    plan = plan_job([str(tmp_path / "a.txt")], tmp_path / "out")
    (tmp_path / "out").mkdir()
    assembler = ShardAssembler(list(plan.shards), plan, "jsonl", BatchSummary())
    assembler.add(0, 1, RECORD, b"{}\n")
    with pytest.raises(OnnxpipeError, match="ended before 1 shard"):
        assembler.finish()  # seq 0 never came: the shard is not complete
    with pytest.raises(OnnxpipeError, match="a.txt:3: bad") as failed:
        assembler.add(0, 0, FAILURE, pickle.dumps(("a.txt:3: bad", 2)))
    assert int(failed.value.exit_status) == 2
    assembler.abort()
    assert list((tmp_path / "out").iterdir()) == [] and not plan.shards[0].output.exists()
