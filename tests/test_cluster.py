"""`listenloop serve --replicas`: the server's endpoints on Ray Serve, two replicas behind one
address, against the single-process server. One local Ray instance for the module, loopback only."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("ray.serve")

import listenloop  # noqa: E402
from listenloop.protocol import CHUNK_SAMPLES  # noqa: E402
from test_determinism import TIMING_FIELDS, signature  # noqa: E402
from test_server import serving  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
RECORDINGS = ("front_door.wav", "kitchen.wav", "living_room.wav", "quiet_evening.wav")
PIECE = 1600  # 0.1 s of audio per message
PACE_S = 0.025  # one piece per 25 ms: four times real time, so a recording takes ~5 s to send
REPLICAS, SESSIONS_PER_REPLICA = 2, 4
KILL_AFTER_S = 1.5  # into the streaming, when one replica is killed
CLOSE_DEADLINE_S = 2.0  # its clients must see their connection close within this
METRICS_REPORT_MS = 500  # how often Ray's workers report their metrics here (Ray's default: 10 s)
METRICS_WAIT_S = 60.0  # for Ray's metrics endpoint to show what the clients were sent
DRAIN_APP, DRAIN_PREFIX, DRAIN_S = "listenloop-drain", "/drain", 3.0
pytestmark = pytest.mark.timeout(180)


def wav(name):
    pcm, rate = sf.read(EXAMPLES / name, dtype="float32")
    assert rate == 16000
    return pcm


# -- clients: what a client sees, less ids and timings ------------------------------------------

@dataclass
class Run:
    protocol: str
    recording: str
    events: list = field(default_factory=list)
    complete: bool = False  # the stream ended as it should (Finished, or every chunk decided)
    close_code: int | None = None
    closed_at: float | None = None  # time.monotonic() when the server's close arrived


def _without_ids(value):
    if isinstance(value, dict):
        return {k: _without_ids(v) for k, v in value.items() if k != "id" and not k.endswith("_id")}
    if isinstance(value, list):
        return [_without_ids(v) for v in value]
    return value


def realtime_signature(event: dict) -> dict:
    """A /v1/realtime event less what differs between runs: ids, and the timings of
    listenloop.* events (as test_determinism.signature drops them)."""
    event = _without_ids(event)
    if event["type"] in ("listenloop.stats", "listenloop.audio_dropped"):
        return {k: v for k, v in event.items() if k not in TIMING_FIELDS}
    event.pop("wall_time", None)
    return event


async def _stream(send, pcm, go: asyncio.Event, done) -> None:
    await go.wait()
    for start in range(0, len(pcm), PIECE):
        if done():
            return
        try:
            await send(pcm[start:start + PIECE])
        except ConnectionError:  # the server went away: the reader sees the close
            return
        await asyncio.sleep(PACE_S)


async def pcm_client(url: str, name: str, go: asyncio.Event | None = None,
                     connected=None) -> Run:
    """One /v1/pcm connection streaming a recording, then {"type": "finish"}."""
    pcm, run = wav(name), Run("pcm", name)
    go = go or _set_event()
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/v1/pcm") as ws:
        ready = await ws.receive_json(timeout=60)
        assert ready["event"] == "Ready", ready
        if connected is not None:
            connected()

        async def read():
            async for msg in ws:
                run.events.append(json.loads(msg.data))
            run.closed_at = time.monotonic()

        reader = asyncio.create_task(read())
        with _cancelling(reader):
            await _stream(lambda block: ws.send_bytes(block.astype("<f4").tobytes()), pcm, go, reader.done)
            if not reader.done():
                with contextlib.suppress(ConnectionError):
                    await ws.send_str(json.dumps({"type": "finish"}))
            await asyncio.wait_for(reader, 60)
        run.close_code = ws.close_code
    run.complete = bool(run.events) and run.events[-1]["event"] == "Finished"
    run.events = signature(run.events)
    return run


async def realtime_client(url: str, name: str, go: asyncio.Event | None = None, connected=None) -> Run:
    """One /v1/realtime connection with listenloop.* events on, streaming a recording at 16 kHz;
    complete once every whole chunk is decided and no reply is open."""
    pcm, run = wav(name), Run("realtime", name)
    pcm16 = (np.clip(pcm, -1, 1) * 32767).astype("<i2")
    last_chunk = len(pcm) // CHUNK_SAMPLES - 1
    go = go or _set_event()
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/v1/realtime") as ws:
        assert (await ws.receive_json(timeout=60))["type"] == "session.created"
        await ws.send_str(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
            "listenloop": {"events": True}}}))
        assert (await ws.receive_json(timeout=60))["type"] == "session.updated"
        if connected is not None:
            connected()

        async def read():
            decided, open_replies = -1, 0
            async for msg in ws:
                event = json.loads(msg.data)
                run.events.append(realtime_signature(event))
                decided = event["chunk"] if event["type"] == "listenloop.decision" else decided
                open_replies += {"response.created": 1, "response.done": -1}.get(event["type"], 0)
                if decided == last_chunk and open_replies == 0:
                    run.complete = True
                    return
            run.closed_at = time.monotonic()

        async def send(block):
            await ws.send_str(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(block.tobytes()).decode()}))

        reader = asyncio.create_task(read())
        with _cancelling(reader):
            await _stream(send, pcm16, go, reader.done)
            await asyncio.wait_for(reader, 60)
        run.close_code = ws.close_code
    return run


def _set_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


class _cancelling:
    def __init__(self, task):
        self.task = task

    def __enter__(self):
        return self.task

    def __exit__(self, *exc):
        self.task.cancel()


def eight_clients(url: str, go: asyncio.Event, connected):
    """A /v1/pcm and a /v1/realtime client for each of the four recordings."""
    return [client(url, name, go=go, connected=connected) for name in RECORDINGS
            for client in (pcm_client, realtime_client)]


async def _all_open_then_stream(url: str, during=None) -> list:
    """Eight clients, opened one after the other, that start streaming together once all
    eight are open (so both replicas hold four each); `during()` runs beside them."""
    go, opened = asyncio.Event(), asyncio.Queue()
    clients = []
    for client in eight_clients(url, go, lambda: opened.put_nowait(1)):
        clients.append(asyncio.create_task(client))
        waiting = asyncio.create_task(opened.get())
        await asyncio.wait([waiting, clients[-1]], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():  # the client failed (or hangs): do not wait for the others
            waiting.cancel()
            break
    go.set()
    extra = asyncio.create_task(during()) if during is not None else None
    runs = await asyncio.gather(*clients, return_exceptions=True)
    assert len(runs) == 8, runs
    return runs, (await extra if extra is not None else None)


def run(coro, timeout=150):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def key(r: Run):
    return r.protocol, r.recording


# -- fixtures --------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def expected():
    """Each client's run on the single-process aiohttp server, all eight at once."""
    runtime = listenloop.Runtime()
    try:
        with serving(runtime, max_sessions=8) as server:
            runs, _ = run(_all_open_then_stream(server.http))
    finally:
        runtime.close()
    for r in runs:
        assert not isinstance(r, BaseException), r
        assert r.complete, (r.protocol, r.recording, r.events[-3:])
    return {key(r): r.events for r in runs}


