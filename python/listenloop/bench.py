"""Latency, throughput and memory figures of one model package on this machine (`listenloop bench`).

Every figure is measured on synthetic audio (seeded noise and tones), so nothing is downloaded.
Times are time.perf_counter for stage timings and time.monotonic_ns (the ring buffer's steady
clock) for end-to-end figures. Each distribution is summarised by median, p90 and p99.

Replies on a random model: the decision is forced with the runtime's `speak_bias` (+50: always
speaks, -50: never speaks), and `ScriptedReplies` replaces greedy sampling of the reply with
"best non-control token, TEXT_END after exactly N tokens", so every reply has text and a
known length. Both are said in the output.

Stages of TTFR (time to first reply text), measured one by one on the Engine:
    scheduler  ring write of the chunk's last sample -> mel ready (ChunkScheduler, ready_ns - arrived_ns,
               which includes the scheduler's own mel)
    encoder    Engine.encode of the one chunk
    listen     the 13-token decoder step + decision (Engine.listen)
    first token  TEXT_BEGIN -> first reply token (first Engine.speak step)
End to end, a real Session is fed 20 ms blocks at real-time pace from another thread and TTFR
is the time from the triggering chunk's last block entering accept_waveform to the first
TextDelta reaching this (the application's) thread.

torch is imported only for --compare-torch.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .errors import Error
from .sampling import Sampler, SamplingConfig

SAMPLE_RATE = 16000
CHUNK = 6400
CHUNK_SECONDS = CHUNK / SAMPLE_RATE
BLOCK_MS = 20  # real-time feeding block of the end-to-end session run
STEP_TOKENS = 13
ALWAYS_SPEAK, NEVER_SPEAK = 50.0, -50.0


# --- statistics and environment -------------------------------------------------------------

def summarize(values_ms) -> dict:
    """median / p90 / p99 / mean / min / n of a list of milliseconds."""
    v = np.asarray(list(values_ms), dtype=np.float64)
    if v.size == 0:
        return {"n": 0}
    return {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "p99": float(np.percentile(v, 99)),
            "mean": float(v.mean()), "min": float(v.min()), "n": int(v.size)}


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM), MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return float("nan")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(engine) -> dict:
    import onnxruntime as ort

    from . import __version__
    from .profiles import physical_cores

    dec = engine.package.decoder
    env = {"listenloop": __version__, "onnxruntime": ort.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "cpu": cpu_model(), "logical_cpus": os.cpu_count(),
           "physical_cores": physical_cores(), "load_average": list(os.getloadavg()),
           "profile": engine.profile.name, "providers": list(engine.providers),
           "intra_op_threads": engine.decoder.get_session_options().intra_op_num_threads,
           "package": str(engine.package.path), "model": engine.package.name,
           "precision": dec["precision"], "encoder_precision": engine.package.manifest["encoder"]["precision"],
           "io_dtype": dec["io_dtype"], "layers": dec["num_layers"], "hidden_size": dec["hidden_size"],
           "vocab_size": dec["vocab_size"], "context_capacity": engine.capacity,
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if "CUDAExecutionProvider" in engine.providers:
        env["device"] = _gpu_name()
    else:
        env["device"] = env["cpu"]
    return env


def _gpu_name() -> str:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "CUDA device"


# --- synthetic input and scripted replies -------------------------------------------------

def synthetic_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise with wandering tones, float32 16 kHz: mel and encoder work like on speech."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    tone = np.sin(2 * np.pi * (220 + 180 * np.sin(2 * np.pi * 0.3 * t)) * t)
    return (0.05 * rng.standard_normal(n) + 0.2 * tone).astype(np.float32)


def chunk_mels(audio: np.ndarray) -> np.ndarray:
    """[k,128,40] mels of consecutive chunks, as the scheduler computes them."""
    from . import _core

    mel = _core.StreamingMel(CHUNK)
    k = len(audio) // CHUNK
    return np.stack([mel(audio[i * CHUNK:(i + 1) * CHUNK]) for i in range(k)])


class ScriptedReplies(Sampler):
    """Replies of exactly `reply_tokens` text tokens on any model (random ones included).

    Reply tokens: the best non-control token, then TEXT_END once `reply_tokens` were given.
    Decisions: greedy on the logits (speak_bias included), but at most every `speak_every`-th
    decision may speak, so long replies do not turn every chunk into a catch-up.
    """

    def __init__(self, tokens: dict, reply_tokens: int, speak_every: int = 1):
        super().__init__(SamplingConfig())
        if reply_tokens < 1 or speak_every < 1:
            raise ValueError("reply_tokens and speak_every must be >= 1")
        self.text_end = tokens["TEXT_END"]
        self.control = np.array(sorted(set(tokens.values())), dtype=np.int64)
        self.reply_tokens = reply_tokens
        self.speak_every = speak_every
        self._given = 0
        self._decisions = 0

    def decide(self, silence_logit: float, speak_logit: float) -> bool:
        self._given = 0
        self._decisions += 1
        if self._decisions % self.speak_every:
            return False
        return bool(speak_logit > silence_logit)

    def sample(self, logits: np.ndarray) -> int:
        if self._given >= self.reply_tokens:
            return self.text_end
        self._given += 1
        row = np.array(logits, dtype=np.float32, copy=True)
        row[self.control] = -np.inf
        return int(np.argmax(row))


def make_engine(package, profile: str = "cpu", *, speak_bias: float = NEVER_SPEAK, reply_tokens: int = 16,
                speak_every: int = 1, max_context: int | None = None):
    from .engine import Engine
    from .package import resolve_package

    pkg = resolve_package(package)
    return Engine(pkg, profile, max_context, speak_bias=speak_bias, max_reply_tokens=max(reply_tokens + 1, 2),
                  sampler=ScriptedReplies(pkg.tokens, reply_tokens, speak_every))


def _reply(engine, max_tokens: int | None = None) -> list[float]:
    """Run one reply; seconds since start at each token."""
    marks = []
    start = time.perf_counter()
    for _ in engine.speak(max_tokens):
        marks.append(time.perf_counter() - start)
    return marks


def _ms(seconds: float) -> float:
    return seconds * 1000.0


# --- measurements ---------------------------------------------------------------------------

def measure_startup(package, profile: str, reply_tokens: int) -> tuple[dict, object]:
    """Package load -> first decision, in this process (ORT already imported); returns the Runtime."""
    from .session import Runtime

    audio = synthetic_audio(CHUNK_SECONDS, seed=1)
    start = time.perf_counter()
    runtime = Runtime(package, profile, speak_bias=NEVER_SPEAK, max_reply_tokens=reply_tokens + 1)
    loaded = time.perf_counter()
    engine = runtime.engine
    engine.listen(engine.encode(chunk_mels(audio))[0])
    first = time.perf_counter()
    engine.reset()
    engine.sampler = ScriptedReplies(runtime.package.tokens, reply_tokens)
    return {"load_ms": _ms(loaded - start), "first_decision_ms": _ms(first - start),
            "rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb()}, runtime


def measure_listening(engine, mels: np.ndarray) -> dict:
    """Steady stream, never speaking: mel, encoder, decoder step and their sum per chunk."""
    from . import _core

    engine.speak_bias = NEVER_SPEAK
    engine.reset()
    streaming = _core.StreamingMel(CHUNK)
    audio = synthetic_audio(CHUNK_SECONDS * len(mels), seed=2)
    engine.listen(engine.encode(mels[:1])[0])  # the prefix step is not a steady step
    mel_ms, enc_ms, dec_ms, total_ms = [], [], [], []
    for i in range(len(mels)):
        if engine.position + 2 * STEP_TOKENS + engine.reply_reserve > engine.capacity:
            engine.reset()  # stay in steady steps: a context rebuild is not a listening step
            engine.listen(engine.encode(mels[:1])[0])
        t0 = time.perf_counter()
        mel = streaming(audio[i * CHUNK:(i + 1) * CHUNK])
        t1 = time.perf_counter()
        embeds = engine.encode(mel[None])
        t2 = time.perf_counter()
        engine.listen(embeds[0])
        t3 = time.perf_counter()
        mel_ms.append(_ms(t1 - t0))
        enc_ms.append(_ms(t2 - t1))
        dec_ms.append(_ms(t3 - t2))
        total_ms.append(_ms(t3 - t0))
    step = summarize(total_ms)
    return {"mel_ms": summarize(mel_ms), "encoder_ms": summarize(enc_ms), "decoder_step_ms": summarize(dec_ms),
            "step_ms": step, "headroom": step["median"] / _ms(CHUNK_SECONDS),
            "headroom_p99": step["p99"] / _ms(CHUNK_SECONDS), "samples_ms": total_ms}


def measure_scheduler(chunks: int) -> dict:
    """ChunkScheduler: a chunk's last sample written -> its mel queued (ready_ns - arrived_ns)."""
    from . import _core

    ring = _core.RingBuffer(4 * CHUNK)
    queue = _core.ChunkQueue(8)
    scheduler = _core.ChunkScheduler(ring, queue)
    audio = synthetic_audio(CHUNK_SECONDS * chunks, seed=3)
    block = SAMPLE_RATE * BLOCK_MS // 1000
    latencies = []
    scheduler.start()
    try:
        for i in range(chunks):
            for start in range(i * CHUNK, (i + 1) * CHUNK, block):
                ring.write(audio[start:start + block])
            chunk = queue.pop(2.0)
            if chunk is None:
                raise Error("the chunk scheduler produced no chunk within 2 s")
            latencies.append((chunk.ready_ns - chunk.arrived_ns) / 1e6)
    finally:
        scheduler.stop()
        queue.close()
    return summarize(latencies)


