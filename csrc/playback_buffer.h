// The device's playback (the echo reference), placed on the microphone's sample clock.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

namespace listenloop {

// Single producer (accept_playback) / single consumer (the chunk scheduler's echo canceller).
// Every sample has a position in microphone samples (docs/PROTOCOL.md, "Playback reference"):
// the producer appends blocks at non-decreasing positions, a gap between blocks is silence,
// and the consumer reads any span of positions, getting silence where nothing was written.
// Neither side blocks or allocates. What cannot be placed is counted, never silently lost:
//   - late: positions the consumer has already passed (it assumed silence there);
//   - overlap: positions before the end of what was already written;
//   - ahead: positions at or beyond read_position() + capacity (the consumer is that far behind).
class PlaybackBuffer {
 public:
  // `capacity` is rounded up to a power of two; the memory is allocated by the first write, so
  // a session that never plays costs nothing.
  explicit PlaybackBuffer(size_t capacity);
  PlaybackBuffer(const PlaybackBuffer&) = delete;
  PlaybackBuffer& operator=(const PlaybackBuffer&) = delete;

  struct WriteResult {
    size_t written = 0;
    size_t late = 0;
    size_t overlap = 0;
    size_t ahead = 0;
  };

  // --- producer ---
  // Places `n` samples from position `at` on. Returns what happened to each of them.
  WriteResult write(uint64_t at, const float* data, size_t n) noexcept;

  // --- consumer ---
  // Fills `out` with the reference for positions [at, at + n), silence where none was written,
  // and releases every position before at + n. `at` must not go backwards.
  void read(uint64_t at, float* out, size_t n) noexcept;

  // --- any thread ---
  uint64_t end_position() const noexcept { return end_.load(std::memory_order_acquire); }
  uint64_t read_position() const noexcept { return read_.load(std::memory_order_acquire); }
  bool ever_written() const noexcept { return end_position() > 0; }
  size_t capacity() const noexcept { return capacity_; }

 private:
  const size_t capacity_;
  const size_t mask_;
  std::unique_ptr<float[]> data_;  // set by the producer's first write, published by end_
  // Producer-owned: one past the last position written (0: nothing yet). Positions in
  // [start_, end_) hold written samples or the zeros of a gap.
  alignas(64) std::atomic<uint64_t> end_{0};
  // Consumer-owned: every position before it has been read (or skipped as silence).
  alignas(64) std::atomic<uint64_t> read_{0};
};

}  // namespace listenloop
