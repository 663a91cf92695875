"""`listenloop serve` in operation: health and readiness probes, Prometheus metrics that equal
what the clients were sent, and the drain on SIGTERM. Real clients (aiohttp, the openai SDK)
on loopback; the drain runs `listenloop serve` in its own process."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("openai")
pytest.importorskip("prometheus_client")

from listenloop.events import AudioDropped, Decision, EventsDropped, ReplyStarted, TextDelta  # noqa: E402
from listenloop.protocol import CHUNK_SAMPLES, SAMPLE_RATE  # noqa: E402
from listenloop.server.app import drain  # noqa: E402
from listenloop.server.metrics import ServerMetrics  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from test_server import (ALARM, EXAMPLES, _validator, b64, run, runtime, serving, wait_idle,  # noqa: E402, F401
                         wav)

pytestmark = pytest.mark.timeout(120)


async def _get(http, url, **options):
    async with http.get(url, **options) as response:
        return response.status, await response.text()


def samples(text: str) -> dict:
    """{(name, ((label, value), ...)): value} of a Prometheus text exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def scrape(url: str, **options) -> dict:
    async with aiohttp.ClientSession() as http:
        status, text = await _get(http, f"{url}/metrics", **options)
    assert status == 200, text
    return samples(text)


def value(metrics: dict, name: str, **labels) -> float:
    return metrics[(name, tuple(sorted(labels.items())))]


async def send_audio(ws, pcm):
    """0.1 s float32 frames at about 20x real time."""
    for start in range(0, len(pcm), 1600):
        await ws.send_bytes(pcm[start:start + 1600].astype("<f4").tobytes())
        await asyncio.sleep(0.005)


# -- health and readiness --------------------------------------------------------------------

async def _probes_ready_full_draining(server):
    url = server.http
    async with aiohttp.ClientSession() as http:
        assert await _get(http, f"{url}/healthz") == (200, json.dumps({"status": "ok"}))
        status, body = await _get(http, f"{url}/readyz")
        assert status == 200 and json.loads(body) == {"status": "ready"}
        async with http.ws_connect(f"{url}/v1/pcm") as first:
            assert (await first.receive_json(timeout=10))["event"] == "Ready"
            # full: the one session slot is taken; the probes themselves are not sessions
            status, body = await _get(http, f"{url}/readyz")
            assert status == 503 and json.loads(body) == {"status": "unavailable", "reason": "full"}
            assert (await _get(http, f"{url}/healthz"))[0] == 200
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(f"{url}/v1/pcm")
            assert refused.value.status == 503
        await wait_idle(server)
        assert (await _get(http, f"{url}/readyz"))[0] == 200

        # draining: the open session runs on and ends by itself, new ones are refused
        async with http.ws_connect(f"{url}/v1/pcm") as ws:
            assert (await ws.receive_json(timeout=10))["event"] == "Ready"
            await send_audio(ws, wav("kitchen.wav"))
            stopping = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(drain(server.app, 60.0), server.loop))
            status, body = await _get(http, f"{url}/readyz")
            assert status == 503 and json.loads(body) == {"status": "unavailable", "reason": "draining"}
            assert (await _get(http, f"{url}/healthz"))[0] == 200
            async with http.get(f"{url}/v1/realtime", headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                                               "Sec-WebSocket-Version": "13",
                                                               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as r:
                assert r.status == 503 and (await r.json())["error"]["code"] == "draining"
            await ws.send_str(json.dumps({"type": "finish"}))
            events = [json.loads(msg.data) async for msg in ws]
            assert events[-1]["event"] == "Finished" and ws.close_code == 1000
            assert ALARM in [e.get("text") for e in events if e["event"] == "ReplyEnded"]
            await asyncio.wait_for(stopping, 30)  # the drain ended as its last session did
    return await scrape(url)


def test_health_and_readiness_when_ready_full_and_draining(runtime):
    with serving(runtime, max_sessions=1) as server:
        metrics = run(_probes_ready_full_draining(server), timeout=90)
    assert value(metrics, "listenloop_sessions_refused_total", reason="session_limit") == 1
    assert value(metrics, "listenloop_sessions_refused_total", reason="draining") == 1
    assert value(metrics, "listenloop_sessions_served_total") == 2


async def _probe_access(url, port, key):
    async with aiohttp.ClientSession() as http:
        for route in ("/healthz", "/readyz"):
            assert (await _get(http, f"{url}{route}"))[0] == 200, route  # probes carry no key
        status, body = await _get(http, f"{url}/metrics")
        assert status == 401 and "listenloop_" not in body  # the metrics show traffic: key needed
        assert (await _get(http, f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}))[0] == 200
        assert (await _get(http, f"{url}/metrics?key={key}"))[0] == 200
        for route in ("/healthz", "/readyz"):  # another site's page in a browser
            assert (await _get(http, f"{url}{route}", headers={"Origin": "https://evil.example"}))[0] == 403


