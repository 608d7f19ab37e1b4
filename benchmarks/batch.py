"""`onnxpipe batch` on the real sentiment export: the local and Ray engines against the streaming command.

    python benchmarks/batch.py                        # 100,000 lines, 8 shards, 2 threads in all
    python benchmarks/batch.py --lines 2000 --json benchmarks/results/batch.json
    python benchmarks/batch.py --two-nodes --lines 2000   # a 2-node Ray cluster on this machine

The input is build/sentiment/heldout.txt (held-out sentences) repeated to --lines lines, cut into --shards
files. Every configuration uses --threads cores in all, split between its workers or actors:

- stream: `onnxpipe classify --format jsonl` over the shard files, one process;
- local, 1 worker (--threads N) and N workers (--threads 1 each), `batch --engine local`;
- ray, 1 actor (N CPUs, N threads) and N actors (1 each), `batch --engine ray` on a local Ray that the
  job starts and stops (its start is part of the time, as a user pays for it).

Figures: records/s over the whole process (spawn to exit: loading, Ray's start, writing), the rate the
command itself reports, and peak RSS: of the main process and of each worker or actor (VmHWM of every
process under the command, sampled while it runs). The Ray overhead is the best local rate over the
Ray rate at N actors (the issue's target: within 15%). The outputs must agree: every batch shard byte
for byte with the local 1-worker run's, and its records with the streaming command's (label equal,
score within 1e-5: another thread count may round the last bits differently).

--two-nodes starts `ray start --head --num-cpus 1` and a second node (`ray start --address ...
--num-cpus 1`, its own temp folder and ports), runs the job there with --ray-address and 2 actors,
prints on which node each actor ran (Ray's actor table) and checks the output against the local
engine's; both nodes are stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import harness
from harness import REPO

ONNXPIPE = [sys.executable, "-m", "onnxpipe"]
HELDOUT = REPO / "build/sentiment/heldout.txt"
MODEL = REPO / "exports/sentiment"


# --- input --------------------------------------------------------------------------------------


def make_input(folder: Path, lines: int, shards: int) -> list[Path]:
    sentences = HELDOUT.read_text(encoding="utf-8").splitlines()
    corpus = [sentences[i % len(sentences)] for i in range(lines)]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    per = -(-lines // shards)
    for k in range(shards):
        part = corpus[k * per : (k + 1) * per]
        path = folder / f"part-{k:03d}.txt"
        path.write_text("".join(line + "\n" for line in part), encoding="utf-8")
        paths.append(path)
    return paths


# --- peak RSS of every process under the command ---------------------------------------------------


class TreeSampler:
    """VmHWM (peak RSS) of ROOT and every process below it, sampled every INTERVAL seconds."""

    def __init__(self, root: int, interval: float = 0.2):
        self.root = root
        self.interval = interval
        self.peaks: dict[int, tuple[float, str]] = {}  # pid -> (MiB, command line)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for pid in self._tree():
                status = _read(f"/proc/{pid}/status")
                hwm = next((int(x.split()[1]) / 1024 for x in status.splitlines() if x.startswith("VmHWM:")), None)
                if hwm is None:
                    continue
                cmd = _read(f"/proc/{pid}/cmdline").replace("\0", " ").strip()
                old = self.peaks.get(pid, (0.0, cmd))
                self.peaks[pid] = (max(old[0], hwm), cmd or old[1])
            self._stop.wait(self.interval)

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                stat = _read(f"/proc/{entry}/stat")
                if stat:
                    ppid = int(stat.rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(entry))
        out, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    def workers(self, kind: str) -> list[float]:
        """Peak RSS (MiB) of each worker process: local's spawned workers (none: the model runs in the
        main process, which is then the one worker), or Ray's actors."""
        mark = "spawn_main" if kind == "local" else "MapWorker"
        found = sorted(mib for pid, (mib, cmd) in self.peaks.items() if pid != self.root and mark in cmd)
        return found or ([self.main()] if kind == "local" else [])

    def main(self) -> float:
        return self.peaks.get(self.root, (0.0, ""))[0]


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def run_sampled(args: list[str], stdout_path: Path | None = None) -> tuple[float, str, TreeSampler]:
    """Run ARGS to the end: (wall seconds, stderr, the sampler of its process tree)."""
    env = {**os.environ, **harness.ENV}
    out = open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.PIPE, env=env, cwd=REPO, text=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    try:
        _, stderr = proc.communicate()
    finally:
        sampler.stop()
        if stdout_path:
            out.close()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args[:8]))} ... exited {proc.returncode}:\n{stderr[-2000:]}")
    return wall, stderr, sampler


def reported_rate(stderr: str) -> float | None:
    """The records/s the command printed in its summary line."""
    for line in reversed(stderr.splitlines()):
        if "records/s)" in line:
            return float(line.split("(")[1].split(" records/s")[0].replace(",", ""))
    return None


# --- the configurations ------------------------------------------------------------------------


CONFIGS = ("local-1", "local-n", "ray-1", "ray-n")


