"""`onnxpipe serve`'s application on tiny exports, in process (starlette's TestClient, httpx's ASGI transport).

The oracles: `onnxpipe.load` and the CLI's --format jsonl records for the same inputs and options (what a
request returns is what the command writes), OpenAI's schemas as the `openai` package's types parse them,
and hand-made hostile requests. The real-process clients (openai, llm, raw sockets) are test_serve_clients.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

import onnxpipe  # noqa: E402
from onnxpipe.main import cli  # noqa: E402
from onnxpipe.serve.app import Settings, create_app  # noqa: E402
from onnxpipe.serve.batching import DynamicBatcher  # noqa: E402

LINES = ["A good movie with a great cast.", "Paris is the capital of France.", "Short.", "dull"]
MASKED = ["The capital of France is [MASK].", "A [MASK] movie."]
# endpoint -> (arch, export task, CLI arguments, request options, inputs)
TASKS = {
    "classify": ("bert", "text-classification", ["--top-k", "2"], {"top_k": 2}, LINES),
    "rerank": (
        "bert",
        "text-classification",
        ["--query", "a good film", "--label", "1"],
        {"query": "a good film", "label": 1},
        LINES,
    ),
    "tag": ("roberta", "token-classification", ["--aggregation", "first"], {"aggregation": "first"}, LINES),
    "fill-mask": ("bert", "fill-mask", ["-k", "3"], {"top_k": 3}, MASKED),
    "translate": ("marian", None, ["--max-new-tokens", "6"], {"max_new_tokens": 6}, LINES[:2]),
}


@pytest.fixture(scope="module")
def pipelines(exported):
    """served name -> Pipeline: a chat model (tiny llama with a chat template), an embedder, a classifier."""
    return {
        "chat": onnxpipe.load(exported("llama"), device="cpu", threads=1, on_error="null"),
        "embed": onnxpipe.load(exported("distilbert", "feature-extraction"), device="cpu", threads=1, on_error="null"),
        "clf": onnxpipe.load(exported("bert", "text-classification"), device="cpu", threads=1, on_error="null"),
    }


def _client(pipelines, log=None, **settings) -> TestClient:
    app = create_app(pipelines, Settings(**settings), log=(log.append if log is not None else lambda line: None))
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def client(pipelines):
    with _client(pipelines) as c:
        yield c


def _error(response, status: int, code: str | None = None, type: str = "invalid_request_error") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == type and body["error"]["code"] == code, body
    assert "Traceback" not in response.text
    return body["error"]


def _cli_records(command: str, folder, args: list[str], lines: list[str]) -> list[dict]:
    result = CliRunner().invoke(
        cli,
        [command, "-m", str(folder), "--device", "cpu", "--format", "jsonl", *args],
        input="".join(f"{line}\n" for line in lines),
    )
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def _close(a, b, tol: float = 1e-5) -> bool:
    """Equal JSON values, floats within TOL (another batch pads differently: last-bit float noise)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return abs(a - b) <= tol
    return a == b


# --- models, health ------------------------------------------------------------------------------


def test_models_and_health(client):
    from openai.types import Model

    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["chat", "embed", "clf"]
    for m in models["data"]:
        Model.model_validate(m)
    assert {m["id"]: m["task"] for m in models["data"]}["embed"] == "feature-extraction"
    assert client.get("/v1/models/clf").json()["id"] == "clf"
    _error(client.get("/v1/models/nope"), 404, "model_not_found")
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["models"]["chat"]["task"] == "generate"
    assert health["models"]["embed"]["provider"] == "CPUExecutionProvider"


# --- embeddings ----------------------------------------------------------------------------------


