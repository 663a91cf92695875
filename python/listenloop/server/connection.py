"""One WebSocket connection bridged to one Session.

Audio goes in with `accept_waveform(..., block=False)`, so a client that sends faster than
the model takes loses audio (reported to it as AudioDropped) instead of growing a buffer. A
pump task polls `session.drain()` every 10 ms and sends each event; it drains only after the
previous send completed, so a client that does not read leaves its events in the session's
bounded event queue (which drops decisions and statistics, never replies, and reports the
loss), and a client that reads nothing for `send_timeout_s` is disconnected.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket

from aiohttp import WSCloseCode, WSMsgType, web

from ..errors import CapacityError, Error

log = logging.getLogger("listenloop.server")

POLL_S = 0.010
# The kernel's send buffer of a connection (Linux doubles it): a few seconds of events, while
# its default grows to megabytes for a client that reads nothing, before send_timeout_s can
# notice it.
SEND_BUFFER_BYTES = 64 * 1024
SESSION_OPTIONS = {"ring_seconds": 16.0, "event_queue": 1024}  # bounded per connection
FRAME_HARD_LIMIT = 4  # messages past this many times max_frame_bytes cannot be read: close 1009
MAX_TEXT_CHARS = 2000  # error messages quote at most this much of a client's input


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


class Connection:
    """Base of the two WebSocket protocols: admission, receive loop, idle timeout, pump, close."""

    def __init__(self, request: web.Request, state):
        self.request = request
        self.state = state
        self.id = new_id("sess")
        self.ws = web.WebSocketResponse(max_msg_size=FRAME_HARD_LIMIT * state.max_frame_bytes, autoping=True,
                                        compress=False, timeout=2.0)
        self.session = None
        self.policy: dict = {}
        self._send_lock = asyncio.Lock()
        self._pump_task: asyncio.Task | None = None
        self._done = False  # the session's stream ended (Finished) or failed

    # -- hooks ----------------------------------------------------------------------------

    async def on_open(self) -> None:
        pass

    async def on_text(self, text: str) -> None:
        raise NotImplementedError

    async def on_binary(self, data: bytes) -> None:
        raise NotImplementedError

    async def on_event(self, event) -> None:
        raise NotImplementedError

    async def on_error(self, code: str, message: str, client_event_id=None, param=None) -> None:
        raise NotImplementedError

    # -- life cycle -----------------------------------------------------------------------

    def open_session(self, **policy):
        """A new Session with `policy` (ConfigError if out of range); the old one is closed."""
        session = self.state.runtime.session(**SESSION_OPTIONS, **policy)
        if self.session is not None:
            self.session.close()
        self.session, self.policy = session, dict(policy)
        return session

    async def run(self) -> web.StreamResponse:
        """Serve the connection; the caller has admitted it (one slot of the session cap)."""
        state = self.state
        try:
            try:
                self.open_session(**self.policy)
            except CapacityError as exc:  # every slot of the model's shared KV cache is taken
                from .app import json_error

                return json_error(503, f"{exc}; try again later", "session_limit")
            except Error as exc:
                from .app import json_error

                return json_error(400, str(exc), "invalid_option")
            await self.ws.prepare(self.request)
            sock = self.request.transport.get_extra_info("socket") if self.request.transport else None
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            state.connections.add(self)
            await self.on_open()
            self._pump_task = asyncio.create_task(self._pump())
            await self._receive_loop()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            state.connections.discard(self)
            if self._pump_task is not None:
                self._pump_task.cancel()
                try:
                    await self._pump_task
                except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the connection is gone
                    pass
            if self.session is not None:
                self.session.close()
                self.session = None
            if not self.ws.closed and self.ws.prepared:
                await self._close(WSCloseCode.OK, "")
            # Closed, not just closing: a transport's close() waits to flush what a client that
            # stopped reading will never take, and would keep its socket open for ever.
            if self.ws.prepared and self.request.transport is not None:
                self.request.transport.abort()
            state.release()
        return self.ws

    async def _receive_loop(self) -> None:
        state = self.state
        while not self.ws.closed:
            try:
                msg = await self.ws.receive(timeout=state.idle_timeout_s)
            except asyncio.TimeoutError:
                await self._close(WSCloseCode.GOING_AWAY, f"idle timeout: no frame for {state.idle_timeout_s:g} s")
                return
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if msg.type == WSMsgType.ERROR:  # e.g. a message past the hard size limit: aiohttp closed it
                log.info("connection %s closed: %s", self.id, self.ws.exception())
                return
            size = len(msg.data.encode("utf-8") if isinstance(msg.data, str) else msg.data)
            if size > state.max_frame_bytes:
                await self.on_error("frame_too_large", f"message of {size} bytes is over the limit of "
                                    f"{state.max_frame_bytes} bytes; send smaller pieces")
                continue
            if msg.type == WSMsgType.TEXT:
                await self.on_text(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await self.on_binary(msg.data)

    async def _pump(self) -> None:
        """Session events to the client, in order, one send at a time."""
        while not self.ws.closed:
            try:
                events = self.session.drain() if self.session is not None else []
            except Error as exc:  # the session failed: say so and end the connection
                self._done = True
                await self.on_error("server_error", str(exc))
                await self._close(WSCloseCode.INTERNAL_ERROR, "session failed")
                return
            for event in events:
                await self.on_event(event)
                if self.ws.closed:
                    return
            if not events:
                if self._done:
                    return
                await asyncio.sleep(POLL_S)

    # -- sending --------------------------------------------------------------------------

    async def send(self, message: dict) -> bool:
        """Send one JSON text frame; False if the connection is gone. A client that takes
        nothing for send_timeout_s is disconnected."""
        if self.ws.closed:
            return False
        data = json.dumps(message, ensure_ascii=False)
        try:
            await asyncio.wait_for(self._locked_send(data), self.state.send_timeout_s)
        except asyncio.TimeoutError:
            # A close frame would wait behind what the client does not read (and aiohttp's close
            # can outwait a timeout around it): the connection is cut at once.
            log.info("connection %s: client is not reading; disconnecting", self.id)
            transport = self.request.transport
            if transport is not None:
                transport.abort()
            return False
        except (ConnectionError, RuntimeError):
            return False
        return True

    async def _locked_send(self, data: str) -> None:
        async with self._send_lock:
            await self.ws.send_str(data)

    async def _close(self, code: int, reason: str, abort_after: float = 2.0) -> None:
        if self.ws.closed:
            return
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()[:120]), abort_after)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            transport = self.request.transport
            if transport is not None:
                transport.abort()

    async def shutdown(self, reason: str) -> None:
        await self._close(WSCloseCode.GOING_AWAY, reason)


def loads_object(text: str):
    """(parsed JSON object, None) or (None, problem)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return None, f"invalid JSON: {exc}"
    if not isinstance(value, dict):
        return None, f"a message must be a JSON object, got {type(value).__name__}"
    return value, None


def quote(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
