"""`listenloop serve`: one loaded model behind WebSocket endpoints (docs/SERVE.md).

    /v1/realtime  OpenAI-Realtime-compatible (text replies), for voice-agent clients
    /v1/pcm       raw PCM in, listenloop events out as JSON, for small clients and the browser page
    /healthz      JSON health and load
    /, /static/*  the files of the browser page (this package's static/ folder only)

Each connection gets its own Session of the server's one Runtime; its events depend only on
its own audio.
"""
from __future__ import annotations

from .app import (DEFAULT_HOST, DEFAULT_PORT, check_bind, create_app, is_loopback, serve)

__all__ = ["create_app", "serve", "check_bind", "is_loopback", "DEFAULT_HOST", "DEFAULT_PORT"]
