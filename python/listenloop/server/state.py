"""What the server's handlers share: the runtime, the limits, the open connections, the
metrics, and the checks made before a request is served (Host, Origin, API key, session cap,
draining, which static file) or before the server starts (bind address, port, API key). The
handlers and both servers (app.py, cluster.py) import this module; it imports none of them."""
from __future__ import annotations

import hmac
import ipaddress
import os
import re
import stat
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from ..errors import Error
from .metrics import ServerMetrics

LOOPBACK_NAMES = frozenset({"localhost", "localhost."})
STATIC_DIR = Path(__file__).resolve().parent / "static"
_STATIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # one plain file name, no path
# The limits' defaults (create_app's and a Ray replica's)
MAX_FRAME_BYTES = 1_048_576
IDLE_TIMEOUT_S = 60.0
SEND_TIMEOUT_S = 10.0


class ServerState:
    """The runtime, the limits, the open connections and the metrics of one app."""

    def __init__(self, runtime, *, api_key, allowed_origins, max_sessions, max_frame_bytes=MAX_FRAME_BYTES,
                 idle_timeout_s=IDLE_TIMEOUT_S, send_timeout_s=SEND_TIMEOUT_S, static_dir=STATIC_DIR,
                 allowed_hosts=(), metrics: ServerMetrics | None = None):
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
        self.metrics = metrics if metrics is not None else ServerMetrics(runtime=runtime)
        self.connections: set = set()
        self.reserved = 0  # connections admitted whose handler has not finished yet
        self.served = 0  # connections admitted since the start
        self.refused = 0  # connections refused by the session cap
        self.draining = False  # stopping: no new sessions, open ones may finish

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

    def not_ready(self) -> str | None:
        """Why one more session would be refused now ("draining", "full"), or None."""
        if self.draining:
            return "draining"
        if self.reserved >= self.max_sessions:
            return "full"
        return None

    def admit(self) -> bool:
        if self.reserved >= self.max_sessions:
            self.refuse("session_limit")
            return False
        self.reserved += 1
        self.served += 1
        return True

    def refuse(self, reason: str) -> None:
        self.refused += 1
        self.metrics.session_refused(reason)

    def release(self) -> None:
        self.reserved -= 1


STATE = web.AppKey("listenloop_state", ServerState)


def json_error(status: int, message: str, code: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def guard(request: web.Request, *, counts: bool, needs_key: bool = True) -> web.Response | None:
    """The refusal for a request (401, 403, 503), or None to go on. With `counts`, an
    admitted request holds one session slot until `ServerState.release()`. Without
    `needs_key` (the health probes) the Host and Origin checks still apply."""
    state = request.app[STATE]
    if not state.host_allowed(request):
        return json_error(403, f"host {request.host!r} is not allowed: without an API key only loopback names "
                          "and --allow-host names are served", "host_not_allowed")
    if not state.origin_allowed(request):
        return json_error(403, f"origin {request.headers.get('Origin')!r} is not allowed (see --allow-origin)",
                          "origin_not_allowed")
    if needs_key and not state.authorized(request):
        return json_error(401, "missing or wrong API key: send 'Authorization: Bearer KEY' or ?key=KEY",
                          "invalid_api_key")
    if counts and state.draining:
        state.refuse("draining")
        return json_error(503, "the server is shutting down; connect to another instance", "draining")
    if counts and not state.admit():
        return json_error(503, f"the server is at its session limit ({state.max_sessions}); try again later",
                          "session_limit")
    return None


def static_path(state: ServerState, name: str) -> Path | None:
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


# -- checks made before the server starts -----------------------------------------------

def check_bind(host: str, api_key: str | None) -> None:
    """Refuse (Error) to listen beyond this machine without an API key."""
    if not is_loopback(host) and not api_key:
        raise Error(f"refusing to listen on {host!r} without an API key: set one in an environment variable "
                    "and pass --api-key-env VAR (or bind to 127.0.0.1)")


def check_port(port) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise Error(f"--port must be a TCP port number from 1 to 65535, got {port!r}")


def api_key_from_env(name: str | None) -> str | None:
    if name is None:
        return None
    value = os.environ.get(name, "")
    if not value.strip():
        raise Error(f"--api-key-env {name}: the environment variable {name} is not set or empty")
    return value.strip()


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses; any other name or address (including the
    wildcard addresses 0.0.0.0 and ::) is treated as reachable from the network."""
    host = host.strip().strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
