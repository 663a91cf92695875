"""Speech rendered by espeak-ng as 16 kHz float32, cached on disk.

espeak-ng is a training-time dependency only. Rendering is the slow part of stream generation,
so every utterance is cached under demo/.cache/speech/ keyed by text, voice, speed and pitch.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000
CACHE_DIR = Path(__file__).resolve().parent / ".cache" / "speech"
_CACHE_VERSION = "1"  # bump when rendering or trimming changes

# Base voices (espeak-ng --voices=en, the gmw/ ones that ship with the Debian package) and
# variants (+name). Evaluation voices and variants are disjoint from training ones.
TRAIN_LANGUAGES = ("en-us", "en-gb", "en-gb-x-rp", "en-029", "en-gb-x-gbcwmd")
EVAL_LANGUAGES = ("en-gb-scotland", "en-us-nyc", "en-gb-x-gbclan")
TRAIN_VARIANTS = ("", "m1", "m2", "m3", "m5", "m7", "f1", "f2", "f4", "klatt", "klatt3", "Andy",
                  "belinda", "david", "steph")
EVAL_VARIANTS = ("m4", "m6", "f3", "f5", "klatt2", "Annie", "john")


@dataclass(frozen=True)
class Voice:
    language: str  # espeak-ng voice name, e.g. "en-us"
    variant: str  # variant name without "+", "" for the voice's default
    speed: int  # words per minute (espeak-ng -s)
    pitch: int  # 0..99 (espeak-ng -p)

    @property
    def spec(self) -> str:
        return f"{self.language}+{self.variant}" if self.variant else self.language


def random_voice(rng: np.random.Generator, split: str) -> Voice:
    """A voice of the given split ("train" or "eval") with random speed and pitch."""
    if split == "train":
        languages, variants = TRAIN_LANGUAGES, TRAIN_VARIANTS
    elif split == "eval":
        languages, variants = EVAL_LANGUAGES, EVAL_VARIANTS
    else:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return Voice(
        language=str(rng.choice(languages)),
        variant=str(rng.choice(variants)),
        speed=int(rng.integers(125, 200)),
        pitch=int(rng.integers(20, 80)),
    )


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def _cache_path(text: str, voice: Voice) -> Path:
    key = hashlib.sha1(f"{_CACHE_VERSION}|{text}|{voice.spec}|{voice.speed}|{voice.pitch}".encode()).hexdigest()
    return CACHE_DIR / key[:2] / f"{key}.npy"


def trim_silence(audio: np.ndarray, threshold: float = 0.01, margin: int = 160) -> np.ndarray:
    """Cut leading and trailing samples quieter than threshold × peak (keeping a 10 ms margin),
    so an utterance's end time is where the voice really stops (labels depend on it)."""
    loud = np.flatnonzero(np.abs(audio) > threshold * float(np.abs(audio).max(initial=0.0)))
    if loud.size == 0:
        return audio[:0]
    return audio[max(0, loud[0] - margin) : loud[-1] + margin + 1]


def _synthesise(text: str, voice: Voice) -> np.ndarray:
    if not espeak_available():
        raise FileNotFoundError(
            "espeak-ng is not installed; it is needed only to generate demo training data "
            "(apt-get install espeak-ng)"
        )
    result = subprocess.run(
        ["espeak-ng", "-v", voice.spec, "-s", str(voice.speed), "-p", str(voice.pitch), "--stdout", text],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0 or not result.stdout:
        raise RuntimeError(f"espeak-ng failed for voice {voice.spec}: {result.stderr.decode(errors='replace')}")
    data, rate = sf.read(io.BytesIO(result.stdout), dtype="float32")
    if data.ndim == 2:
        data = data.mean(axis=1)
    audio = soxr.resample(data, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    audio = trim_silence(audio)
    peak = float(np.abs(audio).max(initial=0.0))
    if peak == 0.0:
        raise RuntimeError(f"espeak-ng rendered silence for {text!r} with voice {voice.spec}")
    return (audio / peak).astype(np.float32)


def render(text: str, voice: Voice) -> np.ndarray:
    """`text` spoken by `voice`: 16 kHz float32, silence trimmed, peak 1.0."""
    if not text.strip():
        raise ValueError("cannot render empty text")
    path = _cache_path(text, voice)
    if path.exists():
        return np.load(path)
    audio = _synthesise(text, voice)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, audio)
    os.replace(tmp, path)  # atomic, so parallel generators never read half a file
    return audio
