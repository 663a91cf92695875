// RingBuffer: ordering under two-thread contention, exact overrun accounting, arrival stamps.
#include <stdexcept>
#include <atomic>
#include <chrono>
#include <random>
#include <thread>
#include <vector>

#include "check.h"
#include "ring_buffer.h"

using listenloop::RingBuffer;

TEST_CASE(capacity_is_rounded_up_to_a_power_of_two) {
  CHECK_EQ(RingBuffer(1000).capacity(), size_t{1024});
  CHECK_EQ(RingBuffer(1024).capacity(), size_t{1024});
  CHECK_EQ(RingBuffer(1).capacity(), size_t{1});
  bool threw = false;
  try {
    RingBuffer bad(0);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
}

// The producer writes a counter sequence in random-size blocks, retrying what did not fit;
// the consumer reads random-size blocks and checks it sees every value once, in order.
TEST_CASE(two_threads_move_millions_of_samples_without_loss_or_reordering) {
  constexpr uint32_t kTotal = 3'000'000;  // exactly representable in float32 (< 2^24)
  RingBuffer ring(4096);
  std::thread producer([&] {
    std::mt19937 rng(1);
    std::vector<float> block(1500);
    uint32_t next = 0;
    while (next < kTotal) {
      const uint32_t n = std::min<uint32_t>(1 + rng() % 1500, kTotal - next);
      for (uint32_t i = 0; i < n; ++i) block[i] = static_cast<float>(next + i);
      size_t done = 0;
      while (done < n) {
        const size_t room = ring.capacity() - ring.available();
        const size_t k = ring.write(block.data() + done, std::min<size_t>(n - done, room));
        done += k;
        if (k == 0) std::this_thread::yield();
      }
      next += n;
    }
  });
  std::mt19937 rng(2);
  std::vector<float> out(2000);
  uint32_t expected = 0;
  bool in_order = true;
  while (expected < kTotal) {
    ring.wait_for(1, std::chrono::milliseconds(10));
    const size_t got = ring.read(out.data(), 1 + rng() % 2000);
    for (size_t i = 0; i < got; ++i) {
      if (out[i] != static_cast<float>(expected + i)) in_order = false;
    }
    expected += static_cast<uint32_t>(got);
  }
  producer.join();
  CHECK(in_order);
  CHECK_EQ(expected, kTotal);
  CHECK_EQ(ring.written_total(), uint64_t{kTotal});
  CHECK_EQ(ring.read_total(), uint64_t{kTotal});
  CHECK_EQ(ring.dropped_samples(), uint64_t{0});
}

TEST_CASE(overrun_keeps_what_fits_and_counts_the_rest_exactly) {
  RingBuffer ring(8);
  std::vector<float> block(20);
  for (size_t i = 0; i < block.size(); ++i) block[i] = static_cast<float>(i);
  CHECK_EQ(ring.write(block.data(), 5), size_t{5});
  CHECK_EQ(ring.write(block.data() + 5, 6), size_t{3});  // 3 fit, 3 dropped (the newest)
  CHECK_EQ(ring.dropped_samples(), uint64_t{3});
  CHECK_EQ(ring.write(block.data(), 4), size_t{0});
  CHECK_EQ(ring.dropped_samples(), uint64_t{7});
  std::vector<float> out(8);
  CHECK_EQ(ring.read(out.data(), 8), size_t{8});
  for (size_t i = 0; i < 8; ++i) CHECK_EQ(out[i], static_cast<float>(i));
  // After draining, writes that wrap around the end are intact.
  CHECK_EQ(ring.write(block.data() + 10, 6), size_t{6});
  CHECK_EQ(ring.read(out.data(), 8), size_t{6});
  for (size_t i = 0; i < 6; ++i) CHECK_EQ(out[i], static_cast<float>(10 + i));
  CHECK_EQ(ring.written_total(), uint64_t{14});
  CHECK_EQ(ring.dropped_samples(), uint64_t{7});
}

TEST_CASE(wait_for_times_out_then_wakes_on_write_and_on_wake) {
  RingBuffer ring(64);
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(!ring.wait_for(10, std::chrono::milliseconds(30)));
  CHECK(std::chrono::steady_clock::now() - t0 >= std::chrono::milliseconds(25));

  std::vector<float> block(10, 1.0f);
  std::thread writer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ring.write(block.data(), 4);  // not enough yet: must not end the wait
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ring.write(block.data(), 6);
  });
  CHECK(ring.wait_for(10, std::chrono::seconds(5)) || ring.wait_for(10, std::chrono::seconds(5)));
  writer.join();
  CHECK_EQ(ring.available(), size_t{10});

  std::thread waker([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ring.wake();
  });
  const auto t1 = std::chrono::steady_clock::now();
  CHECK(!ring.wait_for(20, std::chrono::seconds(10)));
  CHECK(std::chrono::steady_clock::now() - t1 < std::chrono::seconds(5));
  waker.join();
}