def test_embeddings_equal_onnxpipe_embed(client, exported):
    from openai.types import CreateEmbeddingResponse

    response = client.post("/v1/embeddings", json={"model": "embed", "input": LINES})
    assert response.status_code == 200, response.text
    body = CreateEmbeddingResponse.model_validate(response.json())
    assert body.model == "embed" and [d.index for d in body.data] == [0, 1, 2, 3]
    cli_vectors = [
        r["embedding"] for r in _cli_records("embed", exported("distilbert", "feature-extraction"), [], LINES)
    ]
    got = np.array([d.embedding for d in body.data])
    assert np.abs(got - np.array(cli_vectors)).max() <= 1e-6
    tokenizer = onnxpipe.load(exported("distilbert", "feature-extraction"), device="cpu").model.tokenizer
    assert body.usage.prompt_tokens == sum(len(tokenizer.encode(t).ids) for t in LINES) == body.usage.total_tokens
    # base64: little-endian float32 bytes, as OpenAI sends them (and the openai client decodes them)
    one = client.post("/v1/embeddings", json={"model": "embed", "input": LINES[1], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(one["data"][0]["embedding"]), dtype="<f4")
    assert np.abs(decoded - np.array(cli_vectors[1])).max() <= 1e-6


def test_embeddings_refuse_what_they_cannot_embed(client):
    _error(client.post("/v1/embeddings", json={"model": "embed", "input": [[1, 2, 3]]}), 400)
    _error(client.post("/v1/embeddings", json={"model": "embed", "input": ""}), 400)
    _error(client.post("/v1/embeddings", json={"model": "embed", "input": 3}), 400)
    _error(client.post("/v1/embeddings", json={"model": "embed"}), 400)
    error = _error(client.post("/v1/embeddings", json={"model": "embed", "input": "a", "encoding_format": "hex"}), 400)
    assert error["param"] == "encoding_format"
    error = _error(client.post("/v1/embeddings", json={"model": "chat", "input": "a"}), 400, "model_not_supported")
    assert "text-generation export" in error["message"] and error["param"] == "model"


def test_concurrent_embedding_requests_share_session_runs(pipelines):
    """32 requests at once run in fewer model runs than requests, and each gets its own vectors."""

    async def main():
        app = create_app(pipelines, Settings(batch_wait_ms=50))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            texts = [f"sentence number {i} " + "word " * (i % 7) for i in range(32)]
            responses = await asyncio.gather(
                *(http.post("/v1/embeddings", json={"model": "embed", "input": t}) for t in texts)
            )
            health = (await http.get("/health")).json()
        return texts, responses, health

    texts, responses, health = asyncio.run(main())
    stats = health["models"]["embed"]["batching"]["embed"]
    assert stats["requests"] == 32 and stats["inputs"] == 32
    assert stats["runs"] < 32, stats
    alone = pipelines["embed"](texts)
    for text, response, expected in zip(texts, responses, alone):
        assert response.status_code == 200
        assert np.abs(np.array(response.json()["data"][0]["embedding"]) - expected.value).max() <= 1e-6, text


# --- onnxpipe's task endpoints -------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", list(TASKS))
def test_task_endpoints_return_the_cli_records(endpoint, exported):
    arch, export_task, cli_args, options, lines = TASKS[endpoint]
    folder = exported(arch, export_task)
    pipeline = onnxpipe.load(folder, device="cpu", threads=1, on_error="null")
    with _client({"m": pipeline}) as client:
        response = client.post(f"/v1/{endpoint}", json={"model": "m", "input": lines, **options})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "list" and body["model"] == "m"
        assert _close(body["data"], _cli_records(endpoint, folder, cli_args, lines))
        one = client.post(f"/v1/{endpoint}", json={"model": "m", "input": lines[0], **options}).json()
        assert _close(one["data"], body["data"][:1])


def test_a_text2text_export_serves_translate_and_summarize(exported):
    folder = exported("bart")
    with _client({"bart": onnxpipe.load(folder, device="cpu", threads=1, on_error="null")}) as client:
        body = client.post("/v1/summarize", json={"model": "bart", "input": LINES[:2], "max_new_tokens": 5}).json()
        assert _close(body["data"], _cli_records("summarize", folder, ["--max-new-tokens", "5"], LINES[:2]))
        _error(client.post("/v1/classify", json={"model": "bart", "input": "x"}), 400, "model_not_supported")


def test_task_endpoint_errors(client):
    error = _error(client.post("/v1/classify", json={"model": "clf", "input": "x", "temperature": 1}), 400)
    assert "classify takes no option 'temperature'" in error["message"]
    _error(client.post("/v1/generate", json={"model": "chat", "input": "x"}), 404, "unknown_url")
    _error(client.post("/v1/nope", json={"model": "clf", "input": "x"}), 404, "unknown_url")
    _error(client.post("/v1/classify", json={"model": "embed", "input": "x"}), 400, "model_not_supported")
    # an empty text is an empty record, as in the CLI's line contract
    empty = client.post("/v1/classify", json={"model": "clf", "input": ["", "good"]}).json()["data"]
    assert empty[0]["text"] == "" and empty[0]["label"] is None and empty[1]["label"] is not None


# --- chat and completions ------------------------------------------------------------------------

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8}


