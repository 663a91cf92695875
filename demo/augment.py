"""Channel augmentations: gain, additive noise at an SNR, room reverb, low-rate resampling
artefacts, clipping, and a tempo change for speech. All take and return 16 kHz float32."""
from __future__ import annotations

import numpy as np
import soxr

from listenloop.protocol import SAMPLE_RATE

from .dsp import db_to_amplitude, fft_convolve, rms, seconds, time_axis


def gain(x: np.ndarray, db: float) -> np.ndarray:
    return (x * db_to_amplitude(db)).astype(np.float32)


def add_noise(x: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """x + noise scaled so that rms(x)/rms(noise) is `snr_db`."""
    if noise.shape != x.shape:
        raise ValueError(f"noise shape {noise.shape} differs from signal shape {x.shape}")
    signal_rms, noise_rms = rms(x), rms(noise)
    if signal_rms == 0.0 or noise_rms == 0.0:
        return x.astype(np.float32)
    return (x + noise * (signal_rms / noise_rms / db_to_amplitude(snr_db))).astype(np.float32)


def reverb(rng: np.random.Generator, x: np.ndarray, rt60_s: float, wet: float) -> np.ndarray:
    """Convolve with exponentially decaying noise (a small room's diffuse tail) plus the dry
    path. The output keeps x's length and gets the tail appended, so the sound's own end time
    is unchanged but its reverberation rings on."""
    n_ir = seconds(rt60_s)
    decay = np.exp(-6.9 * time_axis(n_ir) / rt60_s)  # -60 dB at rt60
    ir = (rng.standard_normal(n_ir) * decay).astype(np.float32)
    ir[: seconds(0.003)] = 0.0  # first reflections arrive a few ms after the direct sound
    ir *= wet / max(1e-9, float(np.sqrt(np.sum(ir.astype(np.float64) ** 2))))
    padded = np.concatenate([x, np.zeros(n_ir, np.float32)])
    return (padded + fft_convolve(padded, ir)).astype(np.float32)


def resample_artefacts(x: np.ndarray, via_rate: int) -> np.ndarray:
    """Down to `via_rate` and back up with soxr's low-quality filters: band limit and aliasing
    like a cheap microphone path or a phone line."""
    if via_rate >= SAMPLE_RATE:
        raise ValueError(f"via_rate must be below {SAMPLE_RATE}, got {via_rate}")
    low = soxr.resample(x, SAMPLE_RATE, via_rate, quality="LQ")
    back = soxr.resample(low, via_rate, SAMPLE_RATE, quality="LQ")
    out = np.zeros_like(x)
    out[: min(len(x), len(back))] = back[: len(x)]
    return out.astype(np.float32)


def change_tempo(x: np.ndarray, factor: float) -> np.ndarray:
    """Play `x` `factor` times faster (shorter, higher pitch and formants), like a different
    speaker: a cheap way to widen a few synthetic voices."""
    if not 0.5 <= factor <= 2.0:
        raise ValueError(f"tempo factor must be in [0.5, 2], got {factor}")
    return soxr.resample(x, SAMPLE_RATE, SAMPLE_RATE / factor, quality="HQ").astype(np.float32)


def clip(x: np.ndarray, drive_db: float) -> np.ndarray:
    """Amplify by drive_db and hard-clip at full scale, as an overdriven input would."""
    return np.clip(x * db_to_amplitude(drive_db), -1.0, 1.0).astype(np.float32)


GAIN_JITTER_LOG10 = 0.6  # features are played up to ±6 dB louder or quieter


def spec_augment(rng: np.random.Generator, mel: np.ndarray, freq_masks: int = 2, max_bins: int = 12,
                 time_masks: int = 1, max_frames: int = 6) -> np.ndarray:
    """SpecAugment on normalised chunk features [N, 128, 40]: per chunk, bands of mel bins and
    runs of frames set to the chunk's mean. Returns a new array."""
    out = np.array(mel, np.float32, copy=True)
    n, bins, frames = out.shape
    for k in range(n):
        fill = out[k].mean()
        for _ in range(freq_masks):
            width = int(rng.integers(0, max_bins + 1))
            start = int(rng.integers(0, bins - width + 1))
            out[k, start : start + width] = fill
        for _ in range(time_masks):
            width = int(rng.integers(0, max_frames + 1))
            start = int(rng.integers(0, frames - width + 1))
            out[k, :, start : start + width] = fill
    return out


P_WARP = 0.5  # share of augmented windows whose spectra are warped as another vocal tract would
WARP = (0.88, 1.12)  # frequency scale factor range (about ±12 %: a child's to a large adult's tract)


def _slaney_hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, np.float64)
    linear = hz / (200.0 / 3.0)
    return np.where(hz < 1000.0, linear, 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) / (np.log(6.4) / 27.0))


def _bin_centres_hz(bins: int, top_hz: float = 8000.0) -> np.ndarray:
    mels = np.linspace(0.0, _slaney_hz_to_mel(np.array(top_hz)), bins + 2)[1:-1]
    return np.where(mels < 15.0, mels * (200.0 / 3.0), 1000.0 * np.exp((mels - 15.0) * np.log(6.4) / 27.0))


def warp_frequencies(mel: np.ndarray, factor: float) -> np.ndarray:
    """Chunk features [N, bins, frames] with every frequency scaled by `factor` (vocal tract
    length perturbation): bin b takes the value found at its centre frequency / factor,
    interpolated between the neighbouring bins (the edge bins hold beyond the range)."""
    bins = mel.shape[1]
    centres = _bin_centres_hz(bins)
    source = np.interp(centres / factor, centres, np.arange(bins, dtype=np.float64))
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, bins - 1)
    w = (source - low).astype(np.float32)[None, :, None]
    return (mel[:, low] * (1.0 - w) + mel[:, high] * w).astype(np.float32)


def training_window(rng: np.random.Generator | None, features, i: int, first: int, end: int, restart: int = 0,
                    augmenting: bool = False) -> np.ndarray:
    """`features.window(i, first, end, restart)` (a demo.dataset.FeatureSet) as training sees
    it: when `augmenting`, played up to ±6 dB louder or quieter, sometimes frequency-warped as
    another speaker's vocal tract would shift it, then SpecAugment-masked."""
    if not augmenting:
        return features.window(i, first, end, restart)
    gain = float(rng.uniform(-GAIN_JITTER_LOG10, GAIN_JITTER_LOG10))
    window = features.window(i, first, end, restart, gain)
    if rng.random() < P_WARP:
        window = warp_frequencies(window, float(rng.uniform(*WARP)))
    return spec_augment(rng, window)
