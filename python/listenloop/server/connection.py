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

from ..errors import CapacityError, Error
from .transport import Channel, CloseCode

log = logging.getLogger("listenloop.server")

POLL_S = 0.010
SESSION_OPTIONS = {"ring_seconds": 16.0, "event_queue": 1024}  # bounded per connection
FRAME_HARD_LIMIT = 4  # messages past this many times max_frame_bytes cannot be read: close 1009
MAX_TEXT_CHARS = 2000  # error messages quote at most this much of a client's input


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


class Connection:
    """Base of the two WebSocket protocols: admission, receive loop, idle timeout, pump, close.
    It talks to its client through a `Channel` (transport.py), whichever server carries it."""

    def __init__(self, channel: Channel, state):
        self.channel = channel
        self.state = state
        self.id = new_id("sess")
        self.session = None
        self.policy: dict = {}
        self.meter = None  # the session's metrics (SessionMeter) once the WebSocket is open
        self._send_failed = False  # a send did not reach the client: what follows is not counted
        self._send_lock = asyncio.Lock()
        self._pump_task: asyncio.Task | None = None
        self._done = False  # the session's stream ended (Finished) or failed

    @property
    def request(self):
        return self.channel.request

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

    async def on_going_away(self, reason: str) -> None:
        """Tell the client in its protocol, before the close frame, that the server is stopping."""

    # -- life cycle -----------------------------------------------------------------------

    def open_session(self, **policy):
        """A new Session with `policy` (ConfigError if out of range); the old one is closed."""
        session = self.state.runtime.session(**SESSION_OPTIONS, step_observer=self.state.metrics.step_observer,
                                             **policy)
        if self.session is not None:
            self.session.close()
        self.session, self.policy = session, dict(policy)
        return session

    async def run(self):
        """Serve the connection; the caller has admitted it (one slot of the session cap).
        Returns the channel's response (what an aiohttp handler returns)."""
        state, channel = self.state, self.channel
        try:
            try:
                self.open_session(**self.policy)
            except CapacityError as exc:  # every slot of the model's shared KV cache is taken
                await channel.refuse(503, "session_limit", f"{exc}; try again later")
                return channel.response
            except Error as exc:
                await channel.refuse(400, "invalid_option", str(exc))
                return channel.response
            await channel.accept(max_msg_size=FRAME_HARD_LIMIT * state.max_frame_bytes)
            state.connections.add(self)
            self.meter = state.metrics.session_opened()
            await self.on_open()
            self._pump_task = asyncio.create_task(self._pump())
            await self._receive_loop()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            state.connections.discard(self)
            if self.meter is not None:
                self.meter.closed()
            if self._pump_task is not None:
                self._pump_task.cancel()
                try:
                    await self._pump_task
                except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the connection is gone
                    pass
            if self.session is not None:
                self.session.close()
                self.session = None
            if not channel.closed and channel.accepted:
                await self._close(CloseCode.OK, "")
            if channel.accepted:
                channel.abort()
            state.release()
        return channel.response

    async def _receive_loop(self) -> None:
        state = self.state
        while not self.channel.closed:
            try:
                data = await self.channel.receive(timeout=state.idle_timeout_s)
            except asyncio.TimeoutError:
                await self._close(CloseCode.GOING_AWAY, f"idle timeout: no frame for {state.idle_timeout_s:g} s")
                return
            if data is None:
                return
            size = len(data.encode("utf-8") if isinstance(data, str) else data)
            if size > state.max_frame_bytes:
                await self.on_error("frame_too_large", f"message of {size} bytes is over the limit of "
                                    f"{state.max_frame_bytes} bytes; send smaller pieces")
                continue
            if isinstance(data, str):
                await self.on_text(data)
            else:
                await self.on_binary(data)

    async def _pump(self) -> None:
        """Session events to the client, in order, one send at a time."""
        while not self.channel.closed:
            try:
                events = self.session.drain() if self.session is not None else []
            except Error as exc:  # the session failed: say so and end the connection
                self._done = True
                await self.on_error("server_error", str(exc))
                await self._close(CloseCode.INTERNAL_ERROR, "session failed")
                return
            for event in events:
                await self.on_event(event)
                if not self._send_failed:
                    self.meter.event_sent(event)
                if self.channel.closed:
                    return
            if not events:
                if self._done:
                    return
                await asyncio.sleep(POLL_S)

    def audio_received(self) -> None:
        """After microphone audio was fed: the metrics learn when each chunk was complete."""
        self.meter.audio_received(self.session.microphone_position)

    # -- sending --------------------------------------------------------------------------

    async def send(self, message: dict) -> bool:
        """Send one JSON text frame; False if the connection is gone. A client that takes
        nothing for send_timeout_s is disconnected."""
        if self.channel.closed:
            self._send_failed = True
            return False
        data = json.dumps(message, ensure_ascii=False)
        try:
            await asyncio.wait_for(self._locked_send(data), self.state.send_timeout_s)
        except asyncio.TimeoutError:
            # A close frame would wait behind what the client does not read (and aiohttp's close
            # can outwait a timeout around it): the connection is cut at once.
            log.info("connection %s: client is not reading; disconnecting", self.id)
            self.channel.abort()
            self._send_failed = True
            return False
        except (ConnectionError, RuntimeError):
            self._send_failed = True
            return False
        return True

    async def _locked_send(self, data: str) -> None:
        async with self._send_lock:
            await self.channel.send_text(data)

    async def _close(self, code: int, reason: str, abort_after: float = 2.0) -> None:
        if self.channel.closed:
            return
        try:
            await asyncio.wait_for(self.channel.close(code, reason), abort_after)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            self.channel.abort()

    async def going_away(self, reason: str, timeout_s: float) -> None:
        """The server is stopping: the client is told why (on_going_away), then closed with 1001
        and `reason`; one that takes neither within `timeout_s` each is cut off."""
        if self.channel.closed:
            return
        try:
            await asyncio.wait_for(self.on_going_away(reason), timeout_s)
        except asyncio.TimeoutError:
            pass
        await self._close(CloseCode.GOING_AWAY, reason, abort_after=timeout_s)


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
