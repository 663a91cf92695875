"""Speech rendered by espeak-ng or flite as 16 kHz float32, cached on disk.

Two synthesizers of different kinds (espeak-ng: formant synthesis; flite: diphone and
clustergen voices recorded from real speakers), so the demo model does not learn one
synthesizer's timbre. Both are training-time dependencies only (Debian packages espeak-ng and
flite). Rendering is the slow part of stream generation, so every utterance is cached under
demo/.cache/speech/ keyed by synthesizer, text, voice, speed and pitch.
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

from listenloop.protocol import SAMPLE_RATE

CACHE_DIR = Path(__file__).resolve().parent / ".cache" / "speech"
_CACHE_VERSION = "1"  # bump when rendering or trimming changes

# Base voices (espeak-ng --voices=en, the gmw/ ones that ship with the Debian package) and
# variants (+name). Evaluation voices and variants are disjoint from training ones.
TRAIN_LANGUAGES = ("en-us", "en-gb", "en-gb-x-rp", "en-029", "en-gb-x-gbcwmd")
EVAL_LANGUAGES = ("en-gb-scotland", "en-us-nyc", "en-gb-x-gbclan")
TRAIN_VARIANTS = ("", "m1", "m2", "m3", "m5", "m7", "m8", "f1", "f2", "f4", "klatt", "klatt3", "klatt4",
                  "klatt5", "klatt6", "Andy", "belinda", "david", "steph", "steph2", "steph3", "adam",
                  "Alex", "Alicia", "Andrea", "aunty", "benjamin", "boris", "caleb", "ed", "edward",
                  "Gene", "gustave", "Hugo", "iven", "iven3", "Jacky", "Lee", "linda", "Marco", "max",
                  "Michael", "Mike", "paul", "quincy", "rob", "robert", "zac", "anika", "norbert",
                  "sandro", "shelby", "travis", "victor", "grandma", "grandpa")
EVAL_VARIANTS = ("m4", "m6", "f3", "f5", "klatt2", "Annie", "john")

# flite's built-in voices (flite -lv), with each voice's natural pitch in Hz: the pitch setting
# scales it. kal and kal16 are one speaker, so both train; rms is held out for evaluation.
FLITE_VOICES = {"kal": 105.0, "kal16": 105.0, "awb": 110.0, "slt": 170.0, "rms": 100.0}
TRAIN_FLITE_VOICES = ("kal", "kal16", "awb", "slt")
EVAL_FLITE_VOICES = ("rms",)
FLITE_SHARE = 0.3  # share of utterances flite speaks


@dataclass(frozen=True)
class Voice:
    language: str  # espeak-ng voice name, e.g. "en-us"; for flite, its voice name, e.g. "slt"
    variant: str  # espeak-ng variant name without "+", "" for the voice's default
    speed: int  # words per minute (espeak-ng -s; flite stretches durations to match)
    pitch: int  # 0..99 (espeak-ng -p; flite scales its voice's natural pitch by 0.8..1.2)
    synth: str = "espeak-ng"  # or "flite"

    @property
    def spec(self) -> str:
        if self.synth == "flite":
            return f"flite:{self.language}"
        return f"{self.language}+{self.variant}" if self.variant else self.language

    def command(self, text: str) -> list[str]:
        """The synthesizer's command line that writes `text` as WAV to stdout."""
        if self.synth == "flite":
            f0 = FLITE_VOICES[self.language] * (0.8 + 0.4 * self.pitch / 99.0)
            return ["flite", "-voice", self.language, "--setf", f"duration_stretch={160.0 / self.speed:.3f}",
                    "--setf", f"int_f0_target_mean={f0:.1f}", "-t", text, "-o", "/dev/stdout"]
        return ["espeak-ng", "-v", self.spec, "-s", str(self.speed), "-p", str(self.pitch), "--stdout", text]


def random_voice(rng: np.random.Generator, split: str) -> Voice:
    """A voice of the given split ("train" or "eval") with random speed and pitch."""
    if split == "train":
        languages, variants, flite_voices = TRAIN_LANGUAGES, TRAIN_VARIANTS, TRAIN_FLITE_VOICES
    elif split == "eval":
        languages, variants, flite_voices = EVAL_LANGUAGES, EVAL_VARIANTS, EVAL_FLITE_VOICES
    else:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    language, variant = str(rng.choice(languages)), str(rng.choice(variants))
    speed, pitch = int(rng.integers(125, 200)), int(rng.integers(20, 80))
    if rng.random() < FLITE_SHARE:  # drawn after the espeak-ng choices, so each seed's draws stay aligned
        return Voice(str(rng.choice(flite_voices)), "", speed, pitch, synth="flite")
    return Voice(language, variant, speed, pitch)


def _cache_path(text: str, voice: Voice) -> Path:
    # voice.spec names the synthesizer too ("flite:slt"), so the two never share a key.
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
    if shutil.which(voice.synth) is None:
        raise FileNotFoundError(
            f"{voice.synth} is not installed; it is needed only to generate demo training data "
            "(apt-get install espeak-ng flite)"
        )
    result = subprocess.run(voice.command(text), capture_output=True, check=False)
    if result.returncode != 0 or not result.stdout:
        raise RuntimeError(f"{voice.synth} failed for voice {voice.spec}: {result.stderr.decode(errors='replace')}")
    data, rate = sf.read(io.BytesIO(result.stdout), dtype="float32")
    if data.ndim == 2:
        data = data.mean(axis=1)
    audio = soxr.resample(data, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    audio = trim_silence(audio)
    peak = float(np.abs(audio).max(initial=0.0))
    if peak == 0.0:
        raise RuntimeError(f"{voice.synth} rendered silence for {text!r} with voice {voice.spec}")
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
