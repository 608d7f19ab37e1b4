"""`onnxpipe serve`: the exports behind an OpenAI-compatible HTTP server, loaded once and kept warm."""

from __future__ import annotations

import click

from onnxpipe.commands._options import complete_export_names, device_options


@click.command("serve")
@click.option(
    "-m",
    "--model",
    "models",
    required=True,
    multiple=True,
    metavar="MODEL[=NAME][@DEVICE]",
    shell_complete=complete_export_names,
    help="An export to serve (repeatable): a name in the export home or a path, served as its name "
    "(the folder's name for a path), or as NAME after '='. Clients reach only these names. "
    "@DEVICE pins it to a device (cuda:1, cpu); the others run on --device.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to bind.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="The port to bind (0: any free port; the log says which).",
)
@click.option(
    "--api-key",
    envvar="ONNXPIPE_API_KEY",
    metavar="KEY",
    help="Require 'Authorization: Bearer KEY' on /v1 (compared in constant time). Needed to bind an address "
    "other than loopback, unless --no-auth. [env: ONNXPIPE_API_KEY]",
)
@click.option("--no-auth", is_flag=True, help="Serve an address other than loopback without an API key.")
@click.option(
    "--batch-wait-ms",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    metavar="MS",
    help="How long a request waits for others to share its model run (encoder and seq2seq exports).",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=1),
    default=4 * 1024 * 1024,
    show_default=True,
    metavar="N",
    help="Larger request bodies get 413.",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    metavar="SECONDS",
    help="A request still running after this gets 408 (its generation stops).",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    metavar="N",
    help="Requests waiting per export, at most; more get 429.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="The access log on stderr: one line per request, as text or JSON.",
)
@device_options
def serve(
    models: tuple[str, ...],
    host: str,
    port: int,
    api_key: str | None,
    no_auth: bool,
    batch_wait_ms: float,
    max_body_bytes: int,
    request_timeout: float,
    max_queue: int,
    log_format: str,
    device: str,
    threads: int | None,
) -> None:
    """Serve exports over HTTP with OpenAI's API, each loaded once and kept warm.

    Any OpenAI client works against http://HOST:PORT/v1: chat and text completions (streamed
    or not) on text-generation exports, embeddings on feature-extraction exports, and the
    models list. onnxpipe's own POST /v1/classify, /v1/tag, /v1/fill-mask, /v1/translate and
    /v1/summarize take {"model", "input": a text or a list, the task's options} and answer
    {"data": [the --format jsonl record per input]}. GET /health says what is served.

    Concurrent requests to one encoder export share model runs (--batch-wait-ms). It binds
    127.0.0.1; any other address needs --api-key or --no-auth. SIGTERM or Ctrl-C stops it after
    the requests in flight. On a machine with several GPUs, -m NAME@cuda:N puts each export on
    its own GPU.

    \b
      onnxpipe serve -m smollm2 -m minilm --port 8080
      onnxpipe serve -m minilm --host 0.0.0.0 --api-key "$KEY"
      onnxpipe serve -m smollm2@cuda:0 -m minilm@cuda:1 --device cuda
    """
    from onnxpipe.errors import require_extra

    require_extra("serve", "onnxpipe serve", "starlette", "uvicorn")
    from onnxpipe.serve.run import check_host, load_exports, pinned_devices, run_server, served_names

    check_host(host, api_key, no_auth)
    models, pinned = pinned_devices(models)
    names = served_names(models)
    pipelines = load_exports(names, device, threads, pinned)
    from onnxpipe.serve.app import Settings

    settings = Settings(
        api_key=api_key,
        batch_wait_ms=batch_wait_ms,
        max_body_bytes=max_body_bytes,
        request_timeout=request_timeout,
        max_queue=max_queue,
        log_format=log_format,
    )
    run_server(pipelines, settings, host, port)
