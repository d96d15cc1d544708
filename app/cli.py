"""``pgttt serve``: the evaluation service on uvicorn; flags override ``PGTTT_*`` variables."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
from typing import Any

GRACEFUL_SHUTDOWN_S = 5
EPILOG = """With no arguments it serves the bundled demo checkpoint and demo val data (on every visible GPU, else
the CPU) at http://127.0.0.1:8000, API docs at /docs. Every flag has a PGTTT_ variable, e.g.
PGTTT_DEVICES=cuda:0,cuda:1. See docs/service.md."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the evaluation server",
        description="Run the evaluation server (uvicorn); flags override PGTTT_* variables.",
        epilog=EPILOG,
    )
    p.add_argument(
        "--checkpoint-dir",
        action="append",
        dest="checkpoint_dirs",
        metavar="DIR",
        help="folder with *.bin / *.ptz checkpoints (repeatable; default: the demo)",
    )
    p.add_argument(
        "--data-dir",
        action="append",
        dest="data_dirs",
        metavar="DIR",
        help="folder with datasets (fineweb_val_*.bin + tokenizer; repeatable; default: the demo)",
    )
    p.add_argument("--devices", help="cpu, cuda, or cuda:0,cuda:1 (default: all visible GPUs, else cpu)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000; 0: any free port)")
    p.add_argument("--api-key", help="require this key (Authorization: Bearer KEY or X-API-Key)")
    p.add_argument("--state-dir", help="job database and uploads (default ~/.local/state/pgttt)")
    p.add_argument("--database", help="SQLite job database (default STATE_DIR/jobs.sqlite)")
    p.add_argument("--queue-limit", type=int, help="queued jobs accepted before 429 (default 256)")
    p.add_argument("--max-upload-bytes", type=int, help="largest request body (default 64 MiB)")
    p.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="warm up each checkpoint before /readyz says ready (default on)",
    )
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replay compiled static training graphs as CUDA graphs (default on)",
    )
    p.add_argument(
        "--compile-cache", help="torch.compile's caches, reused after a restart (default STATE_DIR/compile-cache)"
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace):
    """Settings from the flags given, the ``PGTTT_*`` environment for the rest."""
    from pydantic import ValidationError

    from .settings import Settings, SettingsError

    given = {k: v for k, v in vars(args).items() if k not in ("command", "func") and v is not None}
    if "devices" in given:
        given["devices"] = given["devices"].split(",")
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SettingsError(f"--{where.replace('_', '-')}: {first['msg']} (got {first.get('input')!r})") from None
    for field, flag in (("checkpoint_dirs", "--checkpoint-dir"), ("data_dirs", "--data-dir")):
        where = flag if field in given else f"PGTTT_{field.upper()}"
        for folder in getattr(settings, field):
            if not folder.is_dir():
                why = "is not a directory" if folder.exists() else "no such directory"
                raise SettingsError(f"{where} {folder}: {why}")
    return settings


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before any checkpoint is loaded: a port in use is a setting error (exit 2)."""
    from .settings import SettingsError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise SettingsError(f"--host {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port in TIME_WAIT is free
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise SettingsError(f"--port {port}: cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .main import create_app

    settings = settings_from_args(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = listen(settings.host, settings.port)
    app = create_app(settings)
    service = app.state.service

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # Event streams never end by themselves, and uvicorn waits for open requests before stopping.
            asyncio.get_running_loop().call_soon_threadsafe(service.close_streams)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    try:
        Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0
