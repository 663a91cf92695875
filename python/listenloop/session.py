"""Runtime (loads a model once) and Session (one audio stream, its threads and its events).

Pipeline of a session (MODEL_SPEC §8, docs/DESIGN.md):

    accept_waveform / microphone -> RingBuffer -> ChunkScheduler (mel) -> listen queue
      -> encoder thread (batches of waiting chunks) -> encoded queue
      -> decoder thread (protocol state machine) -> event queue -> events()

Audio keeps flowing into the queues while a reply is generated; the chunks that arrived
meanwhile are decided right after TEXT_END in one catch-up decoder call (Engine.listen_many),
so no chunk is lost to a reply.

A Runtime has one Engine (one KV cache), so it serves one open session at a time; close a
session before opening the next, or create another Runtime for concurrent streams.
"""
from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time

import numpy as np

from . import events as ev
from .audio import SAMPLE_RATE, StreamResampler, check_sample_rate, to_float32_mono
from .engine import MAX_CATCH_UP, Engine
from .errors import Error, SessionClosedError
from .package import resolve_package
from .textstream import ReplyText, TokenBytes

log = logging.getLogger("listenloop")

CHUNK = 6400
CHUNK_SECONDS = CHUNK / SAMPLE_RATE
MAX_CONSECUTIVE_FAULTS = 5  # a worker failing this many times in a row is fatal


def _core():
    from . import _core as core

    return core


class Runtime:
    """A loaded model package and engine; cheap sessions are created from it."""

    def __init__(self, package=None, profile: str = "cpu", *, max_context: int | None = None, **engine_options):
        self.package = resolve_package(package)
        self.engine = Engine(self.package, profile, max_context, **engine_options)
        self.token_bytes = TokenBytes(self.package.tokenizer_path)
        self._lock = threading.Lock()
        self._active: Session | None = None

    @property
    def profile(self):
        return self.engine.profile

    def session(self, **options) -> Session:
        """A new stream. One open session per Runtime at a time (they share the KV cache)."""
        with self._lock:
            if self._active is not None and not self._active.closed:
                raise Error("this Runtime already has an open session; close it first or create another Runtime")
            self._active = Session(self, **options)
            return self._active

    def info(self) -> dict:
        core_info = None
        try:
            core = _core()
            core_info = core.build_info() if hasattr(core, "build_info") else None
        except ImportError:
            pass
        import onnxruntime as ort

        dec = self.package.decoder
        return {
            "model": self.package.name, "package": str(self.package.path),
            "precision": dec["precision"], "io_dtype": dec["io_dtype"],
            "layers": dec["num_layers"], "hidden_size": dec["hidden_size"], "vocab_size": dec["vocab_size"],
            "context_capacity": self.engine.capacity, "profile": self.engine.profile.name,
            "providers": list(self.engine.providers), "kv_cache_device": self.engine.profile.kv_cache_device,
            "onnxruntime": ort.__version__, "onnxruntime_providers": ort.get_available_providers(),
            "cuda": "CUDAExecutionProvider" in ort.get_available_providers(), "core_build": core_info,
        }


