"""listenloop._core.ChunkQueue (the listen queue): bounded, non-blocking pushes, GIL-free waits.

Python cannot push to a ChunkQueue; a ChunkScheduler is the producer here.
"""
import threading
import time

import numpy as np
import pytest

from listenloop._core import CHUNK_SAMPLES, ChunkQueue, ChunkScheduler, RingBuffer


def _audio(n_chunks, seed=0):
    return (0.1 * np.random.default_rng(seed).standard_normal(n_chunks * CHUNK_SAMPLES)).astype(np.float32)


def _fill(queue, n_chunks):
    """Pushes n_chunks chunks at queue through a scheduler; returns it, stopped."""
    ring = RingBuffer(1 << 17)
    scheduler = ChunkScheduler(ring, queue)
    scheduler.start()
    assert ring.write(_audio(n_chunks)) == n_chunks * CHUNK_SAMPLES
    assert scheduler.flush(10.0)
    scheduler.stop()
    return scheduler


def test_a_full_queue_drops_chunks_and_counts_them():
    q = ChunkQueue(2)
    scheduler = _fill(q, 5)
    assert (q.dropped, len(q), q.size(), q.capacity) == (3, 2, 2, 2)
    assert (scheduler.chunks_emitted, scheduler.chunks_dropped) == (2, 3)
    assert [c.index for c in q.pop_many(10, 0)] == [0, 1]  # the oldest stay, later ones drop
    assert len(q) == 0 and q.dropped == 3


def test_pop_many_takes_what_is_there_without_waiting_for_more():
    q = ChunkQueue(8)
    _fill(q, 5)
    t0 = time.monotonic()
    assert [c.index for c in q.pop_many(3, 5.0)] == [0, 1, 2]
    assert [c.index for c in q.pop_many(10, 5.0)] == [3, 4]  # fewer than asked: no wait
    assert time.monotonic() - t0 < 1.0
    assert q.pop_many(0, 0) == []
    assert q.pop(0) is None


def test_pop_returns_none_after_the_timeout():
    q = ChunkQueue(2)
    t0 = time.monotonic()
    assert q.pop(0.05) is None
    assert 0.04 <= time.monotonic() - t0 < 1.0
    assert q.pop_many(3, 0.01) == []
    with pytest.raises(ValueError):
        q.pop(-1)
    with pytest.raises(ValueError):
        ChunkQueue(0)


def test_close_wakes_blocked_pops_and_refuses_pushes():
    q = ChunkQueue(2)
    results = []
    waiter = threading.Thread(target=lambda: results.append(q.pop(None)))  # waits forever
    many = threading.Thread(target=lambda: results.append(q.pop_many(4, 30.0)))
    waiter.start()
    many.start()
    time.sleep(0.05)
    q.close()
    waiter.join(2.0)
    many.join(2.0)
    assert not waiter.is_alive() and not many.is_alive()
    assert sorted(map(repr, results)) == sorted(["None", "[]"])
    assert q.closed
    scheduler = _fill(q, 1)  # a closed queue refuses the chunk
    assert scheduler.chunks_dropped == 1 and q.dropped == 0  # refused because closed, not full
    assert len(q) == 0


def test_queued_chunks_survive_close():
    q = ChunkQueue(4)
    _fill(q, 2)
    q.close()
    assert [c.index for c in q.pop_many(4, None)] == [0, 1]
    assert q.pop(None) is None and q.pop_many(4, None) == []


def test_a_waiting_pop_does_not_hold_the_gil():
    q = ChunkQueue(2)
    waiter = threading.Thread(target=q.pop, args=(3.0,))
    waiter.start()
    time.sleep(0.01)
    t0 = time.monotonic()
    spins = 0
    while time.monotonic() - t0 < 0.2:  # pure Python work needs the GIL
        spins += 1
    assert waiter.is_alive()  # the pop is still waiting while we ran
    assert time.monotonic() - t0 < 1.0 and spins > 1000
    q.close()
    waiter.join(2.0)
    assert not waiter.is_alive()


def test_pops_from_many_threads_deliver_each_chunk_once():
    n_chunks = 40
    q = ChunkQueue(64)
    seen, lock = [], threading.Lock()

    def consume():
        while (batch := q.pop_many(3, None)):
            with lock:
                seen.extend(c.index for c in batch)

    consumers = [threading.Thread(target=consume) for _ in range(3)]
    for t in consumers:
        t.start()
    ring = RingBuffer(1 << 16)
    scheduler = ChunkScheduler(ring, q)
    scheduler.start()
    audio = _audio(n_chunks)
    for start in range(0, len(audio), 1600):  # 100 ms blocks, as fast as the ring has room
        while ring.capacity - ring.available() < 1600:
            time.sleep(0.001)
        assert ring.write(audio[start:start + 1600]) == 1600
    assert scheduler.flush(10.0)
    scheduler.stop()
    deadline = time.monotonic() + 10
    while len(q) and time.monotonic() < deadline:
        time.sleep(0.001)
    q.close()
    for t in consumers:
        t.join(5.0)
    assert sorted(seen) == list(range(n_chunks)) and q.dropped == 0
