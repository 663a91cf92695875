"""`listenloop listen --speak`: microphone and speaker on one duplex stream, replies spoken through
espeak-ng, and what was played fed back as the echo reference. The sound card is a fake
`sounddevice` module whose stream calls the callback from its own thread with a synthetic
microphone signal and keeps every block the callback played."""
from __future__ import annotations

import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from listenloop import cli
from listenloop.audio import resample
from listenloop.protocol import CHUNK_SAMPLES, SAMPLE_RATE
from listenloop.session import Session

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ALARM = "Smoke alarm! Please check the kitchen."
BLOCK = 0.02  # seconds per callback
PACE = 8.0  # the fake plays this many times faster than real time (the end result does not depend on it)
AHEAD_S = 2.0  # the fake waits while it is this far ahead of the decisions the command printed
has_espeak = pytest.mark.skipif(shutil.which(cli.ESPEAK) is None, reason="espeak-ng is not installed")
pytestmark = pytest.mark.timeout(180)


class FakeStream:
    """A duplex stream: each block, the microphone signal (then silence) in, NaN out (the
    callback must write every sample), the output kept."""

    def __init__(self, sd, device, channels, samplerate, dtype, blocksize, callback):
        assert channels == 1 and dtype == "float32" and samplerate == sd.native
        self.sd, self.rate, self.blocksize, self.callback = sd, samplerate, blocksize, callback
        self.captured: list[np.ndarray] = []
        self.played: list[np.ndarray] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.sd.streams.append(self)
        self._thread.start()

    def _run(self):
        signal, position, began = self.sd.microphone, 0, time.monotonic()
        while not self._stop.is_set():
            block = np.zeros((self.blocksize, 1), np.float32)
            piece = signal[position:position + self.blocksize]
            block[:piece.size, 0] = piece
            out = np.full((self.blocksize, 1), np.nan, np.float32)
            self.callback(block, out, self.blocksize, None, None)
            self.captured.append(block[:, 0].copy())
            self.played.append(out[:, 0].copy())
            position += self.blocksize
            if self.sd.after_block(position / self.rate):
                return
            time.sleep(max(0.0, began + position / self.rate / self.sd.pace - time.monotonic()))

    def stop(self):
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(30)

    def close(self):
        pass


class FakeSoundDevice:
    """The `sounddevice` module for one duplex device pair that runs at `native` Hz only."""

    def __init__(self, microphone: np.ndarray, native: int, pace: float = PACE):
        self.microphone, self.native, self.pace = microphone, native, pace
        self.streams: list[FakeStream] = []
        self.default = SimpleNamespace(device=[0, 1])

    def after_block(self, fed_s: float) -> bool:
        """Called after each block; True stops the stream thread."""
        return False

    def query_devices(self, device=None, kind=None):
        return {"name": f"fake {kind}", "default_samplerate": float(self.native), "max_input_channels": 1,
                "max_output_channels": 1}

    def _check(self, samplerate, **_):
        if samplerate != self.native:
            raise ValueError(f"Invalid sample rate {samplerate}")

    def check_input_settings(self, device=None, channels=None, dtype=None, samplerate=None):
        self._check(samplerate)

    def check_output_settings(self, device=None, channels=None, dtype=None, samplerate=None):
        self._check(samplerate)

    def Stream(self, device=None, **options):  # noqa: N802 - sounddevice's name
        return FakeStream(self, device, **options)


@pytest.fixture
def recorded(monkeypatch):
    """What reached the session: ("playback" | "microphone", samples, rate) in call order."""
    calls = []
    playback, waveform = Session.accept_playback, Session.accept_waveform

    def accept_playback(self, pcm, sample_rate=SAMPLE_RATE, **options):
        calls.append(("playback", np.array(pcm, np.float32), sample_rate))
        return playback(self, pcm, sample_rate, **options)

    def accept_waveform(self, pcm, sample_rate=SAMPLE_RATE, **options):
        calls.append(("microphone", np.array(pcm, np.float32), sample_rate))
        return waveform(self, pcm, sample_rate, **options)

    monkeypatch.setattr(Session, "accept_playback", accept_playback)
    monkeypatch.setattr(Session, "accept_waveform", accept_waveform)
    return calls


def _spoken(text: str, rate: int) -> np.ndarray:
    pcm, tts_rate = cli.Espeak().render(text)
    return resample(pcm, tts_rate, rate)


def _check_fed_back(calls, stream):
    """The reference pushed is exactly what was played, the microphone exactly what was
    captured, and each played block went in before the microphone block captured with it."""
    played, captured = np.concatenate(stream.played), np.concatenate(stream.captured)
    assert not np.isnan(played).any()
    assert {rate for _, _, rate in calls} == {stream.rate}
    reference = np.concatenate([pcm for kind, pcm, _ in calls if kind == "playback"])
    microphone = np.concatenate([pcm for kind, pcm, _ in calls if kind == "microphone"])
    assert np.array_equal(reference, played[:reference.size]) and np.array_equal(microphone, captured[:microphone.size])
    assert reference.size == microphone.size == captured.size  # all of it
    pushed = {"playback": 0, "microphone": 0}
    for kind, pcm, _ in calls:
        pushed[kind] += pcm.size
        assert pushed["playback"] >= pushed["microphone"]
    return played


