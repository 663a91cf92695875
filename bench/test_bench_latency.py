"""The figures of `listenloop bench` through pytest-benchmark, on the exporter's tiny package.

    pytest bench/test_bench_latency.py --benchmark-only
    pytest bench/test_bench_latency.py --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Groups (compare medians within a group):
  listen-step      one steady 13-token listening step (Engine.listen) with ~100 tokens cached, and
                   the whole per-chunk step (C++ mel + encoder + decoder + decision)
  listen-torch     the same encoder + decoder step through the PyTorch reference (transformers
                   classes, KV cache), torch threads = ORT intra-op threads
  ttfr             encoder + listening step with TEXT_BEGIN forced (speak_bias=+50) + first reply
                   token, on the Engine; and the end-to-end Session run (real-time 20 ms blocks,
                   TTFR median in extra_info)
  reply            one reply token (decode speed = 1 / median)
  catch-up         8 queued chunks decided by one listen_many call right after a reply
  context          one listening step with 2000 tokens cached
  precision        one decoder listening step per decoder precision (fp32 / int8 / int4)
  startup          package load to first decision
Replies on the random model are scripted (listenloop.bench.ScriptedReplies): text tokens,
then TEXT_END after a fixed count.
"""
from __future__ import annotations

import numpy as np
import pytest

from listenloop import bench
from listenloop.engine import Engine

pytest.importorskip("pytest_benchmark")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pytest.importorskip("torch")
    from listenloop.export.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("bench-checkpoint") / "tiny", seed=0)


@pytest.fixture(scope="module")
def package_at(checkpoint, tmp_path_factory):
    from listenloop.export.package import export_package

    root, cache = tmp_path_factory.mktemp("bench-packages"), {}

    def build(precision="fp32"):
        if precision not in cache:
            cache[precision] = export_package(checkpoint, root / precision, precision=precision)
        return cache[precision]

    return build


@pytest.fixture(scope="module")
def engine(package_at) -> Engine:
    return bench.make_engine(package_at("fp32"), reply_tokens=16)


@pytest.fixture(scope="module")
def mels():
    return bench.chunk_mels(bench.synthetic_audio(16 * bench.CHUNK_SECONDS, seed=0))


def _primed(engine, mels, tokens=100):
    """Engine after the prefix step and enough silent steps to hold about `tokens` tokens."""
    engine.reset()
    engine.speak_bias = bench.NEVER_SPEAK
    embeds = engine.encode(mels)
    while engine.position < tokens:
        engine.listen(embeds[engine.position % len(embeds)])
    return embeds


@pytest.mark.benchmark(group="listen-step")
def test_decoder_listening_step(benchmark, engine, mels):
    embeds = _primed(engine, mels)

    def step():
        if engine.position > 1000:  # stay at a comparable cache length
            _primed(engine, mels)
        return engine.listen(embeds[3])

    result = benchmark(step)
    assert not result.spoke  # speak_bias -50 keeps it listening
    assert benchmark.stats["median"] < bench.CHUNK_SECONDS  # keeps up with real time


@pytest.mark.benchmark(group="listen-step")
def test_whole_listening_step(benchmark, engine, mels):
    from listenloop import _core

    _primed(engine, mels)
    audio = bench.synthetic_audio(bench.CHUNK_SECONDS, seed=1)
    streaming = _core.StreamingMel(bench.CHUNK)

    def step():
        if engine.position > 1000:
            _primed(engine, mels)
        return engine.listen(engine.encode(streaming(audio)[None])[0])

    benchmark(step)
    headroom = benchmark.stats["median"] / bench.CHUNK_SECONDS
    benchmark.extra_info["headroom"] = headroom
    assert headroom < 1, f"slower than real time: {headroom:.2f} of each 0.4 s chunk"


@pytest.mark.benchmark(group="listen-torch")
def test_torch_reference_listening_step(benchmark, checkpoint, engine, mels):
    torch = pytest.importorskip("torch")
    from listenloop.export.reference import TorchReference

    torch.set_num_threads(engine.decoder.get_session_options().intra_op_num_threads or 1)
    reference = TorchReference(checkpoint)
    reference.listen(reference.encode(mels[:1])[0])
    reference._speaking, reference._previous = False, reference.tokens["KEEP_SILENCE"]

    def step():
        if reference.position > 1000:  # same cache lengths as ours
            reference.reset()
            reference.listen(reference.encode(mels[:1])[0])
        result = reference.listen(reference.encode(mels[3][None])[0])
        if result.spoke:  # the random model often speaks here: go on as if it had kept silent,
            reference._speaking = False  # so every timed step is one 13-token listening step
            reference._previous = reference.tokens["KEEP_SILENCE"]
        return result

    benchmark.pedantic(step, rounds=30, iterations=1, warmup_rounds=2)


