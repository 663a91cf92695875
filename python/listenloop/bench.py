"""Latency, throughput and memory figures of one model package on this machine (`listenloop bench`).

Every single-stream figure is measured on synthetic audio (seeded noise and tones), so nothing
is downloaded; the multi-session figure feeds a recording (default: examples/kitchen.wav).
Times are time.perf_counter for stage timings and time.monotonic_ns (the ring buffer's steady
clock) for end-to-end figures. Each distribution is summarised by median, p90 and p99.

Streams and policies: a stream's policy is fixed when it is created (stream.Policy), so every
measurement creates the streams it needs over one shared Model (a stream costs only its KV
cache). On a random model replies are forced with speak_bias +50 and scripted by
`ScriptedReplies` ("best non-control token, TEXT_END after exactly N tokens"; which decisions
may speak is part of the script), so every reply has text and a known length. Listening
figures use `listening_stream`: speak_bias +50 keeps p_speak near 1, so no quiet-moment reset
(docs/PROTOCOL.md, "Context policy") interrupts the run, while its script never lets it speak:
every timed step is a steady 13-token step, and the context fills up to its capacity.

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

Several sessions (`measure_sessions`, `bench_sessions`): one Runtime, N sessions open at once,
each fed the same recording in 0.1 s pieces as fast as possible from its own thread; aggregate
chunks/s, each stream's listening step, KV bytes per session, and whether every session's
events (decisions, p_speak, reply text, context resets) equal those of a single session.

torch is imported only for --compare-torch.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .errors import Error
from .profiles import profile_help
from .protocol import BLOCK, CHUNK_SAMPLES, CHUNK_SECONDS, SAMPLE_RATE, STEP
from .sampling import Sampler, SamplingConfig

BLOCK_MS = 20  # real-time feeding block of the end-to-end session run
PIECE_SECONDS = 0.1  # feeding piece of the multi-session run
ALWAYS_SPEAK = 50.0  # speak_bias that makes any model choose TEXT_BEGIN (p_speak near 1)
SESSION_COUNTS = (1, 4, 16)


def examples_dir() -> Path:
    """examples/ of the source tree this module runs from, else of the current folder."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "examples" / "kitchen.wav").is_file():
            return root / "examples"
    return Path(__file__).resolve().parents[2] / "examples"


DEFAULT_RECORDING = examples_dir() / "kitchen.wav"


# --- statistics and environment -------------------------------------------------------------

