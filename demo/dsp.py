"""Small NumPy signal helpers shared by the sound, background and augmentation generators."""
from __future__ import annotations

import numpy as np

from listenloop.protocol import SAMPLE_RATE


def seconds(n_seconds: float) -> int:
    return int(round(n_seconds * SAMPLE_RATE))


def time_axis(n_samples: int) -> np.ndarray:
    return np.arange(n_samples, dtype=np.float64) / SAMPLE_RATE


def band_filter(x: np.ndarray, low_hz: float | None, high_hz: float | None, edge_hz: float = 50.0) -> np.ndarray:
    """Zero-phase band filter in the frequency domain with raised-cosine edges `edge_hz` wide.

    FFT filtering is enough here: the signals are finite, generated once, and no causal
    behaviour is needed.
    """
    n = len(x)
    if n == 0:
        return x.astype(np.float32)
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    gain = np.ones_like(freqs)
    if low_hz is not None:
        gain *= np.clip((freqs - low_hz + edge_hz) / edge_hz, 0.0, 1.0)
    if high_hz is not None:
        gain *= np.clip((high_hz + edge_hz - freqs) / edge_hz, 0.0, 1.0)
    gain = 0.5 - 0.5 * np.cos(np.pi * gain)  # smooth 0..1 ramps
    return np.fft.irfft(np.fft.rfft(x) * gain, n).astype(np.float32)


def fade(x: np.ndarray, fade_samples: int) -> np.ndarray:
    """Linear fade-in and fade-out so cut tones do not click."""
    x = x.copy()
    k = min(fade_samples, len(x) // 2)
    if k > 0:
        ramp = np.linspace(0.0, 1.0, k, dtype=np.float32)
        x[:k] *= ramp
        x[-k:] *= ramp[::-1]
    return x


def normalise_peak(x: np.ndarray, peak: float = 1.0) -> np.ndarray:
    top = float(np.abs(x).max(initial=0.0))
    if top == 0.0:
        return x.astype(np.float32)
    return (x * (peak / top)).astype(np.float32)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def set_rms(x: np.ndarray, target_rms: float) -> np.ndarray:
    current = rms(x)
    if current == 0.0:
        return x.astype(np.float32)
    return (x * (target_rms / current)).astype(np.float32)


def db_to_amplitude(db: float) -> float:
    return float(10.0 ** (db / 20.0))


def fft_convolve(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Linear convolution truncated to len(x)."""
    n = len(x) + len(h) - 1
    size = 1 << (n - 1).bit_length()
    y = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[: len(x)]
    return y.astype(np.float32)
