// ChunkScheduler end to end: chunk boundaries, stamps, raw mel and peaks, drops, flush,
// wake signal, stop.
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <limits>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#include "check.h"
#include "chunk_scheduler.h"
#include "clock.h"
#include "wake_signal.h"

using namespace listenloop;
using namespace std::chrono_literals;

namespace {

std::vector<float> tone(size_t n, size_t offset) {
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = 0.3f * std::sin(0.01f * static_cast<float>(i + offset));
  return out;
}

// What StreamingMel gives for the same chunks (zero-padded at the end) fed directly.
std::vector<std::vector<float>> reference_mels(const std::vector<float>& stream, size_t n_chunks, bool raw) {
  StreamingMel mel;
  std::vector<std::vector<float>> out;
  for (size_t c = 0; c < n_chunks; ++c) {
    std::vector<float> chunk(kChunkSamples, 0.0f);
    const size_t begin = c * kChunkSamples;
    for (size_t i = 0; i < kChunkSamples && begin + i < stream.size(); ++i) chunk[i] = stream[begin + i];
    out.emplace_back(kNMels * mel.frames());
    if (raw) {
      mel.compute_raw(chunk.data(), out.back().data());
    } else {
      mel.compute(chunk.data(), out.back().data());
    }
  }
  return out;
}

// The consumer's side: normalise each chunk with the running maximum of the chunk peaks.
std::vector<std::vector<float>> normalised(const std::vector<MelChunk>& chunks) {
  float running = -std::numeric_limits<float>::infinity();
  std::vector<std::vector<float>> out;
  for (const MelChunk& c : chunks) {
    running = std::max(running, c.peak);
    out.push_back(c.mel);
    normalise_log_mel(out.back().data(), out.back().size(), running);
  }
  return out;
}

void write_in_blocks(RingBuffer& ring, const std::vector<float>& stream) {  // 10 ms mic callbacks
  for (size_t done = 0; done < stream.size();) {
    const size_t n = std::min<size_t>(160, stream.size() - done);
    while (ring.capacity() - ring.available() < n) std::this_thread::sleep_for(1ms);
    ring.write(stream.data() + done, n);
    done += n;
  }
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

  const auto expected_raw = reference_mels(stream, 6, true);
  const auto expected = reference_mels(stream, 6, false);
  const auto ours = normalised(chunks);
  for (size_t i = 0; i < chunks.size(); ++i) {
    const MelChunk& c = chunks[i];
    CHECK_EQ(c.index, static_cast<int64_t>(i));
    CHECK_EQ(c.first_sample, static_cast<int64_t>(i * kChunkSamples));
    CHECK_EQ(c.valid_samples, static_cast<int32_t>(i < 5 ? kChunkSamples : 1234));
    CHECK(c.arrived_ns >= t_start && c.arrived_ns <= t_written);
    CHECK(c.ready_ns >= c.arrived_ns);
    if (i > 0) CHECK(c.arrived_ns >= chunks[i - 1].arrived_ns);
    CHECK(c.mel == expected_raw[i]);
    CHECK_EQ(c.peak, *std::max_element(c.mel.begin(), c.mel.end()));
    CHECK(ours[i] == expected[i]);  // bit-identical to normalising inside StreamingMel
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

// The consumer restarts its running maximum at an exact chunk; the history stays.
TEST_CASE(history_is_kept_and_the_consumer_owns_the_running_max) {
  RingBuffer ring(1 << 16);
  ChunkQueue queue(16);
  ChunkScheduler scheduler(ring, queue);
  scheduler.start();
  std::vector<float> loud = tone(kChunkSamples, 0);
  for (float& x : loud) x *= 3.0f;
  std::vector<float> quiet = tone(kChunkSamples, 7);
  for (float& x : quiet) x *= 0.001f;
  ring.write(loud.data(), loud.size());
  auto first = queue.pop(5s);
  ring.write(quiet.data(), quiet.size());
  auto second = queue.pop(5s);
  scheduler.stop();
  CHECK(first && second);
  if (!first || !second) return;
  CHECK(second->peak < first->peak);

  StreamingMel continued;  // the quiet chunk's left edge is the loud chunk's real tail
  std::vector<float> raw(kNMels * continued.frames());
  continued.compute_raw(loud.data(), raw.data());
  CHECK_EQ(continued.compute_raw(quiet.data(), raw.data()), second->peak);
  CHECK(second->mel == raw);

  std::vector<float> restarted = second->mel, carried = second->mel;
  normalise_log_mel(restarted.data(), restarted.size(), second->peak);
  normalise_log_mel(carried.data(), carried.size(), std::max(first->peak, second->peak));
  CHECK(restarted != carried);  // so where the maximum restarts matters
  CHECK_EQ(*std::max_element(restarted.begin(), restarted.end()), (second->peak + 4.0f) / 4.0f);
}

// Many schedulers, one consumer sleeping on one shared signal.
TEST_CASE(a_shared_wake_signal_serves_many_schedulers) {
  constexpr size_t kSessions = 3, kChunksEach = 4;
  WakeSignal wake;
  std::vector<std::unique_ptr<RingBuffer>> rings;
  std::vector<std::unique_ptr<ChunkQueue>> queues;
  std::vector<std::unique_ptr<ChunkScheduler>> schedulers;
  for (size_t s = 0; s < kSessions; ++s) {
    rings.push_back(std::make_unique<RingBuffer>(1 << 15));
    queues.push_back(std::make_unique<ChunkQueue>(kChunksEach));
    schedulers.push_back(std::make_unique<ChunkScheduler>(*rings[s], *queues[s], kChunkSamples, &wake));
    schedulers[s]->start();
  }
  std::vector<std::thread> mics;
  for (size_t s = 0; s < kSessions; ++s) {
    mics.emplace_back([&, s] { write_in_blocks(*rings[s], tone(kChunkSamples * kChunksEach, 100 * s)); });
  }
  std::array<std::vector<int64_t>, kSessions> got;
  size_t total = 0, waits = 0;
  const auto t0 = std::chrono::steady_clock::now();
  while (total < kSessions * kChunksEach && std::chrono::steady_clock::now() - t0 < 60s) {
    wake.wait(30s);  // no timeout-driven polling: every chunk posts
    ++waits;
    for (size_t s = 0; s < kSessions; ++s) {
      while (auto c = queues[s]->pop(0ns)) {
        got[s].push_back(c->index);
        ++total;
      }
    }
  }
  for (auto& t : mics) t.join();
  CHECK(std::chrono::steady_clock::now() - t0 < 30s);
  CHECK_EQ(total, kSessions * kChunksEach);
  CHECK(waits <= total);  // each wait was answered by a post
  for (size_t s = 0; s < kSessions; ++s) {
    CHECK(got[s] == std::vector<int64_t>({0, 1, 2, 3}));
    schedulers[s]->stop();
  }
}

// One post per pushed chunk and one per completed flush; a dropped chunk posts nothing.
TEST_CASE(wake_posts_count_pushed_chunks_and_flushes) {
  RingBuffer ring(1 << 16);
  ChunkQueue queue(1);
  WakeSignal wake;
  ChunkScheduler scheduler(ring, queue, kChunkSamples, &wake);
  scheduler.start();
  const std::vector<float> stream = tone(kChunkSamples * 3, 0);
  ring.write(stream.data(), stream.size());
  CHECK(scheduler.flush(5s));
  scheduler.stop();
  CHECK_EQ(scheduler.chunks_emitted(), uint64_t{1});
  CHECK_EQ(scheduler.chunks_dropped(), uint64_t{2});
  for (int i = 0; i < 2; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    wake.wait(10s);
    CHECK(std::chrono::steady_clock::now() - t0 < 5s);
  }
  const auto t0 = std::chrono::steady_clock::now();
  wake.wait(50ms);  // nothing left to take
  CHECK(std::chrono::steady_clock::now() - t0 >= 40ms);
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
