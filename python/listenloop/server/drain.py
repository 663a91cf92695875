"""How a server stops: it drains (no new sessions, the open ones may end by themselves), then
closes what is left with 1001, each client first told why in its own protocol. The same for
`listenloop serve` (app.py) and each Ray Serve replica (cluster.py)."""
from __future__ import annotations

import asyncio

from ..errors import Error
from .state import ServerState

STOP_POLL_S = 0.1  # how often a server looks at its stop event and a drain at its sessions
DRAIN_TIMEOUT_S = 10.0  # --drain-timeout: open sessions' time to end once the server is stopping
# After the drain: each connection's time to take its going-away message and close frame, and
# the handlers' time to end, before the server stops without them.
CLOSE_TIMEOUT_S = 2.0
SHUTDOWN_REASON = "server shutting down"


def check_drain_timeout(seconds) -> None:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= 3600:
        raise Error(f"--drain-timeout must be a number of seconds from 0 to 3600, got {seconds!r}")


async def drain_sessions(state: ServerState, timeout_s: float, now=lambda: False) -> None:
    """Stop taking sessions and let the open ones end: from now on a WebSocket upgrade gets
    503 `draining` and /readyz 503; sessions run on (a client that ends its input gets every
    event up to Finished) until none is left, `timeout_s` passed or `now()` is true; then
    each one left is closed with 1001 (going away)."""
    state.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while state.reserved and not now() and loop.time() < deadline:
        await asyncio.sleep(STOP_POLL_S)
    await close_sessions(state)


async def close_sessions(state: ServerState) -> None:
    """Close every open connection with 1001 and the reason SHUTDOWN_REASON, each client
    first told why in its own protocol."""
    await asyncio.gather(*(c.going_away(SHUTDOWN_REASON, CLOSE_TIMEOUT_S) for c in list(state.connections)))
