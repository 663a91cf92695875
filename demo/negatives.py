"""Streams the demo model must mostly stay silent through: real recordings (demo/realworld.py)
and the device's own spoken replies heard back through a room.

- `make_real_stream(seed, "train")`: real speech, music or sound effects as the bed of a
  training stream; in some streams the usual synthetic commands and sounds are played over it
  (labelled as in demo/streams.py), so the model learns to answer over real audio, not to go
  deaf when it hears any.
- `make_real_stream(seed, "eval")`: held-out real recordings only, played as they are (no
  reverb, no items): every reply on them is a false reply. `python -m demo.evaluate --real`.
- `make_own_stream(seed)`: the demo's own reply texts, spoken by the training voices (and the
  kiosk's device voice) through a simulated room (demo/rooms.py), half of the streams after
  listenloop's echo canceller given the played signal as its reference, as the runtime does.
  The replies are never a target; user commands and sounds sometimes follow or talk over them.
"""
from __future__ import annotations

import numpy as np

from listenloop.protocol import CHUNK_SAMPLES

from . import augment, realworld, speech, streams, tasks
from .dsp import db_to_amplitude, seconds, set_rms
from .rooms import Echo, Room

_REAL_SALT = {"train": 0x4EA1, "eval": 0x4EA2}
_OWN_SALT = 0x0C40
REAL_BEDS = ("speech", "music", "speech over music", "sounds")
_BED_WEIGHTS = {"train": (0.45, 0.25, 0.2, 0.1), "eval": (0.4, 0.3, 0.2, 0.1)}
P_ITEMS = 0.4  # share of real training streams that also carry synthetic items over the bed
EVAL_LEVEL_DB = (-30.0, -16.0)  # RMS of a held-out real stream, in dBFS
EVAL_NOISE_DB = -65.0  # a microphone's self-noise under the held-out recordings
P_CANCELLED = 0.5  # share of own-voice streams heard after the echo canceller
P_DEVICE_VOICE = 0.3  # share of own replies spoken in the kiosk's device voice
P_USER = 0.5  # share of own-voice streams in which the user also speaks or a sound occurs


def _sequence(rng: np.random.Generator, kind: str, split: str, n: int, gap_s: tuple[float, float]) -> np.ndarray:
    """Random recordings of `kind` back to back with gaps, each at its own level (±4 dB
    around RMS 1), cut to n samples."""
    rows = realworld.catalogue(kind, split)
    out = np.zeros(n, np.float32)
    at = seconds(rng.uniform(0.0, gap_s[1]))
    while at < n:
        clip = realworld.load(rows[int(rng.integers(len(rows)))][0])
        if kind == "music" and len(clip) > n:  # a random excerpt of a track
            start = int(rng.integers(len(clip) - n + 1))
            clip = clip[start:start + n]
        clip = set_rms(clip, db_to_amplitude(rng.uniform(-4.0, 4.0)))
        piece = clip[: n - at]
        out[at:at + len(piece)] += piece
        at += len(piece) + seconds(rng.uniform(*gap_s))
    return out


def real_bed(rng: np.random.Generator, n: int, split: str) -> tuple[np.ndarray, str]:
    """n samples of real audio at RMS 1 and what it is (one of REAL_BEDS)."""
    bed = str(rng.choice(REAL_BEDS, p=_BED_WEIGHTS[split]))
    if bed == "speech":
        audio = _sequence(rng, "speech", split, n, (0.05, 1.2))
    elif bed == "music":
        audio = _sequence(rng, "music", split, n, (0.0, 0.5))
    elif bed == "sounds":
        audio = _sequence(rng, "sounds", split, n, (0.3, 3.0))
    else:
        audio = (_sequence(rng, "speech", split, n, (0.05, 1.2))
                 + db_to_amplitude(rng.uniform(-20.0, -6.0)) * set_rms(_sequence(rng, "music", split, n, (0.0, 0.5)), 1.0))
    return set_rms(audio, 1.0), bed