def configs(threads: int, only: list[str] | None = None) -> list[tuple[str, str, list[str]]]:
    """(name, engine kind, the arguments after `onnxpipe batch classify ...`), those in ONLY (CONFIGS' keys)."""
    n = threads
    every = [
        ("local, 1 worker", "local", ["--engine", "local", "--workers", "1", "--threads", str(n)]),
        (f"local, {n} workers", "local", ["--engine", "local", "--workers", str(n), "--threads", "1"]),
        ("ray, 1 actor", "ray", ["--engine", "ray", "--actors", "1", "--cpus-per-actor", str(n), "--threads", str(n)]),
        (f"ray, {n} actors", "ray", ["--engine", "ray", "--actors", str(n), "--cpus-per-actor", "1", "--threads", "1"]),
    ]
    return [config for key, config in zip(CONFIGS, every) if only is None or key in only]


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*.jsonl"))}


def agree_with_stream(stream_path: Path, shards: dict[str, bytes]) -> str:
    """The batch records against the streaming command's: 'ok', or what differs first."""
    stream = [json.loads(line) for line in stream_path.read_text(encoding="utf-8").splitlines()]
    batch = [json.loads(line) for name in sorted(shards) for line in shards[name].decode("utf-8").splitlines()]
    if len(stream) != len(batch):
        return f"{len(batch)} records, the stream wrote {len(stream)}"
    for i, (s, b) in enumerate(zip(stream, batch)):
        b = {k: v for k, v in b.items() if k not in ("_source", "_line")}
        if s["text"] != b["text"] or s["label"] != b["label"] or abs(s["score"] - b["score"]) > 1e-5:
            return f"record {i + 1}: stream {s['label']} {s['score']:.6f}, batch {b['label']} {b['score']:.6f}"
    return "ok"


def bench(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="onnxpipe-batch-bench-"))
    try:
        inputs = make_input(work / "in", args.lines, args.shards)
        rows = []
        stream_out = work / "stream.jsonl"
        stream_args = [*ONNXPIPE, "classify", "-m", str(MODEL), "--device", "cpu", "--threads", str(args.threads)]
        if args.only is None or "stream" in args.only:
            wall, stderr, sampler = run_sampled([*stream_args, "--format", "jsonl", *map(str, inputs)], stream_out)
            rows.append(_row("stream (classify)", "stream", wall, stderr, sampler, args.lines, "reference"))
        reference: dict[str, bytes] | None = None
        for name, kind, more in configs(args.threads, args.only):
            out = work / f"out-{len(rows)}"
            command = [*ONNXPIPE, "batch", "classify", "-m", str(MODEL), "--device", "cpu", *map(str, inputs)]
            wall, stderr, sampler = run_sampled([*command, "--output-dir", str(out), *more])
            files = shard_files(out)
            if reference is None:
                reference, first = files, name
                agreement = agree_with_stream(stream_out, files) if stream_out.exists() else "reference"
            else:
                agreement = "identical" if files == reference else f"DIFFERS from {first}"
            rows.append(_row(name, kind, wall, stderr, sampler, args.lines, agreement))
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best_local = max((r["records_per_s"] for r in rows if r["kind"] == "local"), default=None)
    ray_n = next((r for r in rows if r["name"] == f"ray, {args.threads} actors"), None)
    return {
        "lines": args.lines,
        "shards": args.shards,
        "threads": args.threads,
        "rows": rows,
        "ray_overhead": best_local / ray_n["records_per_s"]
        if ray_n and best_local
        else None,  # 1.15: Ray 15% slower than the best local run
        "machine": harness.machine(),
        "load_average": harness.load_average(),
        "versions": harness.versions("onnxpipe", "onnxruntime-gpu", "ray", "pyarrow"),
        "date": harness.now(),
    }


def _row(name: str, kind: str, wall: float, stderr: str, sampler: TreeSampler, lines: int, agreement: str) -> dict:
    workers = sampler.workers(kind) if kind in ("local", "ray") else []
    return {
        "name": name,
        "kind": kind,
        "wall_s": round(wall, 2),
        "records_per_s": lines / wall,
        "reported_records_per_s": reported_rate(stderr),
        "main_rss_mib": round(sampler.main(), 1),
        "worker_rss_mib": [round(x, 1) for x in workers],
        "agreement": agreement,
    }


def markdown(report: dict) -> str:
    header = [
        "configuration",
        "wall s",
        "records/s",
        "reported records/s",
        "main RSS MiB",
        "per worker RSS MiB",
        "output",
    ]
    rows = []
    for r in report["rows"]:
        per = ", ".join(f"{x:.0f}" for x in r["worker_rss_mib"]) or "-"
        reported = f"{r['reported_records_per_s']:,.0f}" if r["reported_records_per_s"] else "-"
        rows.append(
            [r["name"], f"{r['wall_s']:.1f}", f"{r['records_per_s']:,.0f}", reported, f"{r['main_rss_mib']:.0f}", per,
             r["agreement"]]
        )  # fmt: skip
    lines = [
        f"## onnxpipe batch: {report['lines']:,} lines in {report['shards']} shards, "
        f"{report['threads']} threads in all per configuration",
        "",
        harness.markdown_table(header, rows),
        "",
        f"Ray overhead (best local records/s over Ray at {report['threads']} actors): "
        + (f"{report['ray_overhead']:.2f}x (target: at most 1.15)" if report["ray_overhead"] else "not measured"),
        "",
        *harness.machine_lines(report["machine"], report["versions"]),
        f"- load average at the end: {report['load_average']}",
    ]
    return "\n".join(lines)


