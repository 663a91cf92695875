"""`listenloop serve`: the OpenAI Realtime endpoint through the official SDK, /v1/pcm against
the Python API, hostile input, limits and access control. Loopback only."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("openai")

import listenloop  # noqa: E402
from listenloop.server import check_bind, create_app, is_loopback  # noqa: E402
from listenloop.server.app import NON_SESSION_TIMEOUT_S, SPARE_CONNECTIONS, start  # noqa: E402
from test_determinism import signature  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ALARM = "Smoke alarm! Please check the kitchen."
DOOR = "Someone is at the door."
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def runtime():
    rt = listenloop.Runtime()
    yield rt
    rt.close()


class Server:
    """An app served on a free loopback port by an event loop in a background thread."""

    def __init__(self, runtime, non_session_timeout_s=NON_SESSION_TIMEOUT_S, **options):
        self.app = create_app(runtime, **options)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._runner = self._call(start(self.app, "127.0.0.1", 0, non_session_timeout_s=non_session_timeout_s,
                                        shutdown_timeout=1.0))
        self.port = self._runner.addresses[0][1]

    def _call(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def tcp_connections(self) -> int:
        return len(self._runner.server.connections)

    @property
    def http(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self):
        from listenloop.server.app import STATE

        return self.app[STATE]

    def close(self):
        self._call(self._runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@contextlib.contextmanager
def serving(runtime, **options):
    server = Server(runtime, **options)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def server(runtime):
    with serving(runtime, max_sessions=8) as s:
        yield s


def run(coro, timeout=45):
    return asyncio.run(asyncio.wait_for(coro, timeout) if timeout is not None else coro)


def wav(name):
    pcm, rate = sf.read(EXAMPLES / name, dtype="float32")
    assert rate == 16000
    return pcm


def pcm16_24k(pcm):
    import soxr

    return (np.clip(soxr.resample(pcm, 16000, 24000), -1, 1) * 32767).astype("<i2")


def b64(samples) -> str:
    return base64.b64encode(np.asarray(samples, "<i2").tobytes()).decode()


async def wait_idle(server, timeout=5.0):
    for _ in range(int(timeout / 0.02)):
        if server.state.reserved == 0 and server.state.runtime.open_sessions == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{server.state.reserved} connections / {server.state.runtime.open_sessions} sessions open")


# -- OpenAI Realtime through the official SDK ------------------------------------------------

def _validator(beta: bool):
    from pydantic import TypeAdapter

    if beta:
        from openai.types.beta.realtime.realtime_server_event import RealtimeServerEvent
    else:
        from openai.types.realtime.realtime_server_event import RealtimeServerEvent
    return TypeAdapter(RealtimeServerEvent)


async def _sdk_kitchen(port, beta: bool):
    from openai import AsyncOpenAI

    # the beta client needs websocket_base_url for plain ws:// (it assumes wss:// otherwise)
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                         websocket_base_url=f"ws://127.0.0.1:{port}/v1" if beta else None)
    realtime = client.beta.realtime if beta else client.realtime
    pcm = pcm16_24k(wav("kitchen.wav"))
    strict = _validator(beta)
    seen, replies, text, emotions = [], [], "", []
    async with realtime.connect(model="listenloop-demo") as conn:
        first = await conn.recv()
        assert first.type == "session.created"
        if beta:
            await conn.session.update(session={"input_audio_format": "pcm16", "listenloop": {"events": True}})
        else:
            await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                               "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}}}})

        async def feed():  # 0.1 s pieces at about 20x real time
            for start in range(0, len(pcm), 2400):
                await conn.input_audio_buffer.append(audio=b64(pcm[start:start + 2400]))
                await asyncio.sleep(0.005)

        feeder = asyncio.create_task(feed())
        try:
            while not replies:
                raw = await asyncio.wait_for(conn.recv_bytes(), 20)
                data = json.loads(raw)
                seen.append(data["type"])
                if not data["type"].startswith("listenloop."):
                    strict.validate_python(data)  # every field the SDK's types require, with the right types
                event = conn.parse_event(raw)
                if event.type in ("response.output_text.delta", "response.text.delta"):
                    text += event.delta
                elif event.type == "response.done":
                    assert event.response.status == "completed"
                    emotions.append((event.response.metadata or {}).get("emotion"))
                    replies.append(text)
        finally:
            feeder.cancel()
    return seen, replies, emotions


def test_openai_sdk_streams_the_alarm_reply(server):
    seen, replies, emotions = run(_sdk_kitchen(server.port, beta=False))
    assert replies == [ALARM]
    assert emotions == ["URGENT"]
    assert seen[0] == "session.updated"
    start = seen.index("response.created")
    # the commit adds the user's audio item, complete at once; the reply's item is added as it starts
    assert seen[start - 3:start] == ["input_audio_buffer.committed", "conversation.item.added",
                                     "conversation.item.done"]
    assert seen[start:start + 4] == ["response.created", "response.output_item.added", "conversation.item.added",
                                     "response.content_part.added"]
    assert seen[-5:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                         "conversation.item.done", "response.done"]
    assert not any(t.startswith("listenloop.") or t == "error" for t in seen)


def test_openai_sdk_beta_event_names_and_listenloop_events(server):
    seen, replies, _ = run(_sdk_kitchen(server.port, beta=True))
    assert replies == [ALARM]
    assert "response.text.delta" in seen and "response.text.done" in seen
    assert "response.output_text.delta" not in seen
    events = [t for t in seen if not t.startswith("listenloop.")]
    start = events.index("response.created")  # beta: conversation.item.created, and no conversation.item.done
    assert events[start - 2:start + 3] == ["input_audio_buffer.committed", "conversation.item.created",
                                           "response.created", "response.output_item.added",
                                           "conversation.item.created"]
    assert "conversation.item.added" not in seen and "conversation.item.done" not in seen
    assert seen.count("listenloop.decision") >= 10  # one per 0.4 s chunk, with p_speak


# -- /v1/pcm ---------------------------------------------------------------------------------

async def _pcm_events(url, pcm, piece=1600, pace=0.005, fmt="f32"):
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url}/v1/pcm?format={fmt}") as ws:
            ready = await ws.receive_json(timeout=10)
            events = []

            async def read():
                async for msg in ws:
                    events.append(json.loads(msg.data))

            reader = asyncio.create_task(read())
            for start in range(0, len(pcm), piece):
                block = pcm[start:start + piece]
                await ws.send_bytes((block * 32767).astype("<i2").tobytes() if fmt == "s16" else
                                    block.astype("<f4").tobytes())
                await asyncio.sleep(pace)
            await ws.send_str(json.dumps({"type": "finish"}))
            await asyncio.wait_for(reader, 30)
            return ready, events, ws.close_code


def test_pcm_events_equal_the_python_api(server, runtime):
    pcm = wav("front_door.wav")
    with runtime.session() as s:
        s.accept_waveform(pcm)
        s.finish(timeout=60)
        expected = signature(list(s.events(timeout=5)))
    ready, events, code = run(_pcm_events(server.http, pcm))
    assert ready["event"] == "Ready" and ready["sample_rate"] == 16000 and ready["model"] == "listenloop-demo"
    assert ready["session"]
    assert events[-1]["event"] == "Finished" and code == 1000
    assert signature(events) == expected
    assert [e["text"] for e in events if e["event"] == "ReplyEnded"][0] == DOOR


# -- hostile input ---------------------------------------------------------------------------

BAD_REALTIME = [
    "{not json",
    "[1, 2]",
    json.dumps({"no": "type"}),
    json.dumps({"type": 7}),
    json.dumps({"type": "no.such.event", "event_id": "evt_1"}),
    json.dumps({"type": "conversation.item.create", "event_id": "evt_2"}),
    json.dumps({"type": "input_audio_buffer.append"}),
    json.dumps({"type": "input_audio_buffer.append", "audio": 12}),
    json.dumps({"type": "input_audio_buffer.append", "audio": "!!!not base64!!!"}),
    json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x00\x01\x02").decode()}),
    json.dumps({"type": "session.update", "session": "x"}),
    json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcm",
                                                                                      "rate": 44100}}}}}),
    json.dumps({"type": "session.update", "session": {"input_audio_format": "g711_ulaw"}}),
    json.dumps({"type": "session.update", "session": {"listenloop": {"bogus": 1}}}),
    json.dumps({"type": "session.update", "session": {"listenloop": {"speak_bias": "loud"}}}),
    json.dumps({"type": "response.cancel", "event_id": "evt_3"}),
    json.dumps({"type": "input_audio_buffer.append", "event_id": 5, "audio": ""}),
]


async def _hostile_realtime(url):
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url}/v1/realtime") as ws:
            assert (await ws.receive_json(timeout=10))["type"] == "session.created"
            for bad in BAD_REALTIME:
                await ws.send_str(bad)
                reply = await ws.receive_json(timeout=10)
                assert reply["type"] == "error", (bad, reply)
                error = reply["error"]
                assert error["type"] == "invalid_request_error" and error["code"] and error["message"]
                assert reply["event_id"]
                if '"event_id": "evt_' in bad:
                    assert error["event_id"] == json.loads(bad)["event_id"]
            await ws.send_bytes(b"\x00\x00")
            assert (await ws.receive_json(timeout=10))["type"] == "error"
            await ws.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 90_000}))
            too_big = await ws.receive_json(timeout=10)  # over max_frame_bytes: error, the connection stays
            assert too_big["type"] == "error" and too_big["error"]["code"] == "frame_too_large"
            # accepted messages, then good audio: the connection still works
            await ws.send_str(json.dumps({"type": "input_audio_buffer.commit"}))
            assert (await ws.receive_json(timeout=10))["type"] == "input_audio_buffer.committed"
            assert (await ws.receive_json(timeout=10))["type"] == "conversation.item.added"
            assert (await ws.receive_json(timeout=10))["type"] == "conversation.item.done"
            await ws.send_str(json.dumps({"type": "input_audio_buffer.clear"}))
            assert (await ws.receive_json(timeout=10))["type"] == "input_audio_buffer.cleared"
            await ws.send_str(json.dumps({"type": "response.create"}))
            await ws.send_str(json.dumps({"type": "session.update", "session": {"listenloop": {"speak_bias": 0.0}}}))
            assert (await ws.receive_json(timeout=10))["type"] == "session.updated"
            pcm = pcm16_24k(wav("kitchen.wav"))
            text, types = "", []
            for start in range(0, len(pcm), 4800):
                await ws.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": b64(pcm[start:start + 4800])}))
            while True:
                event = await ws.receive_json(timeout=20)
                types.append(event["type"])
                if event["type"] == "response.output_text.delta":
                    text += event["delta"]
                if event["type"] == "response.done":
                    break
            assert text == ALARM and "error" not in types
            # a message past four times the limit cannot be read: the connection closes (1009)
            await ws.send_str("x" * 300_000)
            msg = await ws.receive(timeout=10)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
            assert ws.close_code == 1009 or msg.data == 1009


def test_hostile_realtime_messages_get_errors_and_the_connection_keeps_working(runtime):
    with serving(runtime, max_frame_bytes=65_536) as server:
        run(_hostile_realtime(server.http))
        run(wait_idle(server))


async def _hostile_pcm(url):
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url}/v1/pcm?format=s16&rate=8000") as ws:
            assert (await ws.receive_json(timeout=10))["event"] == "Ready"
            for bad in (b"\x00\x01\x02", "not json", json.dumps({"type": "stop"}), json.dumps([1])):
                await (ws.send_bytes(bad) if isinstance(bad, bytes) else ws.send_str(bad))
                reply = await ws.receive_json(timeout=10)
                assert reply["event"] == "Error" and reply["message"], bad
        for query in ("rate=100", "rate=abc", "format=f64", "speak_bias=nan"):
            response = await http.get(f"{url}/v1/pcm?{query}")
            assert response.status == 400 and "message" in (await response.json())["error"], query


def test_hostile_pcm_frames_get_errors(server):
    run(_hostile_pcm(server.http))
    pcm = wav("front_door.wav")
    _, events, _ = run(_pcm_events(server.http, pcm, fmt="s16"))  # the server still serves
    assert DOOR in [e.get("text") for e in events]
    run(wait_idle(server))


def test_response_cancel_stops_the_reply_being_streamed():
    from types import SimpleNamespace

    from listenloop import events as ev
    from listenloop.server.realtime import RealtimeConnection

    async def scenario():
        state = SimpleNamespace(max_frame_bytes=65_536, model_name="m", send_timeout_s=1.0)
        conn = RealtimeConnection(None, state, beta=False)
        sent = []

        async def send(message):
            sent.append(message)
            return True

        conn.send = send
        await conn.on_event(ev.Decision(0.4, 0.0, 0, True, 0.9))
        await conn.on_event(ev.ReplyStarted(0.4, 0.0, 0, "URGENT"))
        await conn.on_event(ev.TextDelta(0.4, 0.0, "Smoke"))
        await conn.on_text(json.dumps({"type": "response.cancel", "event_id": "evt_c"}))
        await conn.on_event(ev.TextDelta(0.4, 0.0, " alarm!"))
        await conn.on_event(ev.ReplyEnded(0.4, 0.0, 0, "Smoke alarm!"))
        await conn.on_text(json.dumps({"type": "response.cancel", "event_id": "evt_d"}))  # nothing to cancel
        return sent

    sent = run(scenario())
    types = [m["type"] for m in sent]
    assert types == ["input_audio_buffer.committed", "conversation.item.added", "conversation.item.done",
                     "response.created", "response.output_item.added", "conversation.item.added",
                     "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                     "response.content_part.done", "response.output_item.done", "conversation.item.done",
                     "response.done", "error"]
    done = sent[12]["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "client_cancelled"
    assert done["metadata"] == {"emotion": "URGENT"} and done["output"][0]["content"][0]["text"] == "Smoke"
    assert sent[8]["text"] == "Smoke"
    assert sent[11]["item"]["status"] == "incomplete" and sent[11]["item"]["content"][0]["text"] == "Smoke"
    assert sent[13]["error"]["code"] == "response_cancel_not_active" and sent[13]["error"]["event_id"] == "evt_d"
    for message in sent[:13]:
        _validator(False).validate_python(message)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def _cycles(url, n):
    async with aiohttp.ClientSession() as http:
        for i in range(n):
            async with http.ws_connect(f"{url}/v1/pcm" if i % 2 else f"{url}/v1/realtime") as ws:
                await ws.receive_json(timeout=10)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_a_thousand_connect_disconnect_cycles(server):
    run(_cycles(server.http, 100))
    run(wait_idle(server))
    before = _rss_bytes()
    run(_cycles(server.http, 1000))
    run(wait_idle(server))
    grown = _rss_bytes() - before
    assert grown < 40 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 1000 connections"
    assert len(server.state.connections) == 0

    async def open_sessions():
        from prometheus_client.parser import text_string_to_metric_families

        async with aiohttp.ClientSession() as http:
            text = await (await http.get(f"{server.http}/metrics")).text()
        return {f.name: f.samples[0].value for f in text_string_to_metric_families(text)}["listenloop_sessions_open"]

    assert run(open_sessions()) == 0


BAD_FRAME = b"\x00" * 32_769  # s16 audio of an odd byte count


async def _never_reads(server):
    url = server.http
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{url}/v1/pcm?format=s16")
        assert (await ws.receive_json(timeout=10))["event"] == "Ready"
        transport = ws._conn.transport
        # this client reads nothing from now on, and its kernel takes little for it
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        transport.pause_reading()
        sent = 0
        # Each bad frame makes the server send an Error event, until the buffers between are full
        # and the server, stuck sending for send_timeout_s, drops the client: however long
        # that takes on this machine (the test's timeout is the only limit).
        while server.state.reserved:
            try:
                # an odd byte count: one Error event each. Large frames, so that what waits in the
                # server's socket is few frames, not hundreds of thousands it must first get through.
                await ws.send_bytes(BAD_FRAME)  # blocks once the server stops reading, until it drops us
                sent += 1
            except ConnectionError:
                break
        # its socket is closed on the server's side, not left waiting to flush
        while server.tcp_connections:
            await asyncio.sleep(0.02)
        # other clients are served
        ready, events, _ = await _pcm_events(url, wav("front_door.wav"))
        assert DOOR in [e.get("text") for e in events]
        transport.resume_reading()
        errors = 0
        while True:  # what the server had sent before it gave up on this client, then the end
            msg = await ws.receive(timeout=10)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            errors += json.loads(msg.data)["event"] == "Error"
        return sent, errors, msg, ws.close_code


@pytest.mark.timeout(300)  # a hang guard only: the test waits for the server, not a deadline
def test_a_client_that_never_reads_is_disconnected(runtime):
    # A client that floods frames and reads nothing can stall the server's reading of it
    # (its events never block a send): the idle timeout is then what cuts it off.
    with serving(runtime, send_timeout_s=1.0, idle_timeout_s=5.0) as server:
        sent, errors, last, code = run(_never_reads(server), timeout=None)
        assert errors < sent  # what it was sent before being cut off is bounded (an abort may discard it all)
        # the server gave up on it: a close frame if it still fit in the socket, else it dropped the connection
        assert (code == 1008 and "not reading" in last.extra) or code == 1006, (last, code)
        run(wait_idle(server, timeout=10))  # its session is closed; memory did not pile up
        assert server.state.served >= 2


async def _closed_by_server(reader) -> bool:
    try:
        return await reader.read() == b""
    except ConnectionResetError:  # aborted: no FIN, a reset
        return True


async def _connections_past_the_cap(server, spare):
    url = server.http
    async with aiohttp.ClientSession() as http:
        sessions = [await http.ws_connect(f"{url}/v1/pcm") for _ in range(server.state.max_sessions)]
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(spare)]
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await _closed_by_server(reader)  # one connection too many: closed as it opens
        writer.close()
        # the spare ones, which never send a whole request, are closed after the timeout
        for r, w in idle:
            w.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the end of the headers
            assert await _closed_by_server(r)
            w.close()
        for ws in sessions:  # the sessions are not timed out
            assert not ws.closed
            await ws.close()


def test_tcp_connections_count_against_the_cap_and_idle_ones_time_out(runtime):
    with serving(runtime, max_sessions=2, non_session_timeout_s=0.5) as server:
        run(_connections_past_the_cap(server, SPARE_CONNECTIONS))
        run(wait_idle(server))
        assert server.state.refused >= 1


async def _refused(url):
    async with aiohttp.ClientSession() as http:
        a = await http.ws_connect(f"{url}/v1/pcm")
        b = await http.ws_connect(f"{url}/v1/realtime")
        with pytest.raises(aiohttp.WSServerHandshakeError) as refusal:
            await http.ws_connect(f"{url}/v1/realtime")
        assert refusal.value.status == 503
        response = await http.get(f"{url}/v1/pcm", headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                                            "Sec-WebSocket-Version": "13",
                                                            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        assert response.status == 503 and (await response.json())["error"]["code"] == "session_limit"
        await a.close()
        await asyncio.sleep(0.1)
        c = await http.ws_connect(f"{url}/v1/pcm")  # a slot is free again
        assert (await c.receive_json(timeout=10))["event"] == "Ready"
        await b.close()
        await c.close()


def test_session_cap_refuses_with_503(runtime):
    with serving(runtime, max_sessions=2) as server:
        run(_refused(server.http))
        run(wait_idle(server))


async def _idle(url):
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url}/v1/pcm") as ws:
            await ws.receive_json(timeout=10)
            msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.CLOSE and "idle" in msg.extra


def test_idle_connections_are_closed(runtime):
    with serving(runtime, idle_timeout_s=0.5) as server:
        run(_idle(server.http))
        run(wait_idle(server))


# -- access control --------------------------------------------------------------------------

async def _access(url, port):
    async with aiohttp.ClientSession() as http:
        assert (await http.get(f"{url}/healthz")).status == 200  # no key needed
        for route in ("/", "/static/app.js", "/v1/pcm", "/v1/realtime"):
            assert (await http.get(f"{url}{route}")).status == 401, route
            assert (await http.get(f"{url}{route}?key=wrong")).status == 401, route
            assert (await http.get(f"{url}{route}", headers={"Authorization": "Bearer wrong"})).status == 401
        assert (await http.get(f"{url}/?key=s3cret")).status == 200
        assert (await http.get(f"{url}/static/app.js", headers={"Authorization": "Bearer s3cret"})).status == 200
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{url}/v1/realtime")
        assert refused.value.status == 401
        auth = {"Authorization": "Bearer s3cret"}
        async with http.ws_connect(f"{url}/v1/realtime", headers=auth) as ws:
            assert (await ws.receive_json(timeout=10))["type"] == "session.created"
        async with http.ws_connect(f"{url}/v1/pcm?key=s3cret", origin=f"http://127.0.0.1:{port}") as ws:
            assert (await ws.receive_json(timeout=10))["event"] == "Ready"  # same origin
        async with http.ws_connect(f"{url}/v1/pcm?key=s3cret", origin="https://app.example") as ws:
            assert (await ws.receive_json(timeout=10))["event"] == "Ready"  # allow-listed
        for origin in ("https://evil.example", "http://127.0.0.1:1", "null"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(f"{url}/v1/pcm?key=s3cret", origin=origin)
            assert refused.value.status == 403, origin
        # static files: only plain files directly inside the static folder
        assert (await (await http.get(f"{url}/static/app.js?key=s3cret")).text()) == "js"
        for path in ("/static/../secret.txt", "/static/%2e%2e/secret.txt", "/static/%2e%2e%2fsecret.txt",
                     "/static/..%2fsecret.txt", "/static/%2Fetc%2Fpasswd", "/static//etc/passwd",
                     "/static/link.txt", "/static/.hidden", "/static/missing.js", "/static/sub",
                     "/static/%00"):
            response = await http.get(f"{url}{path}", headers=auth)
            assert response.status == 404, path
            assert "top secret" not in await response.text()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # raw paths no client normalises
        for raw in ("/static/../secret.txt", "/static/..%2Fsecret.txt", "/../secret.txt"):
            writer.write(f"GET {raw}?key=s3cret HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
            body = await reader.readexactly(length)
            assert b" 404 " in head.split(b"\r\n")[0] and b"top secret" not in body, raw
        writer.close()


def test_api_key_origin_and_static_files(runtime, tmp_path):
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<html></html>")
    (static / "app.js").write_text("js")
    (static / ".hidden").write_text("top secret")
    (static / "sub").mkdir()
    (tmp_path / "secret.txt").write_text("top secret")
    (static / "link.txt").symlink_to(tmp_path / "secret.txt")
    with serving(runtime, api_key="s3cret", allowed_origins=["https://app.example"], static_dir=static) as server:
        run(_access(server.http, server.port))
        run(wait_idle(server))


async def _hosts(server):
    port = server.port
    async with aiohttp.ClientSession() as http:
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "proxy.example", "proxy.example:443"):
            assert (await http.get(f"{server.http}/", headers={"Host": host})).status == 200, host
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1:1", "localhost", f"127.0.0.1.evil.example:{port}"):
            response = await http.get(f"{server.http}/", headers={"Host": host})
            assert response.status == 403, host
            error = (await response.json())["error"]
            assert error["code"] == "host_not_allowed" and "\n" not in error["message"] and host in error["message"]
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(f"{server.http}/v1/pcm", headers={"Host": host})
            assert refused.value.status == 403


def test_without_a_key_only_requests_naming_this_server_are_served(runtime):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends
    `Host: evil.example`; without an API key it gets 403."""
    with serving(runtime, allowed_hosts=["proxy.example"]) as server:
        run(_hosts(server))


