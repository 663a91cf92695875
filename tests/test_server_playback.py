"""`listenloop serve` with the playback (echo) reference: listenloop.playback.append through the
official openai SDK, tagged /v1/pcm frames, both against the Python API fed the same blocks in
the same order, and bad playback input. The snippets of docs/SERVE.md that send playback are
the ones these tests run."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("openai")

from listenloop.protocol import CHUNK_SAMPLES, SAMPLE_RATE  # noqa: E402
from test_determinism import signature  # noqa: E402
from test_server import b64, pcm16_24k, run, runtime, server, serving, wait_idle, wav  # noqa: E402, F401

ROOT = Path(__file__).resolve().parent.parent
PLAY_AT_S = 10.0  # the device starts speaking here: after the alarm replies, before the spoken command
ECHO_DELAY_S = 0.05  # speaker to microphone
ECHO_GAIN = 0.3
BLOCK_S = 0.1  # what a client sends at a time, playback then microphone
IN_FLIGHT_S = 2.0  # audio a client sends ahead of the decisions it got back (see _fed_ahead)
REALTIME_RATE = 24000
pytestmark = pytest.mark.timeout(120)


def _docs_snippet(name: str):
    """The function `name` as docs/SERVE.md defines it."""
    docs = (ROOT / "docs" / "SERVE.md").read_text()
    code = re.search(rf"```python\n((?:(?!```).)*?def {name}\(.*?)```", docs, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "docs/SERVE.md", "exec"), scope)
    return scope[name]


def _speech() -> np.ndarray:
    """What the device says: espeak-ng at 16 kHz, or a tone burst where it is not installed."""
    if shutil.which("espeak-ng"):
        import soxr

        out = subprocess.run(["espeak-ng", "--stdout", "The weather today is sunny with a light breeze."],
                             capture_output=True, check=True, timeout=60).stdout
        pcm, rate = sf.read(io.BytesIO(out), dtype="float32")
        return soxr.resample(pcm, rate, SAMPLE_RATE).astype(np.float32)
    t = np.arange(int(2.5 * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.5 * np.sin(2 * np.pi * 440 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32)


@pytest.fixture(scope="module")
def echo_case():
    """(microphone, played) at 16 kHz: kitchen.wav with the device's speech echoing into it."""
    microphone = wav("kitchen.wav")
    speech = _speech()
    played = np.zeros_like(microphone)
    start = int(PLAY_AT_S * SAMPLE_RATE)
    played[start:start + speech.size] = speech[:microphone.size - start]
    delay = int(ECHO_DELAY_S * SAMPLE_RATE)
    echo = np.zeros_like(microphone)
    echo[delay:] = ECHO_GAIN * played[:-delay]
    return np.clip(microphone + echo, -1, 1).astype(np.float32), played, speech.size / SAMPLE_RATE


def _blocks(microphone, played, rate):
    """(played, microphone) block pairs of BLOCK_S at `rate`."""
    step = int(BLOCK_S * rate)
    return [(played[i:i + step], microphone[i:i + step]) for i in range(0, len(microphone), step)]


def _fed_ahead(blocks_sent: int, decided: int) -> bool:
    """Whether a client is more than IN_FLIGHT_S of audio ahead of the decisions it got back.
    Waiting for decisions keeps the microphone within reach of the chunk scheduler however fast
    the machine is, so no playback falls outside the reference buffer (and nothing is dropped)."""
    return blocks_sent * BLOCK_S - decided * CHUNK_SAMPLES / SAMPLE_RATE > IN_FLIGHT_S


def _python_api(runtime, blocks, rate, finish: bool):
    """Events of the Python API fed `blocks` (playback first) and, without finish, the number of
    whole chunks its microphone audio makes."""
    events = []
    with runtime.session() as s:
        decided = 0
        for sent, (played, microphone) in enumerate(blocks):
            while _fed_ahead(sent, decided):
                event = next(iter(s.events(timeout=30)))
                events.append(event)
                decided += event.kind == "Decision"
            s.accept_playback(played, rate, block=False)
            s.accept_waveform(microphone, rate)
        if finish:
            s.finish(timeout=60)
            return events + list(s.events(timeout=10)), None
        chunks = s.microphone_position // CHUNK_SAMPLES
        while sum(e.kind == "Decision" for e in events) < chunks or _reply_open(events):
            events.append(next(iter(s.events(timeout=30))))
        return events, chunks


