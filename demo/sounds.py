"""Household sound events synthesised in NumPy, each with randomised pitch, tempo and length.

Every generator takes a NumPy Generator and returns a Sound: 16 kHz float32 audio with peak 1.0
(the stream mixer sets the level) that starts and ends where the sound does, and its cue, the
sample by which the sound is recognised, which decides the reply's chunk. The cue is the end of
the sound, except for an alarm that repeats its pattern: that is answered once, after the first
round, and its later rounds need no second reply.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from listenloop.protocol import SAMPLE_RATE

from .dsp import band_filter, fade, normalise_peak, seconds, time_axis


class Sound(NamedTuple):
    audio: np.ndarray
    cue: int  # samples from the start after which the reply is due (see the module doc)


def _whole(audio: np.ndarray) -> Sound:
    """A sound recognised only once it is over: the reply is due at its end."""
    return Sound(audio, len(audio))


SoundGenerator = Callable[[np.random.Generator], Sound]


def _tone(freq_hz: float | np.ndarray, n: int, phase: float = 0.0) -> np.ndarray:
    """Sine at a constant or per-sample frequency (phase-continuous)."""
    freq = np.broadcast_to(np.asarray(freq_hz, dtype=np.float64), (n,))
    return np.sin(phase + 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE)


def smoke_alarm(rng: np.random.Generator) -> Sound:
    """T3 temporal pattern: three ~0.5 s beeps near 3 kHz, a pause, and sometimes a second round
    (answered after the first)."""
    freq = rng.uniform(2800, 3400)
    beep_s, gap_s = rng.uniform(0.35, 0.6), rng.uniform(0.3, 0.55)
    pause_s = rng.uniform(1.0, 1.6)
    beep_n = seconds(beep_s)
    # a piezo's square-ish wave: odd harmonics above the fundamental
    beep = _tone(freq, beep_n) + 0.3 * _tone(3 * freq, beep_n) * (3 * freq < 7800)
    beep = fade(beep.astype(np.float32), seconds(0.005))
    gap = np.zeros(seconds(gap_s), np.float32)
    first_round = np.concatenate([beep, gap, beep, gap, beep])
    rounds = [first_round]
    if int(rng.integers(1, 3)) == 2:
        rounds += [np.zeros(seconds(pause_s), np.float32), first_round]
    return Sound(normalise_peak(np.concatenate(rounds)), len(first_round))


def _bell_strike(fundamental: float, n: int, decay_s: float) -> np.ndarray:
    t = time_axis(n)
    out = np.zeros(n)
    for ratio, amp, decay_scale in ((1.0, 1.0, 1.0), (2.76, 0.4, 0.6), (5.40, 0.2, 0.35), (2.0, 0.25, 0.8)):
        f = fundamental * ratio
        if f < 7500:
            out += amp * np.sin(2 * np.pi * f * t) * np.exp(-t / (decay_s * decay_scale))
    out *= np.minimum(1.0, t / 0.003)  # 3 ms attack of the hammer
    return out.astype(np.float32)


def doorbell(rng: np.random.Generator) -> Sound:
    """Two-tone "ding-dong": a high strike then a lower one (a major or minor third down)."""
    high = rng.uniform(550, 950)
    low = high / rng.choice([1.25, 1.19, 1.33])
    decay = rng.uniform(0.35, 0.8)
    gap = seconds(rng.uniform(0.35, 0.7))
    ring = seconds(decay * 3.0)
    total = np.zeros(gap + ring, np.float32)
    total[:ring] += _bell_strike(high, ring, decay)
    total[gap:] += _bell_strike(low, ring, decay)
    return _whole(normalise_peak(fade(total, seconds(0.01))))


def phone_ring(rng: np.random.Generator) -> Sound:
    """Dual-tone ring bursts (e.g. 440+480 Hz), optionally warbled, in 2-4 cadences."""
    f1 = rng.uniform(400, 900)
    f2 = f1 + rng.uniform(30, 200)
    on_s, off_s = rng.uniform(0.35, 1.2), rng.uniform(0.2, 1.5)
    double = rng.random() < 0.5  # UK-style "ring-ring" cadence
    warble = rng.random() < 0.4
    parts: list[np.ndarray] = []
    cadences = int(rng.integers(2, 5))
    for c in range(cadences):
        for _ in range(2 if double else 1):
            n = seconds(on_s if not double else on_s * 0.5)
            burst = 0.5 * (_tone(f1, n) + _tone(f2, n))
            if warble:
                burst *= 0.6 + 0.4 * np.sign(np.sin(2 * np.pi * rng.uniform(15, 25) * time_axis(n)))
            parts.append(fade(burst.astype(np.float32), seconds(0.01)))
            if double:
                parts.append(np.zeros(seconds(0.2), np.float32))
        if c < cadences - 1:
            parts.append(np.zeros(seconds(off_s), np.float32))
    audio = np.concatenate(parts)
    return _whole(normalise_peak(np.trim_zeros(audio, "b")))


def knocking(rng: np.random.Generator) -> Sound:
    """Knuckles on a door: 3-5 short band-passed noise impulses in a rhythm, 1-2 groups."""
    centre = rng.uniform(150, 500)
    interval = rng.uniform(0.14, 0.35)
    knock_n = seconds(rng.uniform(0.04, 0.09))
    t = time_axis(knock_n)
    groups = int(rng.integers(1, 3))
    onsets: list[float] = []
    start = 0.0
    for _ in range(groups):
        count = int(rng.integers(3, 6))
        onsets += [start + i * interval * rng.uniform(0.9, 1.1) for i in range(count)]
        start = onsets[-1] + rng.uniform(0.6, 1.2)
    total = np.zeros(seconds(onsets[-1]) + knock_n, np.float32)
    for onset in onsets:
        burst = rng.standard_normal(knock_n) * np.exp(-t / rng.uniform(0.008, 0.02))
        burst += 0.8 * np.sin(2 * np.pi * centre * t) * np.exp(-t / 0.025)  # the door's resonance
        i = seconds(onset)
        total[i : i + knock_n] += burst.astype(np.float32) * rng.uniform(0.7, 1.0)
    total = band_filter(total, 60.0, centre * 6, edge_hz=80.0)
    return _whole(normalise_peak(total))


def glass_break(rng: np.random.Generator) -> Sound:
    """A broadband crash followed by ringing high partials and a few falling shards."""
    n = seconds(rng.uniform(0.9, 1.8))
    t = time_axis(n)
    crash = rng.standard_normal(n) * np.exp(-t / rng.uniform(0.03, 0.08))
    crash = band_filter(crash.astype(np.float32), 800.0, None, edge_hz=400.0)
    ring = np.zeros(n)
    for _ in range(int(rng.integers(5, 10))):
        f = rng.uniform(2000, 7000)
        ring += rng.uniform(0.1, 0.35) * np.sin(2 * np.pi * f * t + rng.uniform(0, 6.28)) * np.exp(
            -t / rng.uniform(0.08, 0.5)
        )
    total = crash + ring
    tink_n = seconds(0.05)
    for _ in range(int(rng.integers(2, 7))):  # shards landing later
        i = int(rng.integers(seconds(0.15), max(seconds(0.2), n - tink_n)))
        f = rng.uniform(3000, 7500)
        tt = time_axis(tink_n)
        total[i : i + tink_n] += rng.uniform(0.1, 0.3) * np.sin(2 * np.pi * f * tt) * np.exp(-tt / 0.012)
    return _whole(normalise_peak(fade(total.astype(np.float32), seconds(0.003))))


def kettle_whistle(rng: np.random.Generator) -> Sound:
    """A narrowband whistle whose pitch and level rise, with breathy steam noise."""
    n = seconds(rng.uniform(1.8, 4.0))
    f_start = rng.uniform(1300, 2000)
    f_end = f_start * rng.uniform(1.1, 1.5)
    ramp = np.linspace(0.0, 1.0, n)
    freq = f_start + (f_end - f_start) * np.sqrt(ramp)
    freq *= 1.0 + 0.004 * np.sin(2 * np.pi * rng.uniform(4, 8) * time_axis(n))  # flutter
    whistle = _tone(freq, n) * (0.2 + 0.8 * ramp)
    steam = band_filter(rng.standard_normal(n).astype(np.float32), f_start * 0.8, f_end * 1.3, edge_hz=300.0)
    steam *= (0.1 + 0.3 * ramp) * float(rng.uniform(0.5, 1.5)) / max(1e-9, float(np.std(steam)))
    total = whistle + 0.3 * steam
    return _whole(normalise_peak(fade(total.astype(np.float32), seconds(0.1))))


SOUND_EVENTS: dict[str, SoundGenerator] = {
    "smoke_alarm": smoke_alarm,
    "doorbell": doorbell,
    "phone_ring": phone_ring,
    "knocking": knocking,
    "glass_break": glass_break,
    "kettle_whistle": kettle_whistle,
}
