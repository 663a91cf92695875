"""Runtime/Session end to end over the C++ core and the tiny package."""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import soxr
from test_runtime_engine import ScriptedSampler
from test_runtime_fixtures import TOKENS, build_tiny_package, runtime_package  # noqa: F401

import listenloop
from listenloop.audio import condition_pcm
from listenloop.errors import AudioFormatError, DeviceError, Error, SessionClosedError
from listenloop.protocol import CHUNK_SAMPLES

T = TOKENS
CHUNK = CHUNK_SAMPLES


@pytest.fixture(scope="module")
def roomy_package(tmp_path_factory):
    """Same model with a context large enough that no reset happens in these streams."""
    return build_tiny_package(tmp_path_factory.mktemp("roomy"), max_context=8192)


def _signal(seconds, rate, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 220 * t * (1 + 0.5 * t))
    noise = 0.05 * rng.normal(size=(len(t), channels))
    return (tone[:, None] + noise).squeeze()


def _run(session, blocks, rate):
    for block in blocks:
        session.accept_waveform(block, rate)
    session.finish(timeout=60)
    return list(session.events(timeout=1))


def _kinds(events, kind):
    return [e for e in events if e.kind == kind]


def test_any_rate_channels_and_block_size_gives_the_same_decisions(roomy_package):
    stereo = (_signal(4.3, 44100, channels=2) * 32767).astype(np.int16)
    reference = condition_pcm(stereo).samples
    reference = soxr.resample(reference, 44100, 16000)
    sampler_script = [T["NORMAL"], ord("y"), T["TEXT_END"]]

    rt = listenloop.Runtime(roomy_package)
    with rt.session(sampler=ScriptedSampler(sampler_script)) as s:
        events_16k = _run(s, [reference.astype(np.float32)], 16000)
    odd = [stereo[i:i + n] for i, n in _odd_blocks(len(stereo))]
    with rt.session(sampler=ScriptedSampler(sampler_script)) as s:
        events_44k = _run(s, odd, 44100)

    a, b = _kinds(events_16k, "Decision"), _kinds(events_44k, "Decision")
    assert len(a) == len(b) == int(np.ceil(len(reference) / CHUNK))
    assert [d.chunk for d in b] == list(range(len(b)))
    assert [d.spoke for d in a] == [d.spoke for d in b]
    np.testing.assert_allclose([d.p_speak for d in a], [d.p_speak for d in b], rtol=1e-3, atol=1e-5)
    assert [d.stream_time for d in b] == pytest.approx([0.4 * (i + 1) for i in range(len(b))])


def _odd_blocks(n):
    sizes = [1, 777, 4097, 13, 30011, 2]
    i = k = 0
    while i < n:
        size = sizes[k % len(sizes)]
        yield i, size
        i += size
        k += 1


def test_no_chunk_is_lost_while_replying(runtime_package):  # noqa: F811
    script = [T["HAPPY"], ord("h"), ord("e"), ord("y"), T["TEXT_END"]]
    rt = listenloop.Runtime(runtime_package, sampler=ScriptedSampler(script), speak_bias=1e4)
    pcm = _signal(8.0, 16000).astype(np.float32)
    with rt.session() as s:
        events = _run(s, [pcm[i:i + 3000] for i in range(0, len(pcm), 3000)], 16000)
    decisions = _kinds(events, "Decision")
    assert [d.chunk for d in decisions] == list(range(20))
    assert all(d.spoke for d in decisions)
    started, ended = _kinds(events, "ReplyStarted"), _kinds(events, "ReplyEnded")
    assert len(started) == len(ended) == 20
    assert all(e.emotion == "HAPPY" for e in started)
    assert all(e.text == "hey" and not e.truncated for e in ended)
    assert "".join(e.text for e in _kinds(events, "TextDelta")) == "hey" * 20
    # a reply's events come after its decision and before the next chunk's decision
    order = [(e.kind, getattr(e, "chunk", None)) for e in events if e.kind in ("Decision", "ReplyEnded")]
    assert order[:4] == [("Decision", 0), ("ReplyEnded", 0), ("Decision", 1), ("ReplyEnded", 1)]
    stats = _kinds(events, "Stats")[-1]
    assert stats.chunks == 20 and stats.dropped_chunks == 0 and stats.dropped_samples == 0


