"""The device's own playback, fed to a session as the echo reference (docs/PROTOCOL.md,
"Playback reference").

The reference lives on the microphone's sample clock: each playback sample has the position
of the microphone sample captured while it played. The C++ PlaybackBuffer holds it, and the
session's chunk scheduler cancels its echo from the microphone before the log-mel. This module
only checks, converts and places the blocks a caller pushes, and turns what could not be placed
into events.
"""
from __future__ import annotations

import collections
import statistics
import time

import numpy as np

from . import events as ev
from .audio import StreamResampler, check_sample_rate, condition_pcm
from .errors import AudioFormatError
from .protocol import SAMPLE_RATE

MAX_SKEW_SECONDS = 1.0  # how far the reference may run ahead of or fall behind the microphone
BUFFER_MARGIN_SECONDS = 2.0  # the PlaybackBuffer holds the microphone ring, the skew and a chunk beyond it
_MICROPHONE_STALL_SECONDS = 1.0  # a blocking push gives up if the microphone and canceller stand still this long
MAX_SKEW_SAMPLES = int(MAX_SKEW_SECONDS * SAMPLE_RATE)


def buffer_samples(ring_capacity: int) -> int:
    """PlaybackBuffer size for a session whose microphone ring holds `ring_capacity` samples:
    the canceller may lag the microphone by the whole ring, and the reference may lead that."""
    return ring_capacity + int(BUFFER_MARGIN_SECONDS * SAMPLE_RATE)


class PlaybackInput:
    """Places one session's playback blocks on its microphone's clock.

    `ring` is the session's microphone ring (its totals are the clock), `events` its event
    queue, `stream_time()` stamps events. It holds no reference to the session."""

    def __init__(self, buffer, ring, events, stream_time):
        self.buffer = buffer
        self._ring = ring
        self._events = events
        self._stream_time = stream_time
        self._resampler: StreamResampler | None = None
        self._next: int | None = None  # where a block pushed with at=None goes
        self._seen_drops = 0  # microphone samples the ring dropped, as of the last block
        self._skip = 0  # reference samples still to discard: they played over dropped microphone audio
        self.samples = 0  # playback samples placed on the timeline

    def _microphone_position(self) -> int:
        return int(self._ring.written_total)

    def _emit(self, event) -> None:
        self._events.put(event)

    def accept(self, pcm, sample_rate, at, block: bool) -> None:
        rate = check_sample_rate(sample_rate)
        if at is not None and (isinstance(at, (bool, np.bool_)) or not isinstance(at, (int, np.integer)) or at < 0):
            raise AudioFormatError(f"accept_playback: at must be a microphone sample position (an integer >= 0), got {at!r}")
        conditioned = condition_pcm(pcm)
        now = time.monotonic
        if conditioned.nonfinite:
            self._emit(ev.AudioDropped(self._stream_time(), now(), conditioned.nonfinite,
                                       "playback: NaN or infinite samples replaced by silence"))
        if conditioned.clipped:
            self._emit(ev.AudioClipped(self._stream_time(), now(), conditioned.clipped, conditioned.peak,
                                       "playback: " + conditioned.clip_reason, conditioned.int_pcm_as_float))
        if at is not None or self._resampler is None or self._resampler.in_rate != rate:
            self._flush()
            self._resampler = StreamResampler(rate)
            if at is not None:
                self._next = int(at)
        self._place(self._resampler(conditioned.samples), block, placed=at is not None)

    def _flush(self) -> None:
        if self._resampler is not None:
            self._place(self._resampler(np.zeros(0, np.float32), last=True), block=False, placed=False)
            self._resampler = None

    def _place(self, samples: np.ndarray, block: bool, placed: bool) -> None:
        """`placed`: the caller gave this block's position (it is kept, late or not)."""
        if not samples.size:
            return
        drops = int(self._ring.dropped_samples)
        if not placed:  # a continuous reference also played over the microphone audio the ring dropped
            self._skip += drops - self._seen_drops
        self._seen_drops = drops
        if self._skip:
            skipped = min(self._skip, samples.size)
            self._skip -= skipped
            samples = samples[skipped:]
            self._emit(ev.AudioDropped(self._stream_time(), time.monotonic(), skipped,
                                       "playback over microphone audio that was dropped"))
            if not samples.size:
                return
        microphone = self._microphone_position()
        if self._next is None:
            self._next = microphone  # the first block plays from the microphone's current position
        elif not placed and microphone - self._next > MAX_SKEW_SAMPLES:
            behind = microphone - self._next
            self._emit(ev.AudioDropped(self._stream_time(), time.monotonic(), 0,
                                       f"playback: {behind / SAMPLE_RATE:.2f} s behind the microphone; "
                                       "continued from the microphone's position"))
            self._next = microphone
        end = self._next + samples.size
        if block:
            microphone = self._wait(end)
        keep = min(samples.size, max(0, microphone + MAX_SKEW_SAMPLES - self._next))
        if keep < samples.size:
            self._emit(ev.AudioDropped(self._stream_time(), time.monotonic(), samples.size - keep,
                                       f"playback more than {MAX_SKEW_SECONDS:g} s ahead of the microphone"))
        result = self.buffer.write(self._next, samples[:keep]) if keep else {"written": 0, "late": 0, "overlap": 0, "ahead": 0}
        self._next = end
        self.samples += result["written"]
        for key, what in (("late", "arrived after the microphone audio it played over was processed"),
                          ("overlap", "overlaps playback already placed there"),
                          ("ahead", "does not fit the playback buffer")):
            if result[key]:
                self._emit(ev.AudioDropped(self._stream_time(), time.monotonic(), result[key], f"playback {what}"))

    def _wait(self, end: int) -> int:
        """Waits until playback up to `end` is at most MAX_SKEW_SECONDS ahead of the microphone
        and fits the buffer (the canceller consumes it as it processes the microphone), or
        until neither moves for a while. Returns the microphone position."""
        def state():
            return self._microphone_position(), self.buffer.read_position

        current, since = state(), time.monotonic()
        while end - MAX_SKEW_SAMPLES > current[0] or end > current[1] + self.buffer.capacity:
            time.sleep(0.002)
            now = state()
            if now != current:
                current, since = now, time.monotonic()
            elif time.monotonic() - since > _MICROPHONE_STALL_SECONDS:
                break
        return current[0]


class NearEndDetector:
    """Whether someone talks over the device's playback in a chunk (docs/PROTOCOL.md, "Own
    voice"), from the canceller's report: the cancelled output stands well above what it
    usually is while the device plays (residual echo plus the room's background).
    Deterministic: it depends only on the chunks' reports."""

    WINDOW = 25  # playing chunks whose output level makes the typical one
    MIN_CHUNKS = 5  # ... before any judgement
    MARGIN = 3.0  # about 10 dB above the typical output: a voice, not echo

    def __init__(self):
        self._levels: collections.deque = collections.deque(maxlen=self.WINDOW)

    def __call__(self, chunk) -> bool:
        if not chunk.playing:
            return False
        typical = statistics.median(self._levels) if len(self._levels) >= self.MIN_CHUNKS else None
        self._levels.append(chunk.out_rms)
        return typical is not None and chunk.out_rms > self.MARGIN * typical
