"""NumPy reference of the audio front end (docs/PROTOCOL.md, "Chunks" and "Log-mel").

This is the readable definition the C++ kernel (`listenloop._core.LogMel` and the chunk
scheduler) is tested against; the runtime itself uses the C++ path.
"""
from __future__ import annotations

import functools

import numpy as np

from .protocol import (CHUNK_SAMPLES, DYNAMIC_RANGE_LOG10, FRAMES_PER_CHUNK, HOP, LOG_FLOOR, N_FFT,  # noqa: F401
                       N_MELS, SAMPLE_RATE)

HISTORY = N_FFT // 2  # samples of real history a chunk's first frames reach back to


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = hz / f_sp
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    log_part = min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep
    return np.where(hz >= min_log_hz, log_part, mels)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    f_sp = 200.0 / 3
    freqs = mels * f_sp
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    log_part = min_log_hz * np.exp(logstep * (mels - min_log_mel))
    return np.where(mels >= min_log_mel, log_part, freqs)


@functools.lru_cache(maxsize=4)
def mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters, [n_mels, n_fft//2+1] float32.

    Same construction as librosa.filters.mel(sr, n_fft, n_mels), which Whisper stores as mel_128.
    """
    fft_freqs = np.linspace(0.0, sample_rate / 2, 1 + n_fft // 2)
    mel_points = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2))
    widths = np.diff(mel_points)
    ramps = mel_points[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_points[2:] - mel_points[:-2]))[:, None]
    weights = weights.astype(np.float32)
    weights.setflags(write=False)
    return weights


@functools.lru_cache(maxsize=1)
def _hann() -> np.ndarray:
    n = np.arange(N_FFT)
    return (0.5 - 0.5 * np.cos(2 * np.pi * n / N_FFT)).astype(np.float32)  # periodic


def _log10_mel(padded: np.ndarray, n_frames: int) -> np.ndarray:
    """log10 mel power of frames starting every HOP samples in an already padded signal."""
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:n_frames]
    spectrum = np.fft.rfft(frames * _hann(), axis=-1)
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    mel = mel_filterbank() @ power.T
    return np.log10(np.maximum(mel, LOG_FLOOR))


def normalise(log_spec: np.ndarray, peak) -> np.ndarray:
    """Step 5 of "Log-mel": the 80 dB floor below `peak` (a number, or an array that broadcasts
    against log_spec), then the scaling."""
    return ((np.maximum(log_spec, peak - DYNAMIC_RANGE_LOG10) + 4.0) / 4.0).astype(np.float32)


def log_mel(samples: np.ndarray) -> np.ndarray:
    """Whisper's log_mel_spectrogram(n_mels=128) of a whole array: [128, len//160] float32.

    Centred frames, reflect padding of n_fft/2 on both ends, last frame dropped, and the
    80 dB floor taken from the maximum of the whole array.
    """
    samples = np.asarray(samples, dtype=np.float32)
    n_frames = len(samples) // HOP
    log_spec = _log10_mel(np.pad(samples, HISTORY, mode="reflect"), n_frames)
    return normalise(log_spec, float(log_spec.max()))


class StreamingLogMel:
    """Chunk-by-chunk features as the runtime computes them.

    Each 6400-sample chunk gets 200 samples of real history on the left (reflect padding at
    the very start of the stream) and reflect padding on its right edge, so only frame 39
    differs from the whole-file features and no look-ahead latency is added. The 80 dB floor
    follows a running maximum that `reset()` clears (docs/PROTOCOL.md, "Log-mel").
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._history: np.ndarray | None = None
        self._peak = -np.inf

    def __call__(self, chunk: np.ndarray) -> np.ndarray:
        log_spec = self.log10(chunk)
        self._peak = max(self._peak, float(log_spec.max()))
        return normalise(log_spec, self._peak)

    def log10(self, chunk: np.ndarray) -> np.ndarray:
        """The chunk's log10 mel power before the floor and scaling ([128, 40] float32); moves
        the left-edge history on, not the peak. Training data keeps this form, so that features
        can be normalised from any restart of the peak later."""
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.shape != (CHUNK_SAMPLES,):
            raise ValueError(f"a chunk has {CHUNK_SAMPLES} samples, got shape {chunk.shape}")
        left = chunk[HISTORY:0:-1] if self._history is None else self._history
        right = chunk[-2 : -HISTORY - 2 : -1]
        self._history = chunk[-HISTORY:].copy()
        return _log10_mel(np.concatenate([left, chunk, right]), FRAMES_PER_CHUNK)