def test_off_protocol_tokens_in_a_reply_are_filtered(runtime_package):  # noqa: F811
    script = [T["ASSISTANT"], ord("o"), T["PAD"], ord("k"), T["TEXT_END"]]
    rt = listenloop.Runtime(runtime_package, sampler=ScriptedSampler(script), speak_bias=1e4)
    with rt.session() as s:
        events = _run(s, [np.zeros(CHUNK, np.float32)], 16000)
    (ended,) = _kinds(events, "ReplyEnded")
    assert ended.text == "ok" and ended.filtered_tokens == 2
    assert _kinds(events, "ReplyStarted")[0].emotion is None


def test_context_resets_keep_the_session_bounded(runtime_package):  # noqa: F811
    rt = listenloop.Runtime(runtime_package, max_context=300, speak_bias=-1e4)
    pcm = _signal(48.0, 16000).astype(np.float32)
    with rt.session(stats_every=10) as s:
        events = _run(s, [pcm], 16000)
    assert len(_kinds(events, "Decision")) == 120
    resets = _kinds(events, "ContextReset")
    assert len(resets) >= 5
    # each reset is announced right before the decision of the chunk it applies to
    for reset in resets:
        after = events[events.index(reset) + 1]
        assert after.kind == "Decision" and after.chunk == reset.chunk
    assert all(st.position <= st.capacity == 300 for st in _kinds(events, "Stats"))


def test_overload_drops_whole_chunks_and_says_so(runtime_package, monkeypatch):  # noqa: F811
    """Fed faster than it can encode, with no back-pressure: chunks are dropped, counted, reported."""
    rt = listenloop.Runtime(runtime_package, speak_bias=-1e4)
    real_encode = rt.model.encode

    def slow_encode(mel):
        time.sleep(0.05)
        return real_encode(mel)

    monkeypatch.setattr(rt.model, "encode", slow_encode)
    n_chunks = 40
    with rt.session(listen_queue=2, ring_seconds=30) as s:
        s.accept_waveform(np.zeros(n_chunks * CHUNK, np.float32), 16000, block=False)
        s.finish(timeout=60)
        events = list(s.events(timeout=1))
    decided = len(_kinds(events, "Decision"))
    dropped = sum(e.samples for e in _kinds(events, "AudioDropped") if "listen queue full" in e.reason)
    assert dropped > 0 and dropped % CHUNK == 0
    assert decided + dropped // CHUNK == n_chunks
    assert _kinds(events, "Stats")[-1].dropped_chunks == dropped // CHUNK


def test_stream_time_counts_the_audio_an_overrun_dropped(runtime_package):  # noqa: F811
    """Events locate the input: after a ring overrun with block=False, chunks fed next are
    stamped where they were in what the caller pushed, not where they sit in the kept audio."""
    rt = listenloop.Runtime(runtime_package, speak_bias=-1e4)
    before, burst, after = 2 * CHUNK, 40 * CHUNK, 5 * CHUNK + 1000
    with rt.session(ring_seconds=1.0) as s:
        s.accept_waveform(np.zeros(before, np.float32), 16000)
        deadline = time.monotonic() + 30
        events = []
        while len(_kinds(events, "Decision")) < 2 and time.monotonic() < deadline:
            events += s.drain()
            time.sleep(0.005)
        s.accept_waveform(np.full(burst, 0.01, np.float32), 16000, block=False)  # 16 s into a 1 s ring
        s.accept_waveform(np.zeros(after, np.float32), 16000)
        s.finish(timeout=60)
        events += list(s.events(timeout=5))
    dropped = sum(e.samples for e in _kinds(events, "AudioDropped") if "overrun" in e.reason)
    assert dropped > 30 * CHUNK
    total = (before + burst + after) / 16000
    decisions = _kinds(events, "Decision")
    assert events[-1].kind == "Finished" and events[-1].stream_time == total
    assert total <= decisions[-1].stream_time < total + CHUNK / 16000  # the last chunk ends with the input
    times = [d.stream_time for d in decisions]
    assert times == sorted(times) and times[:2] == [0.4, 0.8]
    # the chunks of `after` (the last 6) lie after the burst in the input
    assert all(t > (before + burst) / 16000 for t in times[-6:])