def _reply_open(events) -> bool:
    kinds = [e.kind if not isinstance(e, dict) else e["event"] for e in events]
    return kinds.count("ReplyStarted") > kinds.count("ReplyEnded")


def _check_playback_flags(decisions, speech_s):
    """Chunks before the speech have playback false, chunks inside it true, chunks well after
    it (past the canceller's reach) false again."""
    chunk_s = CHUNK_SAMPLES / SAMPLE_RATE
    end = PLAY_AT_S + speech_s
    assert decisions, "no decisions"
    for d in decisions:
        start = d["stream_time"] - chunk_s
        if d["stream_time"] <= PLAY_AT_S:
            assert d["playback"] is False, d
        elif start >= PLAY_AT_S and d["stream_time"] <= end:
            assert d["playback"] is True, d
        elif start >= end + 1.0:
            assert d["playback"] is False, d
    assert sum(d["playback"] for d in decisions) >= int(speech_s / chunk_s)


# -- /v1/realtime through the official SDK -----------------------------------------------------

def _to_int16(samples):
    return (np.clip(samples, -1, 1) * 32767).astype("<i2")


async def _sdk_with_playback(port, blocks, chunks):
    from openai import AsyncOpenAI

    send_block = _docs_snippet("send_block")
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    got = []  # decisions, context resets and reply texts, in order, as the Python API's events
    decided = 0
    async with client.realtime.connect(model="listenloop") as conn:
        assert (await conn.recv()).type == "session.created"
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                           "audio": {"input": {"format": {"type": "audio/pcm",
                                                                          "rate": REALTIME_RATE}}},
                                           "listenloop": {"events": True}})

        async def receive():
            nonlocal decided
            data = json.loads(await asyncio.wait_for(conn.recv_bytes(), 30))
            kind = data["type"]
            assert kind != "error", data
            assert kind != "listenloop.audio_dropped", data
            if kind == "listenloop.decision":
                decided += 1
                got.append({"event": "Decision", **data})
            elif kind == "listenloop.context_reset":
                got.append({"event": "ContextReset", **data})
            elif kind == "response.created":
                got.append({"event": "ReplyStarted"})
            elif kind == "response.output_text.done":
                got.append({"event": "ReplyEnded", "text": data["text"]})

        for sent, (played, microphone) in enumerate(blocks):
            while _fed_ahead(sent, decided):
                await receive()
            await send_block(conn, microphone.tobytes(), played.tobytes())
        while decided < chunks or _reply_open(got):
            await receive()
    for event in got:
        for key in ("type", "event_id", "wall_time"):
            event.pop(key, None)
    return got


def _comparable(events):
    """The Python API's events as the Realtime client sees them: decisions and context resets
    (less wall time) and each reply's start and text."""
    out = []
    for e in signature(events):
        if e["event"] in ("Decision", "ContextReset"):
            out.append(e)
        elif e["event"] == "ReplyStarted":
            out.append({"event": "ReplyStarted"})
        elif e["event"] == "ReplyEnded":
            out.append({"event": "ReplyEnded", "text": e["text"]})
    return out


def test_openai_sdk_playback_gives_the_python_api_events(server, runtime, echo_case):  # noqa: F811
    import soxr

    microphone, played, speech_s = echo_case
    # both at the Realtime default rate as pcm16, so both sides resample the same samples
    mic24 = pcm16_24k(microphone)
    played24 = _to_int16(soxr.resample(played, SAMPLE_RATE, REALTIME_RATE))[:mic24.size]
    blocks = _blocks(mic24, played24, REALTIME_RATE)
    expected, chunks = _python_api(runtime, blocks, REALTIME_RATE, finish=False)
    assert not [e for e in expected if e.kind == "AudioDropped"]
    got = run(_sdk_with_playback(server.port, blocks, chunks), timeout=120)
    assert got == _comparable(expected)
    decisions = [e for e in got if e["event"] == "Decision"]
    assert len(decisions) == chunks
    _check_playback_flags(decisions, speech_s)


# -- /v1/pcm with tagged frames -----------------------------------------------------------------

