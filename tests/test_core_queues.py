"""listenloop._core.EventQueue / ChunkQueue: bounded, non-blocking pushes, GIL-free waits."""
import threading
import time

import pytest

from listenloop._core import ChunkQueue, EventQueue


def test_event_round_trip_keeps_every_field():
    q = EventQueue(4)
    assert q.try_push(3, 17, 6.8, 123456789, 0.75, True, "héllo ✓", [5, 6, 7])
    e = q.pop(0)
    assert (e.kind, e.chunk, e.stream_time, e.wall_ns, e.value, e.flag) == (3, 17, 6.8, 123456789, 0.75, True)
    assert e.text == "héllo ✓" and list(e.token_ids) == [5, 6, 7]
    with pytest.raises(AttributeError):
        e.kind = 4  # events are read-only


def test_a_full_queue_refuses_without_blocking_and_counts_drops():
    q = EventQueue(2)
    assert q.try_push(0, 0, 0.0, 0) and q.try_push(0, 1, 0.0, 0)
    t0 = time.monotonic()
    assert not q.try_push(0, 2, 0.0, 0)
    assert time.monotonic() - t0 < 0.05
    assert (q.dropped, len(q), q.size(), q.capacity) == (1, 2, 2, 2)
    assert [e.chunk for e in q.pop_many(10, 0)] == [0, 1]


def test_pop_returns_none_after_the_timeout():
    for q in (EventQueue(2), ChunkQueue(2)):
        t0 = time.monotonic()
        assert q.pop(0.05) is None
        assert 0.04 <= time.monotonic() - t0 < 1.0
        assert q.pop_many(3, 0.01) == []
    with pytest.raises(ValueError):
        EventQueue(2).pop(-1)


@pytest.mark.parametrize("make", [EventQueue, ChunkQueue])
def test_close_wakes_a_blocked_pop_and_refuses_pushes(make):
    q = make(2)
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


def test_queued_events_survive_close():
    q = EventQueue(2)
    q.try_push(1, 0, 0.0, 0)
    q.close()
    assert not q.try_push(1, 1, 0.0, 0)
    assert q.dropped == 0  # refused because closed, not because full
    assert q.pop(None).kind == 1 and q.pop(None) is None


def test_a_waiting_pop_does_not_hold_the_gil():
    q = EventQueue(2)
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


def test_pops_from_many_threads_deliver_each_event_once():
    q = EventQueue(64)
    seen, lock = [], threading.Lock()

    def consume():
        while (e := q.pop(None)) is not None:
            with lock:
                seen.append(e.chunk)

    consumers = [threading.Thread(target=consume) for _ in range(3)]
    for t in consumers:
        t.start()
    pushed = 0
    for i in range(5000):
        while not q.try_push(0, i, 0.0, 0):
            time.sleep(0)
        pushed += 1
    deadline = time.monotonic() + 10
    while len(q) and time.monotonic() < deadline:
        time.sleep(0.001)
    q.close()
    for t in consumers:
        t.join(5.0)
    assert sorted(seen) == list(range(5000))
