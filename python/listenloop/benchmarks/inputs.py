"""The audio the figures are measured on: seeded synthetic audio and its chunk log-mels, or a
recording (default: examples/kitchen.wav of the source tree)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import Error
from ..protocol import CHUNK_SAMPLES, SAMPLE_RATE


def examples_dir() -> Path:
    """examples/ of the source tree this module runs from, else of the current folder."""
    for root in (Path(__file__).resolve().parents[3], Path.cwd()):
        if (root / "examples" / "kitchen.wav").is_file():
            return root / "examples"
    return Path(__file__).resolve().parents[3] / "examples"


DEFAULT_RECORDING = examples_dir() / "kitchen.wav"


def synthetic_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise with wandering tones, float32 16 kHz: mel and encoder work like on speech."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    tone = np.sin(2 * np.pi * (220 + 180 * np.sin(2 * np.pi * 0.3 * t)) * t)
    return (0.05 * rng.standard_normal(n) + 0.2 * tone).astype(np.float32)


def example_pcm() -> np.ndarray:
    """The example recordings (examples/*.wav: 16-bit PCM, mono, 16 kHz) one after the other as
    float32, read with the standard library's `wave` (machines without soundfile read them too)."""
    import wave

    parts = []
    for path in sorted(examples_dir().glob("*.wav")):
        with wave.open(str(path)) as w:
            layout = (w.getsampwidth(), w.getnchannels(), w.getframerate())
            if layout != (2, 1, SAMPLE_RATE):
                raise Error(f"{path}: (bytes per sample, channels, rate) {layout}, expected (2, 1, {SAMPLE_RATE})")
            parts.append(np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768)
    if not parts:
        raise Error(f"{examples_dir()}: no example recordings")
    return np.concatenate(parts)


def chunk_mels(audio: np.ndarray) -> np.ndarray:
    """[k,128,40] normalised log-mels of consecutive chunks, as a session feeds the encoder."""
    from .. import _core

    mel = _core.StreamingMel(CHUNK_SAMPLES)
    k = len(audio) // CHUNK_SAMPLES
    return np.stack([mel(audio[i * CHUNK_SAMPLES:(i + 1) * CHUNK_SAMPLES]) for i in range(k)])


def load_recording(path=None) -> np.ndarray:
    """An audio file as 16 kHz float32 mono (default: DEFAULT_RECORDING, examples/kitchen.wav)."""
    from ..audio import read_audio

    path = Path(path) if path is not None else DEFAULT_RECORDING
    if not path.is_file():
        raise Error(f"{path}: no such recording; pass --recording FILE (any audio file)")
    return read_audio(path)
