"""Prometheus metrics of a server: what its sessions' clients were sent, counted as it is sent.

`ServerMetrics` holds the metrics in its own `CollectorRegistry` (never the process-wide
default, so several servers in one process keep apart) and is independent of the transport:
a connection calls `session_opened()` once its session is open, gets a `SessionMeter`, and
tells it each frame of audio it fed (`audio_received`), each event it delivered
(`event_sent`), and its end (`closed`). The model thread reports each unit of work through
`model_step`, the session's `step_observer`.
"""
from __future__ import annotations

import collections
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..protocol import CHUNK_SAMPLES

CONTENT_TYPE = CONTENT_TYPE_LATEST  # of what scrape() returns

# From a fast GPU reply (~10 ms) to a large model on a small CPU (seconds).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STEP_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Chunks a connection received but the model has not decided yet: at most a ring buffer and a
# listen queue of them (about a hundred); the bound only keeps memory bounded if that changes.
PENDING_CHUNKS = 1024


class ServerMetrics:
    """The listenloop_* metrics of one server, in `registry` (a new one by default).

    `runtime`: when given, its chunks waiting for the model thread are read at each scrape."""

    def __init__(self, registry: CollectorRegistry | None = None, runtime=None):
        self.registry = registry if registry is not None else CollectorRegistry()
        new = self._new
        self.sessions_open = new(Gauge, "listenloop_sessions_open", "WebSocket sessions open now")
        self.sessions_served = new(Counter, "listenloop_sessions_served", "WebSocket sessions opened")
        self.sessions_refused = new(
            Counter, "listenloop_sessions_refused", "Connections refused: reason=session_limit (--max-sessions), "
            "connection_limit (TCP connections past the cap), draining (the server is stopping)", ["reason"])
        self.chunks_decided = new(Counter, "listenloop_chunks_decided",
                                  "0.4 s chunks decided (Decision events delivered)")
        self.replies = new(Counter, "listenloop_replies", "Replies delivered to the end (ReplyEnded events)")
        self.first_reply_token = new(
            Histogram, "listenloop_first_reply_token_seconds",
            "Time to first reply token (TTFR) as bench/serve_load.py measures it, on the server: from "
            "receiving the audio frame that completes the chunk a reply answers to sending the reply's "
            "first text (TextDelta)", buckets=LATENCY_BUCKETS_S)
        self.dropped_audio = new(Counter, "listenloop_dropped_audio_samples",
                                 "16 kHz audio samples that never reached the model (AudioDropped events)")
        self.dropped_events = new(Counter, "listenloop_dropped_events",
                                  "Events dropped for clients that read too slowly (EventsDropped events)")
        self.context_resets = new(Counter, "listenloop_context_resets", "Context rebuilds (ContextReset events)")
        self.model_step = new(
            Histogram, "listenloop_model_step_seconds", "Model thread work per unit: kind=listen (one chunk: "
            "mel peak, encoder, decoder step), kind=reply (one reply token)", ["kind"], buckets=STEP_BUCKETS_S)
        for kind in ("listen", "reply"):
            self.model_step.labels(kind)  # present at zero before the first step
        for reason in ("session_limit", "connection_limit", "draining"):
            self.sessions_refused.labels(reason)
        if runtime is not None:
            queue = new(Gauge, "listenloop_model_queue_chunks",
                        "Chunks waiting for the model thread, all sessions of the runtime")
            queue.set_function(lambda: runtime.queued_chunks)
        self._counted = {"Decision": self._decision, "ReplyEnded": self._reply_ended,
                         "AudioDropped": self._audio_dropped, "EventsDropped": self._events_dropped,
                         "ContextReset": self._context_reset}

    def _new(self, kind, name: str, documentation: str, labels=(), **options):
        """One metric in this server's registry; a subclass may record it elsewhere as well."""
        return kind(name, documentation, labels, registry=self.registry, **options)

    def session_opened(self) -> SessionMeter:
        self.sessions_served.inc()
        self.sessions_open.inc()
        return SessionMeter(self)

    def session_refused(self, reason: str) -> None:
        self.sessions_refused.labels(reason).inc()

    def step_observer(self, kind: str, seconds: float) -> None:
        """A session's step_observer: called on the model thread after each unit of work."""
        self.model_step.labels(kind).observe(seconds)

    def event_sent(self, event) -> None:
        count = self._counted.get(event.kind)
        if count is not None:
            count(event)

    def scrape(self) -> bytes:
        return generate_latest(self.registry)

    def _decision(self, event) -> None:
        self.chunks_decided.inc()

    def _reply_ended(self, event) -> None:
        self.replies.inc()

    def _audio_dropped(self, event) -> None:
        self.dropped_audio.inc(event.samples)

    def _events_dropped(self, event) -> None:
        self.dropped_events.inc(event.count)

    def _context_reset(self, event) -> None:
        self.context_resets.inc()


class SessionMeter:
    """One session's side of the metrics: its events, and its time to first reply token."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self._chunks_received = 0
        # (chunks complete, time.monotonic()) at each frame that completed one or more chunks
        self._completions: collections.deque = collections.deque(maxlen=PENDING_CHUNKS)
        self._reply_arrival: float | None = None  # when the chunk of the reply being sent arrived
        self._closed = False

    def audio_received(self, microphone_position: int) -> None:
        """After feeding a frame of microphone audio: the session's microphone_position."""
        chunks = microphone_position // CHUNK_SAMPLES
        if chunks > self._chunks_received:
            self._chunks_received = chunks
            self._completions.append((chunks, time.monotonic()))

    def event_sent(self, event) -> None:
        """After `event` was delivered to the client."""
        self.metrics.event_sent(event)
        kind = event.kind
        if kind == "Decision":
            # replies answer this chunk or later ones: completions before it are not needed
            while self._completions and self._completions[0][0] <= event.chunk:
                self._completions.popleft()
        elif kind == "ReplyStarted":
            self._reply_arrival = next((t for n, t in self._completions if n > event.chunk), None)
        elif kind == "TextDelta" and self._reply_arrival is not None:
            self.metrics.first_reply_token.observe(time.monotonic() - self._reply_arrival)
            self._reply_arrival = None
        elif kind == "ReplyEnded":
            self._reply_arrival = None

    def closed(self) -> None:
        if not self._closed:
            self._closed = True
            self.metrics.sessions_open.dec()