def measure_reply(engine, mels: np.ndarray, rounds: int, reply_tokens: int) -> dict:
    """TTFR stages on the Engine, and reply decode speed over `reply_tokens`-token replies."""
    listen_ms, enc_ms, first_ms, tokens_per_s, total = [], [], [], [], []
    for r in range(rounds):
        engine.reset()
        engine.speak_bias = NEVER_SPEAK
        engine.listen(engine.encode(mels[r % len(mels)][None])[0])
        engine.speak_bias = ALWAYS_SPEAK
        t0 = time.perf_counter()
        embeds = engine.encode(mels[(r + 1) % len(mels)][None])
        t1 = time.perf_counter()
        result = engine.listen(embeds[0])
        t2 = time.perf_counter()
        if not result.spoke:
            raise Error("speak_bias did not make the model speak")
        marks = _reply(engine, reply_tokens + 1)
        enc_ms.append(_ms(t1 - t0))
        listen_ms.append(_ms(t2 - t1))
        first_ms.append(_ms(marks[0]))
        total.append(_ms(t2 - t0 + marks[0]))
        text_tokens = len(marks) - 1  # the last one is TEXT_END
        if text_tokens > 1:
            tokens_per_s.append((text_tokens - 1) / (marks[-2] - marks[0]))
    engine.speak_bias = NEVER_SPEAK
    tps = np.asarray(tokens_per_s)
    return {"encoder_ms": summarize(enc_ms), "listen_ms": summarize(listen_ms),
            "first_token_ms": summarize(first_ms), "engine_ttfr_ms": summarize(total),
            "tokens_per_s": {"median": float(np.median(tps)) if tps.size else 0.0,
                             "p10": float(np.percentile(tps, 10)) if tps.size else 0.0, "n": int(tps.size)},
            "reply_tokens": reply_tokens}


