"""Phoneme targets for the encoder's auxiliary CTC loss: espeak-ng's ASCII phoneme mnemonics
(`espeak-ng -q -x`, its default English voice), one unit per character, stress and syllable
marks dropped. "turn off the lights" -> t'3:n '0f D@ l'aIts -> t 3 : n 0 f D @ l a I t s.

The targets need only tell commands from each other and from other speech ("on" from "off"),
so one transcription per text is enough, whoever speaks it. Training only: never at run time.
"""
from __future__ import annotations

import json
import shutil
import string
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DROPPED = set("'," + "%=_|" + string.whitespace)  # stress, syllable and word marks
SYMBOLS = tuple(sorted(set(string.printable) - DROPPED))
BLANK = 0  # CTC blank; symbol i is unit i + 1
UNIT = {symbol: i + 1 for i, symbol in enumerate(SYMBOLS)}
N_UNITS = len(SYMBOLS) + 1


def transcribe(text: str) -> str:
    """espeak-ng's phoneme mnemonics for `text`."""
    if shutil.which("espeak-ng") is None:
        raise FileNotFoundError("espeak-ng is not installed; it is needed only to train the demo model "
                                "(apt-get install espeak-ng)")
    result = subprocess.run(["espeak-ng", "-q", "-x", text], capture_output=True, text=True, check=True)
    return " ".join(result.stdout.split())


def units(phonemes: str) -> list[int]:
    return [UNIT[c] for c in phonemes if c in UNIT]


def targets_for(texts: list[str], cache: Path) -> list[list[int]]:
    """Unit sequences for `texts`, transcribed once and kept in the JSON file `cache`."""
    known: dict[str, str] = json.loads(cache.read_text()) if cache.exists() else {}
    missing = [t for t in dict.fromkeys(texts) if t not in known]
    if missing:
        with ThreadPoolExecutor(max_workers=4) as pool:  # each call is a short process
            known.update(zip(missing, pool.map(transcribe, missing)))
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(cache)
    return [units(known[t]) for t in texts]
