"""`listenloop serve`: one loaded model behind WebSocket endpoints (docs/SERVE.md).

    /v1/realtime  OpenAI-Realtime-compatible (text replies), for voice-agent clients
    /v1/pcm       raw PCM in, listenloop events out as JSON, for small clients and the browser page
    /healthz      200 while the process answers (no key needed)
    /readyz       200 when one more session would be admitted, else 503 full | draining
    /metrics      Prometheus metrics (needs the API key when there is one)
    /, /static/*  the files of the browser page (this package's static/ folder only)

Each connection gets its own Session of the server's one Runtime; its events depend only on
its own audio.
"""
from __future__ import annotations

from .app import DEFAULT_HOST, DEFAULT_PORT, create_app, serve
from .state import check_bind, is_loopback

__all__ = ["create_app", "serve", "check_bind", "is_loopback", "DEFAULT_HOST", "DEFAULT_PORT"]
