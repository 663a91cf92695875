"""Runtime (one loaded model, any number of streams) and Session (one audio stream).

Pipeline of a session (docs/DESIGN.md):

    accept_waveform / microphone -> RingBuffer -> ChunkScheduler (log-mel, C++) -> listen queue
      -> the Runtime's model thread (scheduler.py): mel peak, encoder, decoder step, reply tokens
      -> event queue -> events()

Audio keeps flowing into the queues while a reply is generated; those chunks are decided
right after TEXT_END, one listening step each, so no chunk is lost to a reply.
"""
from __future__ import annotations

import collections
import logging
import math
import time
import weakref

import numpy as np

from . import events as ev
from .audio import StreamResampler, check_sample_rate, condition_pcm
from .context import chunk_level
from .errors import Bounds, ConfigError, Error, SessionClosedError
from .event_queue import EventQueue, Wakeup
from .model import Model
from .playback import NearEndDetector, PlaybackInput, buffer_samples
from .protocol import CHUNK_SAMPLES, CHUNK_SECONDS, SAMPLE_RATE
from .scheduler import StreamScheduler
from .textstream import ReplyText

log = logging.getLogger("listenloop")

MAX_CONSECUTIVE_FAULTS = 5  # a session whose model work fails this many times in a row stops
# Session options' ranges (runtime/PACKAGE_FORMAT.md, "Ranges"): the ring holds two chunks at
# least and an hour at most (230 MB); the queues' bounds keep their memory bounded.
SESSION_OPTION_RANGES = {
    "ring_seconds": Bounds(2 * CHUNK_SECONDS, 3600.0),
    "listen_queue": Bounds(2, 1 << 16, integer=True),
    "event_queue": Bounds(1, 1 << 24, integer=True),
    "stats_every": Bounds(0, 1 << 31, integer=True),  # 0: only the final Stats
}


def _core():
    from . import _core as core

    return core


class Runtime:
    """A loaded model package; `session()` opens independent streams over it.

    `policy` options (speak_bias, sampling, speak_threshold, max_reply_tokens) become the
    default of every session, which may override them.
    """

    def __init__(self, package=None, profile: str = "cpu", *, max_context: int | None = None, **policy):
        self.model = Model(package, profile, max_context=max_context)
        self.package = self.model.package
        self._policy_options = policy
        self.policy = self.model.policy(**policy)  # checked now, not at the first session
        self._scheduler = StreamScheduler(pool=self.model.slot_pool)
        self._closed = False

    @property
    def profile(self):
        return self.model.profile

    @property
    def open_sessions(self) -> int:
        return self._scheduler.open_sessions

    @property
    def queued_chunks(self) -> int:
        """Chunks waiting for the model thread, over all open sessions."""
        return sum(len(session._listen) for session in self._scheduler.sessions())

    def session(self, **options) -> Session:
        """A new stream. Session options: ring_seconds, listen_queue, event_queue, stats_every,
        echo_cancellation, step_observer; policy options (speak_bias, sampling, sampler,
        speak_threshold, max_reply_tokens) override the Runtime's for this stream only."""
        if self._closed:
            raise Error("this Runtime is closed")
        overrides = {k: options.pop(k) for k in list(options) if k not in Session.OPTIONS}
        policy = self.model.policy(**{**self._policy_options, **overrides}) if overrides else self.policy
        return Session(self, self.model.stream(policy), **options)

    def close(self) -> None:
        """Close every session and stop the model thread (idempotent)."""
        self._closed = True
        for session in self._scheduler.sessions():
            session.close()
        self._scheduler.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def info(self) -> dict:
        core_info = None
        try:
            core_info = _core().build_info()
        except ImportError:
            pass
        import onnxruntime as ort

        dec, m = self.package.decoder, self.model
        return {
            "model": self.package.name, "package": str(self.package.path),
            "precision": dec["precision"], "io_dtype": dec["io_dtype"], "attention": m.attention,
            "layers": dec["num_layers"], "hidden_size": dec["hidden_size"], "vocab_size": dec["vocab_size"],
            "context_capacity": m.capacity, "trained_context": m.trained_context,
            "kv_cache_bytes_per_session": m.kv_bytes, "profile": m.profile.name,
            "providers": list(m.providers), "kv_cache_device": m.profile.kv_cache_device, "cuda_graphs": m.cuda_graphs,
            "slots": m.slots,
            "onnxruntime": ort.__version__, "onnxruntime_providers": ort.get_available_providers(),
            "cuda": "CUDAExecutionProvider" in ort.get_available_providers(), "core_build": core_info,
        }