async def _pcm_with_playback(url, blocks):
    send_frames = _docs_snippet("send_frames")
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url}/v1/pcm?frames=tagged") as ws:
            assert (await ws.receive_json(timeout=10))["event"] == "Ready"
            events = []

            async def receive():
                events.append(await ws.receive_json(timeout=30))

            for sent, (played, microphone) in enumerate(blocks):
                while _fed_ahead(sent, sum(e["event"] == "Decision" for e in events)):
                    await receive()
                await send_frames(ws, microphone, played)
            await ws.send_str(json.dumps({"type": "finish"}))
            async for msg in ws:
                events.append(json.loads(msg.data))
            return events, ws.close_code


def test_pcm_tagged_playback_gives_the_python_api_events(server, runtime, echo_case):  # noqa: F811
    microphone, played, speech_s = echo_case
    blocks = _blocks(microphone, played, SAMPLE_RATE)
    expected, _ = _python_api(runtime, blocks, SAMPLE_RATE, finish=True)
    assert not [e for e in expected if e.kind == "AudioDropped"]
    events, code = run(_pcm_with_playback(server.http, blocks), timeout=120)
    assert code == 1000 and events[-1]["event"] == "Finished"
    assert signature(events) == signature(expected)
    _check_playback_flags([e for e in events if e["event"] == "Decision"], speech_s)


# -- bad playback input ----------------------------------------------------------------------

def _append(audio, **fields):
    return json.dumps({"type": "listenloop.playback.append", "audio": audio, **fields})


BAD_PLAYBACK = [  # (message, error code, param)
    (_append(base64.b64encode(b"\x00\x01\x02").decode()), "invalid_audio_length", "audio"),
    (_append("!!!not base64!!!"), "invalid_base64", "audio"),
    (_append(12), "invalid_type", "audio"),
    (json.dumps({"type": "listenloop.playback.append"}), "missing_required_parameter", "audio"),
    (_append(b64(np.zeros(160)), at="16000"), "invalid_type", "at"),
    (_append(b64(np.zeros(160)), at=1.5), "invalid_type", "at"),
    (_append(b64(np.zeros(160)), at=True), "invalid_type", "at"),
    (_append(b64(np.zeros(160)), at=-1), "invalid_value", "at"),
]


async def _bad_realtime_playback(url):
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url}/v1/realtime") as ws:
            assert (await ws.receive_json(timeout=10))["type"] == "session.created"
            await ws.send_str(json.dumps({"type": "session.update", "session": {"listenloop": {"events": True}}}))
            assert (await ws.receive_json(timeout=10))["type"] == "session.updated"
            for message, code, param in BAD_PLAYBACK:
                await ws.send_str(message)
                reply = await ws.receive_json(timeout=10)
                assert reply["type"] == "error", (message, reply)
                assert (reply["error"]["code"], reply["error"]["param"]) == (code, param), (message, reply)
                assert reply["error"]["message"]
            # the session goes on: a good block with `at`, then microphone audio, gives decisions
            # (exactly one error was sent per bad message: the next event is not one)
            await ws.send_str(_append(b64(np.zeros(4800)), at=0))
            await ws.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": b64(np.zeros(24000))}))
            event = await ws.receive_json(timeout=30)
            assert event["type"] == "listenloop.decision" and event["playback"] is False, event


async def _bad_pcm_playback(url):
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url}/v1/pcm?frames=tagged&format=s16") as ws:
            assert (await ws.receive_json(timeout=10))["event"] == "Ready"
            for bad, code in ((b"PLAY\x00\x01\x02", "invalid_audio_length"), (b"\x00" * 6, "invalid_tag"),
                              (b"PLA", "invalid_tag"), (b"MIC \x00", "invalid_audio_length")):
                await ws.send_bytes(bad)
                reply = await ws.receive_json(timeout=10)
                assert reply["event"] == "Error" and reply["code"] == code and reply["message"], (bad, reply)
            await ws.send_bytes(b"PLAY" + np.zeros(1600, "<i2").tobytes())
            await ws.send_bytes(b"MIC " + np.zeros(6400, "<i2").tobytes())
            event = await ws.receive_json(timeout=30)
            assert event["event"] == "Decision" and event["chunk"] == 0, event
        response = await http.get(f"{url}/v1/pcm?frames=mixed")
        assert response.status == 400 and "frames" in (await response.json())["error"]["message"]


def test_bad_playback_gets_one_error_and_the_session_goes_on(server):  # noqa: F811
    run(_bad_realtime_playback(server.http))
    run(_bad_pcm_playback(server.http))
    run(wait_idle(server))
