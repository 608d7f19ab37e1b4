"""The starlette application: OpenAI's endpoints and onnxpipe's task endpoints on the served exports.

Every answer other than 200 carries OpenAI's error body. No traceback ever reaches a client: an
unexpected exception is a 500 with a generic message, its details go to the server's log.
Only the exports given at start-up are reachable, by their served name; a model name is never a path.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from onnxpipe.api import Pipeline
from onnxpipe.errors import OnnxpipeError
from onnxpipe.registry import FAMILIES, TaskFamily
from onnxpipe.serve import openai
from onnxpipe.serve.batching import DynamicBatcher
from onnxpipe.serve.batching import QueueFull as BatchQueueFull
from onnxpipe.serve.generation import BatcherClosed, Generator, Sampling
from onnxpipe.serve.generation import QueueFull as GenerationQueueFull
from onnxpipe.serve.openai import APIError
from onnxpipe.tasks.causal import render_chat_template

MAX_N = 16  # choices per request (each one is a row of the batch)
_GENERIC_500 = "The server had an error while processing your request. Its log says more."


@dataclass
class Settings:
    api_key: str | None = None  # None: no auth (loopback, or --no-auth)
    batch_wait_ms: float = 5.0
    max_body_bytes: int = 4 * 1024 * 1024
    request_timeout: float = 300.0  # seconds
    max_queue: int = 256  # waiting requests per export
    log_format: str = "text"  # text | json


@dataclass
class Served:
    """One export as served: its name, its pipeline, and what runs requests on it."""

    name: str
    pipeline: Pipeline
    created: int = field(default_factory=openai.now)
    generator: Generator | None = None
    batchers: dict[str, DynamicBatcher] = field(default_factory=dict)

    @property
    def export_task(self) -> str:
        return str(self.pipeline.model.task)

    def serves(self, family: TaskFamily) -> bool:
        return self.export_task in family.export_tasks

    def batcher(self, family: TaskFamily, settings: Settings) -> DynamicBatcher:
        """The batcher of FAMILY on this export (a text2text export serves translate and summarize)."""
        if family.name not in self.batchers:
            pipeline = self.pipeline
            if pipeline.family.name != family.name:
                pipeline = Pipeline(pipeline.model, family, on_error=pipeline.on_error)
            self.batchers[family.name] = DynamicBatcher(pipeline, settings.batch_wait_ms, settings.max_queue)
        return self.batchers[family.name]

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.pipeline.task, "provider": self.pipeline.provider}
        if self.generator is not None:
            out["generation"] = self.generator.describe()
        for family, batcher in self.batchers.items():
            out.setdefault("batching", {})[family] = {**batcher.stats.to_dict(), "queued": batcher.queued}
        return out


def stderr_log(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def create_app(
    pipelines: dict[str, Pipeline], settings: Settings | None = None, log: Callable[[str], None] = stderr_log
) -> ASGIApp:
    """The ASGI app serving PIPELINES (served name -> opened export) with SETTINGS; LOG takes each log line."""
    settings = settings or Settings()
    served = {name: Served(name, p) for name, p in pipelines.items()}
    for s in served.values():
        if s.pipeline.family.kind == "decoder":
            s.generator = Generator(s.pipeline, settings.max_queue)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        for s in served.values():
            for batcher in s.batchers.values():
                await batcher.close()
            if s.generator is not None:
                s.generator.close()

    handlers = _Handlers(served, settings, log)
    routes = [
        Route("/health", handlers.health, methods=["GET"]),
        Route("/v1/models", handlers.endpoint(handlers.models, auth=True), methods=["GET"]),
        Route("/v1/models/{model:path}", handlers.endpoint(handlers.model, auth=True), methods=["GET"]),
        Route("/v1/chat/completions", handlers.endpoint(handlers.chat), methods=["POST"]),
        Route("/v1/completions", handlers.endpoint(handlers.completions), methods=["POST"]),
        Route("/v1/embeddings", handlers.endpoint(handlers.embeddings), methods=["POST"]),
        Route("/v1/{task}", handlers.endpoint(handlers.task), methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.state.served = served
    return _AccessLog(app, settings.log_format, log)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 (no such route, wrong method), with OpenAI's body."""
    status = getattr(exc, "status_code", 500)
    message = {404: f"Unknown request URL: {request.method} {request.url.path}", 405: "Method not allowed"}.get(
        status, "The request could not be handled"
    )
    code = "unknown_url" if status == 404 else None
    return _error_response(APIError(status, message, code=code))


