"""listenloop._core.ChunkScheduler: ring -> 6400-sample chunks -> raw streaming mel -> listen queue."""
import gc
import threading
import time

import numpy as np
import pytest

from listenloop import Error, features
from listenloop._core import (FRAMES_PER_CHUNK, ChunkQueue, ChunkScheduler, RingBuffer, StreamingMel, WakeSignal,
                              normalize_log_mel)
from listenloop.protocol import CHUNK_SAMPLES

CHUNK = CHUNK_SAMPLES
TOL = 1e-4


def _stream(n, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.2 * np.sin(2 * np.pi * 300 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _feed(ring, samples, block=160):
    """Writes like a 10 ms mic callback; returns (monotonic ns before, after) of each write."""
    stamps = []
    for start in range(0, len(samples), block):
        before = time.monotonic_ns()
        assert ring.write(samples[start:start + block]) == len(samples[start:start + block])
        stamps.append((start + block, before, time.monotonic_ns()))
    return stamps


def _normalise(chunks, restart_at=()):
    """The consumer's side: each chunk's raw mel normalised with the running max of the peaks."""
    running, out = -np.inf, []
    for chunk in chunks:
        if chunk.index in restart_at:
            running = -np.inf
        running = max(running, chunk.peak)
        mel = chunk.mel.copy()
        normalize_log_mel(mel, running)
        out.append(mel)
    return out


def _pop(queue, n):
    chunks = []
    while len(chunks) < n:
        chunk = queue.pop(5.0)
        assert chunk is not None, f"only {len(chunks)} of {n} chunks arrived"
        chunks.append(chunk)
    return chunks


@pytest.fixture
def pipeline():
    ring, queue = RingBuffer(1 << 16), ChunkQueue(16)
    scheduler = ChunkScheduler(ring, queue)
    scheduler.start()
    yield ring, queue, scheduler
    scheduler.stop()


def test_chunks_match_streaming_reference_with_positions_stamps_and_flush(pipeline):
    ring, queue, scheduler = pipeline
    samples = _stream(CHUNK * 4 + 2500)
    stamps = _feed(ring, samples)
    chunks = _pop(queue, 4)
    assert scheduler.flush(5.0) is True
    chunks += _pop(queue, 1)

    ref, core = features.StreamingLogMel(), StreamingMel()
    padded = np.concatenate([samples, np.zeros(5 * CHUNK - len(samples), np.float32)])
    for i, (chunk, mel) in enumerate(zip(chunks, _normalise(chunks))):
        assert (chunk.index, chunk.first_sample) == (i, i * CHUNK)
        assert chunk.valid_samples == (CHUNK if i < 4 else 2500)
        assert chunk.mel.shape == (128, FRAMES_PER_CHUNK) and chunk.mel.dtype == np.float32
        assert chunk.peak == chunk.mel.max()  # raw log10 mel: not clamped or rescaled
        # Normalised by the consumer it is exactly what StreamingMel gives for the same chunks.
        want = core(padded[i * CHUNK:(i + 1) * CHUNK])
        np.testing.assert_array_equal(mel, want)
        assert np.abs(mel - ref(padded[i * CHUNK:(i + 1) * CHUNK])).max() <= TOL
        # arrived_ns is the time of the write that delivered the chunk's last sample.
        last = chunk.first_sample + chunk.valid_samples
        _, before, after = next(s for s in stamps if s[0] >= last)
        assert before <= chunk.arrived_ns <= after
        assert chunk.arrived_ns <= chunk.ready_ns <= time.monotonic_ns()
    assert (scheduler.chunks_emitted, scheduler.chunks_dropped) == (5, 0)
    assert scheduler.samples_consumed == len(samples)
    assert queue.pop(0.05) is None  # flushing again emits nothing: no partial chunk left
    assert scheduler.flush(5.0) and queue.pop(0.05) is None


def test_the_consumer_restarts_the_running_max_at_an_exact_chunk(pipeline):
    ring, queue, scheduler = pipeline
    samples = np.concatenate([4 * _stream(CHUNK * 2, 1), 0.01 * _stream(CHUNK * 2, 2)])
    _feed(ring, samples)
    chunks = _pop(queue, 4)
    assert chunks[2].peak < chunks[1].peak
    restarted = _normalise(chunks, restart_at={2})
    carried = _normalise(chunks)
    np.testing.assert_array_equal(restarted[:2], carried[:2])
    assert np.abs(restarted[2] - carried[2]).max() > 1e-2  # the loud peak no longer sets the floor
    # From the restart on, the floor follows only the quiet chunks' peaks.
    assert restarted[2].max() == np.float32((chunks[2].peak + 4) / 4)
    # The scheduler never drops history: chunk 2's left edge is chunk 1's real tail.
    mel = StreamingMel()
    mel(samples[:CHUNK])
    mel(samples[CHUNK:2 * CHUNK])
    mel.reset()  # a fresh running max, but also no history: the first frames differ
    assert np.abs(mel(samples[2 * CHUNK:3 * CHUNK])[:, 0] - restarted[2][:, 0]).max() > 1e-3


def test_a_full_listen_queue_drops_chunks_and_counts_them():
    ring, queue = RingBuffer(1 << 16), ChunkQueue(1)
    scheduler = ChunkScheduler(ring, queue)
    scheduler.start()
    ring.write(_stream(CHUNK * 4))
    assert scheduler.flush(5.0)
    scheduler.stop()
    assert (scheduler.chunks_emitted, scheduler.chunks_dropped) == (1, 3)
    assert queue.dropped == 3 and queue.pop(0).index == 0


def test_flush_needs_a_running_scheduler_and_stop_is_idempotent():
    scheduler = ChunkScheduler(RingBuffer(1 << 14), ChunkQueue(2))
    with pytest.raises(Error, match="start"):
        scheduler.flush(1.0)
    scheduler.start()
    assert scheduler.running
    scheduler.stop()
    scheduler.stop()
    assert not scheduler.running


def test_the_scheduler_keeps_its_ring_and_queue_alive():
    scheduler = ChunkScheduler(RingBuffer(1 << 14), ChunkQueue(4))  # only the scheduler refers to them
    gc.collect()
    scheduler.start()
    assert scheduler.flush(5.0)
    scheduler.stop()
    del scheduler
    gc.collect()


def test_a_ring_smaller_than_a_chunk_is_refused():
    with pytest.raises(ValueError, match="whole chunk"):
        ChunkScheduler(RingBuffer(4096), ChunkQueue(4))


def test_dropping_a_running_scheduler_joins_its_thread():
    ring, queue = RingBuffer(1 << 14), ChunkQueue(4)
    scheduler = ChunkScheduler(ring, queue)
    scheduler.start()
    t0 = time.monotonic()
    del scheduler
    gc.collect()
    assert time.monotonic() - t0 < 2.0
    ring.write(_stream(CHUNK))
    assert queue.pop(0.2) is None  # nobody consumes the ring any more


def test_a_wake_signal_wait_times_out_returns_on_post_and_releases_the_gil():
    wake = WakeSignal()
    t0 = time.monotonic()
    assert wake.wait(0.05) is None
    assert 0.04 <= time.monotonic() - t0 < 1.0
    wake.post()
    wake.post()  # posts count: two waits return at once
    t0 = time.monotonic()
    wake.wait(5.0)
    wake.wait(None)
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(ValueError):
        wake.wait(-1)
    waiter = threading.Thread(target=wake.wait, args=(10.0,))
    waiter.start()
    t0, spins = time.monotonic(), 0
    while time.monotonic() - t0 < 0.2:  # pure Python work needs the GIL
        spins += 1
    assert waiter.is_alive() and spins > 1000
    wake.post()
    waiter.join(2.0)
    assert not waiter.is_alive()


def test_one_worker_sleeps_on_one_wake_signal_for_many_schedulers():
    wake = WakeSignal()
    sessions = []
    for _ in range(3):
        ring, queue = RingBuffer(1 << 16), ChunkQueue(8)
        scheduler = ChunkScheduler(ring, queue, wake=wake)
        scheduler.start()
        sessions.append((ring, queue, scheduler))
    mics = [threading.Thread(target=_feed, args=(ring, _stream(CHUNK * 3, s))) for s, (ring, _, _) in enumerate(sessions)]
    for t in mics:
        t.start()
    got, waits, t0 = [[] for _ in sessions], 0, time.monotonic()
    while sum(map(len, got)) < 9 and time.monotonic() - t0 < 30:
        wake.wait(10.0)  # every pushed chunk posts: never a timeout
        waits += 1
        for s, (_, queue, _) in enumerate(sessions):
            got[s] += [c.index for c in queue.pop_many(8, 0)]
    for t in mics:
        t.join()
    assert got == [[0, 1, 2]] * 3
    assert waits <= 9 and time.monotonic() - t0 < 10
    # A flush posts too, even with nothing left to emit.
    ring, queue, scheduler = sessions[0]
    assert scheduler.flush(5.0)
    t0 = time.monotonic()
    wake.wait(5.0)
    assert time.monotonic() - t0 < 1.0 and len(queue) == 0
    for _, _, scheduler in sessions:
        scheduler.stop()


def test_the_scheduler_keeps_its_wake_signal_alive():
    ring, queue = RingBuffer(1 << 16), ChunkQueue(4)
    scheduler = ChunkScheduler(ring, queue, 6400, WakeSignal())  # only the scheduler refers to it
    gc.collect()
    scheduler.start()
    ring.write(_stream(CHUNK * 2))
    assert scheduler.flush(5.0)
    scheduler.stop()
    assert scheduler.chunks_emitted == 2 and len(queue) == 2


def test_dropped_chunks_do_not_post():
    wake = WakeSignal()
    ring, queue = RingBuffer(1 << 16), ChunkQueue(1)
    scheduler = ChunkScheduler(ring, queue, wake=wake)
    scheduler.start()
    ring.write(_stream(CHUNK * 3))
    assert scheduler.flush(5.0)
    scheduler.stop()
    assert (scheduler.chunks_emitted, scheduler.chunks_dropped) == (1, 2)
    t0 = time.monotonic()
    wake.wait(5.0)  # the pushed chunk
    wake.wait(5.0)  # the flush
    assert time.monotonic() - t0 < 1.0
    t0 = time.monotonic()
    wake.wait(0.1)  # the two dropped chunks posted nothing
    assert time.monotonic() - t0 >= 0.09


def test_the_old_reset_is_gone():
    assert not hasattr(ChunkScheduler, "reset")
    assert FRAMES_PER_CHUNK == 40
