"""/healthz, /readyz and /metrics: what an orchestrator and a Prometheus server ask.

The probes need no API key (an orchestrator's probe carries none) and say nothing about the
traffic; the Host and Origin checks still apply. /metrics counts the traffic, so it needs the
key when the server has one.
"""
from __future__ import annotations

from aiohttp import web

from .metrics import CONTENT_TYPE
from .state import STATE, guard


async def healthz(request: web.Request) -> web.Response:
    """200 while the process and its event loop answer."""
    refusal = guard(request, counts=False, needs_key=False)
    if refusal is not None:
        return refusal
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 when the model is loaded and one more session would be admitted; else 503 with
    the reason: "full" (every session slot is taken) or "draining" (the server is stopping)."""
    refusal = guard(request, counts=False, needs_key=False)
    if refusal is not None:
        return refusal
    reason = request.app[STATE].not_ready()
    if reason is not None:
        return web.json_response({"status": "unavailable", "reason": reason}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """The Prometheus text format of the server's ServerMetrics."""
    refusal = guard(request, counts=False)
    if refusal is not None:
        return refusal
    response = web.Response(body=request.app[STATE].metrics.scrape())
    response.headers["Content-Type"] = CONTENT_TYPE
    return response
