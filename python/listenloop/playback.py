"""The device's own playback, fed to a session as the echo reference (docs/PROTOCOL.md,
"Playback reference").

The reference lives on the microphone's sample clock: each playback sample has the position
of the microphone sample captured while it played. The C++ PlaybackBuffer holds it, and the
session's chunk scheduler cancels its echo from the microphone before the log-mel. This module
only checks, converts and places the blocks a caller pushes, and turns what could not be placed
into events.
"""
from __future__ import annotations

import time

import numpy as np

from . import events as ev
from .audio import StreamResampler, check_sample_rate, condition_pcm
from .errors import AudioFormatError
from .protocol import SAMPLE_RATE

MAX_SKEW_SECONDS = 1.0  # how far the reference may run ahead of or fall behind the microphone
BUFFER_SECONDS = 4.0  # the PlaybackBuffer: the skew both ways plus a chunk and margin
_MICROPHONE_STALL_SECONDS = 1.0  # a blocking push gives up if the microphone and canceller stand still this long
MAX_SKEW_SAMPLES = int(MAX_SKEW_SECONDS * SAMPLE_RATE)


class PlaybackInput:
    """Places one session's playback blocks on its microphone's clock.

    `microphone_position()` gives the microphone samples the session received so far;
    `emit(event)` queues an event; `stream_time()` stamps it."""

    def __init__(self, buffer, microphone_position, emit, stream_time):
        self.buffer = buffer
        self._microphone_position = microphone_position
        self._emit = emit
        self._stream_time = stream_time
        self._resampler: StreamResampler | None = None
        self._next: int | None = None  # where a block pushed with at=None goes
        self.samples = 0  # playback samples placed on the timeline

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
