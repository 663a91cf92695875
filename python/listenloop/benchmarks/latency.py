"""One stream's figures: start-up, the listening step, TTFR by stage and end to end, reply decode
speed, catch-up after a reply, the step against context length, and the step per precision.

Every figure here is measured on synthetic audio (inputs.synthetic_audio) over streams that
`streams` scripts. Times are time.perf_counter for stage timings and time.monotonic_ns (the ring
buffer's steady clock) for end-to-end figures.

Stages of TTFR (time to first reply text), measured one by one on a DecoderStream:
    scheduler  ring write of the chunk's last sample -> raw mel queued (ChunkScheduler,
               ready_ns - arrived_ns, which includes the scheduler's own mel)
    encoder    Model.encode of the one chunk
    listen     the 13-token decoder step + decision (DecoderStream.listen)
    first token  TEXT_BEGIN -> first reply token (first DecoderStream.speak step)
End to end (`measure_session`), a real Session is fed 20 ms blocks at real-time pace from
another thread and TTFR is the time from just before the block holding the triggering chunk's
last sample is written (accept_waveform) to the first TextDelta event reaching this (the
application's) thread.
"""
from __future__ import annotations

import math
import threading
import time

import numpy as np

from ..errors import Error
from ..protocol import BLOCK, CHUNK_SAMPLES, CHUNK_SECONDS, SAMPLE_RATE, STEP
from .inputs import chunk_mels, synthetic_audio
from .machine import peak_rss_mb, rss_mb
from .stats import ms, summarize
from .streams import listening_stream, load_model, replying_stream, scripted_policy


BLOCK_MS = 20  # real-time feeding block of the end-to-end session run


def _restart(stream, model, mel: np.ndarray) -> None:
    """Empty the stream's cache and take its first (prefix) step, which is not a steady step."""
    stream.reset()
    stream.listen(model.encode(mel[None])[0])


def _reply(stream, max_tokens: int | None = None) -> list[float]:
    """Run one reply; seconds since start at each token."""
    marks = []
    start = time.perf_counter()
    for _ in stream.speak(max_tokens):
        marks.append(time.perf_counter() - start)
    return marks