def test_nan_and_inf_are_zeroed_and_reported(runtime_package):  # noqa: F811
    rt = listenloop.Runtime(runtime_package, speak_bias=-1e4)
    pcm = _signal(0.8, 16000).astype(np.float32)
    pcm[100:110] = np.nan
    pcm[5000] = np.inf
    with rt.session() as s:
        events = _run(s, [pcm], 16000)
    dropped = _kinds(events, "AudioDropped")
    assert len(dropped) == 1 and dropped[0].samples == 11 and "NaN" in dropped[0].reason
    assert len(_kinds(events, "Decision")) == 2


@pytest.mark.parametrize("pcm,rate,message", [
    (np.zeros(100, np.complex64), 16000, "dtype"),
    (np.zeros(100, bool), 16000, "dtype"),
    (np.zeros((2, 3, 4), np.float32), 16000, "shape"),
    (np.zeros(100, np.float32), 0, "sample_rate"),
    (np.zeros(100, np.float32), -8000, "sample_rate"),
    (np.zeros(100, np.float32), float("nan"), "sample_rate"),
    (b"\x00\x01", 16000, "bytes"),
])
def test_bad_input_is_rejected_and_the_session_survives(runtime_package, pcm, rate, message):  # noqa: F811
    rt = listenloop.Runtime(runtime_package, speak_bias=-1e4)
    with rt.session() as s:
        with pytest.raises(AudioFormatError, match=message):
            s.accept_waveform(pcm, rate)
        events = _run(s, [np.zeros(CHUNK, np.int16)], 16000)
    assert len(_kinds(events, "Decision")) == 1


def test_feeding_after_close_or_finish(runtime_package):  # noqa: F811
    rt = listenloop.Runtime(runtime_package)
    s = rt.session()
    s.close()
    s.close()  # idempotent
    with pytest.raises(SessionClosedError):
        s.accept_waveform(np.zeros(10, np.float32), 16000)
    with rt.session() as s2:
        s2.finish()
        with pytest.raises(SessionClosedError):
            s2.accept_waveform(np.zeros(10, np.float32), 16000)


def test_many_sessions_share_one_runtime(runtime_package):  # noqa: F811
    """Sessions are independent streams over one model: each has its own policy and state."""
    script = [ord("y"), T["TEXT_END"]]
    rt = listenloop.Runtime(runtime_package, speak_bias=-1e4)
    pcm = _signal(2.0, 16000).astype(np.float32)
    with rt.session() as quiet, rt.session(speak_bias=1e4, sampler=ScriptedSampler(script)) as chatty:
        assert rt.open_sessions == 2
        quiet.accept_waveform(pcm)
        chatty.accept_waveform(pcm)
        quiet.finish(timeout=30)
        chatty.finish(timeout=30)
        q, c = list(quiet.events()), list(chatty.events())
    assert not _kinds(q, "ReplyEnded") and len(_kinds(c, "ReplyEnded")) == 5
    assert rt.open_sessions == 0
    assert q[-1].kind == c[-1].kind == "Finished"