def test_chat_completion_equals_onnxpipe_generate(client, pipelines):
    from openai.types.chat import ChatCompletion

    response = client.post("/v1/chat/completions", json={**CHAT, "temperature": 0})
    assert response.status_code == 200, response.text
    body = ChatCompletion.model_validate(response.json())
    expected = pipelines["chat"]("Hello there", chat=True, max_new_tokens=8, temperature=0.0)
    assert body.object == "chat.completion" and body.model == "chat" and len(body.choices) == 1
    choice = body.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.generated_text
    assert choice.finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert body.usage.prompt_tokens == expected.prompt_tokens
    assert body.usage.completion_tokens == expected.generated_tokens
    assert body.usage.total_tokens == expected.prompt_tokens + expected.generated_tokens
    # max_completion_tokens is the newer name of max_tokens
    newer = {**CHAT, "temperature": 0, "max_completion_tokens": 8}
    newer.pop("max_tokens")
    assert (
        client.post("/v1/chat/completions", json=newer).json()["choices"][0]["message"]
        == response.json()["choices"][0]["message"]
    )


def _events(response) -> list:
    """The data of each server-sent event; the last must be [DONE]."""
    assert response.headers["content-type"].startswith("text/event-stream")
    data = [line[len("data: ") :] for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in response.text.split("\n\n") if line)
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def _streamed_by_the_library(pipelines, user: str, max_new_tokens: int) -> str:
    """The text pieces that CausalLM.generate gives `onnxpipe generate --stream` for a greedy chat prompt."""
    from onnxpipe.tasks.causal import render_chat_template

    lm = pipelines["chat"].task_for({}).lm
    ids = lm.encode(
        render_chat_template(lm.chat_template, [{"role": "user", "content": user}], lm.special_tokens), True
    )
    pieces: list[str] = []
    config = lm.defaults.update(max_new_tokens=max_new_tokens, do_sample=False)
    lm.generate([ids], config, on_text=lambda key, chunk: pieces.append(chunk))
    return "".join(pieces)


