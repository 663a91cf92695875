"""Micro-benchmarks of the C++ core (pytest-benchmark).

    pytest bench/test_bench_core.py --benchmark-only

Groups (compare medians within a group):
  mel-chunk   one 6400-sample chunk through the streaming log-mel: C++ StreamingMel vs the
              NumPy reference features.StreamingLogMel (same input, same run).
  mel-10s     10 s of audio through the whole-array log-mel: C++ LogMel vs features.log_mel.
  ring        one RingBuffer block of 160 or 1024 samples written and read back from Python
              (the write alone is about half; both include the Python call overhead).
  scheduler   end to end per chunk: write 6400 samples to the ring, the scheduler thread
              wakes, cuts the chunk, computes its mel and pushes it, Python pops the MelChunk.
              Subtracting the C++ mel-chunk median leaves the scheduling + hand-over cost.
  echo-chunk  one 6400-sample chunk through the echo canceller while the device plays
              (the cost the front end adds per chunk), and with no playback within reach
              (the pass-through the canceller costs a session that never plays).

NumPy's matrix product uses OpenBLAS threads; on a busy machine their hand-offs dominate
the tiny per-chunk product. For the single-threaded comparison run with
OPENBLAS_NUM_THREADS=1. The C++ kernel is the one build_info()["mel_kernel"] names.
"""
import numpy as np
import pytest

from listenloop import features
from listenloop._core import ChunkQueue, ChunkScheduler, EchoCanceller, LogMel, RingBuffer, StreamingMel

rng = np.random.default_rng(0)
CHUNK = (0.3 * rng.standard_normal(6400)).astype(np.float32)
TEN_SECONDS = (0.3 * rng.standard_normal(160000)).astype(np.float32)


@pytest.mark.benchmark(group="mel-chunk")
def test_mel_chunk_cpp(benchmark):
    assert np.abs(StreamingMel()(CHUNK) - features.StreamingLogMel()(CHUNK)).max() <= 1e-4
    benchmark(StreamingMel(), CHUNK)


@pytest.mark.benchmark(group="mel-chunk")
def test_mel_chunk_numpy(benchmark):
    benchmark(features.StreamingLogMel(), CHUNK)


@pytest.mark.benchmark(group="mel-10s")
def test_mel_10s_cpp(benchmark):
    out = benchmark(LogMel().compute, TEN_SECONDS)
    assert out.shape == (128, 1000)


@pytest.mark.benchmark(group="mel-10s")
def test_mel_10s_numpy(benchmark):
    benchmark(features.log_mel, TEN_SECONDS)


@pytest.mark.benchmark(group="ring")
@pytest.mark.parametrize("block", [160, 1024])
def test_ring_write_and_read_back(benchmark, block):
    ring = RingBuffer(1 << 16)
    samples = np.ones(block, np.float32)
    out = np.empty(block, np.float32)

    def round_trip():
        ring.write(samples)
        ring.read(out)

    benchmark(round_trip)
    assert ring.dropped_samples == 0 and ring.available() == 0


@pytest.mark.benchmark(group="scheduler")
def test_scheduler_end_to_end_per_chunk(benchmark):
    ring, queue = RingBuffer(1 << 16), ChunkQueue(8)
    scheduler = ChunkScheduler(ring, queue)
    scheduler.start()

    def one_chunk():
        ring.write(CHUNK)
        return queue.pop(5.0)

    try:
        chunk = benchmark(one_chunk)
    finally:
        scheduler.stop()
    assert chunk is not None and chunk.valid_samples == 6400
    assert scheduler.chunks_dropped == 0


@pytest.mark.benchmark(group="echo-chunk")
@pytest.mark.parametrize("playing", [True, False])
def test_echo_canceller_chunk(benchmark, playing):
    canceller = EchoCanceller()
    reference = (0.1 * rng.standard_normal(6400)).astype(np.float32) * playing
    microphone = (0.5 * np.roll(reference, 800) + 0.01 * CHUNK).astype(np.float32)
    canceller.process(microphone, reference)  # the delay estimate and filter get going
    out = benchmark(canceller.process, microphone, reference)
    assert out.shape == (6400,)