@pytest.mark.benchmark(group="listen-torch")
def test_torch_side_by_side(benchmark, checkpoint, engine, mels):
    """Same chunks through both: decisions at fp32 must be identical; the ratio goes to extra_info."""
    pytest.importorskip("torch")
    threads = engine.decoder.get_session_options().intra_op_num_threads or 1
    figures = benchmark.pedantic(bench.compare_torch, args=(engine, checkpoint, mels, 5, threads), rounds=1, iterations=1)
    benchmark.extra_info.update(step_speedup=figures["step_speedup"], ttfr_speedup=figures["ttfr_speedup"],
                                decision_agreement=figures["decision_agreement"])
    assert figures["decisions_agree"] == figures["decisions"] >= 10


@pytest.mark.benchmark(group="ttfr")
def test_engine_ttfr(benchmark, engine, mels):
    """Triggering chunk's encoder + listening step + first reply token (speak_bias +50)."""

    def setup():
        _primed(engine, mels, tokens=1)
        engine.speak_bias = bench.ALWAYS_SPEAK
        return (), {}

    tokens = []

    def first_reply_token():
        result = engine.listen(engine.encode(mels[5][None])[0])
        reply = engine.speak()
        tokens.append(next(reply).token)
        reply.close()
        return result

    result = benchmark.pedantic(first_reply_token, setup=setup, rounds=40, warmup_rounds=2)
    engine.speak_bias = bench.NEVER_SPEAK
    assert result.spoke
    assert engine.tokens["TEXT_END"] not in tokens  # the scripted reply starts with text


@pytest.mark.benchmark(group="ttfr")
def test_session_ttfr_end_to_end(benchmark, package_at):
    """A Session fed 20 ms blocks in real time for 2 s; every chunk triggers a short reply."""
    startup, runtime = bench.measure_startup(package_at("fp32"), "cpu", reply_tokens=4)
    figures = benchmark.pedantic(bench.measure_session, args=(runtime, 5, 4, 1), rounds=1, iterations=1)
    benchmark.extra_info.update(ttfr_median_ms=figures["ttfr_ms"]["median"], ttfr_p90_ms=figures["ttfr_ms"]["p90"])
    assert figures["decisions"] >= 5 and figures["replies"] >= 5
    assert figures["ttfr_ms"]["n"] >= 4
    assert 0 < figures["ttfr_ms"]["median"] < 400  # a reply begins before the next chunk is complete


@pytest.mark.benchmark(group="reply")
def test_reply_token(benchmark, engine, mels):
    _primed(engine, mels, tokens=1)
    engine.speak_bias = bench.ALWAYS_SPEAK
    embeds = engine.encode(mels)
    state = {"reply": None}

    def token():
        if state["reply"] is None:
            while engine.position > 2000:
                _primed(engine, mels, tokens=1)
                engine.speak_bias = bench.ALWAYS_SPEAK
            engine.listen(embeds[1])
            state["reply"] = engine.speak()
        step = next(state["reply"], None)
        if step is None or step.token == engine.tokens["TEXT_END"]:
            state["reply"] = None
        return step

    benchmark(token)
    if state["reply"] is not None:
        state["reply"].close()
    engine.speak_bias = bench.NEVER_SPEAK
    benchmark.extra_info["tokens_per_s"] = 1 / benchmark.stats["median"]


@pytest.mark.benchmark(group="catch-up")
def test_catch_up_after_reply(benchmark, engine, mels):
    def setup():
        _primed(engine, mels, tokens=1)
        engine.speak_bias = bench.ALWAYS_SPEAK
        engine.listen(engine.encode(mels[1][None])[0])
        for _ in engine.speak():
            pass
        engine.speak_bias = bench.NEVER_SPEAK
        return (engine.encode(mels[:8]),), {}

    results = benchmark.pedantic(engine.listen_many, setup=setup, rounds=30, warmup_rounds=1)
    assert len(results) == 8 and not any(r.spoke for r in results)
    benchmark.extra_info["headroom_per_chunk"] = benchmark.stats["median"] / 8 / bench.CHUNK_SECONDS


@pytest.mark.benchmark(group="context")
def test_listening_step_at_2000_tokens(benchmark, engine, mels):
    embeds = engine.encode(mels)

    def setup():
        engine.reset()
        engine.speak_bias = bench.NEVER_SPEAK
        while engine.position < 2000:
            engine.listen_many(embeds[:16])
        return (embeds[3],), {}

    benchmark.pedantic(engine.listen, setup=setup, rounds=15)
    assert 2000 <= engine.position - 13 < 2300


@pytest.mark.benchmark(group="precision")
@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_decoder_step_by_precision(benchmark, package_at, mels, precision):
    engine = bench.make_engine(package_at(precision))
    assert engine.package.decoder["precision"] == precision
    embeds = _primed(engine, mels)

    def step():
        if engine.position > 1000:
            _primed(engine, mels)
        return engine.listen(embeds[3])

    benchmark(step)


@pytest.mark.benchmark(group="startup")
def test_startup_to_first_decision(benchmark, package_at):
    package = package_at("fp32")
    mel = bench.chunk_mels(bench.synthetic_audio(bench.CHUNK_SECONDS))

    def start():
        engine = bench.make_engine(package)
        return engine.listen(engine.encode(mel)[0])

    result = benchmark.pedantic(start, rounds=3, iterations=1)
    assert result.position > 13  # the first step fed the prompt prefix too
    assert bench.peak_rss_mb() > 0
