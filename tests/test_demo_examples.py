"""End to end with the embedded demo model: the example recordings in examples/ (held-out
voices, seeds and levels) go through the real runtime path (file reading, C++ ring buffer and
mel, scheduler, ONNX Runtime engine, session threads).

What is asserted per recording: every item that needs a reply gets one on time (its decision
falls on a chunk from the item's first chunk to 2 chunks after its labelled reply chunk,
demo/evaluate.py's window), and every reply in that window has the item's text and emotion,
sound events and spoken commands alike; no other reply comes (distractor speech, noise and
music stay silent). One known fault is let through: an alarm that repeats is due an alert after
its first round, and the shipped model alerts kitchen.wav's two-round smoke alarm there and
again where the second round ends (README, *Limits*); that repeat, the same alert up to 2 chunks
after the alarm ends, is the only reply allowed outside the windows.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import listenloop
from listenloop.audio import read_audio
from listenloop.events import ReplyEnded, ReplyStarted
from listenloop.package import default_package_path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXPECTED = json.loads((EXAMPLES / "expected_events.json").read_text())
CHUNK_S = 0.4
LATE_CHUNKS = 2


def reply_windows(expected: dict) -> list[tuple[int, int, dict]]:
    """(first chunk, last chunk, item) of every item the file must get a reply to."""
    return [(int(e["start_s"] / CHUNK_S), e["reply_chunk"] + LATE_CHUNKS, e)
            for e in expected["events"] if e["expected"] == "reply"]


def repeat_windows(expected: dict) -> list[tuple[int, int, str]]:
    """(first chunk, last chunk, text) of every sound event after its answer window, to the
    chunk where it ends plus the late allowance: where its alert may come again."""
    return [(e["reply_chunk"] + LATE_CHUNKS + 1, math.ceil(e["end_s"] / CHUNK_S) - 1 + LATE_CHUNKS, e["reply"])
            for e in expected["events"] if e["expected"] == "reply" and e["kind"] == "event"]


@pytest.fixture(scope="module")
def runtime():
    return listenloop.Runtime(profile="cpu")  # the embedded default model


def test_the_default_model_is_embedded_and_small():
    manifest = json.loads((default_package_path() / "manifest.json").read_text())
    size = sum(p.stat().st_size for p in default_package_path().iterdir() if p.is_file())
    assert manifest["name"] == "listenloop-demo"
    assert size < 20e6


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_gets_its_replies_on_time_and_nothing_else(runtime, name):
    samples = read_audio(EXAMPLES / name)
    with runtime.session() as session:
        session.accept_waveform(samples, 16000)
        session.finish()
        events = session.drain()
    started = {e.chunk: e for e in events if isinstance(e, ReplyStarted)}
    replies = [(e.chunk, started[e.chunk].emotion, e.text) for e in events if isinstance(e, ReplyEnded)]
    outside = list(replies)
    for first, last, item in reply_windows(EXPECTED[name]):
        on_time = [r for r in replies if first <= r[0] <= last]
        assert on_time and all((r[1], r[2]) == (item["emotion"], item["reply"]) for r in on_time), \
            f"{name}: {item['name']} ({item['text'] or 'sound'}) answered {on_time} in chunks {first}..{last}, " \
            f"expected {item['emotion']} {item['reply']!r}"
        outside = [r for r in outside if r not in on_time]
    outside = [r for r in outside if not any(first <= r[0] <= last and r[2] == text
                                             for first, last, text in repeat_windows(EXPECTED[name]))]
    assert not outside, f"{name}: replies outside every answer window: {outside}"


def test_readme_demo_command_prints_the_kitchen_replies():
    """`listenloop run examples/kitchen.wav --json`: the README's main command, as a user runs it."""
    out = subprocess.run([sys.executable, "-m", "listenloop", "run", str(EXAMPLES / "kitchen.wav"), "--json"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    replies = [e for e in events if e["event"] == "ReplyEnded"]
    expected = [e["reply"] for e in EXPECTED["kitchen.wav"]["events"] if e["expected"] == "reply"]
    texts = [e["text"] for e in replies]
    distinct = [t for k, t in enumerate(texts) if k == 0 or t != texts[k - 1]]  # the alarm may be alerted twice
    assert distinct == expected  # the smoke alarm, then "turn on the lights"
    assert all(e["stream_time"] <= EXPECTED["kitchen.wav"]["duration_s"] + 0.4 for e in replies)