def measure_catch_up(engine, mels: np.ndarray, rounds: int, reply_tokens: int, chunks: int) -> dict:
    """Right after a long reply: `chunks` queued chunks decided by one listen_many call."""
    per_chunk, reply_s = [], []
    chunks = max(1, min(chunks, 16))
    for r in range(rounds):
        engine.reset()
        engine.speak_bias = ALWAYS_SPEAK
        engine.listen(engine.encode(mels[r % len(mels)][None])[0])
        reply_s.append(_reply(engine, reply_tokens + 1)[-1])
        engine.speak_bias = NEVER_SPEAK
        queued = np.stack([mels[(r + j) % len(mels)] for j in range(chunks)])
        t0 = time.perf_counter()
        results = engine.listen_many(engine.encode(queued))
        t1 = time.perf_counter()
        per_chunk.append(_ms(t1 - t0) / len(results))
    step = summarize(per_chunk)
    return {"chunks": chunks, "reply_tokens": reply_tokens, "reply_ms": summarize([_ms(s) for s in reply_s]),
            "step_ms_per_chunk": step, "headroom": step["median"] / _ms(CHUNK_SECONDS),
            "catch_up_chunks_for_this_reply": math.ceil(np.median(reply_s) / CHUNK_SECONDS)}


def measure_context(engine, mels: np.ndarray, lengths, steps: int) -> list[dict]:
    """Listening step (encoder excluded) with the cache filled to ~L tokens (listen_many prefill)."""
    rows = []
    embeds = engine.encode(mels[:16])
    engine.speak_bias = NEVER_SPEAK
    limit = engine.capacity - engine.reply_reserve - STEP_TOKENS  # the last steady step starts here
    for length in lengths:
        # the timed steps straddle `length`, or end at the last position that needs no context rebuild
        start = min(length - steps * STEP_TOKENS // 2, limit - (steps - 1) * STEP_TOKENS)
        if length > limit + STEP_TOKENS or start < len(engine.package.prefix_ids) + STEP_TOKENS:
            rows.append({"context": length, "skipped": f"does not fit a capacity of {engine.capacity} tokens "
                                                       f"with {engine.reply_reserve} kept for a reply"})
            continue
        engine.reset()
        while engine.position < start:
            k = max(1, min(16, (start - engine.position) // STEP_TOKENS))
            engine.listen_many(embeds[:k])
        times, positions = [], []
        for i in range(min(steps, (limit - engine.position) // STEP_TOKENS + 1)):  # the fill may overshoot
            positions.append(engine.position)
            t0 = time.perf_counter()
            result = engine.listen(embeds[i % len(embeds)])
            elapsed = time.perf_counter() - t0
            if result.context_reset:
                raise Error(f"context scaling: the cache was rebuilt at {positions[-1]} tokens")
            times.append(_ms(elapsed))
        rows.append({"context": length, "mean_position": float(np.mean(positions)), "step_ms": summarize(times)})
    return rows


def measure_session(runtime, chunks: int, reply_tokens: int, speak_every: int) -> dict:
    """End-to-end TTFR through a Session fed 20 ms blocks in real time from a feeder thread."""
    engine = runtime.engine
    saved = engine.sampler, engine.speak_bias
    engine.sampler = ScriptedReplies(runtime.package.tokens, reply_tokens, speak_every)
    engine.speak_bias = ALWAYS_SPEAK
    try:
        return _session_run(runtime, chunks, reply_tokens, speak_every)
    finally:
        engine.sampler, engine.speak_bias = saved


def _session_run(runtime, chunks: int, reply_tokens: int, speak_every: int) -> dict:
    audio = synthetic_audio(CHUNK_SECONDS * chunks, seed=4)
    block = SAMPLE_RATE * BLOCK_MS // 1000
    sent_ns = []  # (samples written after this block, monotonic ns just before the write)
    failure = []

    with runtime.session() as session:
        def feed():
            try:
                start = time.monotonic()
                for i, offset in enumerate(range(0, len(audio), block)):
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
        last_sample = (chunk + 1) * CHUNK
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
                              "text_produced_to_app": summarize(delivery)}, "chunks": chunks, "decisions": decisions, "replies": len(replies),
            "stale_triggers": stale, "dropped_samples": dropped, "reply_tokens": reply_tokens,
            "speak_every": speak_every, "block_ms": BLOCK_MS,
            "session_step_ms": stats.step_ms if stats else None,
            "session_real_time_factor": stats.real_time_factor if stats else None}


def measure_precisions(packages, profile: str, chunks: int) -> list[dict]:
    rows = []
    for package in packages:
        engine = make_engine(package, profile)
        mels = chunk_mels(synthetic_audio(CHUNK_SECONDS * chunks, seed=5))
        listening = measure_listening(engine, mels)
        rows.append({"package": str(package), "precision": engine.package.decoder["precision"],
                     "decoder_step_ms": listening["decoder_step_ms"], "step_ms": listening["step_ms"],
                     "headroom": listening["headroom"]})
        del engine
    return rows


# --- PyTorch side by side -------------------------------------------------------------------

def compare_torch(engine, checkpoint, mels: np.ndarray, rounds: int, threads: int) -> dict:
    """TorchReference vs this engine on the same chunks: step time, TTFR-equivalent, decisions.

    Decisions use each side's own greedy choice (speak_bias 0, the manifest's sampling is
    greedy at fp32); a chunk both decide to speak on gets a reply on both (up to 8 tokens)
    before listening goes on. The TTFR-equivalent forces TEXT_BEGIN on both sides
    (speak_bias on the engine; the reference is put in the same state it reaches when it
    decides to speak) and times encoder + listen + first reply token.
    """
    try:
        import torch

        from .export.reference import TorchReference
    except ImportError as exc:
        raise Error(f"--compare-torch needs torch and transformers (pip install listenloop[export]): {exc}") from None
    torch.set_num_threads(threads)
    reference = TorchReference(checkpoint, max_context=engine.capacity)
    tokens = reference.tokens

    def forced_speak(ref):
        ref._previous, ref._speaking = tokens["TEXT_BEGIN"], True  # what listen() sets on a speak decision

    # Decisions and listening steps: each side on its own (two thread pools spinning on the
    # same cores would slow both), same chunks, each side's own greedy decisions.
    n = max(2, min(len(mels), (engine.capacity - engine.reply_reserve) // (STEP_TOKENS + 9) - 4))

    def stream(side):
        side.reset()
        decisions, times = [], []
        for i in range(n):
            t0 = time.perf_counter()
            result = side.listen(side.encode(mels[i][None])[0])
            if i:  # the first step also feeds the prompt prefix
                times.append(_ms(time.perf_counter() - t0))
            decisions.append(bool(result.spoke))
            if result.spoke:
                for _ in side.speak(8):
                    pass
        return decisions, times

    engine.speak_bias = 0.0
    saved_sampler = engine.sampler
    engine.sampler = Sampler(SamplingConfig())  # the plain greedy decision the reference makes
    try:
        ours_decisions, ours_ms = stream(engine)
    finally:
        engine.sampler = saved_sampler
    theirs_decisions, theirs_ms = stream(reference)
    agree = 0
    for a, b in zip(ours_decisions, theirs_decisions):
        if a != b:
            break  # the two contexts differ from here on
        agree += 1
    decisions = len(ours_decisions)
    both_spoke = sum(a and b for a, b in zip(ours_decisions[:agree], theirs_decisions[:agree]))

    ours_ttfr, theirs_ttfr = [], []
    for r in range(rounds):
        first, second = mels[r % len(mels)][None], mels[(r + 1) % len(mels)][None]
        engine.reset()
        engine.speak_bias = NEVER_SPEAK
        engine.listen(engine.encode(first)[0])
        engine.speak_bias = ALWAYS_SPEAK
        t0 = time.perf_counter()
        engine.listen(engine.encode(second)[0])
        reply = engine.speak(2)
        next(reply)
        ours_ttfr.append(_ms(time.perf_counter() - t0))
        reply.close()
    for r in range(rounds):
        first, second = mels[r % len(mels)][None], mels[(r + 1) % len(mels)][None]
        reference.reset()
        if reference.listen(reference.encode(first)[0]).spoke:
            for _ in reference.speak(1):
                pass
        t0 = time.perf_counter()
        if not reference.listen(reference.encode(second)[0]).spoke:
            forced_speak(reference)
        reply = reference.speak(1)
        next(reply)
        theirs_ttfr.append(_ms(time.perf_counter() - t0))
        reply.close()
    engine.speak_bias = NEVER_SPEAK
    engine.reset()
    ours, theirs = summarize(ours_ms), summarize(theirs_ms)
    ours_t, theirs_t = summarize(ours_ttfr), summarize(theirs_ttfr)
    return {"checkpoint": str(checkpoint), "torch": torch.__version__, "torch_threads": threads,
            "listen_step_ms": {"listenloop": ours, "torch": theirs},
            "ttfr_equivalent_ms": {"listenloop": ours_t, "torch": theirs_t},
            "step_speedup": theirs["median"] / ours["median"], "ttfr_speedup": theirs_t["median"] / ours_t["median"],
            "decisions": decisions, "decisions_agree": agree, "both_spoke": both_spoke,
            "decision_agreement": agree / decisions}


def with_threads(profile, threads: int):
    """The profile with `threads` ORT intra-op threads (the PyTorch side uses as many)."""
    import dataclasses

    from .profiles import load_profile

    if threads < 1:
        raise Error(f"--threads must be >= 1, got {threads}")
    base = load_profile(profile)
    return dataclasses.replace(base, name=f"{base.name}-{threads}t",
                               session={**base.session, "intra_op_num_threads": threads})


# --- the whole run --------------------------------------------------------------------------

def run(package=None, profile: str = "cpu", *, chunks: int = 200, reply_tokens: int = 64, rounds: int = 30,
        context_lengths=(500, 2000, 4000), context_steps: int = 20, session_chunks: int = 25,
        speak_every: int = 1, catch_up_chunks: int = 8, precision_packages=(), torch_checkpoint=None,
        threads: int | None = None, log=print) -> dict:
    """Every figure; `log` gets a line per phase (None: silent)."""
    say = log or (lambda *_: None)
    if threads is not None:
        profile = with_threads(profile, threads)
    startup, runtime = measure_startup(package, profile, reply_tokens)
    engine = runtime.engine
    results = {"environment": environment(engine), "startup": startup,
               "method": {"speak_bias_listening": NEVER_SPEAK, "speak_bias_replies": ALWAYS_SPEAK,
                          "replies": "scripted: best non-control token, TEXT_END after reply_tokens tokens",
                          "audio": "synthetic (seeded noise + tones)"}}
    say(f"listening: {chunks} chunks")
    mels_all = chunk_mels(synthetic_audio(CHUNK_SECONDS * chunks, seed=0))
    mels = mels_all[:64]  # the chunks the reply, context and PyTorch figures cycle through
    results["listening"] = measure_listening(engine, mels_all)
    say("scheduler")
    results["scheduler_ms"] = measure_scheduler(min(chunks, 50))
    say(f"replies: {rounds} x {reply_tokens} tokens")
    results["reply"] = measure_reply(engine, mels, rounds, reply_tokens)
    results["catch_up"] = measure_catch_up(engine, mels, max(3, rounds // 3), reply_tokens, catch_up_chunks)
    say(f"context scaling: {list(context_lengths)}")
    results["context"] = measure_context(engine, mels, context_lengths, context_steps)
    lis, rep = results["listening"], results["reply"]
    split = {"scheduler": results["scheduler_ms"]["median"], "encoder": rep["encoder_ms"]["median"],
             "listen": rep["listen_ms"]["median"], "first_token": rep["first_token_ms"]["median"]}
    results["ttfr_split_ms"] = split
    results["ttfr_components_sum_ms"] = sum(split.values())
    if session_chunks:
        say(f"end-to-end session: {session_chunks} chunks in real time ({session_chunks * CHUNK_SECONDS:.0f} s)")
        results["session"] = measure_session(runtime, session_chunks, min(reply_tokens, 16), speak_every)
    # memory before other packages and torch are loaded: this engine and one session only
    results["memory"] = {"peak_rss_mb_at_start": startup["peak_rss_mb"], "peak_rss_mb_after_stream": peak_rss_mb(),
                         "rss_mb_after_stream": rss_mb()}
    if precision_packages:
        say(f"precisions: {len(precision_packages)} packages")
        results["precisions"] = measure_precisions(precision_packages, profile, min(chunks, 100))
    if torch_checkpoint:
        say("PyTorch side by side")
        threads = engine.decoder.get_session_options().intra_op_num_threads or os.cpu_count()
        results["torch"] = compare_torch(engine, torch_checkpoint, mels, rounds, threads)
    results["environment"]["load_average_end"] = list(os.getloadavg())
    return results


# --- output ---------------------------------------------------------------------------------

def _fmt(s: dict) -> str:
    if not s or not s.get("n"):
        return "n/a"
    return f"{s['median']:8.3f} {s['p90']:8.3f} {s['p99']:8.3f}   (n={s['n']})"


def _headroom_note(h: float) -> str:
    return "  SLOWER THAN REAL TIME" if h > 1 else ""


def report(results: dict) -> str:
    env = results["environment"]
    lines = [f"listenloop bench: {env['model']} ({env['precision']} decoder, {env['layers']} layers, hidden {env['hidden_size']})",
             f"  device {env['device']} | {','.join(env['providers'])} | ORT {env['onnxruntime']} | "
             f"{env['physical_cores']} physical cores, intra-op {env['intra_op_threads']} | load {env['load_average'][0]:.2f}",
             "  replies forced with speak_bias=+50 and scripted to a fixed length; listening with speak_bias=-50",
             "", f"{'figure (ms)':34s} {'median':>8s} {'p90':>8s} {'p99':>8s}"]
    lis = results["listening"]
    for name, key in (("mel (C++)", "mel_ms"), ("encoder", "encoder_ms"), ("decoder listening step", "decoder_step_ms"),
                      ("listening step (mel+enc+dec)", "step_ms")):
        lines.append(f"{name:34s} {_fmt(lis[key])}")
    lines.append(f"{'  real-time headroom (step/0.4 s)':34s} {lis['headroom']:8.4f} (p99 {lis['headroom_p99']:.4f}){_headroom_note(lis['headroom'])}")
    cu = results["catch_up"]
    lines.append(f"{'catch-up step per chunk':34s} {_fmt(cu['step_ms_per_chunk'])}  [{cu['chunks']} chunks after a {cu['reply_tokens']}-token reply]")
    lines.append(f"{'  headroom after a reply':34s} {cu['headroom']:8.4f}{_headroom_note(cu['headroom'])}")
    lines.append(f"{'scheduler (last sample -> mel)':34s} {_fmt(results['scheduler_ms'])}")
    rep = results["reply"]
    lines.append(f"{'TEXT_BEGIN -> first text token':34s} {_fmt(rep['first_token_ms'])}")
    lines.append(f"{'TTFR on the engine (enc+dec+1st)':34s} {_fmt(rep['engine_ttfr_ms'])}")
    split = results["ttfr_split_ms"]
    lines.append("TTFR split (medians): " + ", ".join(f"{k} {v:.3f}" for k, v in split.items())
                 + f" = {results['ttfr_components_sum_ms']:.3f} ms")
    if "session" in results:
        s = results["session"]
        lines.append(f"{'TTFR end to end (Session, 20 ms)':34s} {_fmt(s['ttfr_ms'])}  "
                     f"[{s['replies']} replies, {s['stale_triggers']} catch-up triggers excluded]")
        for name, fig in s["ttfr_split_ms"].items():
            lines.append(f"{'  ' + name.replace('_', ' '):34s} {_fmt(fig)}")
    lines.append(f"reply decode: {rep['tokens_per_s']['median']:.1f} tokens/s median ({rep['reply_tokens']}-token replies)")
    st, mem = results["startup"], results["memory"]
    lines.append(f"start-up: load {st['load_ms']:.1f} ms, first decision {st['first_decision_ms']:.1f} ms | "
                 f"peak RSS {mem['peak_rss_mb_at_start']:.0f} MiB at start, {mem['peak_rss_mb_after_stream']:.0f} MiB after the run")
    lines.append("step vs context (decoder listen only):")
    for row in results["context"]:
        if "skipped" in row:
            lines.append(f"  {row['context']:6d} tokens: skipped ({row['skipped']})")
        else:
            lines.append(f"  {row['context']:6d} tokens: {_fmt(row['step_ms'])}  [mean {row['mean_position']:.0f} cached]")
    for row in results.get("precisions", []):
        lines.append(f"  precision {row['precision']:5s}: decoder step {row['decoder_step_ms']['median']:.3f} ms, "
                     f"listening step {row['step_ms']['median']:.3f} ms, headroom {row['headroom']:.4f}{_headroom_note(row['headroom'])}")
    if "torch" in results:
        t = results["torch"]
        lines.append(f"PyTorch side by side (torch {t['torch']}, {t['torch_threads']} threads):")
        lines.append(f"  listening step  listenloop {t['listen_step_ms']['listenloop']['median']:.3f} ms, "
                     f"torch {t['listen_step_ms']['torch']['median']:.3f} ms -> {t['step_speedup']:.2f}x faster")
        lines.append(f"  TTFR-equivalent listenloop {t['ttfr_equivalent_ms']['listenloop']['median']:.3f} ms, "
                     f"torch {t['ttfr_equivalent_ms']['torch']['median']:.3f} ms -> {t['ttfr_speedup']:.2f}x faster")
        lines.append(f"  decisions agree {t['decisions_agree']}/{t['decisions']} ({t['both_spoke']} spoke on both)")
    return "\n".join(lines)


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def compare(results: dict, old: dict) -> str:
    """Ratios new/old of every median, headroom and speed figure both runs have."""
    new_f, old_f = _flatten(results), _flatten(old)
    keys = [k for k in new_f if k in old_f and (k.endswith(".median") or "headroom" in k or "speedup" in k
                                                 or k.endswith("_ms") and k.startswith("startup"))
            and not k.startswith("environment") and old_f[k]]
    lines = [f"compared with {old.get('environment', {}).get('time_utc', 'the old run')} "
             f"({old.get('environment', {}).get('device', '?')}): new / old (< 1 is faster for times)"]
    for k in keys:
        lines.append(f"  {k:55s} {old_f[k]:10.3f} -> {new_f[k]:10.3f}   x{new_f[k] / old_f[k]:.3f}")
    return "\n".join(lines)


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = results["environment"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    samples = results["listening"].get("samples_ms", [])
    if samples:  # log bins: the median and the scheduling outliers of a shared machine both show
        ax.hist(samples, bins=np.logspace(np.log10(max(min(samples), 1e-3)), np.log10(max(samples)) + 1e-9, 40),
                color="#4477aa")
        ax.set_xscale("log")
    med = results["listening"]["step_ms"]["median"]
    ax.axvline(med, color="k", linestyle="--", label=f"median {med:.2f} ms")
    ax.set_xlabel("listening step per 0.4 s chunk (ms): mel + encoder + decoder")
    ax.set_ylabel("chunks")
    ax.legend()
    ax.set_title("step-time distribution")

    ax = axes[0][1]
    bottom = 0.0
    colours = ["#ccbb44", "#66ccee", "#4477aa", "#ee6677"]
    for (name, value), colour in zip(results["ttfr_split_ms"].items(), colours):
        ax.bar(["engine stages"], [value], bottom=bottom, label=f"{name} {value:.2f} ms", color=colour)
        bottom += value
    if results.get("session", {}).get("ttfr_ms", {}).get("n"):
        ax.bar(["end to end (Session)"], [results["session"]["ttfr_ms"]["median"]], color="#aa3377",
               label=f"end to end {results['session']['ttfr_ms']['median']:.2f} ms")
    ax.set_ylabel("ms (medians)")
    ax.set_title("TTFR split")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    rows = [r for r in results["context"] if "skipped" not in r]
    if rows:
        ax.errorbar([r["mean_position"] for r in rows], [r["step_ms"]["median"] for r in rows],
                    yerr=[[0] * len(rows), [r["step_ms"]["p90"] - r["step_ms"]["median"] for r in rows]],
                    marker="o", capsize=4)
    ax.set_xlabel("tokens in the KV cache")
    ax.set_ylabel("decoder listening step (ms, median, bar to p90)")
    ax.set_title("step time vs context length")

    ax = axes[1][1]
    labels, values = [], []
    for row in results.get("precisions", []):
        labels.append(f"{row['precision']}")
        values.append(row["decoder_step_ms"]["median"])
    if "torch" in results:
        t = results["torch"]["listen_step_ms"]
        labels += ["listenloop\n(enc+dec)", "PyTorch\n(enc+dec)"]
        values += [t["listenloop"]["median"], t["torch"]["median"]]
    if labels:
        ax.bar(labels, values, color="#228833")
        ax.set_ylabel("ms (median)")
        ax.set_title("decoder step by precision; listening step vs PyTorch")
    else:
        ax.axis("off")
    fig.suptitle(f"{env['model']} {env['precision']} | {env['device']} | {','.join(env['providers'])} | "
                 f"ORT {env['onnxruntime']} | load {env['load_average'][0]:.1f}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- command line ---------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("package", nargs="?", default=None, help="model package folder (default: the embedded model)")
    p.add_argument("--profile", default="cpu", help="cpu, cuda, jetson or a profile .json (default: cpu)")
    p.add_argument("--chunks", type=int, default=200, help="chunks of the steady listening run (default 200)")
    p.add_argument("--rounds", type=int, default=30, help="replies timed for TTFR and decode speed (default 30)")
    p.add_argument("--reply-tokens", type=int, default=64, help="length of the scripted replies (default 64)")
    p.add_argument("--context", default="500,2000,4000", help="context lengths of the scaling run (default 500,2000,4000)")
    p.add_argument("--context-steps", type=int, default=20, help="steps timed at each context length")
    p.add_argument("--session-chunks", type=int, default=25,
                   help="chunks of the real-time end-to-end session (0 skips it; 25 = 10 s); "
                        "its replies are min(--reply-tokens, 16) tokens")
    p.add_argument("--speak-every", type=int, default=1,
                   help="in the session, at most every N-th chunk may trigger a reply (large models: replies outlast a chunk)")
    p.add_argument("--catch-up-chunks", type=int, default=8, help="chunks decided in one call after a reply (max 16)")
    p.add_argument("--precision-packages", nargs="+", default=(), metavar="DIR",
                   help="more packages of the same checkpoint (fp32/int8/int4/fp16) for the precision scaling")
    p.add_argument("--compare-torch", metavar="CHECKPOINT", help="also run the PyTorch reference on this checkpoint")
    p.add_argument("--threads", type=int, default=None,
                   help="ORT intra-op threads (default: the profile's); PyTorch gets as many")
    p.add_argument("--json", metavar="FILE", help="save every figure and the environment")
    p.add_argument("--plot", metavar="FILE.png", help="write the plots")
    p.add_argument("--compare", metavar="OLD.json", help="print ratios against a previous --json run")


def main(args) -> int:
    if args.chunks < 10 or args.rounds < 3 or args.reply_tokens < 2:
        raise Error("--chunks must be >= 10, --rounds >= 3 and --reply-tokens >= 2")
    old = None
    if args.compare:
        try:
            old = json.loads(Path(args.compare).read_text())
        except (OSError, ValueError) as exc:
            raise Error(f"--compare {args.compare}: cannot read a bench JSON file ({exc})") from None
    try:
        lengths = tuple(int(x) for x in args.context.split(",") if x.strip())
    except ValueError:
        raise Error(f"--context must be comma-separated token counts, got {args.context!r}") from None
    results = run(args.package, args.profile, chunks=args.chunks, reply_tokens=args.reply_tokens, rounds=args.rounds,
                  context_lengths=lengths, context_steps=args.context_steps, session_chunks=args.session_chunks,
                  speak_every=args.speak_every, catch_up_chunks=args.catch_up_chunks,
                  precision_packages=args.precision_packages, torch_checkpoint=args.compare_torch, threads=args.threads,
                  log=lambda line: print(f"... {line}", file=sys.stderr, flush=True))
    print(report(results))
    if old is not None:
        print(compare(results, old))
    if args.plot:
        plot(results, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0
