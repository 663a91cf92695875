"""The aiohttp application: routes, API key, Origin allow-list, session cap, static files."""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import re
import stat
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from ..errors import Error

log = logging.getLogger("listenloop.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
STATIC_DIR = Path(__file__).resolve().parent / "static"
STOP_POLL_S = 0.1  # how often serve() looks at its stop event
_STATIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # one plain file name, no path


class ServerState:
    """What the handlers share: the runtime, the limits and the open connections."""

    def __init__(self, runtime, *, api_key, allowed_origins, max_sessions, max_frame_bytes, idle_timeout_s,
                 send_timeout_s, static_dir):
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        if max_frame_bytes < 1024:
            raise ValueError("max_frame_bytes must be at least 1024")
        if not idle_timeout_s > 0 or not send_timeout_s > 0:
            raise ValueError("idle_timeout_s and send_timeout_s must be positive")
        self.runtime = runtime
        self.api_key = api_key or None
        self.allowed_origins = frozenset(_origin(o) for o in allowed_origins)
        self.max_sessions = int(max_sessions)
        self.max_frame_bytes = int(max_frame_bytes)
        self.idle_timeout_s = float(idle_timeout_s)
        self.send_timeout_s = float(send_timeout_s)
        self.static_dir = Path(static_dir)
        self.connections: set = set()
        self.reserved = 0  # connections admitted whose handler has not finished yet
        self.served = 0  # connections admitted since the start
        self.refused = 0  # connections refused by the session cap

    @property
    def model_name(self) -> str:
        return self.runtime.package.name

    # -- checks made before a WebSocket upgrade (and before any file is served) ---------

    def authorized(self, request: web.Request) -> bool:
        if self.api_key is None:
            return True
        given = None
        header = request.headers.get("Authorization", "")
        if header[:7].lower() == "bearer ":
            given = header[7:].strip()
        elif "key" in request.query:
            given = request.query["key"]
        if given is None:
            return False
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.api_key.encode("utf-8"))

    def origin_allowed(self, request: web.Request) -> bool:
        """Requests without an Origin header (non-browser clients) pass; a browser's Origin must
        be this server's own (same scheme, host and port) or in the allow-list."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        origin = _origin(origin)
        return origin == _origin(f"{request.scheme}://{request.host}") or origin in self.allowed_origins

    def admit(self) -> bool:
        if self.reserved >= self.max_sessions:
            self.refused += 1
            return False
        self.reserved += 1
        self.served += 1
        return True

    def release(self) -> None:
        self.reserved -= 1


def _origin(text: str) -> str:
    """scheme://host[:port], lower case, without a default port or a trailing slash."""
    text = text.strip()
    if text == "null":
        return "null"
    try:
        parts = urlsplit(text)
        scheme, host, port = parts.scheme.lower(), (parts.hostname or "").lower(), parts.port
    except ValueError:
        return text.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is None or (scheme, port) in (("http", 80), ("https", 443), ("ws", 80), ("wss", 443)):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


STATE = web.AppKey("listenloop_state", ServerState)


def json_error(status: int, message: str, code: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def guard(request: web.Request, *, counts: bool) -> web.Response | None:
    """The refusal for a request (401, 403, 503), or None to go on. With `counts`, an
    admitted request holds one session slot until `ServerState.release()`."""
    state = request.app[STATE]
    if not state.origin_allowed(request):
        return json_error(403, f"origin {request.headers.get('Origin')!r} is not allowed (see --allow-origin)",
                          "origin_not_allowed")
    if not state.authorized(request):
        return json_error(401, "missing or wrong API key: send 'Authorization: Bearer KEY' or ?key=KEY",
                          "invalid_api_key")
    if counts and not state.admit():
        return json_error(503, f"the server is at its session limit ({state.max_sessions}); try again later",
                          "session_limit")
    return None


# -- routes -----------------------------------------------------------------------------

async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"status": "ok", "model": state.model_name, "sessions": len(state.connections),
                              "open_sessions": state.runtime.open_sessions, "max_sessions": state.max_sessions,
                              "served": state.served, "refused": state.refused})


def _static_file(state: ServerState, name: str) -> Path | None:
    """The regular file `name` directly inside the static folder, or None. Names with path
    separators, dot-dot or a leading dot, and symbolic links, are never served."""
    if not _STATIC_NAME.fullmatch(name) or ".." in name:
        return None
    folder = state.static_dir
    path = folder / name
    try:
        info = os.lstat(path)
        real_folder = folder.resolve(strict=True)
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(info.st_mode) or path.resolve().parent != real_folder:
        return None
    return path