async def _probe_hosts(url, port):
    async with aiohttp.ClientSession() as http:
        for route in ("/healthz", "/readyz", "/metrics"):
            assert (await _get(http, f"{url}{route}", headers={"Host": f"localhost:{port}"}))[0] == 200, route
            status, body = await _get(http, f"{url}{route}", headers={"Host": f"evil.example:{port}"})
            assert status == 403 and json.loads(body)["error"]["code"] == "host_not_allowed", route


def test_probes_need_no_key_but_obey_host_and_origin_checks(runtime):
    with serving(runtime, api_key="s3cret") as server:
        run(_probe_access(server.http, server.port, "s3cret"))
    with serving(runtime) as server:  # DNS rebinding: without a key only this server's names
        run(_probe_hosts(server.http, server.port))


# -- metrics ---------------------------------------------------------------------------------

class Seen:
    """What the clients were sent, in the metrics' terms."""

    def __init__(self):
        self.sessions = self.decisions = self.replies = self.resets = self.dropped_samples = 0
        self.dropped_events = self.timed_replies = 0

    def add(self, kind: str, event: dict, samples_sent: int, reply: dict) -> None:
        if kind == "Decision":
            self.decisions += 1
        elif kind == "ReplyStarted":
            reply.clear()
            # TTFR is measured when a received frame completed the reply's chunk (not the
            # zero-padded chunk that finish adds)
            reply["timed"] = (event["chunk"] + 1) * CHUNK_SAMPLES <= samples_sent
        elif kind == "TextDelta" and reply.pop("timed", False):
            self.timed_replies += 1
        elif kind == "ReplyEnded":
            self.replies += 1
        elif kind == "ContextReset":
            self.resets += 1
        elif kind == "AudioDropped":
            self.dropped_samples += event["samples"]
        elif kind == "EventsDropped":
            self.dropped_events += event["count"]


async def _pcm_client(url, pcm, seen: Seen):
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/v1/pcm") as ws:
        assert (await ws.receive_json(timeout=10))["event"] == "Ready"
        seen.sessions += 1
        await send_audio(ws, pcm)
        await ws.send_str(json.dumps({"type": "finish"}))
        reply = {}
        async for msg in ws:
            event = json.loads(msg.data)
            seen.add(event["event"], event, len(pcm), reply)
        assert event["event"] == "Finished" and ws.close_code == 1000


OWN = {"listenloop.decision": "Decision", "listenloop.context_reset": "ContextReset",
       "listenloop.audio_dropped": "AudioDropped", "listenloop.events_dropped": "EventsDropped"}


