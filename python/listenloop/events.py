"""Typed events a Session produces.

Every event carries `stream_time` (seconds of audio into the stream that the event refers
to; a chunk's events use the end of that chunk) and `wall_time` (time.monotonic() when it
was produced). `to_dict()` gives the JSON-lines form the CLI prints.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Event:
    stream_time: float
    wall_time: float

    @property
    def kind(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict:
        data = {"event": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data


@dataclass(frozen=True)
class Decision(Event):
    """The listening decision for one 0.4 s chunk."""

    chunk: int
    spoke: bool
    p_speak: float


@dataclass(frozen=True)
class ReplyStarted(Event):
    chunk: int
    emotion: str | None  # set once the first reply token is known; None if the reply has none


@dataclass(frozen=True)
class TextDelta(Event):
    """New reply text: always whole characters (an incomplete UTF-8 tail is held back)."""

    text: str
    token_ids: tuple = ()


@dataclass(frozen=True)
class ReplyEnded(Event):
    chunk: int
    text: str
    truncated: bool = False  # ended by max_reply_tokens or the context capacity, not TEXT_END
    filtered_tokens: int = 0  # off-protocol control ids dropped from the text


@dataclass(frozen=True)
class AudioDropped(Event):
    """Audio that never reached the model: ring overrun, full listen queue, bad samples..."""

    samples: int
    reason: str


@dataclass(frozen=True)
class ContextReset(Event):
    reason: str


@dataclass(frozen=True)
class Fault(Event):
    """A worker failed. Not fatal: the session skipped the work and keeps running."""

    where: str
    message: str


@dataclass(frozen=True)
class Stats(Event):
    chunks: int  # chunks decided so far
    dropped_samples: int
    dropped_chunks: int
    dropped_events: int
    listen_queue_depth: int
    encoded_queue_depth: int
    event_queue_depth: int
    step_ms: float  # median decoder listening step over the recent window
    real_time_factor: float  # processing time / audio time (< 1 keeps up with real time)
    position: int = 0  # tokens in the KV cache
    capacity: int = 0
    extra: dict = field(default_factory=dict)


EVENT_TYPES = (Decision, ReplyStarted, TextDelta, ReplyEnded, AudioDropped, ContextReset, Fault, Stats)


# --- transport through listenloop._core.EventQueue ------------------------------------------
# The C++ speak queue carries a fixed record (kind, chunk, stream_time, wall_ns, value, flag,
# text, token_ids); each event type maps its fields onto it, Stats and Fault as JSON text.

_CODES = {cls: i + 1 for i, cls in enumerate(EVENT_TYPES)}
_TYPES = {code: cls for cls, code in _CODES.items()}


def to_record(event: Event) -> tuple:
    """(kind, chunk, stream_time, wall_ns, value, flag, text, token_ids) for EventQueue.try_push."""
    kind = _CODES[type(event)]
    base = (kind, event.stream_time, int(event.wall_time * 1e9))
    if isinstance(event, Decision):
        fields = (event.chunk, event.p_speak, event.spoke, "", ())
    elif isinstance(event, ReplyStarted):
        fields = (event.chunk, 0.0, event.emotion is not None, event.emotion or "", ())
    elif isinstance(event, TextDelta):
        fields = (-1, 0.0, False, event.text, tuple(event.token_ids))
    elif isinstance(event, ReplyEnded):
        fields = (event.chunk, float(event.filtered_tokens), event.truncated, event.text, ())
    elif isinstance(event, AudioDropped):
        fields = (event.samples, 0.0, False, event.reason, ())
    elif isinstance(event, ContextReset):
        fields = (-1, 0.0, False, event.reason, ())
    else:  # Fault, Stats: every field but the times as JSON
        payload = {f.name: getattr(event, f.name) for f in dataclasses.fields(event)
                   if f.name not in ("stream_time", "wall_time")}
        fields = (-1, 0.0, False, json.dumps(payload), ())
    chunk, value, flag, text, token_ids = fields
    return base[0], chunk, base[1], base[2], value, flag, text, list(token_ids)


def from_record(record) -> Event:
    """The Event a popped listenloop._core.Event record stands for."""
    cls = _TYPES[record.kind]
    times = (record.stream_time, record.wall_ns / 1e9)
    if cls is Decision:
        return Decision(*times, chunk=record.chunk, spoke=record.flag, p_speak=record.value)
    if cls is ReplyStarted:
        return ReplyStarted(*times, chunk=record.chunk, emotion=record.text if record.flag else None)
    if cls is TextDelta:
        return TextDelta(*times, text=record.text, token_ids=tuple(record.token_ids))
    if cls is ReplyEnded:
        return ReplyEnded(*times, chunk=record.chunk, text=record.text, truncated=record.flag,
                          filtered_tokens=int(record.value))
    if cls is AudioDropped:
        return AudioDropped(*times, samples=record.chunk, reason=record.text)
    if cls is ContextReset:
        return ContextReset(*times, reason=record.text)
    return cls(*times, **json.loads(record.text))
