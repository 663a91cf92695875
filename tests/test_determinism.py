"""Same audio, same events: whatever the push pattern, pace, neighbouring sessions or process.

Events are compared field by field (p_speak as exact floats), less wall times and the timing
fields of Stats. Packages: the tiny random checkpoint exported at fp32, int8 and int4 (its
calibrated decision margin makes it reply on some chunks and not others), and the embedded
demo model (int8) on the example recordings.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import listenloop

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMING_FIELDS = {"wall_time", "step_ms", "real_time_factor", "listen_queue_depth", "event_queue_depth", "stream_time"}


def signature(events) -> list:
    """What must not change between runs: every event (or its `to_dict()` form, as a server
    sends it) less its wall time; of Stats, only what is not a timing (Stats and AudioDropped
    stream_time count what was fed so far)."""
    out = []
    for event in events:
        data = dict(event) if isinstance(event, dict) else event.to_dict()
        for key in TIMING_FIELDS if data["event"] in ("Stats", "AudioDropped") else ("wall_time",):
            data.pop(key, None)
        out.append(data)
    return out


def run(runtime, pcm, pattern: str = "block", sessions: int = 1) -> list:
    """Events of `pcm` through `sessions` concurrent sessions (each must give the same list)."""
    results = [None] * sessions

    def feed(i):
        with runtime.session() as s:
            if pattern == "block":
                s.accept_waveform(pcm)
            elif pattern == "pieces":  # 37-sample pieces: chunks cut across thousands of calls
                for start in range(0, len(pcm), 37):
                    s.accept_waveform(pcm[start:start + 37])
            elif pattern == "paced":  # 0.1 s pieces at 20x real time: chunks reach the model one by one
                for start in range(0, len(pcm), 1600):
                    s.accept_waveform(pcm[start:start + 1600])
                    time.sleep(0.1 / 20)
            s.finish(timeout=120)
            results[i] = list(s.events(timeout=5))

    threads = [threading.Thread(target=feed, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(r is not None for r in results), "a session did not finish"
    return [signature(r) for r in results]


def _tiny_audio(seconds=16.0, seed=3):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 300 * t * (1 + 0.3 * np.sin(t))) + 0.1 * rng.normal(size=t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def kitchen():
    pcm, rate = sf.read(EXAMPLES / "kitchen.wav", dtype="float32")
    assert rate == 16000
    return pcm


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_tiny_package_same_events_for_every_push_pattern_and_neighbour(tiny_package_at, precision):
    runtime = listenloop.Runtime(tiny_package_at(precision))
    pcm = _tiny_audio()
    (alone,) = run(runtime, pcm, "block")
    kinds = [e["event"] for e in alone]
    assert "ReplyEnded" in kinds and kinds.count("Decision") == 40, "the tiny model should reply on some chunks"
    assert any(not e["spoke"] for e in alone if e["event"] == "Decision")
    assert run(runtime, pcm, "pieces") == [alone]
    assert run(runtime, pcm, "paced") == [alone]
    assert run(runtime, pcm, "block", sessions=8) == [alone] * 8


def test_demo_package_same_events_for_every_push_pattern_and_neighbour(kitchen):
    runtime = listenloop.Runtime()  # the embedded demo model, int8
    (alone,) = run(runtime, kitchen, "block")
    assert sum(e["event"] == "ReplyEnded" for e in alone) >= 2
    assert run(runtime, kitchen, "pieces") == [alone]
    assert run(runtime, kitchen, "paced") == [alone]
    assert run(runtime, kitchen, "block", sessions=8) == [alone] * 8


def test_demo_package_same_events_in_another_process(kitchen, tmp_path):
    (here,) = run(listenloop.Runtime(), kitchen, "paced")
    script = tmp_path / "events.py"
    script.write_text(
        "import json, sys, soundfile as sf, listenloop\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_determinism import run\n"
        f"pcm, _ = sf.read({str(EXAMPLES / 'kitchen.wav')!r}, dtype='float32')\n"
        "print(json.dumps(run(listenloop.Runtime(), pcm, 'pieces')[0]))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout) == json.loads(json.dumps(here))