def test_chat_stream_is_openai_chunks_of_the_same_text(client, pipelines):
    from openai.types.chat import ChatCompletionChunk

    whole = client.post("/v1/chat/completions", json={**CHAT, "temperature": 0}).json()
    response = client.post(
        "/v1/chat/completions",
        json={**CHAT, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert response.status_code == 200
    chunks = [ChatCompletionChunk.model_validate(e) for e in _events(response)]
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _streamed_by_the_library(pipelines, "Hello there", 8)
    if "\ufffd" not in text:  # a random model's stray UTF-8 bytes decode differently piece by piece
        assert text == whole["choices"][0]["message"]["content"]
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finished) == 1 and finished[0].choices[0].finish_reason == whole["choices"][0]["finish_reason"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == {
        **whole["usage"],
        "completion_tokens_details": None,
        "prompt_tokens_details": None,
    }
    assert all(c.usage is None for c in chunks[:-1])
    plain = _events(client.post("/v1/chat/completions", json={**CHAT, "temperature": 0, "stream": True}))
    assert all("usage" not in e for e in plain)


def test_completions_prompt_list_n_and_seed(client, pipelines):
    from openai.types import Completion

    prompts = ["The shell is", "Pipes"]
    body = client.post(
        "/v1/completions", json={"model": "chat", "prompt": prompts, "max_tokens": 6, "temperature": 0, "n": 2}
    ).json()
    body = Completion.model_validate(body)
    assert body.object == "text_completion" and [c.index for c in body.choices] == [0, 1, 2, 3]
    expected = pipelines["chat"](prompts, max_new_tokens=6, temperature=0.0)
    assert [c.text for c in body.choices] == [e.generated_text for e in expected for _ in range(2)]
    assert body.usage.completion_tokens == 2 * sum(e.generated_tokens for e in expected)
    # sampling with a seed: reproducible, and choice 0 is what `onnxpipe generate --seed` gives record 0
    sampled = {"model": "chat", "prompt": "The shell is", "max_tokens": 6, "temperature": 0.9, "seed": 7}
    first = client.post("/v1/completions", json=sampled).json()["choices"][0]["text"]
    assert client.post("/v1/completions", json=sampled).json()["choices"][0]["text"] == first
    alone = pipelines["chat"]("The shell is", max_new_tokens=6, temperature=0.9, seed=7)
    assert first == alone.generated_text
    echo = client.post("/v1/completions", json={**sampled, "echo": True}).json()["choices"][0]["text"]
    assert echo == "The shell is" + first


def test_stop_strings_end_the_text(client, pipelines):
    whole = pipelines["chat"]("Hello there", chat=True, max_new_tokens=12, temperature=0.0).generated_text
    stop = whole[len(whole) // 2 : len(whole) // 2 + 2]
    assert stop.strip(), whole
    for stream in (False, True):
        request = {**CHAT, "max_tokens": 12, "temperature": 0, "stop": [stop], "stream": stream}
        response = client.post("/v1/chat/completions", json=request)
        if stream:
            events = _events(response)
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
            reason = [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1]
        else:
            text = response.json()["choices"][0]["message"]["content"]
            reason = response.json()["choices"][0]["finish_reason"]
        assert text == whole[: whole.index(stop)] and reason == "stop", (stream, stop, whole)


def test_generation_request_errors(client):
    error = _error(
        client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10_000}), 400, "context_length_exceeded"
    )
    assert "maximum context length is 256 tokens" in error["message"]
    long_prompt = {**CHAT, "messages": [{"role": "user", "content": "word " * 400}], "max_tokens": 5}
    _error(client.post("/v1/chat/completions", json=long_prompt), 400, "context_length_exceeded")
    assert _error(client.post("/v1/chat/completions", json={**CHAT, "temperature": 3}), 400)["param"] == "temperature"
    assert _error(client.post("/v1/chat/completions", json={**CHAT, "max_tokens": "8"}), 400)["param"] == "max_tokens"
    assert _error(client.post("/v1/chat/completions", json={**CHAT, "n": 99}), 400)["param"] == "n"
    assert _error(client.post("/v1/chat/completions", json={**CHAT, "stop": 5}), 400)["param"] == "stop"
    assert _error(client.post("/v1/chat/completions", json={**CHAT, "messages": []}), 400)["param"] == "messages"
    _error(client.post("/v1/chat/completions", json={**CHAT, "model": "clf"}), 400, "model_not_supported")
    _error(client.post("/v1/completions", json={"model": "chat", "prompt": [1, 2]}), 400)


# --- requests that go wrong ----------------------------------------------------------------------


def test_malformed_unknown_and_oversize_requests(pipelines):
    with _client(pipelines, max_body_bytes=200) as client:
        _error(client.post("/v1/embeddings", content=b'{"model": "embed", "input": '), 400, "invalid_json")
        _error(client.post("/v1/embeddings", content=b"[1, 2]"), 400, "invalid_json")
        _error(client.post("/v1/embeddings", content=b"\xff\xfe"), 400, "invalid_json")
        error = _error(client.post("/v1/embeddings", json={"model": "x", "input": "a"}), 404, "model_not_found")
        assert error["message"] == "The model `x` does not exist" and error["param"] == "model"
        # a model name is a served name, never a path
        _error(client.post("/v1/embeddings", json={"model": "/etc", "input": "a"}), 404, "model_not_found")
        _error(client.post("/v1/embeddings", json={"input": "a"}), 400)
        big = {"model": "embed", "input": "x" * 1000}
        _error(client.post("/v1/embeddings", json=big), 413, "request_too_large")

        def chunked():  # no Content-Length: the limit holds while reading
            for _ in range(10):
                yield b" " * 50

        _error(client.post("/v1/embeddings", content=chunked()), 413, "request_too_large")
        _error(client.get("/nowhere"), 404, "unknown_url")
        _error(client.get("/v1/chat/completions"), 405)
        assert client.get("/health").status_code == 200


def test_auth(pipelines):
    with _client(pipelines, api_key="s3cret") as client:
        _error(client.get("/v1/models"), 401, "invalid_api_key")
        _error(client.post("/v1/embeddings", json={"model": "embed", "input": "a"}), 401, "invalid_api_key")
        bad = client.get("/v1/models", headers={"Authorization": "Bearer s3cre"})
        _error(bad, 401, "invalid_api_key")
        assert bad.headers["www-authenticate"] == "Bearer"
        _error(client.get("/v1/models", headers={"Authorization": "Basic s3cret"}), 401, "invalid_api_key")
        good = {"Authorization": "Bearer s3cret"}
        assert client.get("/v1/models", headers=good).status_code == 200
        ok = client.post("/v1/embeddings", json={"model": "embed", "input": "a"}, headers=good)
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200  # for load balancers: says only what is served


def test_no_traceback_reaches_a_client(pipelines, monkeypatch):
    log: list[str] = []

    def broken(self, texts, options):
        raise RuntimeError("secret detail of a bug")

    monkeypatch.setattr(DynamicBatcher, "_call", broken)
    with _client(pipelines, log=log) as client:
        response = client.post("/v1/embeddings", json={"model": "embed", "input": "a"})
        error = _error(response, 500, type="server_error")
        assert "secret" not in response.text and "RuntimeError" not in response.text
        assert "server had an error" in error["message"]
        assert client.post("/v1/classify", json={"model": "clf", "input": "a"}).status_code == 500
    assert any("secret detail of a bug" in line and "Traceback" in line for line in log)


def test_full_queue_answers_429(pipelines, monkeypatch):
    release = threading.Event()
    original = DynamicBatcher._call

    def slow(self, texts, options):
        release.wait(30)
        return original(self, texts, options)

    monkeypatch.setattr(DynamicBatcher, "_call", slow)

    async def main():
        app = create_app(pipelines, Settings(max_queue=1, batch_wait_ms=0))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:

            async def post(text):
                return await http.post("/v1/classify", json={"model": "clf", "input": text})

            running = asyncio.ensure_future(post("one"))  # taken by the worker, blocked in the model run
            await asyncio.sleep(0.2)
            waiting = asyncio.ensure_future(post("two"))  # the one queued request allowed
            await asyncio.sleep(0.2)
            refused = await post("three")
            release.set()
            return refused, await running, await waiting

    refused, running, waiting = asyncio.run(main())
    _error(refused, 429, "rate_limit_exceeded", type="rate_limit_error")
    assert refused.headers["retry-after"] == "1"
    assert running.status_code == 200 and waiting.status_code == 200


def _slow_steps(monkeypatch, pipelines, seconds: float) -> None:
    """Each decoding step takes SECONDS: a generation long enough to time out or to be cancelled."""
    decoder = pipelines["chat"].task_for({}).lm.decoder
    original = decoder.decode

    def decode(*args, **kw):
        time.sleep(seconds)
        return original(*args, **kw)

    monkeypatch.setattr(decoder, "decode", decode)


def test_timeout_answers_408_and_stops_the_generation(pipelines, monkeypatch):
    _slow_steps(monkeypatch, pipelines, 0.02)
    log: list[str] = []
    with _client(pipelines, log=log, request_timeout=0.3) as client:
        response = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 200, "temperature": 0})
        _error(response, 408, type="timeout")
        stream = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 200, "temperature": 0, "stream": True})
        events = _events(stream)
        assert events[-1]["error"]["type"] == "timeout"
        deadline = time.monotonic() + 10
        while client.get("/health").json()["models"]["chat"]["generation"]["cancelled"] < 2:
            assert time.monotonic() < deadline, "the timed-out generations kept running"
            time.sleep(0.05)
        ok = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2, "temperature": 0})
        assert ok.status_code == 200


