"""listenloop._core.RingBuffer: SPSC PCM ring seen from Python threads."""
import threading

import numpy as np
import pytest

from listenloop import AudioFormatError, Error
from listenloop._core import RingBuffer


def test_capacity_rounds_up_to_a_power_of_two():
    assert RingBuffer(1000).capacity == 1024
    assert RingBuffer(4096).capacity == 4096
    with pytest.raises(ValueError):
        RingBuffer(0)


def test_two_threads_pass_two_million_samples_in_order():
    total = 2_000_000  # a float32 counter is exact below 2**24
    ring = RingBuffer(1 << 14)
    received = []
    errors = []

    def produce():
        rng = np.random.default_rng(1)
        sent = 0
        while sent < total:
            block = np.arange(sent, min(total, sent + int(rng.integers(1, 3000))), dtype=np.float32)
            done = 0
            while done < len(block):
                room = ring.capacity - ring.available()
                done += ring.write(block[done:done + room]) if room else 0
            sent += len(block)

    def consume():
        rng = np.random.default_rng(2)
        got = 0
        try:
            while got < total:
                ring.wait_for(1, 0.01)
                buf = np.empty(int(rng.integers(1, 4000)), np.float32)
                n = ring.read(buf)
                received.append(buf[:n].copy())
                got += n
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    np.testing.assert_array_equal(np.concatenate(received), np.arange(total, dtype=np.float32))
    assert ring.written_total == ring.read_total == total
    assert ring.dropped_samples == 0


def test_overrun_keeps_what_fits_and_counts_the_rest():
    ring = RingBuffer(1000)  # 1024
    block = np.arange(1500, dtype=np.float32)
    assert ring.write(block) == 1024
    assert ring.dropped_samples == 1500 - 1024
    assert ring.write(block[:10]) == 0
    assert ring.dropped_samples == 486
    out = np.empty(100, np.float32)
    assert ring.read(out) == 100
    np.testing.assert_array_equal(out, block[:100])
    assert ring.write(block[:200]) == 100  # the newest 100 are dropped, not the oldest
    assert ring.dropped_samples == 586
    rest = np.empty(2048, np.float32)
    assert ring.read(rest) == 1024
    np.testing.assert_array_equal(rest[:924], block[100:1024])
    np.testing.assert_array_equal(rest[924:1024], block[:100])
    assert (ring.written_total, ring.read_total, ring.available()) == (1124, 1124, 0)


@pytest.mark.parametrize("bad", [np.zeros(8, np.float64), np.zeros(8, np.int16), np.zeros((4, 2), np.float32),
                                 np.zeros(16, np.float32)[::2]])
def test_write_refuses_anything_but_contiguous_1d_float32(bad):
    ring = RingBuffer(64)
    with pytest.raises(AudioFormatError) as info:
        ring.write(bad)
    assert isinstance(info.value, (ValueError, Error))
    assert ring.written_total == 0


def test_read_refuses_a_wrong_or_readonly_buffer():
    ring = RingBuffer(64)
    ring.write(np.ones(8, np.float32))
    with pytest.raises(AudioFormatError):
        ring.read(np.empty(8, np.float64))
    frozen = np.empty(8, np.float32)
    frozen.setflags(write=False)
    with pytest.raises(AudioFormatError):
        ring.read(frozen)
    assert ring.available() == 8


def test_wait_for_times_out_and_wakes_on_a_write():
    ring = RingBuffer(64)
    assert ring.wait_for(4, 0.01) is False
    timer = threading.Timer(0.05, lambda: ring.write(np.ones(4, np.float32)))
    timer.start()
    assert ring.wait_for(4, 5.0) or ring.wait_for(4, 5.0)
    timer.join()