def summarize(values_ms) -> dict:
    """median / p90 / p99 / mean / min / max / n of a list of milliseconds."""
    v = np.asarray(list(values_ms), dtype=np.float64)
    if v.size == 0:
        return {"n": 0}
    return {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "p99": float(np.percentile(v, 99)),
            "mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


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
    """Resident set size of this process now, MiB (Linux /proc, else psutil, else NaN)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        pass
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


def total_memory_bytes() -> int | None:
    """Physical memory of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def environment(model) -> dict:
    """Machine, software and package of a run on `model` (a listenloop.model.Model)."""
    import onnxruntime as ort

    from . import __version__
    from .profiles import physical_cores

    dec = model.package.decoder
    env = {"listenloop": __version__, "onnxruntime": ort.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "cpu": cpu_model(), "logical_cpus": os.cpu_count(),
           "physical_cores": physical_cores(), "load_average": list(os.getloadavg()),
           "profile": model.profile.name, "providers": list(model.providers),
           "intra_op_threads": model.decoder.get_session_options().intra_op_num_threads,
           "package": str(model.package.path), "model": model.package.name,
           "precision": dec["precision"], "encoder_precision": model.package.manifest["encoder"]["precision"],
           "io_dtype": dec["io_dtype"], "layers": dec["num_layers"], "hidden_size": dec["hidden_size"],
           "vocab_size": dec["vocab_size"], "context_capacity": model.capacity, "kv_bytes_per_stream": model.kv_bytes,
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if "CUDAExecutionProvider" in model.providers:
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


# --- synthetic input, scripted replies, streams -------------------------------------------

def synthetic_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise with wandering tones, float32 16 kHz: mel and encoder work like on speech."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    tone = np.sin(2 * np.pi * (220 + 180 * np.sin(2 * np.pi * 0.3 * t)) * t)
    return (0.05 * rng.standard_normal(n) + 0.2 * tone).astype(np.float32)


def chunk_mels(audio: np.ndarray) -> np.ndarray:
    """[k,128,40] normalised log-mels of consecutive chunks, as a session feeds the encoder."""
    from . import _core

    mel = _core.StreamingMel(CHUNK_SAMPLES)
    k = len(audio) // CHUNK_SAMPLES
    return np.stack([mel(audio[i * CHUNK_SAMPLES:(i + 1) * CHUNK_SAMPLES]) for i in range(k)])


def load_recording(path=None) -> np.ndarray:
    """An audio file as 16 kHz float32 mono (default: DEFAULT_RECORDING, examples/kitchen.wav)."""
    from .audio import read_audio

    path = Path(path) if path is not None else DEFAULT_RECORDING
    if not path.is_file():
        raise Error(f"{path}: no such recording; pass --recording FILE (any audio file)")
    return read_audio(path)


class ScriptedReplies(Sampler):
    """Replies of exactly `reply_tokens` text tokens on any model (random ones included).

    Reply tokens: the best non-control token, then TEXT_END once `reply_tokens` were given.
    Decisions: greedy on the logits (speak_bias included), but only decision number d
    (counted from 1 over the sampler's life) with d % speak_every == speak_at % speak_every
    may speak: every `speak_every`-th decision by default, so long replies do not turn every
    chunk into a catch-up; speak_every 0 never speaks. The script is part of the stream's
    policy, fixed at creation; a stream that is reset keeps counting its decisions.
    """

    def __init__(self, tokens: dict, reply_tokens: int, speak_every: int = 1, speak_at: int = 0):
        super().__init__(SamplingConfig())
        if reply_tokens < 1 or speak_every < 0:
            raise ValueError("reply_tokens must be >= 1 and speak_every >= 0")
        self.text_end = tokens["TEXT_END"]
        self.control = np.array(sorted(set(tokens.values())), dtype=np.int64)
        self.reply_tokens = reply_tokens
        self.speak_every = speak_every
        self.speak_at = speak_at
        self._given = 0
        self._decisions = 0

    def may_speak(self, decision: int) -> bool:
        """Whether decision number `decision` (from 1) is allowed to speak."""
        return bool(self.speak_every) and decision % self.speak_every == self.speak_at % self.speak_every

    def decide(self, silence_logit: float, speak_logit: float) -> bool:
        self._given = 0
        self._decisions += 1
        return self.may_speak(self._decisions) and bool(speak_logit > silence_logit)

    def sample(self, logits: np.ndarray) -> int:
        if self._given >= self.reply_tokens:
            return self.text_end
        self._given += 1
        row = np.array(logits, dtype=np.float32, copy=True)
        row[self.control] = -np.inf
        return int(np.argmax(row))


def scripted_policy(tokens: dict, reply_tokens: int, speak_every: int = 1, speak_at: int = 0) -> dict:
    """Policy options of a stream or session that speaks on scripted decisions (speak_bias +50)
    with `reply_tokens`-token scripted replies; max_reply_tokens leaves room for TEXT_END."""
    return {"speak_bias": ALWAYS_SPEAK, "sampler": ScriptedReplies(tokens, reply_tokens, speak_every, speak_at),
            "max_reply_tokens": reply_tokens + 1}


def replying_stream(model, reply_tokens: int, speak_every: int = 1, speak_at: int = 0):
    """A DecoderStream over `model` with scripted_policy."""
    return model.stream(**scripted_policy(model.tokens, reply_tokens, speak_every, speak_at))


def listening_stream(model, reply_tokens: int = 16):
    """A DecoderStream over `model` that never speaks, with p_speak held near 1 so that only a
    full context resets it (docs/PROTOCOL.md, "Context policy"). `reply_tokens` sets the room
    kept free for a reply, as in replying_stream."""
    return replying_stream(model, reply_tokens, speak_every=0)


def load_model(package=None, profile="cpu", max_context: int | None = None):
    """The shared, read-only Model of a package (`package`: folder, ModelPackage or None)."""
    from .model import Model

    return Model(package, profile, max_context=max_context)


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


def _ms(seconds: float) -> float:
    return seconds * 1000.0


# --- measurements ---------------------------------------------------------------------------

def measure_startup(package, profile="cpu") -> tuple[dict, object]:
    """Package load -> first decision, in this process (ORT already imported); returns the Runtime.

    The Runtime carries the package's own policy; every measurement opens the streams and
    sessions it needs over `runtime.model` with its own policy."""
    from .session import Runtime

    mel = chunk_mels(synthetic_audio(CHUNK_SECONDS, seed=1))
    start = time.perf_counter()
    runtime = Runtime(package, profile)
    loaded = time.perf_counter()
    model = runtime.model
    model.stream().listen(model.encode(mel)[0])
    first = time.perf_counter()
    return {"load_ms": _ms(loaded - start), "first_decision_ms": _ms(first - start),
            "kv_bytes_per_stream": model.kv_bytes, "rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb()}, runtime


def measure_listening(model, mels: np.ndarray, stream=None) -> dict:
    """Steady stream, never speaking: mel, encoder, decoder step and their sum per chunk.

    `stream`: default listening_stream(model). When the context is full the stream starts
    over with an untimed prefix step: a context rebuild is not a listening step."""
    from . import _core

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
        mel_ms.append(_ms(t1 - t0))
        enc_ms.append(_ms(t2 - t1))
        dec_ms.append(_ms(t3 - t2))
        total_ms.append(_ms(t3 - t0))
    step = summarize(total_ms)
    return {"mel_ms": summarize(mel_ms), "encoder_ms": summarize(enc_ms), "decoder_step_ms": summarize(dec_ms),
            "step_ms": step, "headroom": step["median"] / _ms(CHUNK_SECONDS),
            "headroom_p99": step["p99"] / _ms(CHUNK_SECONDS), "samples_ms": total_ms}


def measure_scheduler(chunks: int) -> dict:
    """ChunkScheduler: a chunk's last sample written -> its raw mel queued (ready_ns - arrived_ns)."""
    from . import _core

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
        enc_ms.append(_ms(t1 - t0))
        listen_ms.append(_ms(t2 - t1))
        first_ms.append(_ms(marks[0]))
        total.append(_ms(t2 - t0 + marks[0]))
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
    from .context import reply_reserve

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
            times.append(_ms(time.perf_counter() - t0))
            if result.spoke or result.context_reset:
                raise Error(f"catch-up chunk {j} {'spoke' if result.spoke else 'rebuilt the context'}")
        per_chunk += times
        first.append(times[0])
        totals.append(sum(times))
    step = summarize(per_chunk)
    return {"chunks": chunks, "chunks_requested": requested, "reply_tokens": reply_tokens,
            "reply_ms": summarize([_ms(s) for s in reply_s]),
            "step_ms_per_chunk": step, "first_step_ms": summarize(first), "total_ms": summarize(totals),
            "headroom": step["median"] / _ms(CHUNK_SECONDS),
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
            times.append(_ms(elapsed))
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


# --- several sessions on one Runtime --------------------------------------------------------

def event_signature(events) -> dict:
    """What must not depend on other sessions: decisions with p_speak, replies, context resets."""
    return {"decisions": [(e.chunk, e.spoke, e.p_speak) for e in events if e.kind == "Decision"],
            "replies": [(e.chunk, e.text, e.truncated) for e in events if e.kind == "ReplyEnded"],
            "context_resets": [e.chunk for e in events if e.kind == "ContextReset"]}


def first_difference(signature: dict, reference: dict) -> str | None:
    """The first place where `signature` differs from `reference`, in words; None if equal."""
    for key in ("decisions", "replies", "context_resets"):
        ours, theirs = signature[key], reference[key]
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if a != b:
                return f"{key}[{i}]: {a!r} vs {b!r} in the single session"
        if len(ours) != len(theirs):
            return f"{len(ours)} {key} vs {len(theirs)} in the single session"
    return None


def _run_sessions(runtime, n: int, audio: np.ndarray, piece: int, policy: dict) -> tuple[dict, list]:
    """N sessions open at once, each fed `audio` in `piece`-sample pieces as fast as it is taken
    (accept_waveform waits while a session's pipeline is full), each from its own thread, which
    also reads its events; timed from the release of all feeders to the last Finished event."""
    rss_before = rss_mb()
    opened = time.perf_counter()
    sessions = [runtime.session(**policy) for _ in range(n)]
    open_ms = _ms(time.perf_counter() - opened)
    rss_open = rss_mb()
    collected = [[] for _ in range(n)]
    ends = [0.0] * n
    failures = []
    gate = threading.Barrier(n + 1)

    def feed(i):
        session, out = sessions[i], collected[i]
        try:
            gate.wait()
            for offset in range(0, len(audio), piece):
                session.accept_waveform(audio[offset:offset + piece], SAMPLE_RATE)
                out.extend(session.drain())
            session.finish(timeout=600)
            out.extend(session.events(timeout=None))
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            failures.append((i, exc))
        finally:
            ends[i] = time.perf_counter()

    threads = [threading.Thread(target=feed, args=(i,), name=f"listenloop-bench-feeder-{i}", daemon=True)
               for i in range(n)]
    try:
        for thread in threads:
            thread.start()
        gate.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
    finally:
        for session in sessions:
            session.close()
    if failures:
        i, exc = failures[0]
        raise Error(f"session {i} of {n} failed: {exc}")
    wall = max(ends) - start
    finished = [next((e for e in events if e.kind == "Finished"), None) for events in collected]
    if any(f is None for f in finished):
        raise Error("a session's event stream ended without Finished")
    stats = [next(e for e in reversed(events) if e.kind == "Stats") for events in collected]  # finish()'s
    chunks = [f.chunks for f in finished]
    total = sum(chunks)
    row = {"sessions": n, "wall_s": wall, "chunks": total, "chunks_per_session": chunks[0],
           "chunks_per_s": total / wall, "real_time_streams": total / wall * CHUNK_SECONDS,
           "session_chunks_per_s": summarize([c / (end - start) for c, end in zip(chunks, ends)]),
           "step_ms": summarize([s.step_ms for s in stats]),
           "real_time_factor": summarize([s.real_time_factor for s in stats]),
           "kv_bytes_per_session": stats[0].kv_bytes, "kv_bytes_total": sum(s.kv_bytes for s in stats),
           "dropped_chunks": sum(s.dropped_chunks for s in stats),
           "dropped_samples": sum(s.dropped_samples for s in stats),
           "dropped_events": sum(s.dropped_events for s in stats),
           "open_ms": open_ms, "rss_mb_before": rss_before, "rss_mb_opened": rss_open, "rss_mb_after": rss_mb()}
    return row, [event_signature(events) for events in collected]


def single_session_signature(runtime, audio: np.ndarray, *, piece_seconds: float = PIECE_SECONDS, **policy) -> dict:
    """event_signature of one session of `runtime` fed `audio` alone, as measure_sessions feeds it."""
    piece = max(1, int(round(piece_seconds * SAMPLE_RATE)))
    return _run_sessions(runtime, 1, audio, piece, policy)[1][0]


def measure_sessions(runtime, counts=SESSION_COUNTS, audio: np.ndarray | None = None, *, recording=None,
                     piece_seconds: float = PIECE_SECONDS, reference: dict | None = None, log=None, **policy) -> dict:
    """Aggregate throughput of several sessions on one Runtime, and their determinism.

    For each N in `counts`: N sessions open at once (`runtime.session(**policy)`: the
    Runtime's policy unless overridden), each fed the same audio (`audio`, 16 kHz float32, or
    the `recording` file; default examples/kitchen.wav) in `piece_seconds` pieces as fast as
    possible from N feeder threads. Per N: aggregate chunks/s (all sessions' chunks / wall
    time), the sessions' listening step (each session's Stats.step_ms: median over its last
    steps of mel normalisation + encoder + decoder step, as the model thread decides them),
    KV bytes per session, and how many sessions produced exactly the decisions, p_speak,
    reply texts and context resets of a single session: `reference` (a
    single_session_signature), else the N=1 run, else one extra single session run first."""
    counts = sorted({int(n) for n in counts})
    if not counts or counts[0] < 1:
        raise Error(f"session counts must be whole numbers >= 1, got {counts}")
    if audio is None:
        name = Path(recording if recording is not None else DEFAULT_RECORDING).name
        audio = load_recording(recording)
    else:
        name = Path(recording).name if recording is not None else "given audio"
    piece = max(1, int(round(piece_seconds * SAMPLE_RATE)))
    say = log or (lambda *_: None)
    if reference is None and counts[0] != 1:
        say("sessions: 1 (reference)")
        _, (reference,) = _run_sessions(runtime, 1, audio, piece, policy)
    runs = {}
    for n in counts:
        say(f"sessions: {n} at once")
        row, signatures = _run_sessions(runtime, n, audio, piece, policy)
        if reference is None:
            reference = signatures[0]
        differences = [d for d in (first_difference(s, reference) for s in signatures) if d is not None]
        row["identical_to_single_session"] = n - len(differences)
        row["differences"] = differences[:3]
        runs[str(n)] = row
    return {"recording": name, "audio_seconds": len(audio) / SAMPLE_RATE, "piece_seconds": piece / SAMPLE_RATE,
            "policy": {k: (v if isinstance(v, (int, float, str, type(None))) else type(v).__name__)
                       for k, v in policy.items()} or "the Runtime's",
            "reference_decisions": len(reference["decisions"]), "reference_replies": len(reference["replies"]),
            "runs": runs}


def bench_sessions(package=None, profile="cpu", counts=SESSION_COUNTS, recording=None, *,
                   max_context: int | None = None, **policy) -> dict:
    """measure_sessions on a fresh Runtime(package, profile) (default: the embedded package),
    with the environment; print it with report_sessions()."""
    from .session import Runtime

    with Runtime(package, profile, max_context=max_context) as runtime:
        return {"environment": environment(runtime.model),
                "sessions": measure_sessions(runtime, counts, recording=recording, **policy)}


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


# --- PyTorch side by side -------------------------------------------------------------------

def compare_torch(model, checkpoint, mels: np.ndarray, rounds: int, threads: int) -> dict:
    """TorchReference vs `model` on the same chunks: step time, TTFR-equivalent, decisions.

    Decisions use each side's own greedy choice (a stream with speak_bias 0 and a greedy
    sampler; the reference is greedy); a chunk both decide to speak on gets a reply on both
    (up to 8 tokens) before listening goes on. The run stays below the point where the
    stream's context policy could rebuild its cache, which the reference does not do. The
    TTFR-equivalent forces TEXT_BEGIN on both sides (a scripted stream with speak_bias +50
    whose every second decision speaks; the reference is put in the same state it reaches
    when it decides to speak) and times encoder + listen + first reply token.
    """
    try:
        import torch

        from .export.reference import TorchReference
    except ImportError as exc:
        raise Error(f"--compare-torch needs torch and transformers (pip install listenloop[export]): {exc}") from None
    torch.set_num_threads(threads)
    reference = TorchReference(checkpoint, max_context=model.capacity)
    tokens = reference.tokens

    def forced_speak(ref):
        ref._previous, ref._speaking = tokens["TEXT_BEGIN"], True  # what listen() sets on a speak decision

    greedy = model.stream(speak_bias=0.0, sampler=Sampler(SamplingConfig()))
    ours_side = SimpleNamespace(reset=greedy.reset, listen=greedy.listen, speak=greedy.speak, encode=model.encode)
    # Decisions and listening steps: each side on its own (two thread pools spinning on the
    # same cores would slow both), same chunks, each side's own greedy decisions. A chunk adds
    # at most STEP + 9 tokens (its step, an 8-token reply and TEXT_END).
    n = max(2, min(len(mels), (greedy.context.quiet_from - len(model.prefix_ids)) // (STEP + 9)))

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

    ours_decisions, ours_ms = stream(ours_side)
    theirs_decisions, theirs_ms = stream(reference)
    agree = 0
    for a, b in zip(ours_decisions, theirs_decisions):
        if a != b:
            break  # the two contexts differ from here on
        agree += 1
    decisions = len(ours_decisions)
    both_spoke = sum(a and b for a, b in zip(ours_decisions[:agree], theirs_decisions[:agree]))

    speaker = replying_stream(model, 1, speak_every=2)  # each round: a silent step, then TEXT_BEGIN
    ours_ttfr, theirs_ttfr = [], []
    for r in range(rounds):
        first, second = mels[r % len(mels)][None], mels[(r + 1) % len(mels)][None]
        speaker.reset()
        speaker.listen(model.encode(first)[0])
        t0 = time.perf_counter()
        if not speaker.listen(model.encode(second)[0]).spoke:
            raise Error("speak_bias +50 did not make the model speak")
        reply = speaker.speak(2)
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

def run(package=None, profile="cpu", *, chunks: int = 200, reply_tokens: int = 64, rounds: int = 30,
        context_lengths=(500, 2000, 4000), context_steps: int = 20, session_chunks: int = 25,
        speak_every: int = 1, catch_up_chunks: int = 8, sessions=(), recording=None, sessions_only: bool = False,
        precision_packages=(), torch_checkpoint=None, threads: int | None = None, command: str | None = None,
        log=print) -> dict:
    """Every figure; `log` gets a line per phase (None: silent). `sessions`: session counts of
    the multi-session run (empty: skipped); `sessions_only`: only start-up and that run.
    `command` is recorded as the command line of the run (default: this call, spelled out)."""
    say = log or (lambda *_: None)
    if command is None:
        command = ("listenloop.bench.run(" + ", ".join(f"{k}={v!r}" for k, v in (
            ("package", package), ("profile", profile), ("chunks", chunks), ("reply_tokens", reply_tokens),
            ("rounds", rounds), ("context_lengths", tuple(context_lengths)), ("context_steps", context_steps),
            ("session_chunks", session_chunks), ("speak_every", speak_every), ("catch_up_chunks", catch_up_chunks),
            ("sessions", tuple(sessions)), ("recording", recording), ("sessions_only", sessions_only),
            ("precision_packages", tuple(precision_packages)), ("torch_checkpoint", torch_checkpoint),
            ("threads", threads))) + ")")
    if threads is not None:
        profile = with_threads(profile, threads)
    startup, runtime = measure_startup(package, profile)
    model = runtime.model
    try:
        results = {"command": command, "environment": environment(model), "startup": startup,
                   "method": {"speak_bias_listening": ALWAYS_SPEAK, "speak_bias_replies": ALWAYS_SPEAK,
                              "listening": "scripted never to speak, p_speak held near 1: "
                                           "no quiet-moment context resets",
                              "replies": "scripted: best non-control token, TEXT_END after reply_tokens tokens",
                              "audio": "synthetic (seeded noise + tones)",
                              "sessions": "the package's own policy on a recording"}}
        if not sessions_only:
            say(f"listening: {chunks} chunks")
            mels_all = chunk_mels(synthetic_audio(CHUNK_SECONDS * chunks, seed=0))
            mels = mels_all[:64]  # the chunks the reply, context and PyTorch figures cycle through
            results["listening"] = measure_listening(model, mels_all, listening_stream(model, reply_tokens))
            say("scheduler")
            results["scheduler_ms"] = measure_scheduler(min(chunks, 50))
            say(f"replies: {rounds} x {reply_tokens} tokens")
            results["reply"] = measure_reply(model, mels, rounds, reply_tokens)
            say(f"catch-up: {catch_up_chunks} chunks after each reply")
            results["catch_up"] = measure_catch_up(model, mels, max(3, rounds // 3), reply_tokens, catch_up_chunks)
            say(f"context scaling: {list(context_lengths)}")
            results["context"] = measure_context(model, mels, context_lengths, context_steps, reply_tokens)
            rep = results["reply"]
            split = {"scheduler": results["scheduler_ms"]["median"], "encoder": rep["encoder_ms"]["median"],
                     "listen": rep["listen_ms"]["median"], "first_token": rep["first_token_ms"]["median"]}
            results["ttfr_split_ms"] = split
            results["ttfr_components_sum_ms"] = sum(split.values())
            if session_chunks:
                say(f"end-to-end session: {session_chunks} chunks in real time "
                    f"({session_chunks * CHUNK_SECONDS:.0f} s)")
                results["session"] = measure_session(runtime, session_chunks, min(reply_tokens, 16), speak_every)
        # memory before more sessions, other packages and torch: the model, its streams and one session
        results["memory"] = {"peak_rss_mb_at_start": startup["peak_rss_mb"], "peak_rss_mb_after_stream": peak_rss_mb(),
                             "rss_mb_after_stream": rss_mb()}
        if sessions:
            say(f"several sessions on one Runtime: {', '.join(str(n) for n in sessions)}")
            results["sessions"] = measure_sessions(runtime, sessions, recording=recording, log=say)
        if precision_packages and not sessions_only:
            say(f"precisions: {len(precision_packages)} packages")
            results["precisions"] = measure_precisions(precision_packages, profile, min(chunks, 100))
        if torch_checkpoint and not sessions_only:
            say("PyTorch side by side")
            threads = model.decoder.get_session_options().intra_op_num_threads or os.cpu_count()
            results["torch"] = compare_torch(model, torch_checkpoint, mels, rounds, threads)
    finally:
        runtime.close()
    results["environment"]["load_average_end"] = list(os.getloadavg())
    return results


# --- output ---------------------------------------------------------------------------------

def _fmt(s: dict) -> str:
    if not s or not s.get("n"):
        return "n/a"
    return f"{s['median']:8.3f} {s['p90']:8.3f} {s['p99']:8.3f}   (n={s['n']})"


def _headroom_note(h: float) -> str:
    return "  SLOWER THAN REAL TIME" if h > 1 else ""


def report_sessions(figures: dict) -> str:
    """The multi-session table of measure_sessions' figures."""
    lines = [f"several sessions on one Runtime: {figures['recording']} ({figures['audio_seconds']:.1f} s) in each, "
             f"fed in {figures['piece_seconds']:.1f} s pieces as fast as taken; policy: {figures['policy']}",
             f"  single-session reference: {figures['reference_decisions']} decisions, "
             f"{figures['reference_replies']} replies",
             f"  {'sessions':>8s} {'chunks/s':>9s} {'x real time':>11s} {'wall s':>7s}  "
             f"{'step ms: median (min..max)':>28s} {'KV/session':>12s} {'same as 1 session':>18s}"]
    for row in figures["runs"].values():
        step = row["step_ms"]
        steps = f"{step['median']:.3f} ({step['min']:.3f}..{step['max']:.3f})"
        same = f"{row['identical_to_single_session']}/{row['sessions']}"
        lines.append(f"  {row['sessions']:8d} {row['chunks_per_s']:9.1f} {row['real_time_streams']:11.1f} "
                     f"{row['wall_s']:7.2f}  {steps:>28s} {row['kv_bytes_per_session'] / 2**20:8.2f} MiB {same:>18s}")
        for difference in row["differences"]:
            lines.append(f"      DIFFERS: {difference}")
        if row["dropped_chunks"] or row["dropped_samples"] or row["dropped_events"]:
            lines.append(f"      dropped: {row['dropped_chunks']} chunks, {row['dropped_samples']} samples, "
                         f"{row['dropped_events']} events")
    return "\n".join(lines)


def report(results: dict) -> str:
    env = results["environment"]
    lines = [f"listenloop bench: {env['model']} ({env['precision']} decoder, {env['layers']} layers, hidden {env['hidden_size']})"]
    if results.get("command"):
        lines.append(f"  command: {results['command']}")
    lines += [f"  device {env['device']} | {','.join(env['providers'])} | ORT {env['onnxruntime']} | "
              f"{env['physical_cores']} physical cores, intra-op {env['intra_op_threads']} | load {env['load_average'][0]:.2f}"]
    if "listening" in results:
        lines += ["  replies forced with speak_bias=+50 and scripted to a fixed length; listening scripted never "
                  "to speak (p_speak near 1, so no quiet-moment context resets)",
                  "", f"{'figure (ms)':34s} {'median':>8s} {'p90':>8s} {'p99':>8s}"]
        lis = results["listening"]
        for name, key in (("mel (C++)", "mel_ms"), ("encoder", "encoder_ms"), ("decoder listening step", "decoder_step_ms"),
                          ("listening step (mel+enc+dec)", "step_ms")):
            lines.append(f"{name:34s} {_fmt(lis[key])}")
        lines.append(f"{'  real-time headroom (step/0.4 s)':34s} {lis['headroom']:8.4f} (p99 {lis['headroom_p99']:.4f})"
                     f"{_headroom_note(lis['headroom'])}")
    if "catch_up" in results:
        cu = results["catch_up"]
        lines.append(f"{'catch-up step per chunk (enc+dec)':34s} {_fmt(cu['step_ms_per_chunk'])}  "
                     f"[{cu['chunks']} chunks after a {cu['reply_tokens']}-token reply, one step each]")
        lines.append(f"{'  first one (after TEXT_END)':34s} {_fmt(cu['first_step_ms'])}")
        lines.append(f"{'  all {0} chunks'.format(cu['chunks']):34s} {_fmt(cu['total_ms'])}")
        lines.append(f"{'  headroom after a reply':34s} {cu['headroom']:8.4f}{_headroom_note(cu['headroom'])}")
    if "scheduler_ms" in results:
        lines.append(f"{'scheduler (last sample -> mel)':34s} {_fmt(results['scheduler_ms'])}")
    if "reply" in results:
        rep = results["reply"]
        lines.append(f"{'TEXT_BEGIN -> first text token':34s} {_fmt(rep['first_token_ms'])}")
        lines.append(f"{'TTFR on a stream (enc+dec+1st)':34s} {_fmt(rep['engine_ttfr_ms'])}")
        split = results["ttfr_split_ms"]
        lines.append("TTFR split (medians): " + ", ".join(f"{k} {v:.3f}" for k, v in split.items())
                     + f" = {results['ttfr_components_sum_ms']:.3f} ms")
    if "session" in results:
        s = results["session"]
        lines.append(f"{'TTFR end to end (Session, 20 ms)':34s} {_fmt(s['ttfr_ms'])}  "
                     f"[{s['replies']} replies, {s['stale_triggers']} catch-up triggers excluded]")
        for name, fig in s["ttfr_split_ms"].items():
            lines.append(f"{'  ' + name.replace('_', ' '):34s} {_fmt(fig)}")
    if "reply" in results:
        rep = results["reply"]
        lines.append(f"reply decode: {rep['tokens_per_s']['median']:.1f} tokens/s median ({rep['reply_tokens']}-token replies)")
    if "startup" in results:
        st, mem = results["startup"], results.get("memory", {})
        line = (f"start-up: load {st['load_ms']:.1f} ms, first decision {st['first_decision_ms']:.1f} ms | "
                f"KV cache {st['kv_bytes_per_stream'] / 2**20:.2f} MiB per stream")
        if mem:
            line += (f" | peak RSS {mem['peak_rss_mb_at_start']:.0f} MiB at start, "
                     f"{mem['peak_rss_mb_after_stream']:.0f} MiB after the run")
        lines.append(line)
    if "context" in results:
        lines.append("step vs context (decoder listen only):")
        for row in results["context"]:
            if "skipped" in row:
                lines.append(f"  {row['context']:6d} tokens: skipped ({row['skipped']})")
            else:
                lines.append(f"  {row['context']:6d} tokens: {_fmt(row['step_ms'])}  [mean {row['mean_position']:.0f} cached]")
    for row in results.get("precisions", []):
        lines.append(f"  precision {row['precision']:5s}: decoder step {row['decoder_step_ms']['median']:.3f} ms, "
                     f"listening step {row['step_ms']['median']:.3f} ms, headroom {row['headroom']:.4f}{_headroom_note(row['headroom'])}")
    if "sessions" in results:
        lines.append(report_sessions(results["sessions"]))
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
    """Ratios new/old of every median, headroom, speed and throughput figure both runs have."""
    new_f, old_f = _flatten(results), _flatten(old)
    keys = [k for k in new_f if k in old_f and (k.endswith(".median") or "headroom" in k or "speedup" in k
                                                 or k.endswith(".chunks_per_s")
                                                 or k.endswith("_ms") and k.startswith("startup"))
            and not k.startswith("environment") and old_f[k]]
    lines = [f"compared with {old.get('environment', {}).get('time_utc', 'the old run')} "
             f"({old.get('environment', {}).get('device', '?')}): new / old (< 1 is faster for times)"]
    for k in keys:
        lines.append(f"  {k:55s} {old_f[k]:10.3f} -> {new_f[k]:10.3f}   x{new_f[k] / old_f[k]:.3f}")
    return "\n".join(lines)


def _not_measured(ax, what: str) -> None:
    ax.axis("off")
    ax.text(0.5, 0.5, f"{what}: not measured", ha="center", va="center", transform=ax.transAxes)


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = results["environment"]
    with_sessions = "sessions" in results
    if with_sessions and "listening" not in results:  # --sessions-only
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        _plot_sessions(left, right, results["sessions"])
        _finish_plot(fig, env, path)
        return
    fig, axes = plt.subplots(2, 3 if with_sessions else 2, figsize=(18 if with_sessions else 12, 8), squeeze=False)
    ax = axes[0][0]
    if "listening" in results:
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
    else:
        _not_measured(ax, "listening step")

    ax = axes[0][1]
    if "ttfr_split_ms" in results:
        bottom = 0.0
        colours = ["#ccbb44", "#66ccee", "#4477aa", "#ee6677"]
        for (name, value), colour in zip(results["ttfr_split_ms"].items(), colours):
            ax.bar(["stream stages"], [value], bottom=bottom, label=f"{name} {value:.2f} ms", color=colour)
            bottom += value
        if results.get("session", {}).get("ttfr_ms", {}).get("n"):
            ax.bar(["end to end (Session)"], [results["session"]["ttfr_ms"]["median"]], color="#aa3377",
                   label=f"end to end {results['session']['ttfr_ms']['median']:.2f} ms")
        ax.set_ylabel("ms (medians)")
        ax.set_title("TTFR split")
        ax.legend(fontsize=8)
    else:
        _not_measured(ax, "TTFR")

    ax = axes[1][0]
    rows = [r for r in results.get("context", []) if "skipped" not in r]
    if rows:
        ax.errorbar([r["mean_position"] for r in rows], [r["step_ms"]["median"] for r in rows],
                    yerr=[[0] * len(rows), [r["step_ms"]["p90"] - r["step_ms"]["median"] for r in rows]],
                    marker="o", capsize=4)
        ax.set_xlabel("tokens in the KV cache")
        ax.set_ylabel("decoder listening step (ms, median, bar to p90)")
        ax.set_title("step time vs context length")
    else:
        _not_measured(ax, "step vs context")

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

    if with_sessions:
        _plot_sessions(axes[0][2], axes[1][2], results["sessions"])
    _finish_plot(fig, env, path)


def _plot_sessions(ax_throughput, ax_step, figures: dict) -> None:
    runs = list(figures["runs"].values())
    ax = ax_throughput
    ax.bar([str(r["sessions"]) for r in runs], [r["chunks_per_s"] for r in runs], color="#4477aa")
    ax.set_xlabel("sessions at once on one Runtime")
    ax.set_ylabel("chunks/s, all sessions")
    ax.set_title(f"aggregate throughput ({figures['recording']})")
    ax = ax_step
    ax.errorbar([r["sessions"] for r in runs], [r["step_ms"]["median"] for r in runs],
                yerr=[[r["step_ms"]["median"] - r["step_ms"]["min"] for r in runs],
                      [r["step_ms"]["max"] - r["step_ms"]["median"] for r in runs]], marker="o", capsize=4)
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["sessions"] for r in runs], [str(r["sessions"]) for r in runs])
    ax.minorticks_off()
    ax.set_xlabel("sessions at once")
    ax.set_ylabel("listening step per session (ms, median; bar: min..max)")
    ax.set_title("per-stream step")


def _finish_plot(fig, env: dict, path) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(f"{env['model']} {env['precision']} | {env['device']} | {','.join(env['providers'])} | "
                 f"ORT {env['onnxruntime']} | load {env['load_average'][0]:.1f}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- command line ---------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Measure latency, throughput and memory of a model package on this machine. The output "
                     "starts with the command line of the run, every option spelled out.")
    p.add_argument("package", nargs="?", default=None, help="model package folder (default: the embedded model)")
    p.add_argument("--profile", default="cpu", help=profile_help())
    p.add_argument("--chunks", type=int, default=200, help="chunks of the steady listening run (default 200)")
    p.add_argument("--rounds", type=int, default=30, help="replies timed for TTFR and decode speed (default 30)")
    p.add_argument("--reply-tokens", type=int, default=64, help="length of the scripted replies (default 64)")
    p.add_argument("--context", default="500,2000,4000",
                   help="context lengths in tokens of the step-vs-context run (default 500,2000,4000)")
    p.add_argument("--context-steps", type=int, default=20, help="steps timed at each context length (default 20)")
    p.add_argument("--session-chunks", type=int, default=25,
                   help="chunks of the real-time end-to-end session that measures TTFR from the triggering chunk's "
                        "last sample written to the first TextDelta event (0 skips it; 25 = 10 s); its replies are "
                        "min(--reply-tokens, 16) tokens")
    p.add_argument("--speak-every", type=int, default=1,
                   help="in that session, at most every N-th chunk may trigger a reply (large models: replies "
                        "outlast a chunk) (default 1)")
    p.add_argument("--catch-up-chunks", type=int, default=8,
                   help="queued chunks decided one listening step each right after a reply (cut to what fits in "
                        "the context) (default 8)")
    p.add_argument("--sessions", default="", metavar="N[,N...]",
                   help="also open N sessions at once on one Runtime for each N (e.g. 1,4,16), each fed --recording "
                        "in 0.1 s pieces as fast as possible from its own thread: aggregate chunks/s, per-stream "
                        "listening step, KV bytes per session, and whether every session's events equal a single "
                        "session's (default: not run)")
    p.add_argument("--recording", metavar="FILE", default=None,
                   help="audio file fed to every session of --sessions (default: examples/kitchen.wav of the "
                        "source tree, or of the current folder)")
    p.add_argument("--sessions-only", action="store_true",
                   help="with --sessions: measure start-up and the sessions only, skipping every other figure")
    p.add_argument("--precision-packages", nargs="+", default=(), metavar="DIR",
                   help="more packages of the same checkpoint (fp32/int8/int4/fp16) for the precision scaling")
    p.add_argument("--compare-torch", metavar="CHECKPOINT", help="also run the PyTorch reference on this checkpoint")
    p.add_argument("--threads", type=int, default=None,
                   help="ORT intra-op threads (default: the profile's); PyTorch gets as many")
    p.add_argument("--soak", type=float, metavar="HOURS", default=None,
                   help="instead of the figures: stream HOURS simulated hours (examples, silence, noise) through one "
                        "session as fast as it takes them, and report RSS, resets, replies and losses per hour")
    p.add_argument("--json", metavar="FILE", help="save every figure, the command line and the environment")
    p.add_argument("--plot", metavar="FILE.png", help="write the plots")
    p.add_argument("--compare", metavar="OLD.json", help="print ratios against a previous --json run")


def command_line(args) -> str:
    """The `listenloop bench` command of parsed `args`, every option spelled out."""
    parts = ["listenloop", "bench"] + ([str(args.package)] if args.package else [])
    if args.soak is not None:  # the soak run takes only these
        parts += ["--profile", str(args.profile), "--soak", str(args.soak)]
        return shlex.join(parts + (["--json", str(args.json)] if args.json else []))
    parts += ["--profile", str(args.profile), "--chunks", str(args.chunks), "--rounds", str(args.rounds),
              "--reply-tokens", str(args.reply_tokens), "--context", args.context,
              "--context-steps", str(args.context_steps), "--session-chunks", str(args.session_chunks),
              "--speak-every", str(args.speak_every), "--catch-up-chunks", str(args.catch_up_chunks)]
    if args.sessions:
        parts += ["--sessions", args.sessions]
        if args.recording:
            parts += ["--recording", args.recording]
        if args.sessions_only:
            parts.append("--sessions-only")
    if args.precision_packages:
        parts += ["--precision-packages", *map(str, args.precision_packages)]
    for flag, value in (("--compare-torch", args.compare_torch), ("--threads", args.threads), ("--json", args.json),
                        ("--plot", args.plot), ("--compare", args.compare)):
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def parse_counts(text: str) -> tuple[int, ...]:
    """"1,4,16" -> (1, 4, 16); "" -> ()."""
    try:
        counts = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        counts = (0,)
    if any(n < 1 for n in counts):
        raise Error(f"--sessions must be comma-separated session counts >= 1, got {text!r}")
    return counts


def main(args) -> int:
    if args.plot:
        try:
            import matplotlib  # noqa: F401 - checked before a long run, not after it
        except ImportError:
            raise Error("--plot needs matplotlib: pip install 'listenloop[bench]' (or matplotlib)") from None
    if args.soak is not None:
        return _main_soak(args)
    if args.chunks < 10 or args.rounds < 3 or args.reply_tokens < 2:
        raise Error("--chunks must be >= 10, --rounds >= 3 and --reply-tokens >= 2")
    if args.speak_every < 1 or args.catch_up_chunks < 1 or args.context_steps < 1 or args.session_chunks < 0:
        raise Error("--speak-every, --catch-up-chunks and --context-steps must be >= 1, --session-chunks >= 0")
    sessions = parse_counts(args.sessions)
    if args.sessions_only and not sessions:
        raise Error("--sessions-only needs --sessions N[,N...]")
    recording = Path(args.recording) if args.recording else DEFAULT_RECORDING
    if sessions and not recording.is_file():
        raise Error(f"{recording}: no such recording; pass --recording FILE (any audio file)")
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
    command = command_line(args)
    print(f"... {command}", file=sys.stderr, flush=True)
    results = run(args.package, args.profile, chunks=args.chunks, reply_tokens=args.reply_tokens, rounds=args.rounds,
                  context_lengths=lengths, context_steps=args.context_steps, session_chunks=args.session_chunks,
                  speak_every=args.speak_every, catch_up_chunks=args.catch_up_chunks, sessions=sessions,
                  recording=args.recording, sessions_only=args.sessions_only,
                  precision_packages=args.precision_packages, torch_checkpoint=args.compare_torch, threads=args.threads,
                  command=command, log=lambda line: print(f"... {line}", file=sys.stderr, flush=True))
    if args.json:  # first: a failing plot must not lose the figures
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(report(results))
    if old is not None:
        print(compare(results, old))
    if args.plot:
        plot(results, args.plot)
    return 0


def _main_soak(args) -> int:
    from . import soak

    if not 0 < args.soak <= 24 * 30:
        raise Error(f"--soak takes simulated hours in (0, 720], got {args.soak}")
    print(f"... soak: {args.soak} simulated hours", file=sys.stderr, flush=True)
    result = soak.soak(args.soak, args.package, args.profile, report_every_hours=1.0 if args.soak >= 2 else 0.25,
                       progress=lambda r: print(f"... {r}", file=sys.stderr, flush=True))
    result["command"] = command_line(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(soak.report(result))
    return 0
