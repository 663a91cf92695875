"""The aiohttp application: routes, static files, serving and stopping. The checks and the
shared state are state.py's; the handlers import that, never this module."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat
import sys
import threading
from pathlib import Path

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from ..errors import Error
from .health import healthz, metrics, readyz
from .metrics import ServerMetrics
from .pcm import pcm_handler
from .realtime import realtime_handler
from .state import STATE, ServerState, guard, is_loopback

log = logging.getLogger("listenloop.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
STATIC_DIR = Path(__file__).resolve().parent / "static"
STOP_POLL_S = 0.1  # how often serve() looks at its stop event and a drain at its sessions
DRAIN_TIMEOUT_S = 10.0  # --drain-timeout: open sessions' time to end once the server is stopping
# After the drain: each connection's time to take its going-away message and close frame, and
# the handlers' time to end, before the server stops without them.
CLOSE_TIMEOUT_S = 2.0
SHUTDOWN_REASON = "server shutting down"
# TCP connections beyond the sessions: room to answer a refusal (503), /healthz and the page
# while every session is taken; past that a new connection is closed as it opens.
SPARE_CONNECTIONS = 4
# A connection that has not become a WebSocket session this long after it opened (a slow or
# half-open client, an idle keep-alive) is closed: plain HTTP requests take milliseconds.
NON_SESSION_TIMEOUT_S = 10.0
_STATIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # one plain file name, no path


# -- routes -----------------------------------------------------------------------------

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
    await close_sessions(app)


def create_app(runtime, *, api_key: str | None = None, allowed_origins=(), allowed_hosts=(), max_sessions: int = 8,
               max_frame_bytes: int = 1_048_576, idle_timeout_s: float = 60.0, send_timeout_s: float = 10.0,
               static_dir=None, metrics_registry=None) -> web.Application:
    """The server's aiohttp application over one loaded `runtime`.

    `api_key`: when set, every route but /healthz and /readyz needs `Authorization: Bearer
    KEY` or `?key=KEY`. `allowed_origins`: browser origins accepted besides the server's own.
    `allowed_hosts`: Host names served besides loopback ones when there is no API key.
    `max_sessions`: open WebSocket connections at most (each is one Session); more are
    refused with HTTP 503. `max_frame_bytes`: the largest WebSocket message processed; larger
    ones get an error event (past four times this size the connection closes, code 1009).
    `idle_timeout_s`: a connection without any frame for this long is closed.
    `send_timeout_s`: a client that reads nothing for this long while events wait for it is
    disconnected. `static_dir`: the browser page's folder (default: the package's static/).
    `metrics_registry`: the prometheus_client CollectorRegistry of /metrics (default: a new
    one for this app, never the process-wide default).
    """
    state = ServerState(runtime, api_key=api_key, allowed_origins=tuple(allowed_origins),
                        allowed_hosts=tuple(allowed_hosts), max_sessions=max_sessions,
                        max_frame_bytes=max_frame_bytes, idle_timeout_s=idle_timeout_s,
                        send_timeout_s=send_timeout_s, static_dir=static_dir or STATIC_DIR,
                        metrics=ServerMetrics(metrics_registry, runtime))
    app = web.Application(client_max_size=64 * 1024)
    app[STATE] = state
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
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
            state.refuse("connection_limit")
            transport.abort()
            return
        loop.call_later(timeout_s, _close_unless_session, state, transport)

    server.connection_made = connection_made


def _close_unless_session(state: ServerState, transport) -> None:
    if all(c.request.transport is not transport for c in state.connections):
        transport.abort()  # (a no-op if it is closed already)


# -- binding ----------------------------------------------------------------------------

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
          stop: threading.Event | None = None, stop_now: threading.Event | None = None,
          drain_timeout_s: float = DRAIN_TIMEOUT_S, **options) -> None:
    """Load the model once and serve until `stop` is set (or, without one, until interrupted);
    blocking. Then drain (see `drain`): open sessions get `drain_timeout_s` to end, less if
    `stop_now` is set. `options` go to create_app."""
    from ..session import Runtime

    check_port(port)
    check_drain_timeout(drain_timeout_s)
    api_key = api_key_from_env(api_key_env)
    check_bind(host, api_key)
    runtime = Runtime(package, profile)
    try:
        app = create_app(runtime, api_key=api_key, allowed_origins=allowed_origins,
                         allowed_hosts=(*allowed_hosts, host), max_sessions=max_sessions, **options)
        asyncio.run(_serve_until(app, host, port, runtime.package.name, stop or threading.Event(),
                                 stop_now or threading.Event(), drain_timeout_s))
    finally:
        runtime.close()


def check_drain_timeout(seconds) -> None:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= 3600:
        raise Error(f"--drain-timeout must be a number of seconds from 0 to 3600, got {seconds!r}")


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


# -- stopping ---------------------------------------------------------------------------

async def drain(app: web.Application, timeout_s: float, now=lambda: False) -> None:
    """Stop taking sessions and let the open ones end: from now on a WebSocket upgrade gets
    503 `draining` and /readyz 503; sessions run on (a client that ends its input gets every
    event up to Finished) until none is left, `timeout_s` passed or `now()` is true; then
    each one left is closed with 1001 (going away)."""
    state = app[STATE]
    state.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while state.reserved and not now() and loop.time() < deadline:
        await asyncio.sleep(STOP_POLL_S)
    await close_sessions(app)


async def close_sessions(app: web.Application) -> None:
    """Close every open connection with 1001 and the reason SHUTDOWN_REASON, each client
    first told why in its own protocol."""
    connections = list(app[STATE].connections)
    await asyncio.gather(*(c.going_away(SHUTDOWN_REASON, CLOSE_TIMEOUT_S) for c in connections))


async def _serve_until(app: web.Application, host: str, port: int, name: str, stop: threading.Event,
                       stop_now: threading.Event, drain_timeout_s: float) -> None:
    # Signals are the caller's to handle (the command line's main thread sets `stop`, and
    # `stop_now` at a second signal).
    runner = await start(app, host, port, shutdown_timeout=CLOSE_TIMEOUT_S)
    try:
        shown = f"[{host}]" if ":" in host else host
        print(f"listenloop: serving {name} on http://{shown}:{port} "
              f"(ws://{shown}:{port}/v1/realtime, /v1/pcm); Ctrl-C to stop", file=sys.stderr, flush=True)
        while not stop.is_set():
            await asyncio.sleep(STOP_POLL_S)
        state = app[STATE]
        if state.reserved:
            print(f"listenloop: stopping; {state.reserved} open session(s) get up to {drain_timeout_s:g} s to end "
                  "(a second Ctrl-C closes them now)", file=sys.stderr, flush=True)
        await drain(app, drain_timeout_s, stop_now.is_set)
    finally:
        await runner.cleanup()
