"""The figures of `listenloop bench` through pytest-benchmark, on the exporter's tiny package.

    pytest bench/test_bench_latency.py --benchmark-only
    pytest bench/test_bench_latency.py --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Every test shares one loaded Model per precision and creates the DecoderStreams it needs over
it, each with its own fixed policy (listenloop.benchmarks.streams: listening_stream, replying_stream).

Groups (compare medians within a group):
  listen-step      one steady 13-token listening step (DecoderStream.listen) with ~100 tokens cached,
                   and the whole per-chunk step (C++ mel + encoder + decoder + decision)
  listen-torch     the same encoder + decoder step through the PyTorch reference (transformers
                   classes, KV cache), torch threads = ORT intra-op threads
  ttfr             encoder + listening step of a chunk that speaks (speak_bias +50) + first reply
                   token, on a stream; and the end-to-end Session run (real-time 20 ms blocks,
                   TTFR median in extra_info)
  reply            one reply token (decode speed = 1 / median)
  catch-up         8 queued chunks decided one listening step each (encoder + decoder) right after a reply
  context          one listening step with 2000 tokens cached
  precision        one decoder listening step per decoder precision (fp32 / int8 / int4)
  startup          package load to first decision
Replies on the random model are scripted (listenloop.benchmarks.streams.ScriptedReplies): text tokens,
then TEXT_END after a fixed count; the script also says which decisions may speak.
"""
from __future__ import annotations

import pytest

from listenloop.benchmarks import inputs, latency, machine, pytorch, streams
from listenloop.protocol import CHUNK_SAMPLES, CHUNK_SECONDS, STEP

pytest.importorskip("pytest_benchmark")

CATCH_UP = 8  # queued chunks after a reply


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
def model(package_at):
    return streams.load_model(package_at("fp32"))


@pytest.fixture(scope="module")
def mels():
    return inputs.chunk_mels(inputs.synthetic_audio(16 * CHUNK_SECONDS, seed=0))


def _median(benchmark):
    """The median round in seconds; None when timing is off (--benchmark-disable runs each once)."""
    return benchmark.stats["median"] if benchmark.stats else None


def _primed(stream, model, mels, tokens=100):
    """The stream after the prefix step and enough silent steps to hold about `tokens` tokens."""
    stream.reset()
    embeds = model.encode(mels)
    while stream.position < tokens:
        stream.listen(embeds[stream.position % len(embeds)])
    return embeds


@pytest.mark.benchmark(group="listen-step")
def test_decoder_listening_step(benchmark, model, mels):
    stream = streams.listening_stream(model)
    embeds = _primed(stream, model, mels)

    def step():
        if stream.position > 1000:  # stay at a comparable cache length
            _primed(stream, model, mels)
        return stream.listen(embeds[3])

    result = benchmark(step)
    assert not result.spoke and result.p_speak > 0.5  # held near 1, scripted never to speak
    assert _median(benchmark) is None or _median(benchmark) < CHUNK_SECONDS  # keeps up with real time


@pytest.mark.benchmark(group="listen-step")
def test_whole_listening_step(benchmark, model, mels):
    from listenloop import _core

    stream = streams.listening_stream(model)
    _primed(stream, model, mels)
    audio = inputs.synthetic_audio(CHUNK_SECONDS, seed=1)
    streaming = _core.StreamingMel(CHUNK_SAMPLES)

    def step():
        if stream.position > 1000:
            _primed(stream, model, mels)
        return stream.listen(model.encode(streaming(audio)[None])[0])

    benchmark(step)
    if _median(benchmark) is not None:
        headroom = _median(benchmark) / CHUNK_SECONDS
        benchmark.extra_info["headroom"] = headroom
        assert headroom < 1, f"slower than real time: {headroom:.2f} of each 0.4 s chunk"


@pytest.mark.benchmark(group="listen-torch")
def test_torch_reference_listening_step(benchmark, checkpoint, model, mels):
    torch = pytest.importorskip("torch")
    from listenloop.export.reference import TorchReference

    torch.set_num_threads(model.decoder.get_session_options().intra_op_num_threads or 1)
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
def test_torch_side_by_side(benchmark, checkpoint, model, mels):
    """Same chunks through both: decisions at fp32 must be identical; the ratio goes to extra_info."""
    pytest.importorskip("torch")
    threads = model.decoder.get_session_options().intra_op_num_threads or 1
    figures = benchmark.pedantic(pytorch.compare_torch, args=(model, checkpoint, mels, 5, threads), rounds=1, iterations=1)
    benchmark.extra_info.update(step_speedup=figures["step_speedup"], ttfr_speedup=figures["ttfr_speedup"],
                                decision_agreement=figures["decision_agreement"])
    assert figures["decisions_agree"] == figures["decisions"] >= 10


