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
from aiohttp.abc import AbstractAccessLogger

from ..errors import Error

log = logging.getLogger("listenloop.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
STATIC_DIR = Path(__file__).resolve().parent / "static"
STOP_POLL_S = 0.1  # how often serve() looks at its stop event
# TCP connections beyond the sessions: room to answer a refusal (503), /healthz and the page
# while every session is taken; past that a new connection is closed as it opens.
SPARE_CONNECTIONS = 4
# A connection that has not become a WebSocket session this long after it opened (a slow or
# half-open client, an idle keep-alive) is closed: plain HTTP requests take milliseconds.
NON_SESSION_TIMEOUT_S = 10.0
_STATIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # one plain file name, no path


class ServerState:
    """What the handlers share: the runtime, the limits and the open connections."""

    def __init__(self, runtime, *, api_key, allowed_origins, max_sessions, max_frame_bytes, idle_timeout_s,
                 send_timeout_s, static_dir, allowed_hosts=()):
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        if max_frame_bytes < 1024:
            raise ValueError("max_frame_bytes must be at least 1024")
        if not idle_timeout_s > 0 or not send_timeout_s > 0:
            raise ValueError("idle_timeout_s and send_timeout_s must be positive")
        self.runtime = runtime
        self.api_key = api_key or None
        self.allowed_origins = frozenset(_origin(o) for o in allowed_origins)
        self.allowed_hosts = frozenset(_host_name(h) for h in allowed_hosts)
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

    def host_allowed(self, request: web.Request) -> bool:
        """Without an API key, a browser page on another site could reach this server by
        DNS rebinding (its name resolving to 127.0.0.1): only requests naming this server —
        a loopback name with the server's port, or an --allow-host name — are served."""
        if self.api_key is not None:
            return True
        name, port = _split_host(request.host)
        if name in self.allowed_hosts:
            return True
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        local_port = sockname[1] if sockname else None
        return (name in LOOPBACK_NAMES or is_loopback(name)) and port == local_port

    def admit(self) -> bool:
        if self.reserved >= self.max_sessions:
            self.refused += 1
            return False
        self.reserved += 1
        self.served += 1
        return True

    def release(self) -> None:
        self.reserved -= 1


LOOPBACK_NAMES = frozenset({"localhost", "localhost."})


def _host_name(text: str) -> str:
    return text.strip().lower().strip("[]")


def _split_host(host: str) -> tuple[str, int | None]:
    """A Host header's (lower-case name without brackets, port or None)."""
    try:
        parts = urlsplit(f"//{host}")
        return _host_name(parts.hostname or ""), parts.port
    except ValueError:
        return _host_name(host), -1  # a malformed port never matches


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
    if not state.host_allowed(request):
        return json_error(403, f"host {request.host!r} is not allowed: without an API key only loopback names "
                          "and --allow-host names are served", "host_not_allowed")
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


def create_app(runtime, *, api_key: str | None = None, allowed_origins=(), allowed_hosts=(), max_sessions: int = 8,
               max_frame_bytes: int = 1_048_576, idle_timeout_s: float = 60.0, send_timeout_s: float = 10.0,
               static_dir=None) -> web.Application:
    """The server's aiohttp application over one loaded `runtime`.

    `api_key`: when set, every route but /healthz needs `Authorization: Bearer KEY` or
    `?key=KEY`. `allowed_origins`: browser origins accepted besides the server's own.
    `allowed_hosts`: Host names served besides loopback ones when there is no API key.
    `max_sessions`: open WebSocket connections at most (each is one Session); more are
    refused with HTTP 503. `max_frame_bytes`: the largest WebSocket message processed; larger
    ones get an error event (past four times this size the connection closes, code 1009).
    `idle_timeout_s`: a connection without any frame for this long is closed.
    `send_timeout_s`: a client that reads nothing for this long while events wait for it is
    disconnected. `static_dir`: the browser page's folder (default: the package's static/).
    """
    from .pcm import pcm_handler
    from .realtime import realtime_handler

    state = ServerState(runtime, api_key=api_key, allowed_origins=tuple(allowed_origins),
                        allowed_hosts=tuple(allowed_hosts), max_sessions=max_sessions,
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


def limit_connections(server: web.Server, state: ServerState, timeout_s: float = NON_SESSION_TIMEOUT_S) -> None:
    """Count TCP connections, not only sessions, against the cap: past max_sessions +
    SPARE_CONNECTIONS a new connection is closed at once, and one that is not a WebSocket
    session `timeout_s` after it opened is closed then."""
    admitted = server.connection_made
    loop = asyncio.get_running_loop()

    def connection_made(handler, transport) -> None:
        admitted(handler, transport)
        if len(server.connections) > state.max_sessions + SPARE_CONNECTIONS:
            state.refused += 1
            transport.abort()
            return
        loop.call_later(timeout_s, _close_unless_session, state, transport)

    server.connection_made = connection_made


def _close_unless_session(state: ServerState, transport) -> None:
    if all(c.request.transport is not transport for c in state.connections):
        transport.abort()  # (a no-op if it is closed already)


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


def check_port(port) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise Error(f"--port must be a TCP port number from 1 to 65535, got {port!r}")


class AccessLog(AbstractAccessLogger):
    """One line per request (with -v), the API key of a `?key=` URL replaced by ***."""

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        url = request.rel_url
        if "key" in url.query:
            url = url.update_query(key="***")
        self.logger.info('%s "%s %s" %d %.3f s', request.remote, request.method, url, response.status, time)


def api_key_from_env(name: str | None) -> str | None:
    if name is None:
        return None
    value = os.environ.get(name, "")
    if not value.strip():
        raise Error(f"--api-key-env {name}: the environment variable {name} is not set or empty")
    return value.strip()


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, package=None, profile: str = "cpu",
          max_sessions: int = 8, api_key_env: str | None = None, allowed_origins=(), allowed_hosts=(), *,
          stop: threading.Event | None = None, **options) -> None:
    """Load the model once and serve until `stop` is set (or, without one, until interrupted);
    blocking. `options` go to create_app."""
    from ..session import Runtime

    check_port(port)
    api_key = api_key_from_env(api_key_env)
    check_bind(host, api_key)
    runtime = Runtime(package, profile)
    try:
        app = create_app(runtime, api_key=api_key, allowed_origins=allowed_origins,
                         allowed_hosts=(*allowed_hosts, host), max_sessions=max_sessions, **options)
        asyncio.run(_serve_until(app, host, port, runtime.package.name, stop or threading.Event()))
    finally:
        runtime.close()


async def start(app: web.Application, host: str, port: int, *, non_session_timeout_s: float = NON_SESSION_TIMEOUT_S,
                **runner_options) -> web.AppRunner:
    """Serve `app` on host:port as `listenloop serve` does: access log without keys, TCP
    connections capped and timed out (limit_connections), no signal handlers. Returns the
    started runner; its cleanup() stops it."""
    runner = web.AppRunner(app, handle_signals=False, access_log_class=AccessLog, **runner_options)
    await runner.setup()
    limit_connections(runner.server, app[STATE], non_session_timeout_s)
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


async def _serve_until(app: web.Application, host: str, port: int, name: str, stop: threading.Event) -> None:
    # Signals are the caller's to handle (the command line's main thread sets `stop`).
    runner = await start(app, host, port)
    try:
        shown = f"[{host}]" if ":" in host else host
        print(f"listenloop: serving {name} on http://{shown}:{port} "
              f"(ws://{shown}:{port}/v1/realtime, /v1/pcm); Ctrl-C to stop", file=sys.stderr, flush=True)
        while not stop.is_set():
            await asyncio.sleep(STOP_POLL_S)
    finally:
        await runner.cleanup()
