#include "playback_buffer.h"

#include <algorithm>

namespace listenloop {
namespace {

size_t round_up_pow2(size_t n) {
  size_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

}  // namespace

PlaybackBuffer::PlaybackBuffer(size_t capacity)
    : capacity_(round_up_pow2(std::max<size_t>(capacity, 2))),
      mask_(capacity_ - 1) {}

PlaybackBuffer::WriteResult PlaybackBuffer::write(uint64_t at, const float* data, size_t n) noexcept {
  WriteResult result;
  const uint64_t end = end_.load(std::memory_order_relaxed);
  const uint64_t read = read_.load(std::memory_order_acquire);
  uint64_t first = at;
  size_t skip = 0;
  // Before what was already written: those positions are taken.
  if (first < end) {
    const size_t n_overlap = static_cast<size_t>(std::min<uint64_t>(end - first, n));
    result.overlap = n_overlap;
    skip += n_overlap;
    first += n_overlap;
  }
  // Before what the consumer has passed: too late to be heard by the canceller.
  if (skip < n && first < read) {
    const size_t n_late = static_cast<size_t>(std::min<uint64_t>(read - first, n - skip));
    result.late = n_late;
    skip += n_late;
    first += n_late;
  }
  // Room: positions below read + capacity. A gap since `end` is written as zeros first.
  const uint64_t limit = read + capacity_;
  const uint64_t gap_from = std::max(end, read);
  if (skip < n && first >= limit) {
    result.ahead = n - skip;
    return result;
  }
  if (skip == n) return result;
  if (!data_) data_.reset(new (std::nothrow) float[capacity_]);  // the consumer reads none before end_ moves
  if (!data_) {
    result.ahead = n - skip;  // no memory: counted like a full buffer
    return result;
  }
  for (uint64_t p = gap_from; p < first; ++p) data_[p & mask_] = 0.0f;
  const size_t fits = static_cast<size_t>(std::min<uint64_t>(limit - first, n - skip));
  for (size_t i = 0; i < fits; ++i) data_[(first + i) & mask_] = data[skip + i];
  result.written = fits;
  result.ahead = n - skip - fits;
  end_.store(first + fits, std::memory_order_release);
  return result;
}

void PlaybackBuffer::read(uint64_t at, float* out, size_t n) noexcept {
  const uint64_t end = end_.load(std::memory_order_acquire);
  const uint64_t read = read_.load(std::memory_order_relaxed);
  for (size_t i = 0; i < n; ++i) {
    const uint64_t p = at + i;
    // Positions before `read` were released: the producer may have reused their slots.
    out[i] = (p >= read && p < end) ? data_[p & mask_] : 0.0f;
  }
  read_.store(std::max(read, at + n), std::memory_order_release);
}

}  // namespace listenloop