@pytest.fixture(scope="module")
def ray_serve():
    """A local Ray (light: no dashboard, small object store) with Serve's proxy on a free
    loopback port; the http URL."""
    import ray
    from ray import serve

    ray.init(num_cpus=2 * REPLICAS, include_dashboard=False, log_to_driver=False,
             object_store_memory=80 * 2**20, _metrics_export_port=_free_port(),
             _system_config={"metrics_report_interval_ms": METRICS_REPORT_MS})
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_serve):
    from ray import serve

    from listenloop.server.cluster import APP_NAME, build

    serve.run(build(REPLICAS, max_sessions=SESSIONS_PER_REPLICA), name=APP_NAME, route_prefix="/")
    yield ray_serve
    serve.delete(APP_NAME)


def ray_metrics(name: str, app: str) -> dict:
    """{replica tag: value} of a listenloop metric on Ray's metrics endpoint (ray_<name>),
    summed over its other labels, for the replicas of application `app`."""
    import urllib.request

    import ray
    from prometheus_client.parser import text_string_to_metric_families

    (node,) = ray.nodes()
    with urllib.request.urlopen(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"ray_{name}" and sample.labels.get("application") == app:
                found[sample.labels["replica"]] = found.get(sample.labels["replica"], 0) + sample.value
    return found


def settled_metrics(names, app: str) -> dict:
    """{name: {replica: value}} once two reads a few report intervals apart agree."""
    last = None
    for _ in range(int(METRICS_WAIT_S / (4 * METRICS_REPORT_MS / 1000))):
        now = {name: ray_metrics(name, app) for name in names}
        if now == last:
            return now
        last = now
        time.sleep(4 * METRICS_REPORT_MS / 1000)
    raise AssertionError(f"Ray's metrics did not settle: {last}")


def replica_actors() -> list:
    """The live replica actors of the application, through Ray's named actors."""
    import ray

    from listenloop.server.cluster import APP_NAME

    return [ray.get_actor(a["name"], namespace=a["namespace"])
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#")]


# -- tests -----------------------------------------------------------------------------------

COUNTED = ("listenloop_sessions_served_total", "listenloop_replies_total", "listenloop_chunks_decided_total")


def test_eight_clients_on_two_replicas_get_the_single_process_events(cluster, expected):
    from listenloop.server.cluster import APP_NAME

    before = settled_metrics(COUNTED, APP_NAME)
    runs, _ = run(_all_open_then_stream(cluster))
    for r in runs:
        assert not isinstance(r, BaseException), r
        assert r.complete, (r.protocol, r.recording, r.events[-3:])
        assert r.events == expected[key(r)], (r.protocol, r.recording)
    # what the comparison covers: replies and, on /v1/realtime, every listenloop.* event
    assert any(e.get("text") == "Someone is at the door." for r in runs for e in r.events)
    assert any(e["type"] == "listenloop.decision" for r in runs if r.protocol == "realtime" for e in r.events)

    # each replica counted what its own clients were sent, on Ray's metrics endpoint
    def sent(kinds):
        return sum(1 for r in runs for e in r.events if e.get("event", e.get("type")) in kinds)

    after = settled_metrics(COUNTED, APP_NAME)
    served = {replica: n - before["listenloop_sessions_served_total"].get(replica, 0)
              for replica, n in after["listenloop_sessions_served_total"].items()}
    assert sorted(served.values()) == [0] * (len(served) - REPLICAS) + [SESSIONS_PER_REPLICA] * REPLICAS, served
    for name, kinds in (("listenloop_replies_total", ("ReplyEnded", "response.done")),
                        ("listenloop_chunks_decided_total", ("Decision", "listenloop.decision"))):
        delta = sum(after[name].values()) - sum(before[name].values())
        assert delta == sent(kinds) > 0, name


async def _past_the_cap(url):
    async with aiohttp.ClientSession() as http:
        held = []
        for _ in range(REPLICAS * SESSIONS_PER_REPLICA):
            held.append(await http.ws_connect(f"{url}/v1/pcm"))
            assert (await held[-1].receive_json(timeout=60))["event"] == "Ready"
        # every replica is full: one replica's worth of new sessions wait at Ray's proxy ...
        waiting = []
        for _ in range(SESSIONS_PER_REPLICA):
            waiting.append(asyncio.create_task(http.ws_connect(f"{url}/v1/pcm")))
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        assert not any(w.done() for w in waiting)
        # ... and one more is refused at once, before the upgrade
        started = time.monotonic()
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{url}/v1/pcm")
        assert refused.value.status >= 500 and time.monotonic() - started < 10
        await held.pop().close()  # a slot frees: the first waiting session gets it
        ws = await asyncio.wait_for(waiting[0], 60)
        assert (await ws.receive_json(timeout=60))["event"] == "Ready"
        for w in waiting[1:]:
            w.cancel()
        for ws in [*held, ws]:
            await ws.close()


def test_beyond_every_replicas_cap_sessions_wait_then_are_refused(cluster):
    run(_past_the_cap(cluster))


async def _kill_one_replica(url):
    import ray

    killed = {}

    async def kill():
        await asyncio.sleep(KILL_AFTER_S)
        victim = replica_actors()[0]
        killed["at"] = time.monotonic()
        ray.kill(victim, no_restart=True)

    runs, _ = await _all_open_then_stream(url, during=kill)
    reconnect = await pcm_client(url, "front_door.wav")  # after the survivors finished
    return runs, killed["at"], reconnect


def test_a_killed_replica_closes_its_clients_and_the_others_finish(cluster, expected):
    runs, killed_at, reconnect = run(_kill_one_replica(cluster))
    for r in runs:
        assert not isinstance(r, BaseException), r
    cut = [r for r in runs if not r.complete]
    whole = [r for r in runs if r.complete]
    assert len(cut) == SESSIONS_PER_REPLICA and len(whole) == 8 - SESSIONS_PER_REPLICA, \
        [(r.protocol, r.recording, r.complete) for r in runs]
    for r in cut:  # closed by the server side within the deadline, never left hanging
        assert r.closed_at is not None and r.closed_at - killed_at < CLOSE_DEADLINE_S, (r.protocol, r.recording)
        assert r.close_code == 1006  # Ray's proxy drops the connection without a close frame (docs/SERVE.md)
        assert r.events == expected[key(r)][:len(r.events)]  # what came before the close was right
    for r in whole:  # untouched
        assert r.events == expected[key(r)], (r.protocol, r.recording)
    assert reconnect.complete and reconnect.events == expected[("pcm", "front_door.wav")]


async def _page_and_checks(url, port):
    async with aiohttp.ClientSession() as http:
        # the probes of `listenloop serve`, each answered by the replica the router picks
        health = await http.get(f"{url}/healthz")
        assert health.status == 200 and await health.json() == {"status": "ok"}
        ready = await http.get(f"{url}/readyz")
        assert ready.status == 200 and await ready.json() == {"status": "ready"}
        assert (await http.get(f"{url}/readyz", headers={"Origin": "https://evil.example"})).status == 403
        assert (await http.get(f"{url}/metrics")).status == 404  # Ray's metrics endpoint has them
        page = await http.get(f"{url}/")
        assert page.status == 200 and "<html" in (await page.text()).lower()
        assert (await http.get(f"{url}/static/.hidden")).status == 404
        refused = await http.get(f"{url}/", headers={"Host": "evil.example"})  # DNS rebinding, as in test_server
        assert refused.status == 403 and (await refused.json())["error"]["code"] == "host_not_allowed"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refusal:  # refused before the upgrade, as aiohttp does
            await http.ws_connect(f"{url}/v1/pcm?rate=100")
        assert refusal.value.status == 400
        with pytest.raises(aiohttp.WSServerHandshakeError) as refusal:
            await http.ws_connect(f"{url}/v1/pcm", origin="https://evil.example")
        assert refusal.value.status == 403


def test_the_page_and_the_checks_of_the_single_process_server(cluster):
    run(_page_and_checks(cluster, int(cluster.rsplit(":", 1)[1])))


async def _drain(url: str, notice, stop) -> tuple:
    """A /v1/realtime and a /v1/pcm session open while the replica drains, then is stopped."""
    import ray

    async with aiohttp.ClientSession() as http:
        realtime = await http.ws_connect(f"{url}/v1/realtime")
        assert (await realtime.receive_json(timeout=60))["type"] == "session.created"
        pcm = await http.ws_connect(f"{url}/v1/pcm")
        assert (await pcm.receive_json(timeout=60))["event"] == "Ready"
        await asyncio.to_thread(ray.get, notice.drain.remote())
        for _ in range(300):  # the replica follows the notice at once; generous for a busy machine
            ready = await http.get(f"{url}/readyz")
            if ready.status == 503:
                break
            await asyncio.sleep(0.1)
        assert ready.status == 503 and await ready.json() == {"status": "unavailable", "reason": "draining"}
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:  # no new sessions ...
            await http.ws_connect(f"{url}/v1/pcm")
        assert refused.value.status == 503
        await pcm.send_bytes(np.zeros(CHUNK_SAMPLES, "<f4").tobytes())  # ... the open ones run on
        decision = await pcm.receive_json(timeout=60)
        while decision["event"] != "Decision":
            decision = await pcm.receive_json(timeout=60)
        stopping = asyncio.create_task(asyncio.to_thread(stop))
        closed = await asyncio.gather(_closed(realtime), _closed(pcm))
        await asyncio.wait_for(stopping, 60)
    return closed


async def _closed(ws) -> tuple:
    """(events, close code, close reason) once the server closed `ws`."""
    events = []
    while (msg := await ws.receive(timeout=60)).type == aiohttp.WSMsgType.TEXT:
        events.append(json.loads(msg.data))
    return events, ws.close_code, msg.extra if msg.type == aiohttp.WSMsgType.CLOSE else None


def test_stopping_drains_the_replicas_and_closes_what_is_left_with_1001(ray_serve):
    from ray import serve

    from listenloop.server.cluster import build, new_drain_notice, stop_application

    notice = new_drain_notice(DRAIN_APP)
    serve.run(build(1, max_sessions=4, drain_timeout_s=DRAIN_S), name=DRAIN_APP, route_prefix=DRAIN_PREFIX)
    try:
        (realtime_events, *realtime_close), (pcm_events, *pcm_close) = run(_drain(
            f"{ray_serve}{DRAIN_PREFIX}", notice, lambda: stop_application(DRAIN_APP, notice)))
    finally:
        serve.delete(DRAIN_APP)
    # the Realtime client is told why in its protocol, then both get 1001 (not Ray's 1006)
    assert realtime_events[-1]["type"] == "error", realtime_events[-3:]
    assert realtime_events[-1]["error"]["code"] == "server_shutting_down"
    assert realtime_close == pcm_close == [1001, "server shutting down"]
    assert not [e for e in pcm_events if e["event"] in ("Error", "Fault")]


async def _sigterm(server) -> tuple:
    await server.ready(timeout=150)  # a Ray of its own, and a replica that loads the model
    async with aiohttp.ClientSession() as http:
        realtime = await http.ws_connect(f"{server.url}/v1/realtime")
        assert (await realtime.receive_json(timeout=60))["type"] == "session.created"
        server.signal(signal.SIGTERM)
        closed = await _closed(realtime)
    return closed, await server.exit_code(60)


@pytest.mark.timeout(300)  # a Ray of its own starts and stops
def test_sigterm_of_serve_replicas_drains_then_closes_with_1001_and_exits_143():
    from test_server_ops import ServeProcess

    server = ServeProcess("--replicas", "1", "--drain-timeout", "1")
    try:
        (events, *close), code = run(_sigterm(server), timeout=240)
    finally:
        err = server.close()
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "server_shutting_down", events[-3:]
    assert close == [1001, "server shutting down"]
    assert code == 143, err
    assert "Traceback" not in err


# -- without a running Ray -------------------------------------------------------------------

def test_the_serve_config_file_builds_the_application():
    import importlib

    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "docs" / "serve_config.yaml").read_text()))
    (app,) = config.applications
    assert config.http_options.host == "127.0.0.1"
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary  # what `serve run` calls

    module, name = app.import_path.split(":")
    application = call_user_app_builder_with_args_if_necessary(getattr(importlib.import_module(module), name),
                                                               app.args)
    deployment = application._bound_deployment
    assert deployment.num_replicas == app.args["replicas"] == 2
    assert deployment.max_ongoing_requests == app.args["max_sessions"]  # the replica's cap is Ray's