async def _server_error(request: Request, exc: Exception) -> Response:  # pragma: no cover - handlers catch all
    return _error_response(APIError(500, _GENERIC_500, type="server_error"))


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class _Handlers:
    def __init__(self, served: dict[str, Served], settings: Settings, log: Callable[[str], None]):
        self.served = served
        self.settings = settings
        self.log = log

    # --- the frame around every endpoint -----------------------------------------------------

    def endpoint(
        self, handler: Callable[[Request, dict[str, Any]], Awaitable[Response]], auth: bool = True
    ) -> Callable[[Request], Awaitable[Response]]:
        """Auth, body limit, JSON, timeout, and errors as OpenAI bodies around HANDLER(request, body)."""

        async def run(request: Request) -> Response:
            try:
                if auth:
                    self._check_auth(request)
                body = await self._read_json(request) if request.method == "POST" else {}
                return await asyncio.wait_for(handler(request, body), self.settings.request_timeout)
            except APIError as exc:
                return _error_response(exc)
            except asyncio.TimeoutError:
                return _error_response(
                    APIError(408, f"Request timed out after {self.settings.request_timeout:g} s", type="timeout")
                )
            except (BatchQueueFull, GenerationQueueFull):
                return _error_response(_queue_full())
            except BatcherClosed:
                return _error_response(APIError(503, "The server is shutting down", type="server_error"))
            except OnnxpipeError as exc:  # the task refused the request's options or input
                return _error_response(APIError(400, str(exc)))
            except Exception:
                self.log(f"error: {request.method} {request.url.path}: {traceback.format_exc().rstrip()}")
                return _error_response(APIError(500, _GENERIC_500, type="server_error"))

        return run

    def _check_auth(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(
                401,
                "Incorrect API key provided: send it as 'Authorization: Bearer KEY'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def _read_json(self, request: Request) -> dict[str, Any]:
        limit = self.settings.max_body_bytes
        too_big = APIError(413, f"Request body too large: at most {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            raise APIError(
                400,
                "We could not parse the JSON body of your request. The body must be a JSON object.",
                code="invalid_json",
            ) from None
        if not isinstance(body, dict):
            raise APIError(400, "The body of your request must be a JSON object", code="invalid_json")
        return body

    def _lookup(self, request: Request, body: dict[str, Any], family: TaskFamily, endpoint: str) -> Served:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise APIError(400, "You must provide a model parameter", param="model")
        request.scope.setdefault("onnxpipe", {})["model"] = name
        served = self.served.get(name)
        if served is None:
            raise openai.model_not_found(name)
        if not served.serves(family):
            raise APIError(
                400,
                f"The model `{name}` is a {served.export_task} export: it does not serve {endpoint} "
                f"(that needs a {' or '.join(family.export_tasks)} export)",
                param="model",
                code="model_not_supported",
            )
        return served

    # --- endpoints ---------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": {name: s.describe() for name, s in self.served.items()}})

    async def models(self, request: Request, body: dict[str, Any]) -> Response:
        data = [openai.model_object(name, s.created, s.export_task) for name, s in self.served.items()]
        return JSONResponse({"object": "list", "data": data})

    async def model(self, request: Request, body: dict[str, Any]) -> Response:
        name = request.path_params["model"]
        served = self.served.get(name)
        if served is None:
            raise openai.model_not_found(name)
        return JSONResponse(openai.model_object(name, served.created, served.export_task))

    async def embeddings(self, request: Request, body: dict[str, Any]) -> Response:
        served = self._lookup(request, body, FAMILIES["embed"], "/v1/embeddings")
        texts, _ = openai.texts(body, "input", allow_empty=False)
        encoding = openai.field(body, "encoding_format", str, "float")
        if encoding not in ("float", "base64"):
            raise APIError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
        if body.get("dimensions") is not None:
            raise APIError(
                400, "'dimensions' is not supported: the export's vectors have a fixed size", param="dimensions"
            )
        results = await served.batcher(FAMILIES["embed"], self.settings).submit(texts, {})
        failed = next((r for r in results if r.error or r.value is None), None)
        if failed is not None:
            raise APIError(400, f"input could not be embedded: {failed.error or 'empty'}", param="input")
        tokenizer = served.pipeline.model.tokenizer
        # tokenizing (and templating, below) runs in a thread: a large body never stalls the other requests
        tokens = await asyncio.to_thread(lambda: sum(len(e.ids) for e in tokenizer.encode_batch(texts)))
        return JSONResponse(
            {
                "object": "list",
                "data": [openai.embedding_data(r.value, i, encoding) for i, r in enumerate(results)],
                "model": served.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def task(self, request: Request, body: dict[str, Any]) -> Response:
        """onnxpipe's own endpoints: the records the CLI's --format jsonl writes, one per input."""
        name = request.path_params["task"]
        family = FAMILIES.get(name)
        if family is None or family.kind == "decoder":
            served_tasks = sorted(f for f in FAMILIES if FAMILIES[f].kind != "decoder")
            raise APIError(
                404,
                f"Unknown request URL: POST /v1/{name} (onnxpipe's task endpoints: {', '.join(served_tasks)})",
                code="unknown_url",
            )
        served = self._lookup(request, body, family, f"/v1/{name}")
        texts = openai.task_inputs(body)
        options = {k: v for k, v in body.items() if k not in ("model", "input", "user")}
        results = await served.batcher(family, self.settings).submit(texts, options)
        return JSONResponse({"object": "list", "model": served.name, "data": [r.to_dict() for r in results]})

    # --- generation ----------------------------------------------------------------------------

    async def chat(self, request: Request, body: dict[str, Any]) -> Response:
        served = self._lookup(request, body, FAMILIES["generate"], "/v1/chat/completions")
        assert served.generator is not None
        lm = served.generator.lm
        messages = openai.messages(body)
        if not lm.chat_template:
            raise APIError(
                400,
                f"The model `{served.name}` has no chat template: use /v1/completions",
                param="model",
                code="model_not_supported",
            )
        template = lm.chat_template
        ids = await asyncio.to_thread(
            lambda: lm.encode(render_chat_template(template, messages, lm.special_tokens), chat=True)
        )
        return await self._generate(request, body, served, [ids], chat=True)

    async def completions(self, request: Request, body: dict[str, Any]) -> Response:
        served = self._lookup(request, body, FAMILIES["generate"], "/v1/completions")
        assert served.generator is not None
        prompts, _ = openai.texts(body, "prompt")
        lm = served.generator.lm
        ids = await asyncio.to_thread(lambda: [lm.encode(p) for p in prompts])
        echo = bool(openai.field(body, "echo", bool, False))
        return await self._generate(request, body, served, ids, chat=False, echo=prompts if echo else None)

    async def _generate(
        self,
        request: Request,
        body: dict[str, Any],
        served: Served,
        prompts: list[list[int]],
        chat: bool,
        echo: list[str] | None = None,
    ) -> Response:
        generator = served.generator
        assert generator is not None
        n = openai.integer(body, "n", 1, MAX_N) or 1
        sampling = self._sampling(body, generator, prompts, chat)
        stream = bool(openai.field(body, "stream", bool, False))
        stream_options = openai.field(body, "stream_options", dict, {})
        include_usage = bool(stream_options.get("include_usage")) if stream else False
        response_id = openai.new_id("chatcmpl" if chat else "cmpl")
        created = openai.now()
        streams = generator.submit(prompts, n, sampling)
        if stream:
            return StreamingResponse(
                self._stream(served, streams, chat, response_id, created, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            outputs = await generator.complete(streams)
        except OnnxpipeError as exc:  # the model run failed (the request itself was accepted): the server's fault
            self.log(f"error: generation on {served.name}: {exc}")
            raise APIError(500, _GENERIC_500, type="server_error") from None
        choices = []
        for i, out in enumerate(outputs):
            if chat:
                message = {"role": "assistant", "content": out.text, "refusal": None}
                choices.append({"index": i, "message": message, "finish_reason": out.finish_reason, "logprobs": None})
            else:
                text = (echo[i // n] if echo else "") + out.text
                choices.append({"index": i, "text": text, "finish_reason": out.finish_reason, "logprobs": None})
        return JSONResponse(
            {
                "id": response_id,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": served.name,
                "choices": choices,
                "usage": openai.usage(
                    sum(o.usage.prompt_tokens for o in outputs), sum(o.usage.completion_tokens for o in outputs)
                ),
                "system_fingerprint": None,
            }
        )

    def _sampling(self, body: dict[str, Any], generator: Generator, prompts: list[list[int]], chat: bool) -> Sampling:
        """The request's decoding settings; max_tokens over the model's context is a 400, as OpenAI answers it."""
        max_tokens = openai.integer(body, "max_completion_tokens", 1)
        param = "max_completion_tokens"
        if max_tokens is None:
            max_tokens, param = openai.integer(body, "max_tokens", 1), "max_tokens"
        longest = max((len(p) for p in prompts), default=0)
        if not longest:
            raise APIError(400, "The prompt is empty", param="messages" if chat else "prompt")
        context = generator.context
        wanted = max_tokens or generator.default_max_new_tokens
        if context is not None:
            room = context - longest
            if room < 1 or (max_tokens is not None and max_tokens > room):
                asked = max_tokens or 1
                what = "messages" if chat else "prompt"
                raise APIError(
                    400,
                    f"This model's maximum context length is {context} tokens. However, you requested "
                    f"{longest + asked} tokens ({longest} in the {what}, {asked} in the completion). "
                    f"Please reduce the length of the {what} or completion.",
                    param="messages" if chat else param,
                    code="context_length_exceeded",
                )
            wanted = min(wanted, room)
        return Sampling(
            max_new_tokens=wanted,
            temperature=openai.number(body, "temperature", 0.0, 2.0),
            top_p=openai.number(body, "top_p", 0.0, 1.0),
            seed=openai.field(body, "seed", int),
            stop=openai.stop_strings(body),
        )

    async def _stream(
        self,
        served: Served,
        streams: list[Any],
        chat: bool,
        response_id: str,
        created: int,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        """Server-sent events: one chunk per piece of text, a last chunk per choice with its finish_reason,
        the usage chunk when asked, then `data: [DONE]`. A client that goes away cancels the generation."""
        generator = served.generator
        assert generator is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout

        def chunk(choice: int, text: str | None, reason: str | None = None, first: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if text:
                    delta["content"] = text
                item: dict[str, Any] = {"index": choice, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                item = {"index": choice, "text": text or "", "finish_reason": reason, "logprobs": None}
            return _event(self._chunk(response_id, created, served.name, chat, [item], include_usage))

        prompt_tokens = completion_tokens = finished = 0
        events = generator.events(streams)
        try:
            if chat:
                for choice in range(len(streams)):
                    yield chunk(choice, None, first=True)
            while True:
                try:
                    arrived = await asyncio.wait_for(events.next(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    timeout = APIError(408, f"Request timed out after {self.settings.request_timeout:g} s", "timeout")
                    yield _event(timeout.body())
                    break
                except Exception as exc:
                    self.log(f"error: generation on {served.name}: {exc}")
                    yield _event(APIError(500, _GENERIC_500, type="server_error").body())
                    break
                if arrived is None:
                    break
                choice, event = arrived
                if event.text:
                    yield chunk(choice, event.text)
                if event.finish_reason is not None:
                    yield chunk(choice, None, event.finish_reason)
                    finished += 1
                    if event.usage is not None:
                        prompt_tokens += event.usage.prompt_tokens
                        completion_tokens += event.usage.completion_tokens
            if include_usage and finished == len(streams):
                final = self._chunk(response_id, created, served.name, chat, [], include_usage)
                final["usage"] = openai.usage(prompt_tokens, completion_tokens)
                yield _event(final)
            yield "data: [DONE]\n\n"
        finally:
            events.close()  # cancels the choices still running (client gone, timeout)

    @staticmethod
    def _chunk(
        response_id: str, created: int, model: str, chat: bool, choices: list[dict[str, Any]], include_usage: bool
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": response_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "system_fingerprint": None,
        }
        if include_usage:
            out["usage"] = None
        return out


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _queue_full() -> APIError:
    return APIError(
        429,
        "Too many requests are waiting for this model: retry later",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": "1"},
    )


class _AccessLog:
    """One line per request on the log: method, path, status, duration, model (text or JSON)."""

    def __init__(self, app: Starlette, log_format: str, log: Callable[[str], None]):
        self.app = app
        self.state = app.state
        self.log_format = log_format
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        info: dict[str, Any] = {}
        scope["onnxpipe"] = info
        status = {"code": 500}

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self._write(scope, status["code"], time.perf_counter() - start, info.get("model"))

    def _write(self, scope: Scope, status: int, seconds: float, model: str | None) -> None:
        client = scope.get("client")
        address = f"{client[0]}:{client[1]}" if client else "-"
        ms = round(seconds * 1000, 1)
        method, path = scope.get("method", "-"), scope.get("path", "-")
        if self.log_format == "json":
            record = {
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "client": address,
                "method": method,
                "path": path,
                "status": status,
                "duration_ms": ms,
                "model": model,
            }
            self.log(json.dumps(record))
        else:
            self.log(f'{address} "{method} {path}" {status} {ms} ms {model or "-"}')