async def _realtime_client(port, pcm, seen: Seen):
    """The openai SDK at 16 kHz with listenloop's own events on; it reads until every whole
    chunk is decided and no reply is open, so nothing is left unread when it leaves."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    pcm16 = (np.clip(pcm, -1, 1) * 32767).astype("<i2")
    chunks = len(pcm16) // CHUNK_SAMPLES
    async with client.realtime.connect(model="listenloop-demo") as conn:
        assert (await conn.recv()).type == "session.created"
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                           "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
                                           "listenloop": {"events": True}})
        seen.sessions += 1
        for start in range(0, len(pcm16), 1600):
            await conn.input_audio_buffer.append(audio=b64(pcm16[start:start + 1600]))
            await asyncio.sleep(0.005)
        decided, last_chunk, open_reply, reply = 0, None, False, {}
        while decided < chunks or open_reply:
            data = json.loads(await asyncio.wait_for(conn.recv_bytes(), 30))
            kind = data["type"]
            if kind in OWN:
                seen.add(OWN[kind], data, len(pcm16), reply)
                if kind == "listenloop.decision":
                    decided, last_chunk = decided + 1, data["chunk"]
                    open_reply = open_reply or data["spoke"]  # its response follows
            elif kind == "response.created":  # it answers the chunk decided right before it
                seen.add("ReplyStarted", {"chunk": last_chunk}, len(pcm16), reply)
            elif kind == "response.output_text.delta":
                seen.add("TextDelta", data, len(pcm16), reply)
            elif kind == "response.done":
                open_reply = False
                seen.add("ReplyEnded", data, len(pcm16), reply)


async def _stream_the_examples(server):
    seen = Seen()
    names = sorted(p.name for p in EXAMPLES.glob("*.wav"))
    assert len(names) == 4
    clients = [_pcm_client(server.http, wav(name), seen) for name in names]
    broken = wav("quiet_evening.wav").copy()
    broken[1000:1100] = np.nan  # 100 samples the server must drop and report
    clients.append(_pcm_client(server.http, broken, seen))
    clients.append(_realtime_client(server.port, wav("kitchen.wav"), seen))
    await asyncio.gather(*clients)
    await wait_idle(server, timeout=10)
    return seen, await scrape(server.http)


def test_metrics_equal_what_the_clients_were_sent(runtime):
    with serving(runtime, max_sessions=8) as server:
        seen, metrics = run(_stream_the_examples(server), timeout=110)
    assert seen.sessions == 6 and seen.replies >= 5 and seen.dropped_samples == 100
    assert value(metrics, "listenloop_sessions_served_total") == seen.sessions
    assert value(metrics, "listenloop_sessions_open") == 0
    assert value(metrics, "listenloop_chunks_decided_total") == seen.decisions
    assert value(metrics, "listenloop_replies_total") == seen.replies
    assert value(metrics, "listenloop_context_resets_total") == seen.resets
    assert value(metrics, "listenloop_dropped_audio_samples_total") == seen.dropped_samples
    assert value(metrics, "listenloop_dropped_events_total") == seen.dropped_events
    assert value(metrics, "listenloop_first_reply_token_seconds_count") == seen.timed_replies > 0
    assert value(metrics, "listenloop_first_reply_token_seconds_sum") > 0
    # each decided chunk is one listening step of the model thread, each reply at least one token
    assert value(metrics, "listenloop_model_step_seconds_count", kind="listen") == seen.decisions
    assert value(metrics, "listenloop_model_step_seconds_count", kind="reply") >= seen.replies
    assert value(metrics, "listenloop_model_queue_chunks") == 0


def test_server_metrics_count_each_event_kind_and_keep_apart_per_registry():
    first, second = ServerMetrics(CollectorRegistry()), ServerMetrics(CollectorRegistry())
    meter = first.session_opened()
    meter.audio_received(CHUNK_SAMPLES - 1)
    meter.audio_received(CHUNK_SAMPLES + 5)  # completes chunk 0
    for event in (Decision(0.4, 0.0, 0, True, 0.9), ReplyStarted(0.4, 0.0, 0, None), TextDelta(0.4, 0.0, "Hi"),
                  TextDelta(0.4, 0.0, "!"), AudioDropped(0.4, 0.0, 320, "ring buffer overrun"),
                  EventsDropped(0.4, 0.0, 7)):
        meter.event_sent(event)
    meter.closed()
    meter.closed()  # once only
    mine, other = samples(first.scrape().decode()), samples(second.scrape().decode())
    assert value(mine, "listenloop_first_reply_token_seconds_count") == 1  # the first delta only
    assert value(mine, "listenloop_dropped_audio_samples_total") == 320
    assert value(mine, "listenloop_dropped_events_total") == 7
    assert value(mine, "listenloop_chunks_decided_total") == 1
    assert value(mine, "listenloop_sessions_open") == 0
    assert value(other, "listenloop_chunks_decided_total") == 0
    assert ("listenloop_model_queue_chunks", ()) not in mine  # no runtime given


# -- stopping: `listenloop serve` drains on SIGTERM -------------------------------------------

DRAIN_S = 6.0
STOP_MARGIN_S = 30.0  # a hang guard, not a speed requirement


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    def __init__(self, *options):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "listenloop", "serve", "--port", str(self.port),
                                      *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=env)

    async def ready(self, timeout=60.0):
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.proc.communicate()[1]
                try:
                    if (await _get(http, f"{self.url}/readyz"))[0] == 200:
                        return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError("listenloop serve did not get ready")

    def signal(self, sig):
        self.proc.send_signal(sig)

    async def exit_code(self, timeout):
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.proc.poll()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        _, err = self.proc.communicate()
        return err


async def _until_draining(url):
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            status, body = await _get(http, f"{url}/readyz")
            if status == 503:
                return json.loads(body)
            await asyncio.sleep(0.05)
    raise AssertionError("/readyz never turned 503")


async def _closed(ws, started):
    """(events, close code, close reason, seconds from `started`) once the server closed `ws`."""
    events = []
    while (msg := await ws.receive(timeout=DRAIN_S + STOP_MARGIN_S)).type == aiohttp.WSMsgType.TEXT:
        events.append(json.loads(msg.data))
    reason = msg.extra if msg.type == aiohttp.WSMsgType.CLOSE else None
    return events, ws.close_code, reason, time.monotonic() - started


async def _drain(server: ServeProcess):
    await server.ready()
    kitchen = wav("kitchen.wav")
    async with aiohttp.ClientSession() as http:
        staying = await http.ws_connect(f"{server.url}/v1/pcm")  # never ends its input
        assert (await staying.receive_json(timeout=10))["event"] == "Ready"
        await send_audio(staying, kitchen[:SAMPLE_RATE])
        realtime = await http.ws_connect(f"{server.url}/v1/realtime")
        assert (await realtime.receive_json(timeout=10))["type"] == "session.created"
        ending = await http.ws_connect(f"{server.url}/v1/pcm")  # ends its input during the drain
        assert (await ending.receive_json(timeout=10))["event"] == "Ready"
        await send_audio(ending, kitchen)

        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert await _until_draining(server.url) == {"status": "unavailable", "reason": "draining"}
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{server.url}/v1/pcm")
        assert refused.value.status == 503
        await ending.send_str(json.dumps({"type": "finish"}))
        results = await asyncio.gather(_closed(staying, started), _closed(realtime, started),
                                       _closed(ending, started))
        code = await server.exit_code(STOP_MARGIN_S)
        for ws in (staying, realtime, ending):
            await ws.close()
    return results, code, time.monotonic() - started


def test_sigterm_drains_then_closes_with_1001_and_exits_143():
    server = ServeProcess("--drain-timeout", str(DRAIN_S))
    try:
        results, code, stopped_s = run(_drain(server), timeout=100)
    finally:
        err = server.close()
    (_, staying_code, staying_reason, staying_s), (realtime_events, rt_code, rt_reason, _), ending = results
    # the session that did not end had the whole drain time, then was told the server goes away
    assert staying_code == 1001 and staying_reason == "server shutting down"
    assert DRAIN_S - 0.05 <= staying_s <= DRAIN_S + STOP_MARGIN_S
    # the Realtime client was first sent an error event that says why
    assert rt_code == 1001 and rt_reason == "server shutting down"
    error = realtime_events[-1]
    assert error["type"] == "error" and error["error"]["code"] == "server_shutting_down"
    _validator(beta=False).validate_python(error)  # an event the openai SDK's types accept
    assert "shutting down" in error["error"]["message"]
    # the session that ended its input got all its events, unless the drain ran out first
    ending_events, ending_code, _, _ = ending
    if ending_code == 1000:
        assert ending_events[-1]["event"] == "Finished"
        assert ALARM in [e.get("text") for e in ending_events if e["event"] == "ReplyEnded"]
    else:
        assert ending_code == 1001
    assert code == 143, err
    assert "Traceback" not in err


async def _second_signal(server: ServeProcess):
    await server.ready()
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{server.url}/v1/pcm")
        assert (await ws.receive_json(timeout=10))["event"] == "Ready"
        started = time.monotonic()
        server.signal(signal.SIGINT)
        await _until_draining(server.url)
        server.signal(signal.SIGTERM)  # a second signal: close now
        _, close_code, reason, closed_s = await _closed(ws, started)
        code = await server.exit_code(STOP_MARGIN_S)
        await ws.close()
    return close_code, reason, closed_s, code


def test_a_second_signal_closes_at_once_and_ctrl_c_exits_130():
    server = ServeProcess("--drain-timeout", "600")
    try:
        close_code, reason, closed_s, code = run(_second_signal(server), timeout=100)
    finally:
        err = server.close()
    assert close_code == 1001 and reason == "server shutting down"
    assert closed_s < 60  # far from the 600 s of the drain
    assert code == 130, err  # the first signal's code


def test_serve_refuses_a_bad_drain_timeout():
    proc = subprocess.run([sys.executable, "-m", "listenloop", "serve", "--drain-timeout", "-1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "listenloop: error: --drain-timeout must be a number of seconds from 0 to 3600, got -1.0"]
