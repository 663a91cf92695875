"""Background beds the model must stay silent through: coloured noise, mains hum, music-like
chord sequences and distant babble. Each returns n samples of 16 kHz float32 at RMS 1.0 (the
stream mixer sets the level)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from listenloop.protocol import SAMPLE_RATE

from . import speech
from .dsp import band_filter, fade, seconds, set_rms, time_axis


def _shaped_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Noise with power ∝ 1/f^exponent (0 white, 1 pink, 2 brown), shaped in the frequency domain."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    freqs[0] = freqs[1] if n > 1 else 1.0
    spectrum *= freqs ** (-exponent / 2.0)
    return set_rms(np.fft.irfft(spectrum, n).astype(np.float32), 1.0)


def white_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    return _shaped_noise(rng, n, 0.0)


def pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    return _shaped_noise(rng, n, 1.0)


def brown_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    return set_rms(band_filter(_shaped_noise(rng, n, 2.0), 20.0, None, edge_hz=20.0), 1.0)


def mains_hum(rng: np.random.Generator, n: int) -> np.ndarray:
    """50 or 60 Hz with a random set of harmonics and a little noise."""
    base = float(rng.choice([50.0, 60.0])) * rng.uniform(0.995, 1.005)
    t = time_axis(n)
    hum = np.zeros(n)
    for k in range(1, 8):
        hum += rng.uniform(0.0, 1.0 / k) * np.sin(2 * np.pi * base * k * t + rng.uniform(0, 6.28))
    hum += 0.05 * rng.standard_normal(n)
    return set_rms(hum.astype(np.float32), 1.0)


_MAJOR, _MINOR = (0, 4, 7), (0, 3, 7)


def music(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random chord sequence: harmonic-rich notes with attack/decay envelopes, optional bass."""
    out = np.zeros(n)
    pos = 0
    root = int(rng.integers(45, 60))  # MIDI note
    brightness = rng.uniform(0.3, 0.8)
    while pos < n:
        length = min(n - pos, seconds(rng.uniform(0.4, 2.0)))
        t = time_axis(length)
        chord = root + int(rng.choice([0, 2, 4, 5, 7, 9]))
        env = np.minimum(1.0, t / 0.02) * np.exp(-t / rng.uniform(0.3, 1.5))
        for interval in _MAJOR if rng.random() < 0.6 else _MINOR:
            f = 440.0 * 2 ** ((chord + interval + 12 - 69) / 12)
            for h in range(1, 6):
                if f * h < 7500:
                    out[pos : pos + length] += (brightness**h) * np.sin(2 * np.pi * f * h * t) * env
        out[pos : pos + length] += 0.8 * np.sin(2 * np.pi * 440.0 * 2 ** ((chord - 12 - 69) / 12) * t) * env
        pos += length
    return set_rms(fade(out.astype(np.float32), seconds(0.05)), 1.0)


def babble(rng: np.random.Generator, n: int, sentences: tuple[str, ...], split: str) -> np.ndarray:
    """Several unrelated utterances from different voices overlapping, low-passed like speech
    through a wall."""
    out = np.zeros(n, np.float32)
    for _ in range(int(rng.integers(3, 6))):
        pos = int(rng.integers(-seconds(1.0), max(1, n // 3)))
        while pos < n:
            utterance = speech.render(str(rng.choice(sentences)), speech.random_voice(rng, split))
            utterance = utterance * rng.uniform(0.4, 1.0)
            start, skip = max(pos, 0), max(-pos, 0)
            piece = utterance[skip : skip + n - start]
            out[start : start + len(piece)] += piece
            pos += len(utterance) + seconds(rng.uniform(0.2, 1.5))
    out = band_filter(out, 80.0, rng.uniform(1200, 2500), edge_hz=300.0)
    return set_rms(out, 1.0)


BackgroundGenerator = Callable[[np.random.Generator, int], np.ndarray]

NOISE_BACKGROUNDS: dict[str, BackgroundGenerator] = {
    "white": white_noise,
    "pink": pink_noise,
    "brown": brown_noise,
    "hum": mains_hum,
    "music": music,
}
