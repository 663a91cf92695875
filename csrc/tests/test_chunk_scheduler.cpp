// ChunkScheduler end to end: chunk boundaries, stamps, drops, flush, reset, stop.
#include <stdexcept>
#include <chrono>
#include <cmath>
#include <thread>
#include <vector>

#include "check.h"
#include "chunk_scheduler.h"
#include "clock.h"

using namespace listenloop;
using namespace std::chrono_literals;

namespace {

std::vector<float> tone(size_t n, size_t offset) {
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = 0.3f * std::sin(0.01f * static_cast<float>(i + offset));
  return out;
}

// What StreamingMel gives for the same chunks fed directly.
std::vector<std::vector<float>> reference_mels(const std::vector<float>& stream, size_t n_chunks) {
  StreamingMel mel;
  std::vector<std::vector<float>> out;
  for (size_t c = 0; c < n_chunks; ++c) {
    std::vector<float> chunk(kChunkSamples, 0.0f);
    const size_t begin = c * kChunkSamples;
    for (size_t i = 0; i < kChunkSamples && begin + i < stream.size(); ++i) chunk[i] = stream[begin + i];
    out.emplace_back(kNMels * mel.frames());
    mel.compute(chunk.data(), out.back().data());
  }
  return out;
}

}  // namespace

TEST_CASE(feeds_become_exact_chunks_with_positions_and_stamps) {
  RingBuffer ring(1 << 15);
  ChunkQueue queue(64);
  ChunkScheduler scheduler(ring, queue);
  scheduler.start();
  const size_t total = kChunkSamples * 5 + 1234;
  const std::vector<float> stream = tone(total, 0);
  const int64_t t_start = monotonic_ns();
  for (size_t done = 0; done < total;) {  // 10 ms mic callbacks
    const size_t n = std::min<size_t>(160, total - done);
    while (ring.capacity() - ring.available() < n) std::this_thread::sleep_for(1ms);
    CHECK_EQ(ring.write(stream.data() + done, n), n);
    done += n;
  }
  const int64_t t_written = monotonic_ns();
  std::vector<MelChunk> chunks;
  while (chunks.size() < 5) {
    auto c = queue.pop(5s);
    if (!c) break;
    chunks.push_back(std::move(*c));
  }
  CHECK_EQ(chunks.size(), size_t{5});
  CHECK(scheduler.flush(5s));
  auto last = queue.pop(5s);
  CHECK(last.has_value());
  if (last) chunks.push_back(std::move(*last));
  scheduler.stop();
  CHECK_EQ(chunks.size(), size_t{6});

  const auto expected = reference_mels(stream, 6);
  for (size_t i = 0; i < chunks.size(); ++i) {
    const MelChunk& c = chunks[i];
    CHECK_EQ(c.index, static_cast<int64_t>(i));
    CHECK_EQ(c.first_sample, static_cast<int64_t>(i * kChunkSamples));
    CHECK_EQ(c.valid_samples, static_cast<int32_t>(i < 5 ? kChunkSamples : 1234));
    CHECK(c.arrived_ns >= t_start && c.arrived_ns <= t_written);
    CHECK(c.ready_ns >= c.arrived_ns);
    if (i > 0) CHECK(c.arrived_ns >= chunks[i - 1].arrived_ns);
    CHECK(c.mel == expected[i]);
  }
  CHECK_EQ(scheduler.chunks_emitted(), uint64_t{6});
  CHECK_EQ(scheduler.chunks_dropped(), uint64_t{0});
  CHECK_EQ(scheduler.samples_consumed(), uint64_t{total});
  CHECK(queue.size() == 0);
}

TEST_CASE(a_full_queue_drops_chunks_and_counts_them) {
  RingBuffer ring(1 << 16);
  ChunkQueue queue(2);
  ChunkScheduler scheduler(ring, queue);
  scheduler.start();
  const std::vector<float> stream = tone(kChunkSamples * 5, 0);
  CHECK_EQ(ring.write(stream.data(), stream.size()), stream.size());
  CHECK(scheduler.flush(5s));  // everything written is processed once flush returns
  scheduler.stop();
  CHECK_EQ(scheduler.chunks_emitted(), uint64_t{2});
  CHECK_EQ(scheduler.chunks_dropped(), uint64_t{3});
  CHECK_EQ(queue.dropped(), uint64_t{3});
  auto a = queue.pop(0ns), b = queue.pop(0ns);
  CHECK(a && b && a->index == 0 && b->index == 1);
}

TEST_CASE(reset_restarts_history_and_running_max) {
  RingBuffer ring(1 << 16);
  ChunkQueue queue(16);
  ChunkScheduler scheduler(ring, queue);
  scheduler.start();
  std::vector<float> loud = tone(kChunkSamples, 0);
  for (float& x : loud) x *= 3.0f;
  const std::vector<float> quiet = tone(kChunkSamples, 7);
  ring.write(loud.data(), loud.size());
  auto first = queue.pop(5s);
  scheduler.reset();
  ring.write(quiet.data(), quiet.size());
  auto second = queue.pop(5s);
  scheduler.stop();
  CHECK(first && second);
  StreamingMel fresh;
  std::vector<float> expected(kNMels * fresh.frames());
  fresh.compute(quiet.data(), expected.data());  // as if the quiet chunk started a stream
  if (second) CHECK(second->mel == expected);
}

TEST_CASE(stop_is_idempotent_and_flush_needs_a_running_thread) {
  RingBuffer ring(1 << 14);
  ChunkQueue queue(4);
  ChunkScheduler scheduler(ring, queue);
  bool threw = false;
  try {
    scheduler.flush(1s);
  } catch (const std::logic_error&) {
    threw = true;
  }
  CHECK(threw);
  scheduler.start();
  scheduler.start();
  CHECK(scheduler.running());
  const auto t0 = std::chrono::steady_clock::now();
  scheduler.stop();
  scheduler.stop();
  CHECK(!scheduler.running());
  CHECK(std::chrono::steady_clock::now() - t0 < 2s);  // stop wakes the thread, no long sleep

  // A partial chunk survives stop/start and is flushed with the right position.
  const std::vector<float> part = tone(1000, 0);
  ring.write(part.data(), part.size());
  scheduler.start();
  CHECK(scheduler.flush(5s));
  auto c = queue.pop(1s);
  CHECK(c && c->first_sample == 0 && c->valid_samples == 1000);
  CHECK(scheduler.flush(5s));  // nothing pending: no empty chunk
  CHECK(!queue.pop(50ms).has_value());
}

TEST_CASE(ring_smaller_than_a_chunk_is_refused) {
  RingBuffer ring(1024);
  ChunkQueue queue(4);
  bool threw = false;
  try {
    ChunkScheduler scheduler(ring, queue);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
}

TEST_MAIN()
