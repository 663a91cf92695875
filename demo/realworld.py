"""Real recordings for the demo model: audio it must stay silent through (training negatives)
and a held-out real-audio check (`python -m demo.evaluate --real`).

Every recording comes from a Debian 12 package, fetched by version with `apt-get download`
and unpacked with `dpkg-deb` (python -m demo.realworld --fetch; nothing is fetched at run
time). Each package's licence is the one its debian/copyright gives for these files; none is
a recording of the demo's commands or sounds. Sound effects that resemble the six alert sounds
(bells, phones, alarms, glass, knocks, kettles, whistles) are left out, so a negative never
contradicts an alert.

Held out: recordings are split by *group* (one speaker set, language or music track), a
quarter of the groups by a hash of the group's name, so the real-audio check hears voices,
languages and music that training never heard.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from listenloop.protocol import SAMPLE_RATE

CACHE_DIR = Path(__file__).resolve().parent / ".cache" / "real"
HELD_OUT_SHARE = 4  # one group in this many is held out for the real-audio check
MAX_CLIP_S = 240.0  # longer recordings (music tracks) are cut to this much when loaded
_ALERT_LIKE = re.compile(r"bell|phone|ring|alarm|glass|knock|kettle|whistle|siren|door|smoke|beep|clock", re.I)


@dataclass(frozen=True)
class Source:
    package: str
    version: str
    licence: str
    kind: str  # "speech", "music" or "sounds"
    pattern: str  # glob under the unpacked package
    what: str

    def group(self, path: Path) -> str:
        """The unit of the held-out split: a voice pack or language folder, a music track, or
        a language suffix of tuxpaint's read-aloud names."""
        if self.kind == "music":
            return f"{self.package}:{path.stem}"
        if self.package == "tuxpaint-stamps-default" and self.kind == "speech":
            suffix = path.stem.split("_desc", 1)[1].lstrip("_") or "en"
            return f"{self.package}:{suffix}"
        return f"{self.package}:{path.parent.name if self.package != 'klettres-data' else path.parent.parent.name}"


SOURCES: tuple[Source, ...] = (
    Source("alsa-utils", "1.2.8-1", "GPL-2", "speech", "usr/share/sounds/alsa/*.wav",
           "a woman naming loudspeaker channels (\"front left\")"),
    Source("ktuberling-data", "4:22.12.3-1", "GPL-2+", "speech", "usr/share/ktuberling/sounds/*/*.ogg",
           "single words read by native speakers of 20 languages"),
    Source("klettres-data", "4:22.12.3-1", "GPL-2+", "speech", "usr/share/klettres/*/*/*.ogg",
           "letters and syllables read by native speakers of 20 languages"),
    Source("tuxpaint-stamps-default", "2022.06.04-1", "GPL-2", "speech", "usr/share/tuxpaint/stamps/**/*_desc*.ogg",
           "names of pictures read aloud by many speakers in many languages"),
    Source("hedgewars-data", "1.0.2-6", "GFDL-1.3", "speech", "usr/share/games/hedgewars/Data/Sounds/voices/*/*.ogg",
           "voice packs of a game: short lines by voice actors, several accents"),
    Source("tuxpaint-stamps-default", "2022.06.04-1", "GPL-2", "sounds", "usr/share/tuxpaint/stamps/**/*.ogg",
           "recorded sound effects of animals, vehicles and things"),
    Source("hedgewars-data", "1.0.2-6", "GPL-2", "music", "usr/share/games/hedgewars/Data/Music/*.ogg",
           "game music, many styles"),
    Source("wesnoth-1.16-music", "1:1.16.9-1", "GPL-2", "music", "usr/share/games/wesnoth/1.16/data/core/music/*.ogg",
           "orchestral game music"),
)
KINDS = ("speech", "music", "sounds")
SPLITS = ("train", "eval")


def held_out(group: str) -> bool:
    return int(hashlib.sha256(group.encode()).hexdigest(), 16) % HELD_OUT_SHARE == 0


def _package_dir(source: Source) -> Path:
    return CACHE_DIR / "packages" / source.package


def fetch() -> None:
    """Download and unpack every source package (needs apt and a Debian mirror)."""
    debs = CACHE_DIR / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    for package, version in dict.fromkeys((s.package, s.version) for s in SOURCES):
        target = CACHE_DIR / "packages" / package
        if target.exists():
            continue
        found = list(debs.glob(f"{package}_*.deb"))
        if not found:
            subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=debs, check=True)
            found = list(debs.glob(f"{package}_*.deb"))
        digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
        print(f"[real] {found[0].name} sha256 {digest}", flush=True)
        target.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(found[0]), str(target)], check=True)


def _wanted(source: Source, path: Path) -> bool:
    name = path.stem
    if source.kind == "sounds":
        # tuxpaint's sound effects, not its read-aloud names or numbers in a language
        return "_desc" not in name and not re.search(r"_[a-z]{2}(_[A-Z]{2})?$", name) and not _ALERT_LIKE.search(str(path))
    return not _ALERT_LIKE.search(name) if source.kind == "speech" else True


@lru_cache(maxsize=None)
def catalogue(kind: str, split: str) -> tuple[tuple[str, str], ...]:
    """(path, group) of every recording of `kind` in `split`, sorted: the same on every machine."""
    if kind not in KINDS or split not in SPLITS:
        raise ValueError(f"kind must be one of {KINDS} and split one of {SPLITS}, got {kind!r}, {split!r}")
    rows = []
    for source in SOURCES:
        if source.kind != kind:
            continue
        root = _package_dir(source)
        if not root.exists():
            raise FileNotFoundError(f"{root} is missing: run python -m demo.realworld --fetch")
        for path in sorted(root.glob(source.pattern)):
            group = source.group(path)
            if _wanted(source, path) and held_out(group) == (split == "eval"):
                rows.append((str(path.relative_to(CACHE_DIR)), group))
    return tuple(sorted(rows))


@lru_cache(maxsize=4096)
def load(relative: str) -> np.ndarray:
    """A recording as 16 kHz mono float32 at its own level, at most MAX_CLIP_S long."""
    import soundfile
    import soxr

    audio, rate = soundfile.read(CACHE_DIR / relative, dtype="float32", always_2d=True,
                                 frames=int(MAX_CLIP_S * 48000))
    audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, rate, SAMPLE_RATE)
    return np.ascontiguousarray(audio, np.float32)


def summary() -> str:
    lines = []
    for kind in KINDS:
        for split in SPLITS:
            rows = catalogue(kind, split)
            groups = {g for _, g in rows}
            lines.append(f"{kind:7s} {split:5s} {len(rows):5d} recordings in {len(groups):3d} groups")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Fetch and list the real recordings of the demo model's data.")
    p.add_argument("--fetch", action="store_true", help="download and unpack the source packages")
    args = p.parse_args(argv)
    if args.fetch:
        fetch()
    print(summary())


if __name__ == "__main__":
    main()
