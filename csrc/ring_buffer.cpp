#include "ring_buffer.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "clock.h"

namespace listenloop {
namespace {

constexpr size_t kMaxCapacity = size_t{1} << 34;  // 64 GiB of floats: anything above is a mistake

size_t round_up_pow2(size_t n) {
  if (n == 0 || n > kMaxCapacity) {
    throw std::invalid_argument("RingBuffer capacity must be in [1, 2^34] samples, got " + std::to_string(n));
  }
  size_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

static_assert((RingBuffer::kStampSlots & (RingBuffer::kStampSlots - 1)) == 0, "stamp slots: power of two");

}  // namespace

RingBuffer::RingBuffer(size_t capacity)
    : capacity_(round_up_pow2(capacity)),
      mask_(capacity_ - 1),
      data_(new float[capacity_]()),
      stamps_(new Stamp[kStampSlots]) {}

size_t RingBuffer::write(const float* data, size_t n) noexcept {
  const int64_t now = monotonic_ns();
  const uint64_t head = head_.load(std::memory_order_relaxed);
  const uint64_t tail = tail_.load(std::memory_order_acquire);
  const size_t room = capacity_ - static_cast<size_t>(head - tail);
  const size_t k = std::min(n, room);
  if (k < n) dropped_.fetch_add(n - k, std::memory_order_relaxed);
  if (k == 0) return 0;

  const size_t start = static_cast<size_t>(head) & mask_;
  const size_t first = std::min(k, capacity_ - start);
  std::memcpy(data_.get() + start, data, first * sizeof(float));
  std::memcpy(data_.get(), data + first, (k - first) * sizeof(float));

  // The stamp is published before the samples, so a consumer that sees the samples sees it.
  record_stamp(head + k, now);
  // seq_cst store then seq_cst load, mirrored in wait_for(): either the consumer sees the
  // new head, or we see the total it waits for (Dekker), so no wake-up is lost.
  head_.store(head + k, std::memory_order_seq_cst);
  uint64_t wanted = wanted_total_.load(std::memory_order_seq_cst);
  if (head + k >= wanted &&
      wanted_total_.compare_exchange_strong(wanted, kNobodyWaiting, std::memory_order_relaxed)) {
    wake_.post();
  }
  return k;
}

void RingBuffer::record_stamp(uint64_t total_after, int64_t ns) noexcept {
  const uint64_t no = stamps_written_.load(std::memory_order_relaxed);
  Stamp& slot = stamps_[no & (kStampSlots - 1)];
  // Seqlock without fences (TSan does not model them): the release stores keep the odd
  // marker ahead of the new data; arrival_ns() pairs them with acquire loads.
  slot.seq.store(2 * no + 1, std::memory_order_relaxed);
  slot.total.store(total_after, std::memory_order_release);
  slot.ns.store(ns, std::memory_order_release);
  slot.seq.store(2 * (no + 1), std::memory_order_release);
  stamps_written_.store(no + 1, std::memory_order_release);
}

size_t RingBuffer::read(float* out, size_t max_n) noexcept {
  const uint64_t tail = tail_.load(std::memory_order_relaxed);
  const uint64_t head = head_.load(std::memory_order_acquire);
  const size_t k = std::min(max_n, static_cast<size_t>(head - tail));
  if (k == 0) return 0;
  const size_t start = static_cast<size_t>(tail) & mask_;
  const size_t first = std::min(k, capacity_ - start);
  std::memcpy(out, data_.get() + start, first * sizeof(float));
  std::memcpy(out + first, data_.get(), (k - first) * sizeof(float));
  tail_.store(tail + k, std::memory_order_release);
  return k;
}

bool RingBuffer::wait_for(size_t n, std::chrono::nanoseconds timeout) noexcept {
  const uint64_t target = tail_.load(std::memory_order_relaxed) + n;
  if (head_.load(std::memory_order_acquire) >= target) return true;
  wanted_total_.store(target, std::memory_order_seq_cst);
  if (head_.load(std::memory_order_seq_cst) < target && timeout.count() != 0) {
    wake_.wait(timeout);
  }
  wanted_total_.store(kNobodyWaiting, std::memory_order_relaxed);
  return head_.load(std::memory_order_acquire) >= target;
}

void RingBuffer::wake() noexcept { wake_.post(); }

int64_t RingBuffer::arrival_ns(uint64_t sample_end) noexcept {
  uint64_t written = stamps_written_.load(std::memory_order_acquire);
  while (stamp_cursor_ < written) {
    if (written - stamp_cursor_ > kStampSlots) stamp_cursor_ = written - kStampSlots;
    const Stamp& slot = stamps_[stamp_cursor_ & (kStampSlots - 1)];
    const uint64_t expected = 2 * (stamp_cursor_ + 1);
    const uint64_t seq_before = slot.seq.load(std::memory_order_acquire);
    const uint64_t total = slot.total.load(std::memory_order_acquire);
    const int64_t ns = slot.ns.load(std::memory_order_acquire);
    const uint64_t seq_after = slot.seq.load(std::memory_order_relaxed);
    if (seq_before != expected || seq_after != expected) {
      // The producer lapped us while we looked: re-read how far it got and skip ahead.
      written = stamps_written_.load(std::memory_order_acquire);
      ++stamp_cursor_;
      continue;
    }
    // The cursor stays on this stamp: the next chunk may end inside the same write.
    if (total >= sample_end) return ns;
    ++stamp_cursor_;
  }
  return -1;
}

size_t RingBuffer::available() const noexcept {
  const uint64_t tail = tail_.load(std::memory_order_acquire);  // tail first: then head >= tail
  return static_cast<size_t>(head_.load(std::memory_order_acquire) - tail);
}

}  // namespace listenloop