async def _logged(server):
    async with aiohttp.ClientSession() as http:
        assert (await http.get(f"{server.http}/?key=s3cret-value&x=1")).status == 200


def test_the_access_log_never_shows_the_key(runtime, caplog):
    import logging

    with caplog.at_level(logging.INFO, "aiohttp.access"), serving(runtime, api_key="s3cret-value") as server:
        run(_logged(server))  # (logged once the response is sent: the server closes first)
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert any("key=***" in line and "x=1" in line for line in lines), lines
    assert not any("s3cret" in line for line in lines), lines


def test_serve_refuses_a_port_out_of_range_before_loading(capsys):
    from listenloop import cli

    for port in ("99999", "0", "-1"):
        assert cli.main(["serve", "--port", port]) == 1
        err = capsys.readouterr().err
        assert err == f"listenloop: error: --port must be a TCP port number from 1 to 65535, got {port}\n"


def test_only_loopback_binds_without_a_key():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert is_loopback(host)
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com", ""):
        assert not is_loopback(host)
        with pytest.raises(listenloop.Error, match="API key"):
            check_bind(host, None)
        check_bind(host, "key")


def test_serve_command_line(monkeypatch):
    from listenloop import cli

    args = cli._parser().parse_args(["serve", "--host", "0.0.0.0", "--port", "9000", "--max-sessions", "3",
                                     "--api-key-env", "LL_KEY", "--allow-origin", "https://a.example",
                                     "--allow-origin", "https://b.example"])
    assert (args.host, args.port, args.max_sessions, args.api_key_env) == ("0.0.0.0", 9000, 3, "LL_KEY")
    assert args.allow_origin == ["https://a.example", "https://b.example"]
    monkeypatch.delenv("LL_KEY", raising=False)
    assert cli.main(["serve", "--host", "0.0.0.0", "--api-key-env", "LL_KEY"]) == 1  # no key: refuses, binds nothing
    assert cli.main(["serve", "--host", "0.0.0.0"]) == 1