TEST_CASE(arrival_stamp_is_the_write_that_delivered_the_sample) {
  RingBuffer ring(1 << 12);
  std::vector<float> block(100, 0.0f);
  std::vector<int64_t> before(5), after(5);
  for (int i = 0; i < 5; ++i) {
    before[i] = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
    ring.write(block.data(), 100);  // totals 100, 200, ..., 500
    after[i] = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  const int64_t t150 = ring.arrival_ns(150);  // delivered by the 2nd write
  CHECK(t150 >= before[1] && t150 <= after[1]);
  const int64_t t200 = ring.arrival_ns(200);  // still the 2nd write
  CHECK_EQ(t200, t150);
  const int64_t t201 = ring.arrival_ns(201);
  CHECK(t201 >= before[2] && t201 <= after[2]);
  const int64_t t500 = ring.arrival_ns(500);
  CHECK(t500 >= before[4] && t500 <= after[4]);
  CHECK_EQ(ring.arrival_ns(501), int64_t{-1});  // not written yet
}

TEST_CASE(arrival_stamp_survives_the_stamp_ring_wrapping) {
  RingBuffer ring(1 << 16);
  const float one = 1.0f;
  const size_t writes = RingBuffer::kStampSlots * 3 + 7;
  for (size_t i = 0; i < writes; ++i) ring.write(&one, 1);
  // Sample 10's stamp was overwritten: the answer is the oldest surviving stamp (a later time).
  const int64_t early = ring.arrival_ns(10);
  CHECK(early > 0);
  const int64_t last = ring.arrival_ns(writes);
  CHECK(last >= early);
  CHECK_EQ(ring.arrival_ns(writes + 1), int64_t{-1});
}

// Stamps are read while the producer keeps overwriting them (TSan checks the seqlock).
TEST_CASE(arrival_stamps_stay_monotonic_under_contention) {
  RingBuffer ring(1 << 12);
  std::atomic<bool> done{false};
  std::thread producer([&] {
    std::vector<float> block(3, 0.0f);
    for (int i = 0; i < 200000; ++i) {
      while (ring.capacity() - ring.available() < 3) std::this_thread::yield();
      ring.write(block.data(), 3);
    }
    done = true;
  });
  std::vector<float> out(256);
  uint64_t consumed = 0;
  int64_t previous = 0;
  bool monotonic = true;
  while (!done.load() || ring.available() > 0) {
    const size_t got = ring.read(out.data(), out.size());
    if (got == 0) continue;
    consumed += got;
    const int64_t t = ring.arrival_ns(consumed);
    if (t < previous || t <= 0) monotonic = false;
    previous = t;
  }
  producer.join();
  CHECK(monotonic);
  CHECK_EQ(consumed, uint64_t{600000});
  CHECK_EQ(ring.dropped_samples(), uint64_t{0});
}

TEST_MAIN()
