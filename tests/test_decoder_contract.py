"""The two decoder graphs through the runtime (docs/DESIGN.md, "Decoder graph contract"): the
grouped graph and the GroupQueryAttention graph give the same events, and the gqa steps keep
fixed shapes and addresses, bound once per step kind (what CUDA graphs capture)."""
from __future__ import annotations

import numpy as np
import pytest

from listenloop.engine import Engine
from listenloop.protocol import STEP

pytest.importorskip("torch")


def _vectors(n: int, hidden: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 10, hidden)).astype(np.float32)


def engine_events(engine: Engine, chunks: np.ndarray, reply_tokens: int = 6) -> list:
    """Decisions (p_speak) and reply tokens, chunk by chunk."""
    out = []
    for audio in chunks:
        result = engine.listen(audio)
        tokens = [step.token for step in engine.speak(reply_tokens)] if result.spoke else []
        out.append((result.spoke, result.p_speak, result.context_reset is not None, tokens))
    return out


def assert_same_engine_events(a: list, b: list, precision: str) -> None:
    """Two graphs' engine_events: replies and resets happened, every decision, reset and reply
    token is the same, and p_speak agrees to the precision's parity tolerance."""
    assert sum(row[0] for row in a) >= 3 and sum(row[2] for row in a) >= 2  # replies and resets happened
    assert [(s, r, t) for s, _, r, t in a] == [(s, r, t) for s, _, r, t in b]
    tolerance = 2e-3 if precision == "fp16" else 1e-4
    np.testing.assert_allclose([row[1] for row in a], [row[1] for row in b], atol=tolerance)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int4"])
def test_gqa_and_grouped_graphs_give_the_same_events(tiny_package_at, precision):
    grouped, gqa = (Engine(tiny_package_at(precision, attention), speak_bias=2.0, max_context=302)
                    for attention in ("grouped", "gqa"))
    assert grouped.model.attention == "grouped" and gqa.model.attention == "gqa"
    chunks = _vectors(60, grouped.model.hidden)  # 60 chunks through 302 positions: resets too
    assert_same_engine_events(engine_events(grouped, chunks), engine_events(gqa, chunks), precision)


def test_gqa_steps_bind_once_per_kind_at_fixed_addresses(tiny_package_at, monkeypatch):
    engine = Engine(tiny_package_at("fp32", "gqa"), speak_bias=2.0, max_context=400)
    stream = engine.stream
    binds = []
    original = stream.cache._bind_shared
    monkeypatch.setattr(stream.cache, "_bind_shared", lambda binder, T: (binds.append(T), original(binder, T)))
    staging = [a.ctypes.data for a in (stream._embeds, stream._positions, stream._seqlens, stream._total,
                                        stream._logits, stream._logits_index)]
    cache = stream.kv_cache.ctypes.data
    assert stream.kv_cache.shape[1:] == (1, engine.model.kv_heads, 400, engine.model.head_dim)  # head-major
    chunks = _vectors(20, engine.model.hidden, seed=1)
    events = engine_events(engine, chunks)
    assert sum(row[0] for row in events) >= 2
    steady, reply = binds.count(STEP), binds.count(1)
    assert steady == 1 and reply == 1, binds  # each step kind bound once, then only values change
    assert all(T > STEP for T in binds if T not in (STEP, 1))  # the prompt and re-prefills: a third binding
    assert [a.ctypes.data for a in (stream._embeds, stream._positions, stream._seqlens, stream._total,
                                    stream._logits, stream._logits_index)] == staging
    assert stream.kv_cache.ctypes.data == cache
    assert int(stream._total) == 400  # the buffer's length, never rewritten
    assert int(stream._seqlens[0]) == engine.position - 1


def test_captured_step_kinds_run_from_fixed_device_staging(tiny_package_at):
    """The CUDA-graph path (inputs and logits in fixed OrtValues, copied around each run, graph
    ids per step kind), run here with CPU OrtValues: the same events as plain binding."""
    package = tiny_package_at("fp32", "gqa")
    plain = Engine(package, speak_bias=2.0, max_context=400)
    captured = Engine(package, speak_bias=2.0, max_context=400)
    captured.model.cuda_graphs = True  # what a CUDA profile with enable_cuda_graph sets
    captured.stream.cache._graph_capture = True
    chunks = _vectors(24, plain.model.hidden, seed=2)
    a, b = engine_events(plain, chunks), engine_events(captured, chunks)
    assert sum(row[0] for row in a) >= 2
    assert [(s, t) for s, _, _, t in a] == [(s, t) for s, _, _, t in b]
    np.testing.assert_allclose([row[1] for row in a], [row[1] for row in b], atol=1e-6)
    binders = captured.stream.cache._step_binders
    assert binders[STEP].staging is not None and binders[1].staging is not None
    staged = binders[STEP].staging
    addresses = (staged.embeds.data_ptr(), staged.positions.data_ptr(), staged.logits.data_ptr())
    engine_events(captured, chunks[:4])
    assert (staged.embeds.data_ptr(), staged.positions.data_ptr(), staged.logits.data_ptr()) == addresses


def test_cuda_graphs_are_dropped_with_one_warning_for_a_grouped_package(tiny_package_at, caplog):
    from listenloop.model import Model
    from listenloop.profiles import Profile

    profile = Profile(name="graphs", providers=(("CUDAExecutionProvider", {"enable_cuda_graph": True}),
                                                ("CPUExecutionProvider", {})), kv_cache_device="cuda")
    model = Model.__new__(Model)  # only the option check, no GPU needed
    model.profile, model.attention, model.slots = profile, "grouped", 0
    with caplog.at_level("WARNING", logger="listenloop"):
        assert model._cuda_graphs() is False
    assert "--attention gqa" in caplog.text
    assert "enable_cuda_graph" not in model.profile.providers_for("decoder")[0][1]
    model.profile, model.attention = profile, "gqa"
    assert model._cuda_graphs() is True


@pytest.mark.parametrize("attention", ["grouped", "gqa"])
def test_steady_steps_allocate_no_arrays(tiny_package_at, attention):
    """A listening step writes into buffers made once: no array of the vocabulary's, the staging's
    or the cache's size is allocated per step (Python heap, NumPy included; ONNX Runtime reuses
    its own planned buffers). What remains is about a kilobyte of Python objects, freed at the
    step's end: the step's generator frames (stream.listen_steps, which a batching scheduler
    drives) and the StopIteration that returns its result."""
    import tracemalloc

    engine = Engine(tiny_package_at("fp32", attention), speak_bias=-1e4, max_context=4096, quiet_resets=False)
    chunks = _vectors(10, engine.model.hidden, seed=3)
    smallest_array = 4 * min(engine.model.vocab, 10 * engine.model.hidden)  # a logits row or a chunk's vectors
    peaks = []
    tracemalloc.start()
    try:
        for n in range(60):
            tracemalloc.reset_peak()
            before, _ = tracemalloc.get_traced_memory()
            engine.listen(chunks[n % len(chunks)])
            if n >= 10:  # after the prompt and the steady step's first binding
                peaks.append(tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
    # Memory over hours is the soak test's (tests/test_soak.py).
    assert max(peaks) < smallest_array, (max(peaks), smallest_array)
