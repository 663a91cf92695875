"""Soak run: one session fed many simulated hours of audio as fast as it takes it.

    listenloop bench --soak 24            # 24 simulated hours on the embedded demo model

The stream repeats a 10-minute program: the four example recordings, then silence, low pink
noise and hum between them, so the session sees replies, context resets and long stretches
of nothing. Per simulated hour it reports the process RSS, context resets, replies, how many
of the examples' expected replies came on each repetition (early against late), and every
loss (dropped audio, chunks or events). Memory should stay flat and the answers steady.
"""
from __future__ import annotations

import dataclasses
import json
import time

import numpy as np

from ..protocol import CHUNK_SAMPLES, SAMPLE_RATE
from .inputs import examples_dir
from .machine import rss_mb

PROGRAM_SECONDS = 600  # one repetition of the program
FILLERS = ("silence", "pink noise", "hum")
BLOCK_SECONDS = 1.0  # the session is fed in 1 s pieces


def _filler(kind: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    n = int(seconds * SAMPLE_RATE)
    if kind == "silence":
        return np.zeros(n, np.float32)
    if kind == "hum":
        t = np.arange(n) / SAMPLE_RATE
        return (0.02 * np.sin(2 * np.pi * 50 * t) + 0.002 * rng.normal(size=n)).astype(np.float32)
    white = rng.normal(size=n)  # pink noise: 1/f spectrum shaped in the frequency domain
    spectrum = np.fft.rfft(white) / np.sqrt(np.arange(1, n // 2 + 2))
    pink = np.fft.irfft(spectrum, n)
    return (0.01 * pink / (np.abs(pink).max() + 1e-9)).astype(np.float32)


@dataclasses.dataclass
class Program:
    """One repetition: (name, audio, expected replies or None) segments back to back."""

    segments: list

    @classmethod
    def build(cls, seed: int = 0) -> "Program":
        import soundfile as sf

        root = examples_dir()
        if not (root / "expected_events.json").is_file():
            raise FileNotFoundError("the soak run needs the example recordings (examples/ of the source tree)")
        expected = json.loads((root / "expected_events.json").read_text())
        rng = np.random.default_rng(seed)
        recordings = [(name, sf.read(root / name, dtype="float32")[0],
                       [e["reply"] for e in meta["events"] if e["expected"] == "reply"])
                      for name, meta in sorted(expected.items())]
        spoken = sum(len(audio) for _, audio, _ in recordings) / SAMPLE_RATE
        gap = (PROGRAM_SECONDS - spoken) / len(recordings)
        segments = []
        for i, recording in enumerate(recordings):
            segments.append(recording)
            kind = FILLERS[i % len(FILLERS)]
            segments.append((kind, _filler(kind, gap, rng), None))
        return cls(segments)


def soak(hours: float, package=None, profile: str = "cpu", *, report_every_hours: float = 1.0,
         progress=None) -> dict:
    """Stream `hours` simulated hours through one session; a row per `report_every_hours`."""
    from ..session import Runtime

    runtime = Runtime(package, profile)
    program = Program.build()
    block = int(BLOCK_SECONDS * SAMPLE_RATE)
    total = int(hours * 3600 * SAMPLE_RATE)
    every = report_every_hours * 3600 * SAMPLE_RATE
    marks = sorted({min(int(600 * SAMPLE_RATE), total)} | {min(int(k * every), total) for k in range(1, int(total / every) + 2)})
    rows, repetitions = [], []
    counts = {"resets": 0, "replies": 0, "dropped_samples": 0, "dropped_events": 0, "faults": 0}
    fed, started = 0, time.monotonic()
    replies_by_chunk: dict = {}
    windows = []  # (first chunk, last chunk, expected replies) of each recording played

    def take(events) -> None:
        for event in events:
            kind = event.kind
            if kind == "ContextReset":
                counts["resets"] += 1
            elif kind == "ReplyEnded":
                counts["replies"] += 1
                replies_by_chunk[event.chunk] = event.text
            elif kind == "AudioDropped":
                counts["dropped_samples"] += event.samples
            elif kind == "EventsDropped":
                counts["dropped_events"] += event.count
            elif kind == "Fault":
                counts["faults"] += 1

    def row(stats) -> dict:
        return {"hours": round(fed / SAMPLE_RATE / 3600, 3), "rss_mb": round(rss_mb(), 1), **counts,
                "dropped_chunks": stats.dropped_chunks, "position": stats.position,
                "wall_s": round(time.monotonic() - started, 1)}

    with runtime.session(stats_every=0) as session:
        while fed < total:
            for name, audio, expected in program.segments:
                first_chunk = fed // CHUNK_SAMPLES
                for start in range(0, len(audio), block):
                    piece = audio[start:min(start + block, start + total - fed)]  # never past `hours`
                    session.accept_waveform(piece)
                    fed += len(piece)
                    take(session.drain())
                    while marks and fed >= marks[0]:
                        marks.pop(0)
                        rows.append(row(session.stats()))
                        if progress:
                            progress(rows[-1])
                    if fed >= total:
                        break
                else:  # only recordings heard to the end are scored
                    if expected is not None:
                        windows.append((name, first_chunk, (fed - 1) // CHUNK_SAMPLES, expected))
                if fed >= total:
                    break
        session.finish()
        take(session.events())
        rows.append(row(session.stats()))
    for name, first, last, expected in windows:
        said = [text for chunk, text in replies_by_chunk.items() if first <= chunk <= last + 2]
        repetitions.append({"recording": name, "first_chunk": first,
                            "expected": len(expected), "answered": sum(text in said for text in expected)})
    return {"hours": hours, "package": runtime.package.name, "rows": rows, "repetitions": repetitions}


def report(result: dict) -> str:
    rows = result["rows"]
    lines = [f"soak: {result['hours']} simulated hours on {result['package']}",
             "  hours   RSS MB  resets  replies  dropped samples/chunks/events  faults  wall s"]
    for r in rows:
        lines.append(f"  {r['hours']:5.2f}  {r['rss_mb']:7.1f}  {r['resets']:6d}  {r['replies']:7d}  "
                     f"{r['dropped_samples']:>13d}/{r['dropped_chunks']}/{r['dropped_events']}  {r['faults']:6d}  "
                     f"{r['wall_s']:6.1f}")
    reps = result["repetitions"]
    if reps:
        half = max(1, len(reps) // 4)
        early = sum(r["answered"] for r in reps[:half]) / max(1, sum(r["expected"] for r in reps[:half]))
        late = sum(r["answered"] for r in reps[-half:]) / max(1, sum(r["expected"] for r in reps[-half:]))
        lines.append(f"  expected replies answered: first quarter {100 * early:.1f} %, last quarter {100 * late:.1f} % "
                     f"({len(reps)} recordings played)")
    first = next((r for r in rows if r["hours"] >= 10 / 60 - 1e-9), rows[0])
    lines.append(f"  RSS growth: {rows[-1]['rss_mb'] - first['rss_mb']:+.1f} MB from {first['hours']:.2f} h "
                 f"to {rows[-1]['hours']:.2f} h ({100 * (rows[-1]['rss_mb'] / first['rss_mb'] - 1):+.2f} %)")
    return "\n".join(lines)