def test_autoscaling_is_on_open_sessions_between_min_and_max():
    from listenloop.server.cluster import TARGET_LOAD, build

    deployment = build(2, 1, 4, max_sessions=8)._bound_deployment
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.initial_replicas, scaling.max_replicas) == (1, 2, 4)
    assert scaling.target_ongoing_requests == TARGET_LOAD * 8 and deployment.max_ongoing_requests == 8


def test_bad_replica_options_get_one_error_line(capsys):
    from listenloop import cli

    for argv, message in [(["--replicas", "0"], "--replicas must be at least 1, got 0"),
                          (["--replicas", "2", "--min-replicas", "1"], "--min-replicas and --max-replicas go together"),
                          (["--replicas", "2", "--min-replicas", "3", "--max-replicas", "4"], "autoscaling needs"),
                          (["--min-replicas", "1", "--max-replicas", "2"], "--min-replicas needs --replicas N"),
                          (["--ray-address", "auto"], "--ray-address needs --replicas N")]:
        assert cli.main(["serve", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"listenloop: error: {message}") and err.count("\n") == 1, (argv, err)


def test_the_single_process_server_never_imports_ray():
    import subprocess
    import sys

    code = ("import sys, listenloop, listenloop.cli\n"
            "from listenloop.server import app, connection, drain, health, metrics, pcm, realtime, state, transport\n"
            "listenloop.cli._parser()\n"
            "print(sorted(m for m in ('ray', 'fastapi', 'starlette') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
