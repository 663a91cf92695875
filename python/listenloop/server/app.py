"""The aiohttp application: routes, static files, serving and stopping. The checks and the
shared state are state.py's, the drain drain.py's; the handlers import those, never this module."""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .drain import CLOSE_TIMEOUT_S, DRAIN_TIMEOUT_S, STOP_POLL_S, check_drain_timeout, close_sessions, drain_sessions
from .health import healthz, metrics, readyz
from .metrics import ServerMetrics
from .pcm import pcm_handler
from .realtime import realtime_handler
from .state import (IDLE_TIMEOUT_S, MAX_FRAME_BYTES, SEND_TIMEOUT_S, STATE, STATIC_DIR, ServerState, api_key_from_env,
                    check_bind, check_port, guard, static_path)

log = logging.getLogger("listenloop.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
# TCP connections beyond the sessions: room to answer a refusal (503), /healthz and the page
# while every session is taken; past that a new connection is closed as it opens.
SPARE_CONNECTIONS = 4
# A connection that has not become a WebSocket session this long after it opened (a slow or
# half-open client, an idle keep-alive) is closed: plain HTTP requests take milliseconds.
NON_SESSION_TIMEOUT_S = 10.0


# -- routes -----------------------------------------------------------------------------

async def static_file(request: web.Request) -> web.StreamResponse:
    refusal = guard(request, counts=False)
    if refusal is not None:
        return refusal
    name = request.match_info.get("name", "index.html")
    path = static_path(request.app[STATE], name)
    if path is None:
        raise web.HTTPNotFound(text=json.dumps({"error": {"code": "not_found", "message": "no such file"}}),
                               content_type="application/json")
    response = web.FileResponse(path)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


async def _on_shutdown(app: web.Application) -> None:
    await close_sessions(app[STATE])


def create_app(runtime, *, api_key: str | None = None, allowed_origins=(), allowed_hosts=(), max_sessions: int = 8,
               max_frame_bytes: int = MAX_FRAME_BYTES, idle_timeout_s: float = IDLE_TIMEOUT_S,
               send_timeout_s: float = SEND_TIMEOUT_S,
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


# -- serving ----------------------------------------------------------------------------

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
    """drain_sessions (drain.py) of the app's sessions."""
    await drain_sessions(app[STATE], timeout_s, now)


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
