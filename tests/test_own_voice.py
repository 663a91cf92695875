"""Own voice: the playback reference (Session.accept_playback), the echo canceller in the front
end and the own-voice policy (docs/PROTOCOL.md, "Playback reference" and "Own voice")."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_determinism import signature

import listenloop
from listenloop import AudioClipped, AudioDropped, Decision, ReplyEnded
from listenloop.protocol import CHUNK_SAMPLES, SAMPLE_RATE

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng renders the device's voice")


@pytest.fixture(scope="module")
def runtime():
    with listenloop.Runtime() as rt:
        yield rt


@pytest.fixture(scope="module")
def kitchen():
    audio, rate = sf.read(EXAMPLES / "kitchen.wav", dtype="float32")
    assert rate == SAMPLE_RATE
    return audio


def played_and_heard(kitchen):
    """A reference (a tone burst sequence, like speech in level and rhythm) and the microphone:
    the kitchen recording plus that reference heard 50 ms later at -6 dB through a short tail."""
    rng = np.random.default_rng(5)
    n = len(kitchen)
    t = np.arange(n) / SAMPLE_RATE
    bursts = (np.sin(2 * np.pi * 2.5 * t) > 0.3).astype(np.float32)
    played = (0.1 * bursts * rng.standard_normal(n)).astype(np.float32)
    played[: 3 * SAMPLE_RATE] = 0.0  # the device starts speaking 3 s in
    h = np.zeros(2400, np.float32)
    h[800] = 0.5
    h[801:] = 0.02 * rng.standard_normal(1599) * np.exp(-np.arange(1599) / 400)
    heard = np.convolve(played, h)[:n].astype(np.float32)
    return played, np.clip(kitchen + heard, -1, 1).astype(np.float32)


def feed(session, mic, played, block: int) -> list:
    """The reference block first, then the microphone block it plays over, as an audio callback does."""
    for start in range(0, len(mic), block):
        session.accept_playback(played[start:start + block])
        session.accept_waveform(mic[start:start + block])
    session.finish(timeout=120)
    return list(session.events(timeout=5))


def test_a_session_that_never_gets_a_reference_gives_exactly_the_events_without_a_canceller(runtime, kitchen):
    runs = []
    for cancel in (True, False):
        with runtime.session(echo_cancellation=cancel) as s:
            s.accept_waveform(kitchen)
            s.finish(timeout=120)
            runs.append(signature(s.events(timeout=5)))
    assert runs[0] == runs[1]
    assert not any(e.get("playback") for e in runs[0] if e["event"] == "Decision")


def test_same_microphone_and_reference_give_the_same_events_whatever_the_push_pattern(runtime, kitchen):
    played, mic = played_and_heard(kitchen)
    runs = []
    for block in (37, 320, 1600, CHUNK_SAMPLES, 10_000):
        with runtime.session() as s:
            runs.append(signature(feed(s, mic, played, block)))
    assert all(r == runs[0] for r in runs[1:])
    decisions = [e for e in runs[0] if e["event"] == "Decision"]
    assert any(d["playback"] for d in decisions) and not all(d["playback"] for d in decisions)
    # the device is silent for the first 3 s: those chunks are decided as without a reference
    assert not any(d["playback"] for d in decisions[:7])


def test_the_canceller_removes_the_echo_before_the_log_mel(kitchen):
    """Through the core alone, the echo without the scene: the chunks' reports say what was removed."""
    from listenloop import _core

    played, mic = played_and_heard(np.zeros_like(kitchen))
    ring, queue, reference = _core.RingBuffer(1 << 18), _core.ChunkQueue(256), _core.PlaybackBuffer(1 << 16)
    scheduler = _core.ChunkScheduler(ring, queue, CHUNK_SAMPLES, None, reference)
    scheduler.start()
    for start in range(0, len(mic), 1600):
        assert reference.write(start, played[start:start + 1600])["written"] == len(played[start:start + 1600])
        ring.write(mic[start:start + 1600])
        while scheduler.samples_consumed < start - 16000:  # stay within the buffers
            time.sleep(0.001)
    scheduler.flush(60)
    chunks = queue.pop_many(1000, 0)
    scheduler.stop()
    playing = [c for c in chunks if c.playing]
    assert playing and all(not c.playing for c in chunks[:7])
    late = playing[len(playing) // 2:]  # converged
    removed_db = 20 * np.log10(np.mean([c.mic_rms for c in late]) / np.mean([c.out_rms for c in late]))
    assert removed_db > 15.0
    assert all(c.echo_delay > 0 for c in late)


def test_playback_input_is_checked_like_microphone_input(runtime):
    with runtime.session() as s:
        with pytest.raises(listenloop.AudioFormatError, match="sample_rate"):
            s.accept_playback(np.zeros(100, np.float32), sample_rate=1000)
        with pytest.raises(listenloop.AudioFormatError, match="at must be"):
            s.accept_playback(np.zeros(100, np.float32), at=-5)
        with pytest.raises(listenloop.AudioFormatError, match="at must be"):
            s.accept_playback(np.zeros(100, np.float32), at=1.5)
        bad = np.zeros(1600, np.float32)
        bad[[3, 7]] = np.nan
        s.accept_playback(bad)
        s.accept_playback(np.full(1600, 3000.0, np.float32))  # int16 PCM passed as float
        s.accept_waveform(np.zeros(CHUNK_SAMPLES, np.float32))
        s.finish(timeout=60)
        events = list(s.events(timeout=5))
    dropped = [e for e in events if isinstance(e, AudioDropped)]
    clipped = [e for e in events if isinstance(e, AudioClipped)]
    assert dropped[0].samples == 2 and dropped[0].reason.startswith("playback")
    assert clipped[0].int_pcm_as_float and clipped[0].reason.startswith("playback")
    with runtime.session(echo_cancellation=False) as s:
        with pytest.raises(listenloop.Error, match="echo_cancellation=False"):
            s.accept_playback(np.zeros(10, np.float32))


def test_a_reference_far_from_the_microphone_is_reported_and_memory_stays_bounded(runtime):
    with runtime.session() as s:
        for _ in range(20):  # 20 s of playback, no microphone at all
            s.accept_playback(np.full(SAMPLE_RATE, 0.1, np.float32), block=False)
        ahead = [e for e in s.drain() if isinstance(e, AudioDropped)]
        assert sum(e.samples for e in ahead) == 19 * SAMPLE_RATE  # only 1 s ahead is kept
        assert all("ahead of the microphone" in e.reason for e in ahead)
        s.accept_waveform(np.zeros(3 * SAMPLE_RATE, np.float32))  # the microphone moves on 3 s
        while s._chunker.samples_consumed < 7 * CHUNK_SAMPLES:  # ... and the canceller follows
            time.sleep(0.01)
        s.accept_playback(np.full(1600, 0.1, np.float32), at=SAMPLE_RATE * 3 // 2)  # so this is too late
        late = [e for e in s.drain() if isinstance(e, AudioDropped)]
        assert [e.samples for e in late] == [1600] and "after the microphone audio" in late[0].reason
        s.accept_waveform(np.zeros(2 * SAMPLE_RATE, np.float32))
        s.accept_playback(np.full(1600, 0.1, np.float32))  # at=None: 4 s behind the microphone
        behind = [e for e in s.drain() if isinstance(e, AudioDropped)]
        assert any("behind the microphone" in e.reason for e in behind)


def test_a_device_that_plays_in_bursts_places_each_burst_at_the_microphone_position(runtime, kitchen):
    played, mic = played_and_heard(kitchen)
    burst_starts = [3 * SAMPLE_RATE, 9 * SAMPLE_RATE, 15 * SAMPLE_RATE]
    continuous = np.zeros_like(played)
    for b in burst_starts:
        continuous[b:b + 2 * SAMPLE_RATE] = played[b:b + 2 * SAMPLE_RATE]
    heard_mic = np.clip(kitchen + (mic - kitchen) * (continuous != 0), -1, 1).astype(np.float32)
    runs = []
    for mode in ("continuous", "bursts"):
        with runtime.session() as s:
            for start in range(0, len(heard_mic), 320):
                if mode == "continuous":
                    s.accept_playback(continuous[start:start + 320])
                else:
                    for b in burst_starts:
                        if b <= start < b + 2 * SAMPLE_RATE:
                            at = s.microphone_position if start == b else None
                            s.accept_playback(continuous[start:start + 320], at=at)
                s.accept_waveform(heard_mic[start:start + 320])
            s.finish(timeout=120)
            runs.append(signature(s.events(timeout=5)))
    assert runs[0] == runs[1]


@needs_espeak
def test_a_speaking_device_does_not_answer_itself_with_or_without_the_reference(runtime, kitchen):
    """The closed loop (demo/kiosk.py): every reply spoken back at 0 dB through a room. The
    demo model was trained on its own replies heard back, so even with no canceller and no
    own-voice bias it does not take them for commands; with both it keeps the silent run's
    replies."""
    from demo import kiosk
    from demo.rooms import Room

    front_door, _ = sf.read(EXAMPLES / "front_door.wav", dtype="float32")
    scene = np.concatenate([kitchen, front_door])
    room = Room(rt60_s=0.4, gain_db=0.0, delay_s=0.05)
    reference = kiosk.run(runtime, scene, None)
    assert len(reference) >= 4
    without = kiosk.compare(reference, kiosk.run(runtime, scene, room, cancel=False, playback_bias=0.0))
    assert without.extra == []  # nothing the silent device did not say: its own voice is no command
    with_reference = kiosk.compare(reference, kiosk.run(runtime, scene, room))
    assert with_reference.extra == []
    assert with_reference.kept >= with_reference.reference - 1


def test_the_own_voice_policy_is_a_checked_policy_option(runtime):
    with pytest.raises(listenloop.ConfigError, match="playback_bias"):
        runtime.session(playback_bias=1.0)
    with pytest.raises(listenloop.ConfigError, match="playback_bias"):
        runtime.session(playback_bias=float("nan"))
    with runtime.session(playback_bias=-2.5) as s:
        assert s.stream.policy.playback_bias == -2.5


def test_the_readme_kiosk_loop_runs_as_written(runtime, kitchen):
    """The README's loop over (played, captured) blocks of 20 ms."""
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"\*\*A device that speaks\*\*.*?```python\n(.*?)```", readme, re.S).group(1)
    played, mic = played_and_heard(kitchen)
    blocks = [(played[i:i + 320], mic[i:i + 320]) for i in range(0, len(mic), 320)]
    with runtime.session() as s:
        exec(compile(code, "README.md", "exec"), {"s": s, "rate": SAMPLE_RATE, "blocks": blocks})
        s.finish(timeout=120)
        events = list(s.events(timeout=5))
    with runtime.session() as s:
        expected = feed(s, mic, played, 320)
    assert signature(events) == signature(expected)
    assert any(e.playback for e in events if isinstance(e, Decision))
