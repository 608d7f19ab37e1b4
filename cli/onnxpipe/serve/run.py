"""Starting the server: which names are served, the safety check of the address, the socket, uvicorn."""

from __future__ import annotations

import ipaddress
import re
import signal
import socket
from pathlib import Path
from typing import Any

from onnxpipe import console
from onnxpipe.api import Pipeline, load
from onnxpipe.errors import UsageError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, api_key: str | None, no_auth: bool) -> None:
    """Any address but loopback needs an API key or an explicit --no-auth."""
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty")
    if not is_loopback(host) and api_key is None and not no_auth:
        raise UsageError(
            f"--host {host} serves other machines: give --api-key KEY (or ONNXPIPE_API_KEY), or --no-auth to serve "
            "them without one"
        )


def served_names(models: tuple[str, ...]) -> dict[str, str]:
    """served name -> the -m value to load: MODEL=NAME, else the export's name (a path's last folder)."""
    out: dict[str, str] = {}
    for value in models:
        source, name = value, None
        if "=" in value and not Path(value).exists():
            source, name = value.rsplit("=", 1)
            if not name or not source:
                raise UsageError(f"-m {value!r}: give MODEL=NAME, both non-empty")
        if name is None:
            name = Path(source.rstrip("/")).name or source
        if name in out:
            raise UsageError(f"two exports would be served as {name!r}: name one of them with -m MODEL=NAME")
        out[name] = source
    return out


# What after a -m value's last '@' is meant as a device (an export's own '@', as in model@v2, is not)
_DEVICE_LIKE = re.compile(r"\s*(?:cuda|gpu|cpu|auto)", re.IGNORECASE)


def pinned_devices(models: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, str]]:
    """`-m MODEL[=NAME]@DEVICE` -> the -m values without their @DEVICE, and served name -> DEVICE.

    A value that names an existing path or export is taken whole, as served_names takes one with '='.
    A device that does not parse (cuda:-1, cuda:x, cuda:) is a usage error, not part of the name."""
    from onnxpipe.errors import ModelNotFoundError
    from onnxpipe.home import resolve_model
    from onnxpipe.runtime.device import parse_device

    plain: list[str] = []
    devices: dict[str, str] = {}
    for value in models:
        source, at, device = value.rpartition("@")
        if not at or not source or not _DEVICE_LIKE.match(device) or Path(value).exists():
            plain.append(value)
            continue
        try:
            resolve_model(value)
            plain.append(value)  # an export whose name ends so
            continue
        except ModelNotFoundError:
            pass
        try:
            parse_device(device)
        except UsageError as exc:
            raise UsageError(f"-m {value!r}: {exc.message}", hint=exc.hint) from None
        plain.append(source)
        (name,) = served_names((source,))
        devices[name] = device.strip().lower()
    return tuple(plain), devices


def load_exports(
    names: dict[str, str], device: str, threads: int | None, devices: dict[str, str] | None = None
) -> dict[str, Pipeline]:
    """Each export opened once, on_error="null" so that one bad input fails only its own record.
    DEVICES pins a served name to its own --device (`-m NAME@cuda:1`); the others get DEVICE."""
    pipelines = {}
    for name, source in names.items():
        pipeline = load(source, device=(devices or {}).get(name, device), threads=threads, on_error="null")
        for note in pipeline.notes:
            console.warn(note)
        console.info(f"serving {name} ({pipeline.task}) on {pipeline.provider}")
        pipelines[name] = pipeline
    return pipelines


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (bound here, so that --port 0 can say which port it got)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def run_server(pipelines: dict[str, Pipeline], settings: Any, host: str, port: int) -> None:
    """Serve until SIGTERM or Ctrl-C; both finish the requests in flight (SIGTERM then exits 0)."""
    import uvicorn

    from onnxpipe.serve.app import create_app

    app = create_app(pipelines, settings)
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,  # ours: one line per request, with the model
        lifespan="on",
        timeout_graceful_shutdown=int(settings.request_timeout) + 1,
        timeout_keep_alive=5,
        server_header=False,
    )
    server = _Server(config)
    console.info(f"listening on http://{shown}:{bound} (OpenAI API at http://{shown}:{bound}/v1)")
    server.run(sockets=[sock])
    console.info("stopped")


class _Server:
    """uvicorn's Server, except that a SIGTERM it shut down on gracefully is an exit 0, not re-raised."""

    def __new__(cls, config: Any) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                super().handle_exit(sig, frame)
                if sig == signal.SIGTERM:
                    self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

        return Server(config)
