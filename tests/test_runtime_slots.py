"""Fixed-slot batching through the runtime (docs/DESIGN.md, "Fixed-slot batching"), on CPU with
a profile that sets "slots": a stream's events, replies included, are the same alone and among
other streams with other audio, whatever slot it gets and whoever joins or leaves meanwhile;
they match the one-stream-per-call path's; a stream beyond the slots is refused in one line.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import listenloop
from listenloop.engine import Engine
from listenloop.errors import CapacityError, DeviceError, SessionClosedError
from listenloop.model import Model
from listenloop.profiles import load_profile, profiles_dir
from test_decoder_contract import assert_same_engine_events, engine_events
from test_determinism import signature, _tiny_audio

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
SLOTS = 4
CONTEXT = 302  # small enough that 16 s of audio resets the context: re-prefills span several steps


def _profile(tmp_path, slots=SLOTS, name="cpu-slots"):
    data = json.loads((profiles_dir() / "cpu.json").read_text())
    data.update(name=name, slots=slots)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def package(tiny_package_at):
    return tiny_package_at("fp32", "grouped", slots=True)


@pytest.fixture()
def runtime(package, tmp_path):
    with listenloop.Runtime(package, _profile(tmp_path), max_context=CONTEXT, speak_bias=1.0) as rt:
        yield rt


def _events(session, pcm, piece=16000) -> list:
    for start in range(0, len(pcm), piece):
        session.accept_waveform(pcm[start:start + piece])
    session.finish(timeout=120)
    return signature(session.events(timeout=5))


def _count_shared_calls(pool) -> tuple[list, list]:
    """Record how many slots each decoder step and each encoder call of `pool` carried."""
    carried, encoded, staged = [], [], set()
    real_step, real_stage, real_encode = pool.step, pool.stage_chunk, pool.encode

    def step():
        carried.append(int((pool.new_lengths > 0).sum()))
        real_step()

    def stage_chunk(slot, generation, mel):
        staged.add(slot)
        real_stage(slot, generation, mel)

    def encode():
        encoded.append(len(staged))
        staged.clear()
        real_encode()

    pool.step, pool.stage_chunk, pool.encode = step, stage_chunk, encode
    return carried, encoded


def _kinds(events) -> list:
    return [e["event"] for e in events]


def test_events_are_the_same_alone_and_among_streams_joining_and_leaving(runtime):
    pcm = _tiny_audio(16.0, seed=3)
    with runtime.session() as s:
        alone = _events(s, pcm)
        assert s.stream.cache.slot == 0
    kinds = _kinds(alone)
    assert "ReplyEnded" in kinds and "ContextReset" in kinds and kinds.count("Decision") == 40
    carried, encoded = _count_shared_calls(runtime.model.slot_pool)

    a, b = runtime.session(), runtime.session()  # slots 0 and 1
    feeders = [threading.Thread(target=_feed_until_closed, args=(s, _tiny_audio(16.0, seed=seed)))
               for s, seed in ((a, 11), (b, 12))]
    for t in feeders:
        t.start()
    x = runtime.session()  # joins while they run: slot 2
    assert x.stream.cache.slot == 2
    x.accept_waveform(pcm[:6 * 16000])
    _wait_for(lambda: x.stats().chunks >= 8)
    a.close()  # leaves in the middle of its audio: slot 0 is free again
    c = runtime.session()  # and a new stream takes it while x is in the middle of its own
    assert c.stream.cache.slot == 0
    feeders.append(threading.Thread(target=_feed_until_closed, args=(c, _tiny_audio(12.0, seed=13))))
    feeders[-1].start()
    among = _events(x, pcm[6 * 16000:], piece=1600)
    for t in feeders:
        t.join(120)
    for s in (b, c, x):
        s.close()
    assert among == alone
    assert max(carried) >= 3, carried  # steps really were shared by several streams
    assert max(encoded) >= 2, encoded  # and so were encoder calls (mostly the streams are replying)


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_a_chunks_vectors_do_not_depend_on_the_other_rows_of_the_encoder_batch(precision, tiny_package_at, tmp_path):
    from listenloop.encoder import ChunkBatch

    model = Model(tiny_package_at(precision, "grouped", slots=True), _profile(tmp_path), max_context=CONTEXT)
    mels = np.random.default_rng(5).normal(size=(SLOTS + 1, 128, 40)).astype(np.float32)
    batch = ChunkBatch(model, SLOTS)
    batch.stage(0, mels[0])
    batch.run()
    alone = batch.vectors(0)
    for row in range(SLOTS):  # the same chunk in every row, the other rows holding other chunks
        for other in range(SLOTS):
            batch.stage(other, mels[0] if other == row else mels[1 + other])
        batch.run()
        assert np.array_equal(batch.vectors(row), alone)
    np.testing.assert_allclose(alone, model.encode(mels[0])[0], rtol=0, atol=1e-5)  # B = 1, other kernels


def _feed_until_closed(session, pcm) -> None:
    try:
        _events(session, pcm)
    except SessionClosedError:  # closed by the test while it was fed
        pass


def _wait_for(condition, timeout=60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the model thread made no progress"
        time.sleep(0.01)


def test_a_stream_beyond_the_slots_is_refused_in_one_line(runtime):
    sessions = [runtime.session() for _ in range(SLOTS)]
    with pytest.raises(CapacityError, match=r"no free KV-cache slot: profile 'cpu-slots' has \"slots\": 4, every one in use; close a session"):
        runtime.session()
    assert runtime.model.slot_pool.in_use() == SLOTS
    sessions[1].close()
    again = runtime.session()  # the freed slot is taken
    assert again.stream.cache.slot == 1
    for s in sessions + [again]:
        s.close()
    assert runtime.model.slot_pool.in_use() == 0


def test_a_dropped_stream_gives_its_slot_back(package, tmp_path):
    engine = Engine(package, _profile(tmp_path), max_context=CONTEXT)
    pool = engine.model.slot_pool
    streams = [engine.model.stream() for _ in range(SLOTS - 1)]  # the engine's own stream holds slot 0
    with pytest.raises(CapacityError):
        engine.model.stream()
    del streams[0]  # dropped without close(): its slot comes back with it
    assert pool.in_use() == SLOTS - 1
    assert engine.model.stream().cache.slot == 1


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_slot_path_matches_the_one_stream_path(tiny_package_at, tmp_path, precision):
    """Through Engine (a caller driving one stream: each step is made alone). Not bit for bit:
    the two graphs add in other orders (the slot graph reads the whole buffer under a mask), so
    p_speak agrees to the parity tolerances of tests/test_decoder_contract.py and every
    decision, reset and reply token is the same."""
    package = tiny_package_at(precision, "grouped", slots=True)
    plain = Engine(package, max_context=CONTEXT, speak_bias=2.0)
    slots = Engine(package, _profile(tmp_path), max_context=CONTEXT, speak_bias=2.0)
    assert plain.model.slots == 0 and slots.model.slots == SLOTS
    chunks = np.random.default_rng(0).normal(0, 1, (60, 10, plain.model.hidden)).astype(np.float32)
    assert_same_engine_events(engine_events(plain, chunks), engine_events(slots, chunks), precision)


def test_runtime_events_match_the_one_stream_path(package, runtime):
    pcm = _tiny_audio(16.0, seed=5)
    with listenloop.Runtime(package, max_context=CONTEXT, speak_bias=1.0) as plain, plain.session() as s:
        reference = _events(s, pcm)
    with runtime.session() as s:
        batched = _events(s, pcm)

    def without(events, *fields):
        return [{k: v for k, v in e.items() if k not in fields} for e in events]

    assert without(batched, "p_speak", "kv_bytes") == without(reference, "p_speak", "kv_bytes")
    np.testing.assert_allclose([e["p_speak"] for e in batched if "p_speak" in e],
                               [e["p_speak"] for e in reference if "p_speak" in e], atol=1e-4)


def test_captured_step_runs_from_fixed_device_staging(package, tmp_path):
    """The CUDA-graph form of the pool (inputs and logits in fixed OrtValues, copied around each
    step, graph id 1), run here with CPU OrtValues: the same events as plain binding."""
    from listenloop.slot_pool import SlotPool

    plain = Engine(package, _profile(tmp_path), max_context=CONTEXT, speak_bias=2.0)
    captured = Engine(package, _profile(tmp_path), max_context=CONTEXT, speak_bias=2.0)
    captured.model.cuda_graphs = True  # what a CUDA profile with enable_cuda_graph sets
    pool = captured.model.slot_pool = SlotPool(captured.model, SLOTS)
    captured.stream = captured.model.stream(speak_bias=2.0)
    s = captured.stream
    captured.listen, captured.speak = s.listen, s.speak
    assert pool._staging is not None
    addresses = [v.data_ptr() for v in pool._staging._values] + [pool._staging.logits.data_ptr()]
    chunks = np.random.default_rng(2).normal(0, 1, (24, 10, plain.model.hidden)).astype(np.float32)
    a, b = engine_events(plain, chunks), engine_events(captured, chunks)
    assert sum(row[0] for row in a) >= 2
    assert a == b
    assert [v.data_ptr() for v in pool._staging._values] + [pool._staging.logits.data_ptr()] == addresses


def test_profile_slots_are_checked(tmp_path):
    assert load_profile("cuda").slots == 64 and load_profile("cuda-graphs").slots == 64
    assert load_profile("cpu").slots is None
    for bad in (0, -1, 2.5, "64", True, 5000):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({"providers": [["CPUExecutionProvider", {}]], "slots": bad}))
        with pytest.raises(DeviceError, match=r"bad\.json: slots"):
            load_profile(path)


def test_slots_without_a_slot_decoder_run_one_stream_per_call(tiny_package, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="listenloop"):
        model = Model(tiny_package, _profile(tmp_path))
    assert model.slots == 0 and model.slot_pool is None
    assert "no slot decoder" in caplog.text and "--slots" in caplog.text


@pytest.fixture(scope="module")
def demo_package(tmp_path_factory):
    from listenloop.export.package import export_package

    return export_package(ROOT / "demo" / "checkpoint", tmp_path_factory.mktemp("demo") / "fp32-slots",
                          precision="fp32", slots=True)


def test_demo_model_events_alone_among_others_and_against_the_one_stream_path(demo_package, tmp_path):
    """The trained demo model on the example recordings (fp32: int8 is not exported with slots).
    Against the one-stream path every event is the same but p_speak, which agrees within 1e-5
    (the graphs add in other orders); among three other recordings, everything is the same."""
    names = ("kitchen.wav", "front_door.wav", "living_room.wav", "quiet_evening.wav")
    recordings = [sf.read(ROOT / "examples" / name, dtype="float32")[0] for name in names]
    with listenloop.Runtime(demo_package, max_context=768) as plain, plain.session() as s:
        reference = _events(s, recordings[0])
    with listenloop.Runtime(demo_package, _profile(tmp_path), max_context=768) as rt:
        with rt.session() as s:
            alone = _events(s, recordings[0])
        carried, encoded = _count_shared_calls(rt.model.slot_pool)
        sessions = [rt.session() for _ in names]
        results = [None] * len(names)

        def feed(i):
            results[i] = _events(sessions[i], recordings[i])

        threads = [threading.Thread(target=feed, args=(i,)) for i in (3, 2, 1, 0)]  # kitchen.wav joins last
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        for s in sessions:
            s.close()
    assert sum(e["event"] == "ReplyEnded" for e in alone) >= 2
    assert results[0] == alone
    assert max(carried) >= 3 and max(encoded) >= 3, (carried, encoded)
    stripped = [{k: v for k, v in e.items() if k not in ("p_speak", "kv_bytes")} for e in alone]
    assert stripped == [{k: v for k, v in e.items() if k not in ("p_speak", "kv_bytes")} for e in reference]
    np.testing.assert_allclose([e["p_speak"] for e in alone if "p_speak" in e],
                               [e["p_speak"] for e in reference if "p_speak" in e], atol=1e-5)


def test_the_server_refuses_a_connection_beyond_the_slots_with_503(package, tmp_path):
    import aiohttp

    from test_server import run, serving

    async def scenario(url):
        async with aiohttp.ClientSession() as http:
            first = await http.ws_connect(f"{url}/v1/pcm")
            assert (await first.receive_json(timeout=10))["event"] == "Ready"
            response = await http.get(f"{url}/v1/pcm", headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                                                "Sec-WebSocket-Version": "13",
                                                                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
            body = await response.json()
            assert response.status == 503 and body["error"]["code"] == "session_limit"
            assert "no free KV-cache slot" in body["error"]["message"]
            await first.close()

    with listenloop.Runtime(package, _profile(tmp_path, slots=1), max_context=CONTEXT) as rt:
        with serving(rt, max_sessions=4) as server:
            run(scenario(server.http))


def test_a_slot_is_zeroed_in_every_buffer_and_nothing_else():
    """The device clear's region arithmetic (slot_pool.zero_slot), run with the C library's
    memset on host buffers of the pool's layout [S, KVH, C + 13, D]; cudaMemset takes the same
    arguments on a GPU."""
    import ctypes

    from listenloop.slot_pool import zero_slot

    libc = ctypes.CDLL(None)
    libc.memset.argtypes, libc.memset.restype = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t], ctypes.c_void_p
    buffers = [np.full((SLOTS, 2, 7, 3), float(i + 1), np.float16) for i in range(4)]
    slot_nbytes = buffers[0][0].nbytes
    zero_slot([b.ctypes.data for b in buffers], 2, slot_nbytes, libc.memset)
    for i, b in enumerate(buffers):
        assert (b[2] == 0).all()
        assert (np.delete(b, 2, axis=0) == i + 1).all()