# --- two Ray nodes on this machine ------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    socks, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _node_ports() -> list[str]:
    names = [
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    ]
    return [x for name, port in zip(names, _free_ports(len(names))) for x in (name, str(port))]


def two_nodes(args: argparse.Namespace) -> int:
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, **harness.ENV, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    work = Path(tempfile.mkdtemp(prefix="onnxpipe-ray-2nodes-"))
    (gcs_port,) = _free_ports(1)
    address = f"127.0.0.1:{gcs_port}"
    common = ["--num-cpus", "1", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
    nodes: list[subprocess.Popen] = []
    try:
        head = [ray_bin, "start", "--head", "--port", str(gcs_port), "--include-dashboard", "false"]
        nodes.append(_start([*head, *common, "--temp-dir", str(work / "head"), *_node_ports()], env, work / "head.log"))
        _wait_for_nodes(address, 1, env)
        second = [ray_bin, "start", "--address", address, *common, "--temp-dir", str(work / "node2"), *_node_ports()]
        nodes.append(_start(second, env, work / "node2.log"))
        node_ids = _wait_for_nodes(address, 2, env)
        print(f"cluster at {address}: nodes {', '.join(n[:12] for n in node_ids)} (1 CPU each)")
        inputs = make_input(work / "in", args.lines, args.shards)
        command = [*ONNXPIPE, "batch", "classify", "-m", str(MODEL), "--device", "cpu", *map(str, inputs)]
        start = time.perf_counter()
        ray_run = subprocess.run(
            [*command, "--output-dir", str(work / "ray"), "--engine", "ray", "--ray-address", address,
             "--actors", "2", "--threads", "1"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        wall = time.perf_counter() - start
        print(f"ray job (2 actors, --ray-address {address}): exit {ray_run.returncode}, {wall:.1f}s")
        print("  stderr: " + "\n  stderr: ".join(ray_run.stderr.strip().splitlines()))
        if ray_run.returncode != 0:
            return 1
        placed = _actor_nodes(address, env)
        for actor, node, state in placed:
            role = "head" if node == node_ids[0] else "second node"
            print(f"  actor {actor[:12]} ran on node {node[:12]} ({role}), now {state}")
        used = {node for _, node, _ in placed}
        local = subprocess.run(
            [*command, "--output-dir", str(work / "local"), "--threads", "2"], env=env, cwd=REPO, capture_output=True,
            text=True, timeout=900,
        )  # fmt: skip
        same = local.returncode == 0 and shard_files(work / "ray") == shard_files(work / "local")
        print(f"nodes used by the actors: {len(used)} of 2")
        print(f"output: {'identical to' if same else 'DIFFERENT from'} the local engine's ({args.lines:,} lines)")
        return 0 if same and len(used) == 2 else 1
    finally:
        for proc in reversed(nodes):  # `ray start --block` stops its node's processes on SIGTERM
            proc.send_signal(signal.SIGTERM)
        for proc in reversed(nodes):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


def _start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)


_PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
from ray._private.state import actors
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
table = [(a["ActorID"], a["Address"]["NodeID"], a["State"]) for a in actors().values()
         if "MapWorker" in a.get("ActorClassName", "")]
print(json.dumps({"nodes": nodes, "actors": table}))
"""


def _probe(address: str, env: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, address], env=env, capture_output=True, text=True, timeout=120, cwd=REPO
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _wait_for_nodes(address: str, count: int, env: dict, timeout: float = 120) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            nodes = _probe(address, env)["nodes"]
            if len(nodes) >= count:
                return nodes
        except (RuntimeError, ValueError, IndexError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray cluster at {address} did not show {count} node(s) in {timeout:.0f}s")
        time.sleep(1)


def _actor_nodes(address: str, env: dict) -> list[tuple[str, str, str]]:
    return [tuple(a) for a in _probe(address, env)["actors"]]  # type: ignore[misc]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="cores per configuration, split between workers")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--only",
        type=lambda text: text.split(","),
        help=f"the configurations to run, of stream,{','.join(CONFIGS)} (default: all)",
    )
    parser.add_argument("--two-nodes", action="store_true", help="run the job on a 2-node Ray cluster instead")
    args = parser.parse_args()
    if not MODEL.is_dir() or not HELDOUT.is_file():
        print(f"needs {MODEL.relative_to(REPO)} and {HELDOUT.relative_to(REPO)}: run make models", file=sys.stderr)
        return 1
    if args.two_nodes:
        return two_nodes(args)
    report = bench(args)
    print(markdown(report))
    if args.json:
        harness.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