@has_espeak
@pytest.mark.parametrize("native", [SAMPLE_RATE, 48000])
def test_listen_speak_says_each_reply_and_feeds_back_what_it_played(monkeypatch, capsys, recorded, native):
    kitchen, rate = sf.read(EXAMPLES / "kitchen.wav", dtype="float32")
    microphone = resample(kitchen[:int(10.0 * rate)], rate, native)  # the alarm: replies at 5.2 s and 9.2 s
    sd = FakeSoundDevice(microphone, native)
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    seen, said, speakers = [], [], []

    class Printer(cli.Printer):
        def __call__(self, event):
            seen.append(event)
            super().__call__(event)

    class Speaker(cli.Speaker):
        def __init__(self, *args):
            super().__init__(*args)
            speakers.append(self)

        def say(self, text):
            said.append(text)
            super().say(text)

    monkeypatch.setattr(cli, "Printer", Printer)
    monkeypatch.setattr(cli, "Speaker", Speaker)
    interrupted = []

    def after_block(fed_s):
        """Keeps the fake within AHEAD_S of the decisions; once the signal is over and every
        reply is spoken, asks the command to stop as Ctrl-C does (the CLI's stop flag: a real
        signal would end this process, as it ends the command line's)."""
        stream = sd.streams[0]
        while not interrupted:
            decisions = sum(e.kind == "Decision" for e in seen)
            if fed_s - decisions * CHUNK_SAMPLES / SAMPLE_RATE <= AHEAD_S:
                break
            time.sleep(0.001)
        if fed_s * native < microphone.size + native or interrupted:
            return bool(interrupted)
        duplex = stream.callback.__self__
        spoke = sum(e.kind == "Decision" and e.spoke for e in seen)
        ended = sum(e.kind == "ReplyEnded" for e in seen)
        all_decided = sum(e.kind == "Decision" for e in seen) >= duplex.session.microphone_position // CHUNK_SAMPLES
        if (spoke and all_decided and spoke == ended == len(said) and speakers[0].idle
                and not duplex.speaking):
            interrupted.append(fed_s)
            cli.STOP.request(signal.SIGINT)
            return True
        return False

    sd.after_block = after_block
    assert cli.main(["listen", "--speak"]) == 128 + signal.SIGINT
    out, err = capsys.readouterr()
    assert f"({native} Hz)" in err and "speaking on 'fake output'" in err
    assert ALARM in out
    replies = [e for e in seen if e.kind == "ReplyEnded"]
    assert [e.text for e in replies] == said and said

    played = _check_fed_back(recorded, sd.streams[0])
    first_reply = int([e for e in seen if e.kind == "ReplyStarted"][0].stream_time * native)
    sounding = np.flatnonzero(played)
    assert sounding.size and sounding[0] >= first_reply  # silence until there is a reply to say
    # the last reply, never interrupted, is played whole: exactly espeak-ng's audio
    speech = _spoken(said[-1], native)
    start = sounding[-1] - np.flatnonzero(speech)[-1]
    assert np.array_equal(played[start:start + speech.size], speech)


@has_espeak
def test_a_new_reply_replaces_the_one_playing(monkeypatch, recorded):
    import listenloop
    from listenloop.audio import Duplex

    # real time: the long reply lasts seconds, replacing it takes milliseconds
    sd = FakeSoundDevice(np.zeros(0, np.float32), SAMPLE_RATE, pace=1.0)
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    long_text = "The timer is set for five minutes. I will tell you when it is done, so you can relax meanwhile."
    short_text = "Turning on the lights."
    errors = []
    with listenloop.Runtime() as runtime, runtime.session() as session:
        duplex = Duplex(session).start()
        speaker = cli.Speaker(cli.Espeak(), duplex, errors.append)
        try:
            speaker.say(long_text)
            stream, heard = sd.streams[0], 0
            while not any(np.any(block) for block in stream.played[heard:]):  # until it is speaking
                heard = max(0, len(stream.played) - 1)
                time.sleep(0.005)
            speaker.say(short_text)
            while not speaker.idle or duplex.speaking:
                time.sleep(0.005)
        finally:
            speaker.close()
            duplex.stop()
    assert not errors
    played = _check_fed_back(recorded, stream)
    long, short = _spoken(long_text, SAMPLE_RATE), _spoken(short_text, SAMPLE_RATE)
    sounding = np.flatnonzero(played)
    first = sounding[0] - np.flatnonzero(long)[0]
    assert first >= 0 and not np.any(played[:first])
    last = sounding[-1] - np.flatnonzero(short)[-1]
    assert np.array_equal(played[last:last + short.size], short)  # the new reply, whole
    assert last < first + long.size  # ... started before the first one would have ended
    cut = first + int(np.argmax(played[first:last] != long[:last - first])) if np.any(
        played[first:last] != long[:last - first]) else last
    assert np.array_equal(played[first:cut], long[:cut - first]) and cut > first  # the first one, cut short
    assert not np.any(played[cut:last])  # and nothing of it after the cut


def test_missing_espeak_is_one_line_and_nonzero(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no espeak-ng on it
    sd = FakeSoundDevice(np.zeros(0, np.float32), SAMPLE_RATE)
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    assert cli.main(["listen", "--speak"]) != 0
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("listenloop: error: ")
    assert "espeak-ng" in err and "install" in err
    assert not sd.streams  # it stopped before opening any device
    assert cli.main(["listen", "--voice", "en-us"]) != 0  # a voice without --speak
    assert "--speak" in capsys.readouterr().err


@has_espeak
def test_unknown_voice_is_one_line_and_nonzero(monkeypatch, capsys):
    sd = FakeSoundDevice(np.zeros(0, np.float32), SAMPLE_RATE)
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    assert cli.main(["listen", "--speak", "--voice", "nosuchvoice"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("listenloop: error: ") and "'nosuchvoice'" in err
    assert not sd.streams
