"""Several sessions on one Runtime (`measure_sessions`, `bench_sessions`).

N sessions open at once, each fed the same recording (default: examples/kitchen.wav) in 0.1 s
pieces as fast as possible from its own thread: aggregate chunks/s, each stream's listening
step, KV bytes per session, and whether every session's events (decisions, p_speak, reply text,
context resets) equal those of a single session.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from ..errors import Error
from ..protocol import CHUNK_SECONDS, SAMPLE_RATE
from .inputs import DEFAULT_RECORDING, load_recording
from .machine import environment, rss_mb
from .stats import ms, summarize


PIECE_SECONDS = 0.1  # feeding piece of the multi-session run
SESSION_COUNTS = (1, 4, 16)


def event_signature(events) -> dict:
    """What must not depend on other sessions: decisions with p_speak, replies, context resets."""
    return {"decisions": [(e.chunk, e.spoke, e.p_speak) for e in events if e.kind == "Decision"],
            "replies": [(e.chunk, e.text, e.truncated) for e in events if e.kind == "ReplyEnded"],
            "context_resets": [e.chunk for e in events if e.kind == "ContextReset"]}


def first_difference(signature: dict, reference: dict) -> str | None:
    """The first place where `signature` differs from `reference`, in words; None if equal."""
    for key in ("decisions", "replies", "context_resets"):
        ours, theirs = signature[key], reference[key]
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if a != b:
                return f"{key}[{i}]: {a!r} vs {b!r} in the single session"
        if len(ours) != len(theirs):
            return f"{len(ours)} {key} vs {len(theirs)} in the single session"
    return None


def _run_sessions(runtime, n: int, audio: np.ndarray, piece: int, policy: dict) -> tuple[dict, list]:
    """N sessions open at once, each fed `audio` in `piece`-sample pieces as fast as it is taken
    (accept_waveform waits while a session's pipeline is full), each from its own thread, which
    also reads its events; timed from the release of all feeders to the last Finished event."""
    rss_before = rss_mb()
    opened = time.perf_counter()
    sessions = [runtime.session(**policy) for _ in range(n)]
    open_ms = ms(time.perf_counter() - opened)
    rss_open = rss_mb()
    collected = [[] for _ in range(n)]
    ends = [0.0] * n
    failures = []
    gate = threading.Barrier(n + 1)

    def feed(i):
        session, out = sessions[i], collected[i]
        try:
            gate.wait()
            for offset in range(0, len(audio), piece):
                session.accept_waveform(audio[offset:offset + piece], SAMPLE_RATE)
                out.extend(session.drain())
            session.finish(timeout=600)
            out.extend(session.events(timeout=None))
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            failures.append((i, exc))
        finally:
            ends[i] = time.perf_counter()

    threads = [threading.Thread(target=feed, args=(i,), name=f"listenloop-bench-feeder-{i}", daemon=True)
               for i in range(n)]
    try:
        for thread in threads:
            thread.start()
        gate.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
    finally:
        for session in sessions:
            session.close()
    if failures:
        i, exc = failures[0]
        raise Error(f"session {i} of {n} failed: {exc}")
    wall = max(ends) - start
    finished = [next((e for e in events if e.kind == "Finished"), None) for events in collected]
    if any(f is None for f in finished):
        raise Error("a session's event stream ended without Finished")
    stats = [next(e for e in reversed(events) if e.kind == "Stats") for events in collected]  # finish()'s
    chunks = [f.chunks for f in finished]
    total = sum(chunks)
    row = {"sessions": n, "wall_s": wall, "chunks": total, "chunks_per_session": chunks[0],
           "chunks_per_s": total / wall, "real_time_streams": total / wall * CHUNK_SECONDS,
           "session_chunks_per_s": summarize([c / (end - start) for c, end in zip(chunks, ends)]),
           "step_ms": summarize([s.step_ms for s in stats]),
           "real_time_factor": summarize([s.real_time_factor for s in stats]),
           "kv_bytes_per_session": stats[0].kv_bytes, "kv_bytes_total": sum(s.kv_bytes for s in stats),
           "dropped_chunks": sum(s.dropped_chunks for s in stats),
           "dropped_samples": sum(s.dropped_samples for s in stats),
           "dropped_events": sum(s.dropped_events for s in stats),
           "open_ms": open_ms, "rss_mb_before": rss_before, "rss_mb_opened": rss_open, "rss_mb_after": rss_mb()}
    return row, [event_signature(events) for events in collected]


def single_session_signature(runtime, audio: np.ndarray, *, piece_seconds: float = PIECE_SECONDS, **policy) -> dict:
    """event_signature of one session of `runtime` fed `audio` alone, as measure_sessions feeds it."""
    piece = max(1, int(round(piece_seconds * SAMPLE_RATE)))
    return _run_sessions(runtime, 1, audio, piece, policy)[1][0]


def measure_sessions(runtime, counts=SESSION_COUNTS, audio: np.ndarray | None = None, *, recording=None,
                     piece_seconds: float = PIECE_SECONDS, reference: dict | None = None, log=None, **policy) -> dict:
    """Aggregate throughput of several sessions on one Runtime, and their determinism.

    For each N in `counts`: N sessions open at once (`runtime.session(**policy)`: the
    Runtime's policy unless overridden), each fed the same audio (`audio`, 16 kHz float32, or
    the `recording` file; default examples/kitchen.wav) in `piece_seconds` pieces as fast as
    possible from N feeder threads. Per N: aggregate chunks/s (all sessions' chunks / wall
    time), the sessions' listening step (each session's Stats.step_ms: median over its last
    steps of mel normalisation + encoder + decoder step, as the model thread decides them),
    KV bytes per session, and how many sessions produced exactly the decisions, p_speak,
    reply texts and context resets of a single session: `reference` (a
    single_session_signature), else the N=1 run, else one extra single session run first."""
    counts = sorted({int(n) for n in counts})
    if not counts or counts[0] < 1:
        raise Error(f"session counts must be whole numbers >= 1, got {counts}")
    if audio is None:
        name = Path(recording if recording is not None else DEFAULT_RECORDING).name
        audio = load_recording(recording)
    else:
        name = Path(recording).name if recording is not None else "given audio"
    piece = max(1, int(round(piece_seconds * SAMPLE_RATE)))
    say = log or (lambda *_: None)
    if reference is None and counts[0] != 1:
        say("sessions: 1 (reference)")
        _, (reference,) = _run_sessions(runtime, 1, audio, piece, policy)
    runs = {}
    for n in counts:
        say(f"sessions: {n} at once")
        row, signatures = _run_sessions(runtime, n, audio, piece, policy)
        if reference is None:
            reference = signatures[0]
        differences = [d for d in (first_difference(s, reference) for s in signatures) if d is not None]
        row["identical_to_single_session"] = n - len(differences)
        row["differences"] = differences[:3]
        runs[str(n)] = row
    return {"recording": name, "audio_seconds": len(audio) / SAMPLE_RATE, "piece_seconds": piece / SAMPLE_RATE,
            "policy": {k: (v if isinstance(v, (int, float, str, type(None))) else type(v).__name__)
                       for k, v in policy.items()} or "the Runtime's",
            "reference_decisions": len(reference["decisions"]), "reference_replies": len(reference["replies"]),
            "runs": runs}


def bench_sessions(package=None, profile="cpu", counts=SESSION_COUNTS, recording=None, *,
                   max_context: int | None = None, **policy) -> dict:
    """measure_sessions on a fresh Runtime(package, profile) (default: the embedded package),
    with the environment; print it with report_sessions()."""
    from ..session import Runtime

    with Runtime(package, profile, max_context=max_context) as runtime:
        return {"environment": environment(runtime.model),
                "sessions": measure_sessions(runtime, counts, recording=recording, **policy)}
