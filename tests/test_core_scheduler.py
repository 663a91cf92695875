"""listenloop._core.ChunkScheduler: ring -> 6400-sample chunks -> streaming mel -> listen queue."""
import gc
import time

import numpy as np
import pytest

from listenloop import Error, features
from listenloop._core import ChunkQueue, ChunkScheduler, RingBuffer

CHUNK = 6400
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

    ref = features.StreamingLogMel()
    padded = np.concatenate([samples, np.zeros(5 * CHUNK - len(samples), np.float32)])
    for i, chunk in enumerate(chunks):
        assert (chunk.index, chunk.first_sample) == (i, i * CHUNK)
        assert chunk.valid_samples == (CHUNK if i < 4 else 2500)
        assert chunk.mel.shape == (128, 40) and chunk.mel.dtype == np.float32
        assert np.abs(chunk.mel - ref(padded[i * CHUNK:(i + 1) * CHUNK])).max() <= TOL
        # arrived_ns is the time of the write that delivered the chunk's last sample.
        last = chunk.first_sample + chunk.valid_samples
        _, before, after = next(s for s in stamps if s[0] >= last)
        assert before <= chunk.arrived_ns <= after
        assert chunk.arrived_ns <= chunk.ready_ns <= time.monotonic_ns()
    assert (scheduler.chunks_emitted, scheduler.chunks_dropped) == (5, 0)
    assert scheduler.samples_consumed == len(samples)
    assert queue.pop(0.05) is None  # flushing again emits nothing: no partial chunk left
    assert scheduler.flush(5.0) and queue.pop(0.05) is None


def test_reset_starts_the_next_chunk_without_history_or_running_max(pipeline):
    ring, queue, scheduler = pipeline
    loud, quiet = 4 * _stream(CHUNK, 1), 0.01 * _stream(CHUNK, 2)
    _feed(ring, loud)
    _pop(queue, 1)
    scheduler.reset()
    _feed(ring, quiet)
    (chunk,) = _pop(queue, 1)
    assert np.abs(chunk.mel - features.StreamingLogMel()(quiet)).max() <= TOL
    # Without the reset, the loud chunk's history and peak would have shaped it.
    continued = features.StreamingLogMel()
    continued(loud)
    assert np.abs(chunk.mel - continued(quiet)).max() > 1e-2


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
