// PlaybackBuffer: placement on the microphone clock, gaps as silence, and every sample that
// cannot be placed counted as late, overlapping or ahead; a producer and a consumer thread.
#include <atomic>
#include <thread>
#include <vector>

#include "check.h"
#include "playback_buffer.h"

using listenloop::PlaybackBuffer;

namespace {
std::vector<float> ramp(size_t n, float first) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = first + static_cast<float>(i);
  return v;
}
}  // namespace

TEST_CASE(blocks_are_read_back_at_their_positions_with_gaps_silent) {
  PlaybackBuffer b(64);
  const auto first = ramp(4, 1.0f), second = ramp(4, 100.0f);
  CHECK_EQ(b.write(2, first.data(), 4).written, size_t{4});    // positions 2..5
  CHECK_EQ(b.write(10, second.data(), 4).written, size_t{4});  // gap 6..9, then 10..13
  std::vector<float> out(16, -1.0f);
  b.read(0, out.data(), 16);
  const std::vector<float> expected{0, 0, 1, 2, 3, 4, 0, 0, 0, 0, 100, 101, 102, 103, 0, 0};
  CHECK(out == expected);
  CHECK_EQ(b.read_position(), uint64_t{16});
}

TEST_CASE(what_cannot_be_placed_is_counted) {
  PlaybackBuffer b(16);
  const auto block = ramp(8, 1.0f);
  CHECK_EQ(b.write(0, block.data(), 8).written, size_t{8});
  auto overlap = b.write(4, block.data(), 8);  // 4..7 were written already
  CHECK_EQ(overlap.overlap, size_t{4});
  CHECK_EQ(overlap.written, size_t{4});
  std::vector<float> out(20);
  b.read(0, out.data(), 20);  // the consumer passes 12..19 as silence
  auto late = b.write(12, block.data(), 8);
  CHECK_EQ(late.late, size_t{8});
  CHECK_EQ(late.written, size_t{0});
  auto ahead = b.write(30, block.data(), 8);  // read position 20 + capacity 16 = 36: 6 fit
  CHECK_EQ(ahead.written, size_t{6});
  CHECK_EQ(ahead.ahead, size_t{2});
  auto far = b.write(100, block.data(), 8);
  CHECK_EQ(far.ahead, size_t{8});
  CHECK_EQ(b.end_position(), uint64_t{36});
}

// The producer writes a ramp at increasing positions while the consumer reads spans behind it;
// whatever the consumer gets is the ramp value of its position or, where it ran ahead, silence.
TEST_CASE(a_producer_and_a_consumer_thread_agree_on_positions) {
  PlaybackBuffer b(1024);
  constexpr uint64_t kTotal = 400'000;
  std::atomic<bool> done{false};
  std::thread producer([&] {
    std::vector<float> block(97);
    uint64_t at = 0;
    while (at < kTotal) {
      for (size_t i = 0; i < block.size(); ++i) block[i] = static_cast<float>((at + i) % 1000 + 1);
      const auto r = b.write(at, block.data(), block.size());
      at += r.written + r.late + r.overlap;  // what is ahead is retried
      if (r.ahead) std::this_thread::yield();
    }
    done = true;
  });
  std::vector<float> span(61);
  uint64_t at = 0;
  size_t wrong = 0, heard = 0;
  while (!done || at < b.end_position()) {
    if (at + span.size() > b.end_position() && !done) {
      std::this_thread::yield();
      continue;
    }
    b.read(at, span.data(), span.size());
    for (size_t i = 0; i < span.size(); ++i) {
      if (span[i] == 0.0f) continue;
      ++heard;
      if (span[i] != static_cast<float>((at + i) % 1000 + 1)) ++wrong;
    }
    at += span.size();
  }
  producer.join();
  CHECK_EQ(wrong, size_t{0});
  CHECK(heard > kTotal / 2);
}

int main() { return check::run_all(); }