def measure_startup(package, profile="cpu") -> tuple[dict, object]:
    """Package load -> first decision, in this process (ORT already imported); returns the Runtime.

    The Runtime carries the package's own policy; every measurement opens the streams and
    sessions it needs over `runtime.model` with its own policy."""
    from ..session import Runtime

    mel = chunk_mels(synthetic_audio(CHUNK_SECONDS, seed=1))
    start = time.perf_counter()
    runtime = Runtime(package, profile)
    loaded = time.perf_counter()
    model = runtime.model
    model.stream().listen(model.encode(mel)[0])
    first = time.perf_counter()
    return {"load_ms": ms(loaded - start), "first_decision_ms": ms(first - start),
            "kv_bytes_per_stream": model.kv_bytes, "rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb()}, runtime


def measure_listening(model, mels: np.ndarray, stream=None) -> dict:
    """Steady stream, never speaking: mel, encoder, decoder step and their sum per chunk.

    `stream`: default listening_stream(model). When the context is full the stream starts
    over with an untimed prefix step: a context rebuild is not a listening step."""
    from .. import _core

    stream = stream if stream is not None else listening_stream(model)
    streaming = _core.StreamingMel(CHUNK_SAMPLES)
    audio = synthetic_audio(CHUNK_SECONDS * len(mels), seed=2)
    _restart(stream, model, mels[0])
    mel_ms, enc_ms, dec_ms, total_ms = [], [], [], []
    for i in range(len(mels)):
        if stream.pending_reset() is not None:
            _restart(stream, model, mels[0])
        t0 = time.perf_counter()
        mel = streaming(audio[i * CHUNK_SAMPLES:(i + 1) * CHUNK_SAMPLES])
        t1 = time.perf_counter()
        embeds = model.encode(mel[None])
        t2 = time.perf_counter()
        stream.listen(embeds[0])
        t3 = time.perf_counter()
        mel_ms.append(ms(t1 - t0))
        enc_ms.append(ms(t2 - t1))
        dec_ms.append(ms(t3 - t2))
        total_ms.append(ms(t3 - t0))
    step = summarize(total_ms)
    return {"mel_ms": summarize(mel_ms), "encoder_ms": summarize(enc_ms), "decoder_step_ms": summarize(dec_ms),
            "step_ms": step, "headroom": step["median"] / ms(CHUNK_SECONDS),
            "headroom_p99": step["p99"] / ms(CHUNK_SECONDS), "samples_ms": total_ms}


def measure_scheduler(chunks: int) -> dict:
    """ChunkScheduler: a chunk's last sample written -> its raw mel queued (ready_ns - arrived_ns)."""
    from .. import _core

    ring = _core.RingBuffer(4 * CHUNK_SAMPLES)
    queue = _core.ChunkQueue(8)
    scheduler = _core.ChunkScheduler(ring, queue, CHUNK_SAMPLES)
    audio = synthetic_audio(CHUNK_SECONDS * chunks, seed=3)
    block = SAMPLE_RATE * BLOCK_MS // 1000
    latencies = []
    scheduler.start()
    try:
        for i in range(chunks):
            for start in range(i * CHUNK_SAMPLES, (i + 1) * CHUNK_SAMPLES, block):
                ring.write(audio[start:start + block])
            chunk = queue.pop(2.0)
            if chunk is None:
                raise Error("the chunk scheduler produced no chunk within 2 s")
            latencies.append((chunk.ready_ns - chunk.arrived_ns) / 1e6)
    finally:
        scheduler.stop()
        queue.close()
    return summarize(latencies)


def measure_reply(model, mels: np.ndarray, rounds: int, reply_tokens: int) -> dict:
    """TTFR stages on a DecoderStream, and reply decode speed over `reply_tokens`-token replies.

    Each round starts an empty stream with a silent prefix step, then times the triggering
    chunk (a steady step) and its reply: the stream's script lets every second decision speak."""
    stream = replying_stream(model, reply_tokens, speak_every=2)
    listen_ms, enc_ms, first_ms, tokens_per_s, total = [], [], [], [], []
    for r in range(rounds):
        stream.reset()
        if stream.listen(model.encode(mels[r % len(mels)][None])[0]).spoke:
            raise Error("the scripted sampler spoke on the first step of a round")
        t0 = time.perf_counter()
        embeds = model.encode(mels[(r + 1) % len(mels)][None])
        t1 = time.perf_counter()
        result = stream.listen(embeds[0])
        t2 = time.perf_counter()
        if not result.spoke:
            raise Error("speak_bias +50 did not make the model speak")
        marks = _reply(stream, reply_tokens + 1)
        enc_ms.append(ms(t1 - t0))
        listen_ms.append(ms(t2 - t1))
        first_ms.append(ms(marks[0]))
        total.append(ms(t2 - t0 + marks[0]))
        text_tokens = len(marks) - 1  # the last one is TEXT_END
        if text_tokens > 1:
            tokens_per_s.append((text_tokens - 1) / (marks[-2] - marks[0]))
    tps = np.asarray(tokens_per_s)
    return {"encoder_ms": summarize(enc_ms), "listen_ms": summarize(listen_ms),
            "first_token_ms": summarize(first_ms), "engine_ttfr_ms": summarize(total),
            "tokens_per_s": {"median": float(np.median(tps)) if tps.size else 0.0,
                             "p10": float(np.percentile(tps, 10)) if tps.size else 0.0, "n": int(tps.size)},
            "reply_tokens": reply_tokens}


def catch_up_room(model, reply_tokens: int) -> int:
    """Chunks that fit after a prefix step and a `reply_tokens` reply before the context is full."""
    from ..context import reply_reserve

    after_reply = len(model.prefix_ids) + BLOCK + reply_tokens + 1  # prefix + block, TEXT_BEGIN + text
    return (model.capacity - reply_reserve(model.capacity, reply_tokens + 1) - after_reply) // STEP


def measure_catch_up(model, mels: np.ndarray, rounds: int, reply_tokens: int, chunks: int) -> dict:
    """Right after a `reply_tokens` reply: `chunks` queued chunks decided one listening step each
    (encoder + decoder step per chunk, as the session decides them after TEXT_END).

    Each round: an empty stream speaks on its first chunk, replies, then decides the queued
    chunks, the first of them fed after TEXT_END. `chunks` is cut to what fits in the context
    without a rebuild (reported as `chunks`, with `chunks_requested`)."""
    requested = chunks
    chunks = max(1, min(chunks, catch_up_room(model, reply_tokens)))
    stream = replying_stream(model, reply_tokens, speak_every=chunks + 1, speak_at=1)
    per_chunk, first, totals, reply_s = [], [], [], []
    for r in range(rounds):
        stream.reset()
        if not stream.listen(model.encode(mels[r % len(mels)][None])[0]).spoke:
            raise Error("speak_bias +50 did not make the model speak")
        reply_s.append(_reply(stream, reply_tokens + 1)[-1])
        times = []
        for j in range(chunks):
            mel = mels[(r + 1 + j) % len(mels)][None]
            t0 = time.perf_counter()
            result = stream.listen(model.encode(mel)[0])
            times.append(ms(time.perf_counter() - t0))
            if result.spoke or result.context_reset:
                raise Error(f"catch-up chunk {j} {'spoke' if result.spoke else 'rebuilt the context'}")
        per_chunk += times
        first.append(times[0])
        totals.append(sum(times))
    step = summarize(per_chunk)
    return {"chunks": chunks, "chunks_requested": requested, "reply_tokens": reply_tokens,
            "reply_ms": summarize([ms(s) for s in reply_s]),
            "step_ms_per_chunk": step, "first_step_ms": summarize(first), "total_ms": summarize(totals),
            "headroom": step["median"] / ms(CHUNK_SECONDS),
            "catch_up_chunks_for_this_reply": math.ceil(np.median(reply_s) / CHUNK_SECONDS)}


def measure_context(model, mels: np.ndarray, lengths, steps: int, reply_tokens: int = 16) -> list[dict]:
    """Listening step (encoder excluded) with the cache filled to ~L tokens by single listen() steps.

    Lengths are filled in increasing order on one stream, which starts over only when the next
    length lies behind it. Rows come back in the order of `lengths`."""
    stream = listening_stream(model, reply_tokens)
    embeds = model.encode(mels[:16])
    limit = stream.capacity - stream.context.reply_reserve - STEP  # the last steady step starts here
    prefix = len(model.prefix_ids)
    rows, fed = {}, 0
    for length in sorted(set(lengths)):
        # the timed steps straddle `length`, or end at the last position that needs no context rebuild
        start = min(length - steps * STEP // 2, limit - (steps - 1) * STEP)
        if length > limit + STEP or start < prefix + STEP:
            rows[length] = {"context": length, "skipped": f"does not fit a capacity of {stream.capacity} tokens "
                                                          f"with {stream.context.reply_reserve} kept for a reply"}
            continue
        if stream.position > start:
            stream.reset()
        while stream.position < start:  # the fill may overshoot by up to one step
            stream.listen(embeds[fed % len(embeds)])
            fed += 1
        times, positions = [], []
        for i in range(min(steps, (limit - stream.position) // STEP + 1)):
            positions.append(stream.position)
            t0 = time.perf_counter()
            result = stream.listen(embeds[i % len(embeds)])
            elapsed = time.perf_counter() - t0
            if result.context_reset:
                raise Error(f"context scaling: the cache was rebuilt at {positions[-1]} tokens")
            times.append(ms(elapsed))
        if not times:
            rows[length] = {"context": length, "skipped": f"the fill ended at {stream.position} tokens, past the "
                                                          f"last steady step at {limit}"}
            continue
        rows[length] = {"context": length, "mean_position": float(np.mean(positions)), "step_ms": summarize(times)}
    return [rows[length] for length in lengths]


def measure_session(runtime, chunks: int, reply_tokens: int, speak_every: int = 1) -> dict:
    """End-to-end TTFR through a real Session of `runtime`, fed `chunks` chunks of synthetic
    audio in 20 ms blocks at real-time pace from a feeder thread.

    TTFR of a reply: from just before the block holding the last sample of its triggering
    chunk is written (accept_waveform) to its first TextDelta event reaching the thread that
    reads events. The session speaks with speak_bias +50 on every `speak_every`-th chunk and
    gives `reply_tokens`-token scripted replies; replies triggered by a chunk that arrived
    during the previous reply (decided in a catch-up) are counted but left out of TTFR."""
    policy = scripted_policy(runtime.model.tokens, reply_tokens, speak_every)
    with runtime.session(**policy) as session:
        figures = _session_run(session, chunks)
    figures.update(reply_tokens=reply_tokens, speak_every=speak_every)
    return figures


def _session_run(session, chunks: int) -> dict:
    audio = synthetic_audio(CHUNK_SECONDS * chunks, seed=4)
    block = SAMPLE_RATE * BLOCK_MS // 1000
    sent_ns = []  # (samples written after this block, monotonic ns just before the write)
    failure = []

    def feed():
        try:
            start = time.monotonic()
            for offset in range(0, len(audio), block):
                delay = start + (offset + block) / SAMPLE_RATE - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                sent_ns.append((offset + block, time.monotonic_ns()))
                session.accept_waveform(audio[offset:offset + block], SAMPLE_RATE, block=False)
        except Exception as exc:  # noqa: BLE001 - reported by the consumer
            failure.append(exc)

    feeder = threading.Thread(target=feed, name="listenloop-bench-feeder", daemon=True)
    feeder.start()
    replies = {}  # chunk -> times of its reply (ns)
    decided_ns = {}  # chunk -> when its Decision was produced
    current = None
    ended_ns = 0
    decisions = 0
    dropped = 0
    stats = None

    def handle(event):
        nonlocal current, ended_ns, decisions, dropped, stats
        now = time.monotonic_ns()
        if event.kind == "Decision":
            decisions += 1
            decided_ns[event.chunk] = int(event.wall_time * 1e9)
        elif event.kind == "ReplyStarted":
            current = event.chunk
            replies[current] = {"started_ns": now, "previous_end_ns": ended_ns}
        elif event.kind == "TextDelta" and current is not None and "text_ns" not in replies[current]:
            replies[current]["text_ns"] = now
            replies[current]["produced_ns"] = int(event.wall_time * 1e9)
        elif event.kind == "ReplyEnded":
            ended_ns = now
            current = None
        elif event.kind == "AudioDropped":
            dropped += event.samples
        elif event.kind == "Stats":
            stats = event

    while feeder.is_alive():
        for event in session.events(timeout=0.2):
            handle(event)
            if not feeder.is_alive():
                break
    feeder.join()
    if failure:
        raise Error(f"feeding the session failed: {failure[0]}")
    session.finish(timeout=60)
    for event in session.events(timeout=0.5):
        handle(event)

    ttfr, stale, to_decision, to_text, delivery = [], 0, [], [], []
    for chunk, marks in replies.items():
        if "text_ns" not in marks:
            continue
        last_sample = (chunk + 1) * CHUNK_SAMPLES
        arrived = next((ns for total, ns in sent_ns if total >= last_sample), None)
        if arrived is None:
            continue  # the zero-padded flush chunk
        if arrived < marks["previous_end_ns"]:
            stale += 1  # decided in a catch-up after the previous reply: not a fresh trigger
            continue
        ttfr.append((marks["text_ns"] - arrived) / 1e6)
        if chunk in decided_ns:
            to_decision.append((decided_ns[chunk] - arrived) / 1e6)
            to_text.append((marks["produced_ns"] - decided_ns[chunk]) / 1e6)
        delivery.append((marks["text_ns"] - marks["produced_ns"]) / 1e6)
    return {"ttfr_ms": summarize(ttfr),
            "ttfr_split_ms": {"arrival_to_decision": summarize(to_decision),
                              "decision_to_text_produced": summarize(to_text),
                              "text_produced_to_app": summarize(delivery)},
            "chunks": chunks, "decisions": decisions, "replies": len(replies),
            "stale_triggers": stale, "dropped_samples": dropped, "block_ms": BLOCK_MS,
            "session_step_ms": stats.step_ms if stats else None,
            "session_real_time_factor": stats.real_time_factor if stats else None}


def measure_precisions(packages, profile="cpu", chunks: int = 100) -> list[dict]:
    rows = []
    for package in packages:
        model = load_model(package, profile)
        mels = chunk_mels(synthetic_audio(CHUNK_SECONDS * chunks, seed=5))
        listening = measure_listening(model, mels)
        rows.append({"package": str(package), "precision": model.package.decoder["precision"],
                     "decoder_step_ms": listening["decoder_step_ms"], "step_ms": listening["step_ms"],
                     "headroom": listening["headroom"]})
        del model
    return rows