def test_access_log_lines(pipelines):
    log: list[str] = []
    with _client(pipelines, log=log) as client:
        client.post("/v1/embeddings", json={"model": "embed", "input": "a"})
        client.post("/v1/embeddings", json={"model": "nope", "input": "a"})
    assert len(log) == 2
    assert '"POST /v1/embeddings" 200 ' in log[0] and log[0].endswith(" ms embed")
    assert '"POST /v1/embeddings" 404 ' in log[1] and log[1].endswith(" ms nope")
    log.clear()
    with _client(pipelines, log=log, log_format="json") as client:
        client.get("/v1/models")
        client.post("/v1/classify", json={"model": "clf", "input": "a"})
    records = [json.loads(line) for line in log]
    assert [(r["method"], r["path"], r["status"], r["model"]) for r in records] == [
        ("GET", "/v1/models", 200, None),
        ("POST", "/v1/classify", 200, "clf"),
    ]
    assert all(isinstance(r["duration_ms"], float) and r["time"].endswith("+00:00") for r in records)


# --- the command ----------------------------------------------------------------------------------


def test_the_command_refuses_unsafe_or_bad_settings(exported):
    folder = str(exported("bert", "text-classification"))
    result = CliRunner().invoke(cli, ["serve", "-m", folder, "--host", "0.0.0.0"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("onnxpipe: error: --host 0.0.0.0 serves other machines: give --api-key")
    assert result.stderr.count("\n") == 1
    result = CliRunner().invoke(cli, ["serve", "-m", folder, "-m", folder])
    assert result.exit_code == 2 and "two exports would be served as" in result.stderr
    result = CliRunner().invoke(cli, ["serve", "-m", "no-such-export"])
    assert result.exit_code == 1 and "no export named 'no-such-export'" in result.stderr and result.stdout == ""


def test_served_names():
    from onnxpipe.serve.run import check_host, is_loopback, served_names

    assert served_names(("minilm", "exports/smollm2/", "sentiment=clf")) == {
        "minilm": "minilm",
        "smollm2": "exports/smollm2/",
        "clf": "sentiment",
    }
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")
    check_host("0.0.0.0", "key", False)
    check_host("0.0.0.0", None, True)


def test_a_client_that_goes_away_mid_stream_cancels_its_generation(pipelines, monkeypatch):
    """Driven as ASGI directly: the client reads one chunk, then disconnects; the generation stops."""
    _slow_steps(monkeypatch, pipelines, 0.02)
    app = create_app(pipelines, Settings())
    body = json.dumps({**CHAT, "max_tokens": 200, "temperature": 0, "stream": True}).encode()

    async def main():
        sent: list[dict] = []
        gone = asyncio.Event()
        leaving: list[asyncio.Future] = []
        requested = False

        async def receive():
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def leave_once_generating():
            while not app.app.state.served["chat"].generator.batcher.running:  # type: ignore[attr-defined]
                await asyncio.sleep(0.005)
            gone.set()  # the client read its first chunk and went away, mid-generation

        async def send(message):
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("body") and not leaving:
                leaving.append(asyncio.ensure_future(leave_once_generating()))

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 5000),
            "server": ("test", 80),
        }
        await asyncio.wait_for(app(scope, receive, send), 20)
        served = app.app.state.served["chat"]  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while served.generator.batcher.running or served.generator.batcher.waiting:
            assert time.monotonic() < deadline, "the generation kept running after its client left"
            await asyncio.sleep(0.02)
        return sent, served.generator.describe()

    sent, stats = asyncio.run(main())
    assert sent[0]["status"] == 200
    chunks = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert b"[DONE]" not in chunks  # it ended early
    assert stats["cancelled"] == 1 and stats["steps"] < 150, stats