@pytest.mark.benchmark(group="ttfr")
def test_stream_ttfr(benchmark, model, mels):
    """Triggering chunk's encoder + listening step + first reply token (speak_bias +50).

    Each round: a silent prefix step in setup, then the timed chunk, whose decision the
    stream's script lets speak (every second decision)."""
    stream = streams.replying_stream(model, 16, speak_every=2)

    def setup():
        _primed(stream, model, mels, tokens=1)
        return (), {}

    tokens = []

    def first_reply_token():
        result = stream.listen(model.encode(mels[5][None])[0])
        reply = stream.speak()
        tokens.append(next(reply).token)
        reply.close()
        return result

    result = benchmark.pedantic(first_reply_token, setup=setup, rounds=40, warmup_rounds=2)
    assert result.spoke
    assert model.tokens["TEXT_END"] not in tokens  # the scripted reply starts with text


@pytest.mark.benchmark(group="ttfr")
def test_session_ttfr_end_to_end(benchmark, package_at):
    """A Session fed 20 ms blocks in real time for 2 s; every chunk triggers a short reply."""
    startup, runtime = latency.measure_startup(package_at("fp32"), "cpu")
    with runtime:
        figures = benchmark.pedantic(latency.measure_session, args=(runtime, 5, 4, 1), rounds=1, iterations=1)
    benchmark.extra_info.update(ttfr_median_ms=figures["ttfr_ms"]["median"], ttfr_p90_ms=figures["ttfr_ms"]["p90"])
    assert figures["decisions"] >= 5 and figures["replies"] >= 5
    assert figures["ttfr_ms"]["n"] >= 4
    assert 0 < figures["ttfr_ms"]["median"] < 400  # a reply begins before the next chunk is complete


@pytest.mark.benchmark(group="reply")
def test_reply_token(benchmark, model, mels):
    """One reply token per round; setup starts a new reply (listening step, untimed) when one ended."""
    stream = streams.replying_stream(model, 16)  # every decision speaks
    embeds = model.encode(mels)
    state = {"reply": None}

    def setup():
        if state["reply"] is None:
            if stream.position > 2000 or stream.pending_reset() is not None:
                stream.reset()
            assert stream.listen(embeds[1]).spoke
            state["reply"] = stream.speak()
        return (), {}

    def token():
        step = next(state["reply"], None)
        if step is None or step.token == model.tokens["TEXT_END"]:
            state["reply"] = None
        return step

    benchmark.pedantic(token, setup=setup, rounds=200, warmup_rounds=5)
    if state["reply"] is not None:
        state["reply"].close()
    if _median(benchmark) is not None:
        benchmark.extra_info["tokens_per_s"] = 1 / _median(benchmark)


@pytest.mark.benchmark(group="catch-up")
def test_catch_up_after_reply(benchmark, model, mels):
    """The chunks queued during a reply, decided one listening step each (encoder + decoder)."""
    stream = streams.replying_stream(model, 16, speak_every=CATCH_UP + 1, speak_at=1)  # speaks, then 8 silent

    def setup():
        stream.reset()
        assert stream.listen(model.encode(mels[1][None])[0]).spoke
        for _ in stream.speak():
            pass
        return (mels[2:2 + CATCH_UP],), {}

    def catch_up(queued):
        return [stream.listen(model.encode(mel[None])[0]) for mel in queued]

    results = benchmark.pedantic(catch_up, setup=setup, rounds=30, warmup_rounds=1)
    assert len(results) == CATCH_UP and not any(r.spoke or r.context_reset for r in results)
    if _median(benchmark) is not None:
        benchmark.extra_info["step_ms_per_chunk"] = 1000 * _median(benchmark) / CATCH_UP
        benchmark.extra_info["headroom_per_chunk"] = _median(benchmark) / CATCH_UP / CHUNK_SECONDS


@pytest.mark.benchmark(group="context")
def test_listening_step_at_2000_tokens(benchmark, model, mels):
    stream = streams.listening_stream(model)
    embeds = model.encode(mels)

    def setup():
        if not 2000 <= stream.position < 2250:  # the timed steps add 13 tokens each
            stream.reset()
            while stream.position < 2000:
                stream.listen(embeds[stream.position % len(embeds)])
        return (embeds[3],), {}

    result = benchmark.pedantic(stream.listen, setup=setup, rounds=15)
    assert result.context_reset is None
    assert 2000 <= stream.position - STEP < 2300


@pytest.mark.benchmark(group="precision")
@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_decoder_step_by_precision(benchmark, package_at, mels, precision):
    model = streams.load_model(package_at(precision))
    assert model.package.decoder["precision"] == precision
    stream = streams.listening_stream(model)
    embeds = _primed(stream, model, mels)

    def step():
        if stream.position > 1000:
            _primed(stream, model, mels)
        return stream.listen(embeds[3])

    benchmark(step)


@pytest.mark.benchmark(group="startup")
def test_startup_to_first_decision(benchmark, package_at):
    package = package_at("fp32")
    mel = inputs.chunk_mels(inputs.synthetic_audio(CHUNK_SECONDS))

    def start():
        model = streams.load_model(package)
        return model.stream().listen(model.encode(mel)[0])

    result = benchmark.pedantic(start, rounds=3, iterations=1)
    assert result.position > STEP  # the first step fed the prompt prefix too
    assert machine.peak_rss_mb() > 0
