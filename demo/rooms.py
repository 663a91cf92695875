"""Simulated rooms for the own-voice measurements: the device's speaker heard back at its
microphone (bench/echo.py, bench/own_voice.py, tests/test_own_voice.py).

A room is a speaker-to-microphone impulse response: a bulk delay (output latency plus the
distance), a direct path at a gain, and an exponentially decaying reverberant tail of RT60
seconds whose energy sits `drr_db` below the direct path. Everything is seeded.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from listenloop.protocol import SAMPLE_RATE

from .dsp import db_to_amplitude

_TAIL_START_S = 0.0025  # the first reflections arrive a few ms after the direct sound


@dataclass(frozen=True)
class Room:
    rt60_s: float = 0.4  # reverberation time
    gain_db: float = 0.0  # speaker-to-microphone gain of the direct path
    delay_s: float = 0.05  # bulk delay between what the device plays and its direct sound
    drr_db: float = 6.0  # direct-to-reverberant energy ratio
    seed: int = 0

    def impulse_response(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        delay = int(round(self.delay_s * SAMPLE_RATE))
        tail_start = delay + int(_TAIL_START_S * SAMPLE_RATE)
        n = tail_start + int(self.rt60_s * SAMPLE_RATE)
        h = np.zeros(n, np.float64)
        h[delay] = 1.0
        t = np.arange(n - tail_start) / SAMPLE_RATE
        tail = rng.standard_normal(len(t)) * np.exp(-6.9 * t / self.rt60_s)  # 60 dB down at RT60
        tail *= np.sqrt(10.0 ** (-self.drr_db / 10.0) / np.sum(tail**2))
        h[tail_start:] += tail
        return (h * db_to_amplitude(self.gain_db)).astype(np.float32)


class Echo:
    """Streams playback through a room: push(block) gives the echo of that block at the
    microphone, block by block, the same samples as one convolution of the whole signal."""

    def __init__(self, room: Room):
        self.h = room.impulse_response()
        self._tail = np.zeros(len(self.h) - 1, np.float64)  # echo already due for later blocks
        self._fft_cache: dict[int, tuple[int, np.ndarray]] = {}

    def push(self, block: np.ndarray) -> np.ndarray:
        n = len(block)
        if n == 0:
            return np.zeros(0, np.float32)
        size, h_fft = self._fft_cache.get(n) or self._plan(n)
        full = np.fft.irfft(np.fft.rfft(block.astype(np.float64), size) * h_fft, size)[: n + len(self.h) - 1]
        full[: len(self._tail)] += self._tail
        out = full[:n]
        rest = full[n:]
        self._tail = np.zeros(len(self.h) - 1, np.float64)
        self._tail[: len(rest)] = rest
        return out.astype(np.float32)

    def _plan(self, n: int) -> tuple[int, np.ndarray]:
        size = 1 << (n + len(self.h) - 2).bit_length()
        self._fft_cache[n] = (size, np.fft.rfft(self.h.astype(np.float64), size))
        return self._fft_cache[n]


def noise_at_snr(rng: np.random.Generator, reference: np.ndarray, snr_db: float, n: int) -> np.ndarray:
    """White noise `snr_db` below the RMS of `reference` (over its non-silent part)."""
    loud = reference[np.abs(reference) > 1e-4]
    level = float(np.sqrt(np.mean(loud.astype(np.float64) ** 2))) if loud.size else 0.0
    return (rng.standard_normal(n) * level * db_to_amplitude(-snr_db)).astype(np.float32)