@pytest.mark.parametrize("model", ["chat", "shared"])
def test_concurrent_greedy_generations_equal_each_alone(pipelines, shared_buffer_export, model):
    """8 chat requests at once share decoding steps (continuous batching) and get what each gets alone, on
    the fused CPU graph ("chat") and on onnxpipe's CUDA graph with its shared key/value buffer ("shared":
    its float32 form, which the CPU runs)."""
    if model == "shared":
        shared = onnxpipe.load(shared_buffer_export, device="cpu", threads=1, on_error="null")
        assert shared.model.manifest["graph"]["kv_cache"] == "shared-buffer"
        pipelines = {**pipelines, "shared": shared}
    prompts = [f"Question {i}: {'why ' * i}is the sky blue?" for i in range(8)]
    lengths = [4 + 3 * i for i in range(8)]  # they leave the batch at different steps

    async def main():
        app = create_app(pipelines, Settings())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            responses = await asyncio.gather(
                *(
                    http.post(
                        "/v1/chat/completions",
                        json={
                            "model": model,
                            "messages": [{"role": "user", "content": p}],
                            "max_tokens": n,
                            "temperature": 0,
                        },
                    )
                    for p, n in zip(prompts, lengths)
                )
            )
            health = (await http.get("/health")).json()
        return responses, health

    responses, health = asyncio.run(main())
    assert health["models"][model]["generation"]["max_rows"] > 1, health  # they did run together
    for prompt, n, response in zip(prompts, lengths, responses):
        alone = pipelines[model](prompt, chat=True, max_new_tokens=n, temperature=0.0)
        body = response.json()
        assert body["choices"][0]["message"]["content"] == alone.generated_text, prompt
        assert body["usage"]["completion_tokens"] == alone.generated_tokens


def test_a_failed_model_run_is_a_500_without_details(pipelines, monkeypatch):
    decoder = pipelines["chat"].task_for({}).lm.decoder

    def broken(*args, **kw):
        raise RuntimeError("secret detail of a broken graph")

    monkeypatch.setattr(decoder, "decode", broken)
    log: list[str] = []
    with _client(pipelines, log=log) as client:
        response = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5})
        _error(response, 500, type="server_error")
        assert "secret" not in response.text
        events = _events(client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5, "stream": True}))
        assert events[-1]["error"]["type"] == "server_error" and "secret" not in json.dumps(events)
    assert sum("secret detail of a broken graph" in line for line in log) == 2


def test_without_the_serve_extra_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if `pip install onnxpipe` without [serve]
    result = CliRunner().invoke(cli, ["serve", "-m", "sentiment"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (
        "onnxpipe: error: onnxpipe serve needs the [serve] extra (uvicorn is missing): install onnxpipe[serve]\n"
    )