async def static_file(request: web.Request) -> web.StreamResponse:
    refusal = guard(request, counts=False)
    if refusal is not None:
        return refusal
    name = request.match_info.get("name", "index.html")
    path = _static_file(request.app[STATE], name)
    if path is None:
        raise web.HTTPNotFound(text=json.dumps({"error": {"code": "not_found", "message": "no such file"}}),
                               content_type="application/json")
    response = web.FileResponse(path)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


async def _on_shutdown(app: web.Application) -> None:
    for connection in list(app[STATE].connections):
        await connection.shutdown("server shutting down")


def create_app(runtime, *, api_key: str | None = None, allowed_origins=(), max_sessions: int = 8,
               max_frame_bytes: int = 1_048_576, idle_timeout_s: float = 60.0, send_timeout_s: float = 10.0,
               static_dir=None) -> web.Application:
    """The server's aiohttp application over one loaded `runtime`.

    `api_key`: when set, every route but /healthz needs `Authorization: Bearer KEY` or
    `?key=KEY`. `allowed_origins`: browser origins accepted besides the server's own.
    `max_sessions`: open WebSocket connections at most (each is one Session); more are
    refused with HTTP 503. `max_frame_bytes`: the largest WebSocket message processed; larger
    ones get an error event (past four times this size the connection closes, code 1009).
    `idle_timeout_s`: a connection without any frame for this long is closed.
    `send_timeout_s`: a client that reads nothing for this long while events wait for it is
    disconnected. `static_dir`: the browser page's folder (default: the package's static/).
    """
    from .pcm import pcm_handler
    from .realtime import realtime_handler

    state = ServerState(runtime, api_key=api_key, allowed_origins=tuple(allowed_origins), max_sessions=max_sessions,
                        max_frame_bytes=max_frame_bytes, idle_timeout_s=idle_timeout_s,
                        send_timeout_s=send_timeout_s, static_dir=static_dir or STATIC_DIR)
    app = web.Application(client_max_size=64 * 1024)
    app[STATE] = state
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/realtime", realtime_handler)
    app.router.add_get("/v1/pcm", pcm_handler)
    app.router.add_get("/", static_file)
    app.router.add_get("/static/{name}", static_file)
    app.on_shutdown.append(_on_shutdown)
    return app


# -- binding ----------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses; any other name or address (including the
    wildcard addresses 0.0.0.0 and ::) is treated as reachable from the network."""
    host = host.strip().strip("[]")
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse (Error) to listen beyond this machine without an API key."""
    if not is_loopback(host) and not api_key:
        raise Error(f"refusing to listen on {host!r} without an API key: set one in an environment variable "
                    "and pass --api-key-env VAR (or bind to 127.0.0.1)")


def api_key_from_env(name: str | None) -> str | None:
    if name is None:
        return None
    value = os.environ.get(name, "")
    if not value.strip():
        raise Error(f"--api-key-env {name}: the environment variable {name} is not set or empty")
    return value.strip()


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, package=None, profile: str = "cpu",
          max_sessions: int = 8, api_key_env: str | None = None, allowed_origins=(), *,
          stop: threading.Event | None = None, **options) -> None:
    """Load the model once and serve until `stop` is set (or, without one, until interrupted);
    blocking. `options` go to create_app."""
    from ..session import Runtime

    api_key = api_key_from_env(api_key_env)
    check_bind(host, api_key)
    runtime = Runtime(package, profile)
    try:
        app = create_app(runtime, api_key=api_key, allowed_origins=allowed_origins, max_sessions=max_sessions,
                         **options)
        asyncio.run(_serve_until(app, host, port, runtime.package.name, stop or threading.Event()))
    finally:
        runtime.close()


async def _serve_until(app: web.Application, host: str, port: int, name: str, stop: threading.Event) -> None:
    # Signals are the caller's to handle (the command line's main thread sets `stop`).
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        shown = f"[{host}]" if ":" in host else host
        print(f"listenloop: serving {name} on http://{shown}:{port} "
              f"(ws://{shown}:{port}/v1/realtime, /v1/pcm); Ctrl-C to stop", file=sys.stderr, flush=True)
        while not stop.is_set():
            await asyncio.sleep(STOP_POLL_S)
    finally:
        await runner.cleanup()
