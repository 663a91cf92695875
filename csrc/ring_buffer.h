// Lock-free single-producer / single-consumer float32 PCM ring.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "wake_signal.h"

namespace listenloop {

// The producer (an audio callback) never blocks and never allocates. On overrun it keeps
// what fits and drops the rest of the incoming block (drop-newest): the only policy that
// leaves the consumer's index to the consumer alone. Every write also leaves a
// (written_total, monotonic ns) stamp so the consumer can tell when a given sample arrived.
class RingBuffer {
 public:
  // Stamps of the most recent writes kept for arrival_ns(); older ones are overwritten.
  static constexpr size_t kStampSlots = 4096;

  explicit RingBuffer(size_t capacity);  // rounded up to a power of two
  RingBuffer(const RingBuffer&) = delete;
  RingBuffer& operator=(const RingBuffer&) = delete;

  // --- producer side ---
  // Copies up to `n` samples; returns how many were written (the rest count as dropped).
  size_t write(const float* data, size_t n) noexcept;

  // --- consumer side ---
  // Copies up to `max_n` samples out; returns how many.
  size_t read(float* out, size_t max_n) noexcept;
  // Waits until `n` samples are readable, the timeout passes (negative: forever) or wake()
  // is called. Returns whether `n` samples are readable.
  bool wait_for(size_t n, std::chrono::nanoseconds timeout) noexcept;
  // Monotonic ns of the first write whose written_total reached `sample_end` (the write that
  // delivered sample `sample_end - 1`). Queries must come in non-decreasing order of
  // `sample_end`. If that write's stamp was already overwritten, the oldest surviving later
  // stamp is returned (an upper bound); -1 if no write reached `sample_end` yet.
  int64_t arrival_ns(uint64_t sample_end) noexcept;

  // --- any thread ---
  void wake() noexcept;  // interrupts a wait_for()
  size_t available() const noexcept;
  size_t capacity() const noexcept { return capacity_; }
  uint64_t written_total() const noexcept { return head_.load(std::memory_order_acquire); }
  uint64_t read_total() const noexcept { return tail_.load(std::memory_order_acquire); }
  uint64_t dropped_samples() const noexcept { return dropped_.load(std::memory_order_relaxed); }

 private:
  // A seqlock slot: `seq` is 2*(write_no+1) once complete, odd while being written.
  struct Stamp {
    std::atomic<uint64_t> seq{0};
    std::atomic<uint64_t> total{0};
    std::atomic<int64_t> ns{0};
  };
  void record_stamp(uint64_t total_after, int64_t ns) noexcept;
  static constexpr uint64_t kNobodyWaiting = UINT64_MAX;

  const size_t capacity_;
  const size_t mask_;
  std::unique_ptr<float[]> data_;
  std::unique_ptr<Stamp[]> stamps_;

  // Producer-owned, consumer-read.
  alignas(64) std::atomic<uint64_t> head_{0};
  std::atomic<uint64_t> dropped_{0};
  std::atomic<uint64_t> stamps_written_{0};
  // Consumer-owned, producer-read.
  alignas(64) std::atomic<uint64_t> tail_{0};
  // written_total the consumer is waiting for; the producer posts only once it is reached.
  std::atomic<uint64_t> wanted_total_{kNobodyWaiting};
  uint64_t stamp_cursor_ = 0;  // consumer's next stamp to examine (consumer only)
  alignas(64) WakeSignal wake_;
};

}  // namespace listenloop
