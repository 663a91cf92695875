"""The WebSocket as a connection sees it, whichever server carries it.

`Connection` (connection.py) and its two protocols (realtime.py, pcm.py) talk to a `Channel`:
accept or refuse the upgrade, receive a message, send text, close, abort. `AiohttpChannel`
carries them on `listenloop serve`'s aiohttp server; `StarletteChannel` on an ASGI server
(Ray Serve's FastAPI ingress, cluster.py). Neither module of a server imports the other's.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from enum import IntEnum

log = logging.getLogger("listenloop.server")

# The kernel's send buffer of a connection (Linux doubles it): a few seconds of events, while
# its default grows to megabytes for a client that reads nothing, before send_timeout_s can
# notice it.
SEND_BUFFER_BYTES = 64 * 1024
CLOSE_REASON_BYTES = 120  # a close frame's reason may hold 123 bytes (RFC 6455, 5.5)


class CloseCode(IntEnum):
    """The WebSocket close codes the server sends (RFC 6455, 7.4.1)."""

    OK = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011


def error_body(code: str, message: str) -> dict:
    """The JSON body of a refusal made before the upgrade."""
    return {"error": {"code": code, "message": message}}


def close_reason(reason: str) -> bytes:
    return reason.encode()[:CLOSE_REASON_BYTES]


class Channel:
    """One WebSocket. `request` is the server's own request object (what its checks read);
    `response` is what the server's handler returns once the connection is over."""

    request = None
    response = None

    @property
    def accepted(self) -> bool:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    async def accept(self, max_msg_size: int) -> None:
        """Complete the upgrade; messages past `max_msg_size` bytes will close the connection
        (code 1009) instead of being read."""
        raise NotImplementedError

    async def refuse(self, status: int, code: str, message: str) -> None:
        """Answer the upgrade request with HTTP `status` and a JSON error instead."""
        raise NotImplementedError

    async def receive(self, timeout: float) -> str | bytes | None:
        """The next message, or None once the connection is closed; asyncio.TimeoutError
        after `timeout` seconds without one."""
        raise NotImplementedError

    async def send_text(self, data: str) -> None:
        raise NotImplementedError

    async def close(self, code: int, reason: str) -> None:
        """Send a close frame and wait for the client's (the caller bounds the wait)."""
        raise NotImplementedError

    def abort(self) -> None:
        """Drop the connection at once, without waiting on the client."""
        raise NotImplementedError


class AiohttpChannel(Channel):
    def __init__(self, request):
        self.request = request
        self.ws = None

    @property
    def accepted(self) -> bool:
        return self.ws is not None and self.ws.prepared

    @property
    def closed(self) -> bool:
        return self.ws is not None and self.ws.closed

    async def accept(self, max_msg_size: int) -> None:
        from aiohttp import web

        self.ws = self.response = web.WebSocketResponse(max_msg_size=max_msg_size, autoping=True, compress=False,
                                                        timeout=2.0)
        await self.ws.prepare(self.request)
        sock = self.request.transport.get_extra_info("socket") if self.request.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)

    async def refuse(self, status: int, code: str, message: str) -> None:
        from aiohttp import web

        self.response = web.json_response(error_body(code, message), status=status)

    async def receive(self, timeout: float) -> str | bytes | None:
        from aiohttp import WSMsgType

        msg = await self.ws.receive(timeout=timeout)
        if msg.type == WSMsgType.ERROR:  # e.g. a message past the hard size limit: aiohttp closed it
            log.info("connection closed: %s", self.ws.exception())
        return msg.data if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY) else None

    async def send_text(self, data: str) -> None:
        await self.ws.send_str(data)

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code=code, message=close_reason(reason))

    def abort(self) -> None:
        # Closed, not just closing: a transport's close() waits to flush what a client that
        # stopped reading will never take, and would keep its socket open for ever.
        if self.request.transport is not None:
            self.request.transport.abort()


class StarletteChannel(Channel):
    """A Starlette WebSocket. The ASGI server answers pings and owns the socket, so the idle
    timeout counts messages only, and abort() ends the connection with a close frame (1008)
    that the server sends without waiting on the client."""

    def __init__(self, websocket, app=None):
        self.websocket = websocket
        self.request = RequestView(websocket, app)
        self.max_msg_size = None
        self._accepted = False
        self._closed = False
        self._closing = None  # abort()'s close, kept until done

    @property
    def accepted(self) -> bool:
        return self._accepted

    @property
    def closed(self) -> bool:
        return self._closed

    async def accept(self, max_msg_size: int) -> None:
        self.max_msg_size = max_msg_size
        await self.websocket.accept()
        self._accepted = True

    async def refuse(self, status: int, code: str, message: str) -> None:
        from starlette.responses import JSONResponse

        self._closed = True
        if "websocket.http.response" in self.websocket.scope.get("extensions", {}):
            await self.websocket.send_denial_response(JSONResponse(error_body(code, message), status_code=status))
        else:  # the ASGI server answers 403
            await self.websocket.close(CloseCode.POLICY_VIOLATION, close_reason(message).decode(errors="ignore"))

    async def receive(self, timeout: float) -> str | bytes | None:
        if self._closed:
            return None
        message = await asyncio.wait_for(self.websocket.receive(), timeout)
        if message["type"] == "websocket.disconnect":
            self._closed = True
            return None
        data = message.get("text")
        if data is None:
            data = message.get("bytes") or b""
        if len(data) > self.max_msg_size:  # aiohttp would not read it at all: close as it does (1009)
            await self.close(CloseCode.MESSAGE_TOO_BIG, "message too big")
            return None
        return data

    async def send_text(self, data: str) -> None:
        from starlette.websockets import WebSocketDisconnect

        if self._closed:
            raise ConnectionError("the WebSocket is closed")
        try:
            await self.websocket.send_text(data)
        except WebSocketDisconnect as exc:
            self._closed = True
            raise ConnectionError(f"the client went away (code {exc.code})") from None

    async def close(self, code: int, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        await self.websocket.close(code, close_reason(reason).decode(errors="ignore"))

    def abort(self) -> None:
        if not self._closed:
            self._closing = asyncio.get_running_loop().create_task(self.close(CloseCode.POLICY_VIOLATION,
                                                                              "connection dropped"))


class RequestView:
    """A Starlette request or WebSocket as the server's checks (app.guard, ServerState) read
    an aiohttp request: headers, query, Host, scheme (http or https, as aiohttp names a
    WebSocket's), the local address (transport.get_extra_info("sockname")) and the app's
    shared state (app[STATE])."""

    def __init__(self, connection, app=None):
        self.headers = connection.headers
        self.query = connection.query_params
        self.host = connection.headers.get("host", "")
        self.scheme = {"ws": "http", "wss": "https"}.get(connection.url.scheme, connection.url.scheme)
        self.app = app if app is not None else {}
        self.transport = _Sockname(connection.scope.get("server"))


class _Sockname:
    def __init__(self, address):
        self.address = address

    def get_extra_info(self, name: str):
        return tuple(self.address) if name == "sockname" and self.address else None