def make_real_stream(seed: int, split: str = "train") -> streams.Stream:
    """One reproducible stream on real recordings of `split` (see the module's doc)."""
    if split not in _REAL_SALT:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    settings = streams.SETTINGS[split]
    rng = np.random.default_rng([seed, _REAL_SALT[split]])
    n_chunks = int(rng.integers(settings.min_chunks, settings.max_chunks + 1))
    n = n_chunks * CHUNK_SAMPLES
    bed, _ = real_bed(rng, n, split)
    if split == "eval":
        noise = rng.standard_normal(n).astype(np.float32) * db_to_amplitude(EVAL_NOISE_DB)
        audio = np.clip(bed * db_to_amplitude(rng.uniform(*EVAL_LEVEL_DB)) + noise, -1.0, 1.0)
        return streams.Stream(seed=seed, split="real", audio=audio.astype(np.float32))
    if rng.random() < settings.p_reverb:
        bed = set_rms(augment.reverb(rng, bed, rt60_s=rng.uniform(0.2, 0.8), wet=rng.uniform(0.2, 0.6))[:n], 1.0)
    placed = streams.place_items(rng, n, settings, "train") if rng.random() < P_ITEMS else []
    # Without items the real audio is the foreground; with items it is their background.
    bed_snr_db = rng.uniform(5.0, 25.0) if placed else rng.uniform(-3.0, 3.0)
    return streams.mix_stream(rng, n_chunks, placed, "train", settings, seed=seed, bed=bed, bed_snr_db=bed_snr_db)


def _random_room(rng: np.random.Generator) -> Room:
    return Room(rt60_s=rng.uniform(0.2, 0.8), gain_db=rng.uniform(-10.0, 6.0), delay_s=rng.uniform(0.0, 0.25),
                drr_db=rng.uniform(0.0, 10.0), seed=int(rng.integers(2**31)))


def make_own_stream(seed: int) -> streams.Stream:
    """One reproducible training stream of the device's own replies heard back (module doc)."""
    from listenloop import _core  # the runtime's canceller, as a session runs it

    from .kiosk import DEVICE_RMS, DEVICE_VOICE

    settings = streams.TRAIN_SETTINGS
    rng = np.random.default_rng([seed, _OWN_SALT])
    n_chunks = int(rng.integers(settings.min_chunks, settings.max_chunks + 1))
    n = n_chunks * CHUNK_SAMPLES
    played = np.zeros(n, np.float32)
    segments: list[streams.Segment] = []
    at = seconds(rng.uniform(0.2, 2.0))
    while True:
        reply = tasks.REPLIES[int(rng.integers(len(tasks.REPLIES)))]
        voice = DEVICE_VOICE if rng.random() < P_DEVICE_VOICE else speech.random_voice(rng, "train")
        said = set_rms(speech.render(reply.text, voice), DEVICE_RMS)
        if at + len(said) > n:
            break
        played[at:at + len(said)] = said
        segments.append(streams.Segment("distractor", "distractor", reply.text, at, at + len(said), None))
        at += len(said) + seconds(rng.uniform(0.3, 4.0))
    mic = Echo(_random_room(rng)).push(played)
    background = streams.make_background(rng, n, "train") * db_to_amplitude(rng.uniform(-60.0, -40.0))
    mic = mic + background.astype(np.float32)
    if rng.random() < P_USER:
        for item, start in streams.place_items(rng, n, settings, "train"):
            wet = set_rms(item.audio, db_to_amplitude(rng.uniform(*settings.foreground_db)))
            mic[start:start + len(wet)] += wet[: n - start]
            segments.append(item.segment(start))
    mic = np.clip(mic, -1.0, 1.0).astype(np.float32)
    if rng.random() < P_CANCELLED:
        mic = np.asarray(_core.EchoCanceller().process(mic, played), np.float32)
    return streams.Stream(seed=seed, split="own", audio=mic, segments=sorted(segments, key=lambda s: s.start))