class Session:
    """One audio stream through a Runtime. Use as a context manager, or call close(); a
    session that is dropped or still open at interpreter exit is closed for you."""

    OPTIONS = (*SESSION_OPTION_RANGES, "echo_cancellation", "step_observer")

    def __init__(self, runtime: Runtime, stream, *, ring_seconds: float = 8.0, listen_queue: int = 64,
                 event_queue: int = 65536, stats_every: int = 25, echo_cancellation: bool = True,
                 step_observer=None):
        """`step_observer(kind, seconds)`, if given, is called on the model thread after each
        unit of model work: kind "listen" (one chunk decided) or "reply" (one reply token)."""
        for name, value in (("ring_seconds", ring_seconds), ("listen_queue", listen_queue),
                            ("event_queue", event_queue), ("stats_every", stats_every)):
            if (problem := SESSION_OPTION_RANGES[name].problem(value)) is not None:
                raise ConfigError(f"{name} {problem}")
        if not isinstance(echo_cancellation, (bool, np.bool_)):
            raise ConfigError(f"echo_cancellation must be True or False, got {echo_cancellation!r}")
        if step_observer is not None and not callable(step_observer):
            raise ConfigError(f"step_observer must be callable, got {step_observer!r}")
        core = _core()
        self.runtime = runtime
        self.model: Model = runtime.model
        self.stream = stream
        self._scheduler = runtime._scheduler
        self._ring = core.RingBuffer(int(ring_seconds * SAMPLE_RATE))
        self._listen = core.ChunkQueue(listen_queue)
        # The echo canceller sits in the chunk scheduler (C++); it passes the microphone through
        # unchanged until accept_playback() first brings sound, and it and the buffer take
        # their memory only then.
        reference = core.PlaybackBuffer(buffer_samples(self._ring.capacity)) if echo_cancellation else None
        self._chunker = core.ChunkScheduler(self._ring, self._listen, CHUNK_SAMPLES, self._scheduler.wake_signal,
                                            reference)
        self._events = EventQueue(event_queue)
        self._near_end = NearEndDetector()
        self_ref = weakref.ref(self)  # the session is freed as soon as it is dropped, no cycle
        self._playback = None if reference is None else PlaybackInput(
            reference, self._ring, self._events, lambda: self_ref()._stream_time())
        self._stats_every = stats_every

        self._resampler: StreamResampler | None = None
        self._microphones: list = []
        self._accepted = 0  # 16 kHz samples handed to the ring (including dropped ones)
        self._dropped_samples = 0
        # (ring position, samples dropped before it): from that position of the kept samples
        # on, the input is that many samples ahead (see _chunk_time)
        self._drop_marks: collections.deque = collections.deque([(0, 0)])
        self._decided = 0
        self._skipped_chunks = 0
        self._reported_chunk_drops = 0
        self._fault_streak = 0
        self._mel_peak = -math.inf  # running peak of the log-mel since the last context reset
        self._handled_until = 0.0  # stream time at the end of the last chunk decided or skipped
        self._reply: ReplyText | None = None  # the reply being generated
        self._reply_chunk = 0
        self._step_ms = collections.deque(maxlen=50)
        self._step_observer = step_observer
        self._busy_s = 0.0
        self._fatal: BaseException | None = None
        self._finishing = False
        self._flushed = False
        self._ended = False  # Finished was queued (by the model thread)
        self._closed = False
        self._progress = Wakeup()  # (not a Condition: an interrupted finish() must not block the model thread)

        self._chunker.start()
        self._scheduler.add(self)

    # -- feeding -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def accept_waveform(self, pcm, sample_rate: int = SAMPLE_RATE, *, block: bool = True) -> None:
        """Feed PCM (float or int, 1-D or [n, channels]) at any rate from MIN_SAMPLE_RATE to
        MAX_SAMPLE_RATE (4 kHz to 384 kHz; others are an AudioFormatError).

        Float samples belong in [-1, 1] (docs/PROTOCOL.md, "Front end"): louder ones are clipped,
        never rescaled, and reported by one AudioClipped event for the call, which also says
        when the block looks like integer PCM passed as float. NaN and infinite samples become
        silence, reported by AudioDropped.

        With block=True (the default) this waits while the pipeline is full, so nothing is
        dropped however fast audio is fed; real-time sources that must never wait pass
        block=False and get AudioDropped events on overrun instead.
        """
        self._check_open()
        self._check_no_microphone("accept_waveform()")
        rate = check_sample_rate(sample_rate)  # before any conversion or resampling
        conditioned = condition_pcm(pcm)
        if conditioned.nonfinite:
            self._emit(ev.AudioDropped(self._stream_time(), time.monotonic(), conditioned.nonfinite,
                                       "NaN or infinite samples replaced by silence"))
        if conditioned.clipped:
            self._emit(ev.AudioClipped(self._stream_time(), time.monotonic(), conditioned.clipped, conditioned.peak,
                                       conditioned.clip_reason, conditioned.int_pcm_as_float))
        if self._resampler is None or self._resampler.in_rate != rate:
            self._flush_resampler()
            self._resampler = StreamResampler(rate)
        self._write(self._resampler(conditioned.samples), block)

    def accept_playback(self, pcm, sample_rate: int = SAMPLE_RATE, *, at: int | None = None,
                        block: bool = True) -> None:
        """Feed what the device sends to its speaker, block by block as it plays: the echo
        reference (docs/PROTOCOL.md, "Playback reference"). It takes what accept_waveform takes,
        with the same checks and events.

        Each block goes on the microphone's clock right after the previous one; the first block
        starts at the microphone's current position. A continuous reference (silence included)
        needs nothing more. A device that pushes playback only while it plays passes
        `at=session.microphone_position` with the first block of each burst.

        Push each block no later than the microphone audio it plays over: the canceller treats
        reference not yet pushed as silence, and what comes after it passed is dropped and
        reported. The reference may run at most 1 s ahead of the microphone: with block=True
        this waits for the microphone to catch up, otherwise (or if the microphone stands
        still for 1 s) the excess is dropped and reported, as is a reference that falls more
        than 1 s behind.
        """
        self._check_open()
        if self._playback is None:
            raise Error("accept_playback: this session was opened with echo_cancellation=False")
        self._playback.accept(pcm, sample_rate, at, block)

    @property
    def microphone_position(self) -> int:
        """Microphone samples (16 kHz) this session received so far: the playback clock."""
        return int(self._ring.written_total)

    def finish(self, timeout: float | None = None) -> None:
        """End of input: stop the microphone if one captures, flush the last partial chunk and
        wait until every event is produced; the event stream then ends with Finished. It
        returns early if the reader is so far behind that the session pauses for it (see
        event_queue.py): the rest follows as events() is read. Calling it again is harmless."""
        if self._closed:
            return
        if not self._finishing:
            for microphone in self._microphones:
                microphone.stop()
            self._flush_resampler()
            self._finishing = True
            if not self._chunker.flush(timeout):
                raise Error("finish() timed out while the chunk scheduler flushed the last chunk")
            self._flushed = True
            self._scheduler.wake()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (self._ended or self._events.backlogged or self._closed):  # closed: nothing more comes
            self._raise_fatal()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise Error(f"finish() timed out with {self._expected_chunks() - self._accounted()} chunks still in flight")
            self._progress.wait(0.05 if remaining is None else min(0.05, remaining),
                                lambda: self._ended or self._events.backlogged or self._closed or self._fatal is not None)
        self._raise_fatal()

    def _end_stream(self) -> None:
        """Everything is decided and replied (model thread): the final Stats, then Finished."""
        self._report_queue_drops()
        self._emit(self._stats())
        self._emit(ev.Finished(self._stream_time(), time.monotonic(), self._decided))
        self._ended = True
        self._progress.notify_all()
        self._events.close()

    def _write(self, samples: np.ndarray, block: bool) -> None:
        if block:
            # Pieces small enough that the ring and the listen queue can always take them.
            piece = max(CHUNK_SAMPLES, min(self._ring.capacity // 2, (self._listen.capacity // 2) * CHUNK_SAMPLES))
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
            self._drop_marks.append((int(self._ring.written_total), self._dropped_samples))
            self._emit(ev.AudioDropped(self._stream_time(), time.monotonic(), lost, "ring buffer overrun"))

    def _wait_for_room(self, n: int) -> None:
        """Back-pressure: keep ring + listen queue below what the chunk scheduler can always push."""
        while not self._closed:
            in_ring = self._ring.available()
            # chunks the scheduler will push: what is queued, what the ring will hold, and at
            # most one more from the partial chunk it keeps between reads
            chunks_ahead = len(self._listen) + (in_ring + n) // CHUNK_SAMPLES + 1
            if in_ring + n <= self._ring.capacity and chunks_ahead <= self._listen.capacity:
                return
            self._raise_fatal()
            time.sleep(0.002)

    def _note_external_samples(self) -> None:
        """A microphone writing the ring directly: account its samples as accepted."""
        written, dropped = int(self._ring.written_total), int(self._ring.dropped_samples)
        self._accepted = written + dropped
        if dropped > self._dropped_samples:  # placed at this call: within one capture block
            self._drop_marks.append((written, dropped))
        self._dropped_samples = dropped

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
        until the end), and after the Finished event that closes a finished stream, or once
        the session is closed and every queued event was delivered."""
        while True:
            event = self._events.get(timeout)
            if event is None:
                self._raise_fatal()
                return
            yield event
            if isinstance(event, ev.Finished):
                return

    def drain(self) -> list:
        """Every event available right now, without waiting."""
        out = []
        while (event := self._events.get(0)) is not None:
            out.append(event)
        self._raise_fatal()
        return out

    def _emit(self, event) -> None:
        self._events.put(event)  # a full queue counts the drop and marks it in the stream

    # -- model work (runs on the Runtime's model thread) ---------------------------------

    def _work(self) -> bool:
        """One unit of model work: a reply token, or one queued chunk. False if there was none."""
        return self.stream.cache.drive(self._work_steps())

    def _work_steps(self):
        """_work() as a generator that yields while the stream's cache waits for a shared call
        (the scheduler's batched rounds drive it) and returns whether there was work."""
        if self._closed or self._fatal is not None or self._ended:
            return False
        try:
            if self._flushed and self._done():
                self._end_stream()
                return True
            if self._events.backlogged:
                return False  # a reader this far behind pauses the session (see event_queue.py)
            if self._reply is not None:
                yield from self._reply_step()
                return True
            self._report_queue_drops()
            chunk = self._listen.pop(0.0)
            if chunk is None:
                return False
            yield from self._decide(chunk)
            return True
        except GeneratorExit:  # the scheduler dropped this unit (the session closed meanwhile)
            raise
        except BaseException as exc:  # noqa: BLE001 - one session's failure must not stop the others
            log.exception("listenloop session stopped")
            self._fatal = exc
            self._emit(ev.Fault(self._stream_time(), time.monotonic(), "session", f"fatal: {exc}"))
            self._events.close()
            self._progress.notify_all()
            return True

    def _decide(self, chunk):
        started = time.perf_counter()
        stream, index = self.stream, chunk.index
        try:
            if stream.pending_reset(chunk.playing) is not None:
                self._mel_peak = -math.inf  # the running peak restarts with the context, at this chunk
            self._mel_peak = max(self._mel_peak, chunk.peak)
            mel = chunk.mel
            _core().normalize_log_mel(mel, self._mel_peak)
            audio = yield from stream.cache.encode_steps(mel)
            result = yield from stream.listen_steps(audio, chunk_level(mel), chunk.playing, self._near_end(chunk))
        except Exception as exc:  # noqa: BLE001 - skip the chunk, keep the session
            self._fault(index, exc)
            return
        self._fault_streak = 0
        elapsed = time.perf_counter() - started
        self._busy_s += elapsed
        self._step_ms.append(1000 * elapsed)
        if self._step_observer is not None:
            self._step_observer("listen", elapsed)
        stream_time = self._handled_until = self._chunk_time(index)
        if result.context_reset:
            self._emit(ev.ContextReset(stream_time, time.monotonic(), index, result.context_reset))
        self._emit(ev.Decision(stream_time, time.monotonic(), index, result.spoke, result.p_speak, chunk.playing))
        if result.spoke:
            self._reply = ReplyText(self.model.token_bytes, self.model.tokens, self.model.emotions)
            self._reply_chunk = index
            self._reply_started = False
        self._decided += 1
        self._progress.notify_all()
        if self._stats_every and self._decided % self._stats_every == 0:
            self._emit(self._stats())

    def _reply_step(self):
        reply, stream_time = self._reply, self._chunk_time(self._reply_chunk)
        started = time.perf_counter()
        try:
            step = yield from self.stream.speak_steps()
        except Exception as exc:  # noqa: BLE001 - a failed reply ends it; listening goes on
            log.warning("listenloop reply failed: %s", exc)
            self._emit(ev.Fault(stream_time, time.monotonic(), "speak", str(exc)))
            self.stream.end_reply()
            step = None
        elapsed = time.perf_counter() - started
        self._busy_s += elapsed
        if self._step_observer is not None:
            self._step_observer("reply", elapsed)
        if step is not None:
            piece = reply.add(step.token)
            if not self._reply_started:
                self._emit(ev.ReplyStarted(stream_time, time.monotonic(), self._reply_chunk, reply.emotion))
                self._reply_started = True
            if piece.text:
                self._emit(ev.TextDelta(stream_time, time.monotonic(), piece.text, tuple(piece.token_ids)))
        if not self.stream.speaking:
            self._end_reply(reply, stream_time)

    def _end_reply(self, reply: ReplyText, stream_time: float) -> None:
        if not self._reply_started:
            self._emit(ev.ReplyStarted(stream_time, time.monotonic(), self._reply_chunk, None))
        tail = reply.finish()
        if tail.text:
            self._emit(ev.TextDelta(stream_time, time.monotonic(), tail.text, tuple(tail.token_ids)))
        self._emit(ev.ReplyEnded(stream_time, time.monotonic(), self._reply_chunk, reply.text,
                                 self.stream.reply_truncated, reply.filtered))
        self._reply = None
        self._progress.notify_all()

    def _fault(self, index: int, exc: Exception) -> None:
        self._fault_streak += 1
        log.warning("listenloop chunk %d failed (%s); skipping it", index, exc)
        stream_time = self._handled_until = self._chunk_time(index)
        self._emit(ev.Fault(stream_time, time.monotonic(), "model", str(exc)))
        self._emit(ev.AudioDropped(stream_time, time.monotonic(), CHUNK_SAMPLES, f"model failed: {exc}"))
        self._skipped_chunks += 1
        self._progress.notify_all()
        if self._fault_streak >= MAX_CONSECUTIVE_FAULTS:
            raise Error(f"the model failed {self._fault_streak} times in a row; last error: {exc}")

    def _report_queue_drops(self) -> None:
        """Chunks the chunk scheduler could not queue become AudioDropped events."""
        failure = self._chunker.last_error
        if failure:
            raise Error(f"chunk scheduler failed: {failure}")
        dropped = int(self._chunker.chunks_dropped)
        lost = dropped - self._reported_chunk_drops
        self._reported_chunk_drops = dropped
        if lost > 0:
            self._emit(ev.AudioDropped(self._stream_time(), time.monotonic(), lost * CHUNK_SAMPLES,
                                       f"listen queue full: {lost} chunk(s) dropped"))

    # -- bookkeeping ---------------------------------------------------------------------

    def _chunk_time(self, index: int) -> float:
        """Stream time at the end of chunk `index`: where its last sample was in the input,
        counting the samples the ring dropped before it. Called with chunk numbers that never
        decrease (model thread), so marks before the chunk are forgotten."""
        first, last = index * CHUNK_SAMPLES, (index + 1) * CHUNK_SAMPLES - 1  # ring positions
        marks = self._drop_marks
        while len(marks) > 1 and marks[1][0] <= first:
            marks.popleft()
        ahead = 0
        for position, dropped in list(marks):
            if position > last:
                break
            ahead = dropped
        return (last + 1 + ahead) / SAMPLE_RATE  # exact in binary for whole chunks

    def _accounted(self) -> int:
        return self._decided + self._skipped_chunks + int(self._chunker.chunks_dropped)

    def _expected_chunks(self) -> int:
        """Chunks cut from everything that reached the ring; exact once the scheduler flushed."""
        if self._flushed:
            return int(self._chunker.chunks_emitted) + int(self._chunker.chunks_dropped)
        return math.ceil((self._accepted - self._dropped_samples) / CHUNK_SAMPLES)

    def _done(self) -> bool:
        return self._reply is None and self._accounted() >= self._expected_chunks()

    def _stream_time(self) -> float:
        return self._accepted / SAMPLE_RATE

    def _stats(self) -> ev.Stats:
        steps = sorted(self._step_ms)
        audio_s = max(self._decided * CHUNK_SECONDS, 1e-9)
        # stream_time: the audio handled so far, so Stats times never go backwards
        return ev.Stats(self._handled_until, time.monotonic(), chunks=self._decided,
                        dropped_samples=self._dropped_samples,
                        dropped_chunks=int(self._chunker.chunks_dropped) + self._skipped_chunks,
                        dropped_events=self._events.dropped, listen_queue_depth=len(self._listen),
                        event_queue_depth=len(self._events),
                        step_ms=steps[len(steps) // 2] if steps else 0.0,
                        real_time_factor=self._busy_s / audio_s,
                        position=self.stream.position, capacity=self.stream.capacity,
                        kv_bytes=self.stream.kv_bytes)

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
        """Stop the microphone and the chunk scheduler and release the stream (idempotent).
        Events already queued can still be read."""
        if self._closed:
            return
        self._closed = True
        for microphone in self._microphones:
            microphone.stop()
        self._chunker.stop()
        self._listen.close()
        self._scheduler.remove(self)
        self.stream.close()  # its KV cache slot, if it has one, is free for another session
        self._events.close()
        self._progress.notify_all()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