class Session:
    """One audio stream through the runtime. Use as a context manager, or call close()."""

    def __init__(self, runtime: Runtime, *, ring_seconds: float = 8.0, listen_queue: int = 64,
                 encoded_queue: int = 64, event_queue: int = 65536, stats_every: int = 25):
        if listen_queue < 2 or encoded_queue < 1 or event_queue < 1:
            raise ValueError("listen_queue must be >= 2, encoded_queue and event_queue >= 1")
        if ring_seconds * SAMPLE_RATE < 2 * CHUNK:
            raise ValueError("ring_seconds must hold at least two chunks (0.8 s)")
        core = _core()
        self.runtime = runtime
        self.engine: Engine = runtime.engine
        self.engine.reset()
        self._ring = core.RingBuffer(int(ring_seconds * SAMPLE_RATE))
        self._listen = core.ChunkQueue(listen_queue)
        self._scheduler = core.ChunkScheduler(self._ring, self._listen)
        self._encoded: queue.Queue = queue.Queue(maxsize=encoded_queue)
        self._events = core.EventQueue(event_queue)
        self._stats_every = stats_every

        self._resampler: StreamResampler | None = None
        self._microphones: list = []
        self._accepted = 0  # 16 kHz samples handed to the ring (including dropped ones)
        self._dropped_samples = 0
        self._decided = 0
        self._skipped_chunks = 0
        self._reported_chunk_drops = 0
        self._drop_lock = threading.Lock()
        self._step_ms = collections.deque(maxlen=50)
        self._busy_s = 0.0
        self._fatal: BaseException | None = None
        self._finishing = False
        self._flushed = False
        self._working = False  # the decoder thread holds chunks it has not fully handled yet
        self._closed = False
        self._done = threading.Condition()

        self._scheduler.start()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._guard, args=(self._encoder_loop, "encoder"), name="listenloop-encoder", daemon=True),
                         threading.Thread(target=self._guard, args=(self._decoder_loop, "decoder"), name="listenloop-decoder", daemon=True)]
        for t in self._threads:
            t.start()

    # -- feeding -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def accept_waveform(self, pcm, sample_rate: int = SAMPLE_RATE, *, block: bool = True) -> None:
        """Feed PCM (float or int, 1-D or [n, channels], any rate).

        With block=True (the default) this waits while the pipeline is full, so nothing is
        dropped however fast audio is fed; real-time sources that must never wait pass
        block=False and get AudioDropped events on overrun instead.
        """
        self._check_open()
        self._check_no_microphone("accept_waveform()")
        rate = check_sample_rate(sample_rate)
        samples, n_bad = to_float32_mono(pcm)
        if n_bad:
            self._emit(ev.AudioDropped(self._stream_time(), time.monotonic(), n_bad,
                                       "NaN or infinite samples replaced by silence"))
        if self._resampler is None or self._resampler.in_rate != rate:
            self._flush_resampler()
            self._resampler = StreamResampler(rate)
        self._write(self._resampler(samples), block)

    def finish(self, timeout: float | None = None) -> None:
        """End of input: stop the microphone if one captures, flush the last partial chunk and
        wait until every event is produced."""
        self._check_open()
        for microphone in self._microphones:
            microphone.stop()
        self._flush_resampler()
        self._finishing = True
        if not self._scheduler.flush(timeout):
            raise Error("finish() timed out while the chunk scheduler flushed the last chunk")
        self._flushed = True
        expected = self._expected_chunks()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._done:
            while self._fatal is None and (self._accounted() < expected or self._working):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise Error(f"finish() timed out with {expected - self._accounted()} chunks still in flight")
                self._done.wait(0.05 if remaining is None else min(0.05, remaining))
        self._raise_fatal()
        self._report_queue_drops()
        self._emit(self._stats())

    def _write(self, samples: np.ndarray, block: bool) -> None:
        if block:
            # Pieces small enough that the ring and the listen queue can always take them.
            piece = max(CHUNK, min(self._ring.capacity // 2, (self._listen.capacity // 2) * CHUNK))
            for start in range(0, len(samples), piece):
                part = samples[start:start + piece]
                self._wait_for_room(len(part))
                self._write_now(part)
        elif samples.size:
            self._write_now(samples)

    def _write_now(self, samples: np.ndarray) -> None:
        written = self._ring.write(samples)
        self._accepted += len(samples)
        if written < len(samples):
            lost = len(samples) - written
            self._dropped_samples += lost
            self._emit(ev.AudioDropped(self._stream_time(), time.monotonic(), lost, "ring buffer overrun"))

    def _wait_for_room(self, n: int) -> None:
        """Back-pressure: keep ring + listen queue below what the scheduler can always push."""
        while not self._stop.is_set():
            in_ring = self._ring.available()
            # chunks the scheduler will push: what is queued, what the ring will hold, and at
            # most one more from the partial chunk it keeps between reads
            chunks_ahead = len(self._listen) + (in_ring + n) // CHUNK + 1
            if in_ring + n <= self._ring.capacity and chunks_ahead <= self._listen.capacity:
                return
            self._raise_fatal()
            time.sleep(0.002)

    def _note_external_samples(self) -> None:
        """A microphone writing the ring directly: account its samples as accepted."""
        self._accepted = int(self._ring.written_total) + int(self._ring.dropped_samples)
        self._dropped_samples = int(self._ring.dropped_samples)

    def listen(self, device=None):
        """Capture the microphone (`device`: index or name, None for the default) into this
        session; returns the started Microphone (stop() it, or use it as a context manager)."""
        from .audio import Microphone

        self._check_open()
        self._check_no_microphone("listen()")
        microphone = Microphone(self, device).start()
        self._microphones.append(microphone)
        return microphone

    def _check_no_microphone(self, what: str) -> None:
        # The PCM ring has a single writer: while a microphone captures, it is that writer.
        for microphone in self._microphones:
            if microphone.active:
                raise Error(f"{what}: this session is capturing {microphone.device_name!r}; "
                            "stop the microphone first, or feed other audio to a second session")

    def _flush_resampler(self) -> None:
        if self._resampler is not None:
            self._write(self._resampler(np.zeros(0, np.float32), last=True), block=True)
            self._resampler = None

    # -- events --------------------------------------------------------------------------

    def events(self, timeout: float | None = 0.5):
        """Yield events as they come. Stops after `timeout` seconds without one (None: wait
        until the end), or once the session is finished or closed and every event was delivered."""
        idle_since = time.monotonic()
        while True:
            self._raise_fatal()
            item = self._events.pop(0.05)
            if item is not None:
                yield ev.from_record(item)
                idle_since = time.monotonic()
                continue
            if (self._closed or self._finished()) and len(self._events) == 0:
                return
            if timeout is not None and time.monotonic() - idle_since >= timeout:
                return

    def drain(self) -> list:
        """Every event available right now, without waiting."""
        out = []
        while True:
            item = self._events.pop(0.0)
            if item is None:
                self._raise_fatal()
                return out
            out.append(ev.from_record(item))

    def _emit(self, event) -> None:
        self._events.try_push(*ev.to_record(event))  # a full queue counts the drop (Stats)

    # -- workers -------------------------------------------------------------------------

    def _guard(self, loop, where: str) -> None:
        """Run a worker loop; an escaped exception is fatal and surfaces in the caller's thread."""
        try:
            loop()
        except BaseException as exc:  # noqa: BLE001 - must never die silently
            log.exception("listenloop %s thread stopped", where)
            self._fatal = exc
            self._emit(ev.Fault(self._stream_time(), time.monotonic(), where, f"fatal: {exc}"))
            with self._done:
                self._done.notify_all()

    def _fault(self, where: str, exc: Exception, streak: int, chunks: int) -> int:
        streak += 1
        log.warning("listenloop %s failed (%s); skipping %d chunk(s)", where, exc, chunks)
        self._skipped_chunks += chunks
        self._emit(ev.Fault(self._stream_time(), time.monotonic(), where, str(exc)))
        self._emit(ev.AudioDropped(self._stream_time(), time.monotonic(), chunks * CHUNK, f"{where} failed: {exc}"))
        with self._done:
            self._done.notify_all()
        if streak >= MAX_CONSECUTIVE_FAULTS:
            raise Error(f"{where} failed {streak} times in a row; last error: {exc}")
        return streak

    def _encoder_loop(self) -> None:
        streak = 0
        while not self._stop.is_set():
            chunks = self._listen.pop_many(MAX_CATCH_UP, 0.1)
            if not chunks:
                continue
            try:
                embeds = self.engine.encode(np.stack([c.mel for c in chunks]))
                streak = 0
            except Exception as exc:  # noqa: BLE001 - one failed call skips its chunks
                streak = self._fault("encoder", exc, streak, len(chunks))
                continue
            for chunk, vectors in zip(chunks, embeds):
                while not self._stop.is_set():
                    try:
                        self._encoded.put((chunk.index, vectors), timeout=0.1)
                        break
                    except queue.Full:
                        continue

    def _decoder_loop(self) -> None:
        pending: collections.deque = collections.deque()
        streak = 0
        while not self._stop.is_set():
            self._report_queue_drops()
            if not pending:
                self._set_working(False)
                try:
                    pending.append(self._encoded.get(timeout=0.1))
                except queue.Empty:
                    continue
            self._set_working(True)
            while len(pending) < MAX_CATCH_UP:  # what is waiting is decided together (catch-up);
                try:  # taking no more than one call's worth keeps back-pressure on the encoder
                    pending.append(self._encoded.get_nowait())
                except queue.Empty:
                    break
            batch = [pending[j] for j in range(min(len(pending), MAX_CATCH_UP))]
            started = time.perf_counter()
            try:
                if len(batch) == 1:
                    results = [self.engine.listen(batch[0][1])]
                else:
                    results = self.engine.listen_many(np.stack([vectors for _, vectors in batch]))
                streak = 0
            except Exception as exc:  # noqa: BLE001 - skip the chunk, keep the session
                pending.popleft()
                streak = self._fault("decoder", exc, streak, 1)
                continue
            elapsed = time.perf_counter() - started
            self._busy_s += elapsed
            self._step_ms.append(1000 * elapsed / len(results))
            for (index, _), result in zip(batch, results):
                pending.popleft()
                self._on_decision(index, result)
            if results[-1].spoke:
                self._reply(batch[len(results) - 1][0])

    def _report_queue_drops(self) -> None:
        """Chunks the scheduler could not queue become AudioDropped events (decoder thread)."""
        failure = self._scheduler.last_error
        if failure:
            raise Error(f"chunk scheduler failed: {failure}")
        with self._drop_lock:
            dropped = self._scheduler_dropped()
            lost = dropped - self._reported_chunk_drops
            self._reported_chunk_drops = dropped
        if lost > 0:
            self._emit(ev.AudioDropped(self._stream_time(), time.monotonic(), lost * CHUNK,
                                       f"listen queue full: {lost} chunk(s) dropped"))

    def _set_working(self, working: bool) -> None:
        if working != self._working:
            with self._done:
                self._working = working
                self._done.notify_all()

    def _chunk_time(self, index: int) -> float:
        return (index + 1) * CHUNK / SAMPLE_RATE  # exact in binary for whole chunks (no 1.2000000000000002)

    def _on_decision(self, index: int, result) -> None:
        stream_time = self._chunk_time(index)
        if result.context_reset:
            self._scheduler.reset()  # the mel running max restarts with the context (§2.3)
            self._emit(ev.ContextReset(stream_time, time.monotonic(), result.context_reset))
        self._emit(ev.Decision(stream_time, time.monotonic(), index, result.spoke, result.p_speak))
        with self._done:
            self._decided += 1
            self._done.notify_all()
        if self._stats_every and self._decided % self._stats_every == 0:
            self._emit(self._stats())

    def _reply(self, index: int) -> None:
        stream_time = self._chunk_time(index)
        reply = ReplyText(self.runtime.token_bytes, self.engine.tokens, self.engine.package.emotions)
        started_event = False
        started = time.perf_counter()
        try:
            for step in self.engine.speak():
                piece = reply.add(step.token)
                if not started_event:
                    self._emit(ev.ReplyStarted(stream_time, time.monotonic(), index, reply.emotion))
                    started_event = True
                if piece.text:
                    self._emit(ev.TextDelta(stream_time, time.monotonic(), piece.text, tuple(piece.token_ids)))
        except Exception as exc:  # noqa: BLE001 - a failed reply ends it; listening goes on
            log.warning("listenloop reply failed: %s", exc)
            self._emit(ev.Fault(stream_time, time.monotonic(), "speak", str(exc)))
        finally:
            self._busy_s += time.perf_counter() - started
        if not started_event:
            self._emit(ev.ReplyStarted(stream_time, time.monotonic(), index, None))
        tail = reply.finish()
        if tail.text:
            self._emit(ev.TextDelta(stream_time, time.monotonic(), tail.text, tuple(tail.token_ids)))
        self._emit(ev.ReplyEnded(stream_time, time.monotonic(), index, reply.text,
                                 self.engine.reply_truncated, reply.filtered))

    # -- bookkeeping ---------------------------------------------------------------------

    def _accounted(self) -> int:
        return self._decided + self._skipped_chunks + self._scheduler_dropped()

    def _scheduler_dropped(self) -> int:
        return int(self._scheduler.chunks_dropped)

    def _expected_chunks(self) -> int:
        """Chunks cut from everything that reached the ring; exact once the scheduler flushed."""
        if self._flushed:
            return int(self._scheduler.chunks_emitted) + int(self._scheduler.chunks_dropped)
        return math.ceil((self._accepted - self._dropped_samples) / CHUNK)

    def _finished(self) -> bool:
        return self._finishing and not self._working and self._accounted() >= self._expected_chunks()

    def _stream_time(self) -> float:
        return self._accepted / SAMPLE_RATE

    def _stats(self) -> ev.Stats:
        steps = sorted(self._step_ms)
        audio_s = max(self._decided * CHUNK_SECONDS, 1e-9)
        return ev.Stats(self._stream_time(), time.monotonic(), chunks=self._decided,
                        dropped_samples=self._dropped_samples,
                        dropped_chunks=self._scheduler_dropped() + self._skipped_chunks,
                        dropped_events=int(self._events.dropped), listen_queue_depth=len(self._listen),
                        encoded_queue_depth=self._encoded.qsize(), event_queue_depth=len(self._events),
                        step_ms=steps[len(steps) // 2] if steps else 0.0,
                        real_time_factor=self._busy_s / audio_s,
                        position=self.engine.position, capacity=self.engine.capacity)

    def stats(self) -> ev.Stats:
        return self._stats()

    def _raise_fatal(self) -> None:
        if self._fatal is not None:
            exc = self._fatal
            raise Error(f"session failed: {exc}") from exc

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosedError("this session is closed; create a new one with Runtime.session()")
        if self._finishing:
            raise SessionClosedError("finish() ended this session's input; create a new session")
        self._raise_fatal()

    # -- shutdown ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the threads and release the stream (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for microphone in self._microphones:
            microphone.stop()
        self._stop.set()
        self._scheduler.stop()
        self._listen.close()
        for t in self._threads:
            t.join(timeout=5)
        self._events.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
