"""Typed events a Session produces.

Every event carries `stream_time` (seconds of audio into the stream that the event refers
to; a chunk's events use the end of that chunk) and `wall_time` (time.monotonic() when it
was produced). `to_dict()` gives the JSON-lines form the CLI prints.
"""
from __future__ import annotations

import dataclasses
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
    """The listening decision for one 0.4 s chunk. `playback`: the device's own playback could
    echo into this chunk, so the own-voice policy applied (docs/PROTOCOL.md, "Own voice")."""

    chunk: int
    spoke: bool
    p_speak: float
    playback: bool = False


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
class AudioClipped(Event):
    """Samples outside [-1, 1] in one accept_waveform() call, clipped to [-1, 1] (docs/PROTOCOL.md,
    "Front end"). `peak` is the largest magnitude before clipping. `int_pcm_as_float` is set
    when the call looks like integer PCM passed as float (float samples, peak above 2, mostly
    at or above 1 in magnitude or all whole numbers); `reason` then names the fix. The runtime
    never rescales: it clips and says so."""

    samples: int
    peak: float
    reason: str = "float samples belong in [-1, 1]"
    int_pcm_as_float: bool = False


@dataclass(frozen=True)
class ContextReset(Event):
    """The context was rebuilt before chunk `chunk` was decided (docs/PROTOCOL.md, "Context policy")."""

    chunk: int
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
    event_queue_depth: int
    step_ms: float  # median decoder listening step over the recent window
    real_time_factor: float  # processing time / audio time (< 1 keeps up with real time)
    position: int = 0  # tokens in the KV cache
    capacity: int = 0
    kv_bytes: int = 0  # this stream's KV cache: what the stream costs beside the shared model
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EventsDropped(Event):
    """`count` events were dropped right here because the reader fell behind (replies never are)."""

    count: int


@dataclass(frozen=True)
class Finished(Event):
    """The last event of a finished stream: everything before it has been delivered."""

    chunks: int  # chunks decided in the whole stream


EVENT_TYPES = (Decision, ReplyStarted, TextDelta, ReplyEnded, AudioDropped, AudioClipped, ContextReset, Fault,
               Stats, EventsDropped, Finished)