def test_a_failed_decoder_step_skips_the_chunk_and_goes_on(runtime_package, monkeypatch):  # noqa: F811
    from listenloop.stream import DecoderStream

    rt = listenloop.Runtime(runtime_package, speak_bias=-1e4)
    real_listen = DecoderStream.listen_steps  # what the session drives
    calls = {"n": 0}

    def flaky(self, audio, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("transient device error")
        return (yield from real_listen(self, audio, *args))

    monkeypatch.setattr(DecoderStream, "listen_steps", flaky)
    with rt.session() as s:
        events = _chunk_by_chunk(s, 5)  # so every chunk takes the single-step path
    faults = _kinds(events, "Fault")
    assert len(faults) == 1 and "transient device error" in faults[0].message
    assert [d.chunk for d in _kinds(events, "Decision")] == [0, 2, 3, 4]
    assert any("model failed" in d.reason for d in _kinds(events, "AudioDropped"))


def _chunk_by_chunk(s, chunks: int) -> list:
    """Feed silent chunks one at a time, each decided (or faulted) before the next is fed."""
    events = []
    for i in range(chunks):
        s.accept_waveform(np.zeros(CHUNK, np.float32), 16000)
        deadline = time.monotonic() + 30
        while len(_kinds(events, "Decision")) + len(_kinds(events, "Fault")) <= i and time.monotonic() < deadline:
            events += s.drain()
            time.sleep(0.005)
    s.finish(timeout=30)
    return events + list(s.events(timeout=1))


def test_nan_logits_are_a_fault_and_the_stream_goes_on(runtime_package, monkeypatch):  # noqa: F811
    from listenloop.stream import DecoderStream

    rt = listenloop.Runtime(runtime_package, speak_bias=-1e4)
    real_ran = DecoderStream._ran  # called once the decoder step of T tokens is done
    calls = {"n": 0}

    def poisoned(self, T):
        real_ran(self, T)
        calls["n"] += 1
        if calls["n"] == 3:
            self._logits[...] = np.nan

    monkeypatch.setattr(DecoderStream, "_ran", poisoned)
    with rt.session() as s:
        events = _chunk_by_chunk(s, 6)
    faults = _kinds(events, "Fault")
    assert len(faults) == 1 and "non-finite decision logits" in faults[0].message
    decisions = _kinds(events, "Decision")
    assert [d.chunk for d in decisions] == [0, 1, 3, 4, 5]
    assert all(0.0 <= d.p_speak <= 1.0 for d in decisions)
    assert events[-1].kind == "Finished"


def test_nan_reply_logits_end_the_reply_as_a_fault(runtime_package, monkeypatch):  # noqa: F811
    from listenloop.stream import DecoderStream

    rt = listenloop.Runtime(runtime_package, speak_bias=1e4,
                            sampler=ScriptedSampler([ord("a"), ord("b"), ord("c"), T["TEXT_END"]] * 4))
    real_ran = DecoderStream._ran

    def poisoned(self, T):
        real_ran(self, T)
        if T == 1 and self._reply_left == self.policy.max_reply_tokens - 2:  # the second reply token
            self._logits[...] = np.inf

    monkeypatch.setattr(DecoderStream, "_ran", poisoned)
    with rt.session() as s:
        events = _chunk_by_chunk(s, 1)
    faults = _kinds(events, "Fault")
    assert faults and faults[0].where == "speak" and "NaN or infinite reply logits" in faults[0].message
    ended = _kinds(events, "ReplyEnded")
    assert ended and ended[0].truncated and events[-1].kind == "Finished"


def test_nan_audio_vectors_are_a_fault(runtime_package, monkeypatch):  # noqa: F811
    rt = listenloop.Runtime(runtime_package, speak_bias=-1e4)
    real_encoder, calls = rt.model.encoder, {"n": 0}

    class Poisoned:
        def run(self, names, feeds):
            out = real_encoder.run(names, feeds)
            calls["n"] += 1
            if calls["n"] == 2:
                out[0][...] = np.nan
            return out

    monkeypatch.setattr(rt.model, "encoder", Poisoned())
    with rt.session() as s:
        events = _chunk_by_chunk(s, 3)
    faults = _kinds(events, "Fault")
    assert len(faults) == 1 and "NaN or infinite audio vectors" in faults[0].message
    assert [d.chunk for d in _kinds(events, "Decision")] == [0, 2]


def test_a_persistent_failure_surfaces_in_the_caller(runtime_package, monkeypatch):  # noqa: F811
    rt = listenloop.Runtime(runtime_package)

    def broken(mel):
        raise RuntimeError("encoder is gone")

    monkeypatch.setattr(rt.model, "encode", broken)
    with rt.session() as s:
        with pytest.raises(Error, match="encoder is gone"):
            for _ in range(50):
                s.accept_waveform(np.zeros(CHUNK, np.float32), 16000)
                time.sleep(0.01)
            s.finish(timeout=10)
        with pytest.raises(Error, match="session failed"):
            list(s.events(timeout=0.1))


def test_absent_microphone_is_a_device_error(runtime_package, monkeypatch):  # noqa: F811
    import types

    fake = types.ModuleType("sounddevice")

    class PortAudioError(Exception):
        pass

    def query_devices(device=None, kind=None):
        raise PortAudioError("Error querying device -1")

    fake.query_devices = query_devices
    fake.PortAudioError = PortAudioError
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    rt = listenloop.Runtime(runtime_package)
    with rt.session() as s:
        with pytest.raises(DeviceError, match="no usable audio input device"):
            s.listen()


def _fake_sounddevice(native_rate, supports_16k, seconds):
    """A sounddevice stand-in whose stream calls the callback from its own thread."""
    import threading
    import types

    fake = types.ModuleType("sounddevice")

    def query_devices(device=None, kind=None):
        return {"name": "fake mic", "default_samplerate": float(native_rate), "max_input_channels": 1}

    def check_input_settings(device=None, channels=None, samplerate=None, dtype=None):
        if samplerate == 16000 and not supports_16k:
            raise ValueError("Invalid sample rate")

    class InputStream:
        def __init__(self, device, channels, samplerate, dtype, blocksize, callback):
            self.rate, self.block, self.callback = samplerate, blocksize, callback
            self.thread = threading.Thread(target=self._run)

        def _run(self):
            pcm = _signal(seconds, self.rate).astype(np.float32)[:, None]
            for i in range(0, len(pcm) - self.block + 1, self.block):
                self.callback(pcm[i:i + self.block], self.block, None, None)
            self.done = True

        def start(self):
            self.thread.start()

        def stop(self):
            self.thread.join()

        def close(self):
            pass

    fake.query_devices = query_devices
    fake.check_input_settings = check_input_settings
    fake.InputStream = InputStream
    return fake


@pytest.mark.parametrize("native_rate,supports_16k", [(16000, True), (48000, False)])
def test_microphone_capture(runtime_package, monkeypatch, native_rate, supports_16k):  # noqa: F811
    monkeypatch.setitem(sys.modules, "sounddevice", _fake_sounddevice(native_rate, supports_16k, 2.0))
    rt = listenloop.Runtime(runtime_package, speak_bias=-1e4)
    with rt.session() as s:
        mic = s.listen()
        assert mic.rate == (16000 if supports_16k else native_rate)
        time.sleep(0.2)
        mic.stop()
        s.finish(timeout=30)
        events = list(s.events(timeout=1))
    decisions = _kinds(events, "Decision")
    assert len(decisions) == 5  # 2 s of captured audio
    assert not _kinds(events, "AudioDropped")


def test_microphone_is_the_only_writer_while_it_captures(runtime_package, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "sounddevice", _fake_sounddevice(16000, True, 2.0))
    rt = listenloop.Runtime(runtime_package, speak_bias=-1e4)
    with rt.session() as s:
        mic = s.listen()
        with pytest.raises(listenloop.Error, match="stop the microphone first"):
            s.accept_waveform(np.zeros(1600, np.float32), 16000)
        with pytest.raises(listenloop.Error, match="stop the microphone first"):
            s.listen()
        mic.stop()
        s.accept_waveform(np.zeros(6400, np.float32), 16000)  # the ring has one writer again
        s.finish(timeout=30)
        decisions = _kinds(list(s.events(timeout=1)), "Decision")
    assert len(decisions) == 6  # 2 s captured + 0.4 s fed afterwards


def test_missing_portaudio_is_a_device_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_portaudio(name, *args, **kwargs):
        if name == "sounddevice":
            raise OSError("PortAudio library not found")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_portaudio)
    from listenloop.audio import list_input_devices

    with pytest.raises(DeviceError, match="PortAudio"):
        list_input_devices()


def test_import_listenloop_does_not_import_torch():
    code = ("import sys, listenloop, listenloop.session, listenloop.cli; "
            "rt = listenloop.Runtime; assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
