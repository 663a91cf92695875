"""Bad input, one row per kind, through the API and through `listenloop run`.

Each row says what must happen: an AudioFormatError (API) and one `listenloop: error:` line
with exit status 1 (CLI); or a run that completes with one AudioClipped event per call and one
`listenloop: warning:` line for the run; or a partial file read with one warning line. The
embedded demo model hears examples/kitchen.wav, so clipped int16-as-float audio shows whether
the kitchen alarm is still answered, and if it is not, the warning must name the fix.
"""
from __future__ import annotations

import math
import re
import struct
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import listenloop
from listenloop.audio import AudioWarning, read_audio
from listenloop.cli import main
from listenloop.protocol import CHUNK_SAMPLES

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
KITCHEN, _ = sf.read(EXAMPLES / "kitchen.wav", dtype="float32")  # 16 kHz mono, 22 s, peak 0.66
ALARM = "Smoke alarm! Please check the kitchen."
FIX = "this looks like int16 PCM stored as float; divide by 32768"
RANGE = r"is outside the supported range, 4000 to 384000 Hz"


def _wav_with_rate(path: Path, rate: int) -> Path:
    sf.write(path, KITCHEN, 16000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    struct.pack_into("<II", data, 24, rate, rate * 2)  # header: sample rate, byte rate
    path.write_bytes(bytes(data))
    return path


def _truncated(path: Path) -> Path:
    sf.write(path, KITCHEN, 16000, subtype="PCM_16")
    path.write_bytes(path.read_bytes()[:44 + int(3.1 * 16000) * 2])
    return path


def _random_mp3(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    return path


def _directory(path: Path) -> Path:
    path.mkdir()
    return path


@dataclass(frozen=True)
class Case:
    id: str
    array: object = None  # PCM for accept_waveform (the CLI gets it as a float WAV)
    rate: object = 16000
    file: object = None  # Path -> Path: builds the file
    error: str | None = None  # regex of the one-line AudioFormatError
    warning: str | None = None  # regex of the one CLI warning line
    clipped: bool = False  # an AudioClipped per call...
    int_pcm: bool = False  # ... that says integer PCM was passed as float
    chunks: int = 55  # decisions of a completed run
    cli: bool = True


CASES = [
    Case("int16-range float array", array=np.round(KITCHEN * 32768).astype(np.float32), clipped=True, int_pcm=True,
         warning=r"samples clipped \(peak 21693\.0\): " + re.escape(FIX)),
    Case("float WAV at +-1000", file=lambda p: _float_wav(p / "loud.wav", KITCHEN / np.abs(KITCHEN).max() * 1000),
         clipped=True, int_pcm=True, warning=r"loud\.wav: [\d,]+ samples clipped \(peak 1000\.0\): " + re.escape(FIX)),
    Case("samples of 1e18", array=KITCHEN * np.float32(1e18), clipped=True,
         warning=r"samples clipped \(peak 6\.62e\+17\): float samples belong in \[-1, 1\]"),
    Case("WAV header at 1 Hz", file=lambda p: _wav_with_rate(p / "r1.wav", 1), error=r"r1\.wav: sample rate 1 Hz " + RANGE),
    Case("WAV header at 7 Hz", file=lambda p: _wav_with_rate(p / "r7.wav", 7), error=r"r7\.wav: sample rate 7 Hz " + RANGE),
    Case("sample_rate=1", array=KITCHEN, rate=1, error=r"sample_rate 1 Hz " + RANGE, cli=False),
    Case("sample_rate=384001", array=KITCHEN, rate=384001, error=r"sample_rate 384001 Hz " + RANGE, cli=False),
    Case("truncated WAV", file=lambda p: _truncated(p / "cut.wav"), chunks=8,
         warning=r"cut\.wav: file is truncated: read 3\.1 s of the 22\.0 s its header promises"),
    Case("a directory", file=lambda p: _directory(p / "recordings"), error=r"recordings: is a directory, not an audio file"),
    Case("random bytes named .mp3", file=lambda p: _random_mp3(p / "noise.mp3"),
         error=r"noise\.mp3: cannot decode audio \(unrecognised format or corrupt data\)"),
]


def _float_wav(path: Path, pcm: np.ndarray, rate: int = 16000) -> Path:
    sf.write(path, pcm, rate, subtype="FLOAT")
    return path


@pytest.fixture(scope="module")
def runtime():
    with listenloop.Runtime(profile="cpu") as rt:  # the embedded demo model
        yield rt


def _replies(events) -> list[str]:
    return [e.text for e in events if e.kind == "ReplyEnded"]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_api(case, runtime, tmp_path):
    started = time.monotonic()
    with runtime.session() as session, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if case.file is not None:
                pcm, rate = read_audio(case.file(tmp_path)), 16000
            else:
                pcm, rate = case.array, case.rate
            session.accept_waveform(pcm, rate)
        except listenloop.AudioFormatError as exc:
            assert case.error and re.search(case.error + r"(; supported: .*)?$", str(exc)), str(exc)
            assert "\n" not in str(exc)
            return
        finally:
            assert time.monotonic() - started < 30  # refused up front: no hours of 1 Hz "audio" to resample
        assert case.error is None, "accepted input that must be refused"
        session.finish(timeout=120)
        events = list(session.events(timeout=5))
    assert events[-1].kind == "Finished"
    decisions = [e for e in events if e.kind == "Decision"]
    assert len(decisions) == math.ceil(len(pcm) / CHUNK_SAMPLES) == case.chunks
    assert all(math.isfinite(d.p_speak) for d in decisions)
    clipped = [e for e in events if e.kind == "AudioClipped"]
    assert len(clipped) == (1 if case.clipped else 0)  # one accept_waveform() call, one event
    if case.clipped:
        event = clipped[0]
        assert event.samples > 0 and event.peak > 1 and event.int_pcm_as_float == case.int_pcm
        assert event.to_dict()["event"] == "AudioClipped" and event.to_dict()["reason"] == event.reason
        if case.int_pcm:  # the kitchen alarm is still answered, or the event names the fix
            assert ALARM in _replies(events) or "divide by 32768" in event.reason
    truncation = [w for w in caught if issubclass(w.category, AudioWarning)]
    assert len(truncation) == (1 if case.id == "truncated WAV" else 0)
    if truncation:
        assert re.search(case.warning, str(truncation[0].message))


@pytest.mark.parametrize("case", [c for c in CASES if c.cli], ids=[c.id for c in CASES if c.cli])
def test_cli(case, tmp_path, capfd):
    path = case.file(tmp_path) if case.file is not None else _float_wav(tmp_path / "pcm.wav", case.array, case.rate)
    code = main(["run", str(path)])
    out, err = capfd.readouterr()  # file-descriptor level: decoder noise on fd 2 would show here
    lines = err.splitlines()
    problems = [line for line in lines if not re.match(r"\d+ chunks \(", line)]
    assert len(problems) == 1, err  # one line per problem, nothing else (no decoder noise, no traceback)
    if case.error:
        assert code == 1 and out == ""
        assert re.fullmatch(r"listenloop: error: .*" + case.error + r"(; supported: .*)?", problems[0]), problems[0]
        return
    assert code == 0
    assert re.fullmatch(r"listenloop: warning: .*" + case.warning, problems[0]), problems[0]
    assert len(lines) == 2 and lines[-1].startswith(f"{case.chunks} chunks")
    if case.int_pcm:  # after clipping the alarm is still answered, or the warning names the fix
        assert ALARM in out or "divide by 32768" in problems[0]
