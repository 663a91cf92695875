// BoundedQueue: multi-thread push/pop, drop counting, timeouts, close waking waiters.
#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bounded_queue.h"
#include "check.h"
#include "messages.h"

using listenloop::BoundedQueue;
using namespace std::chrono_literals;

TEST_CASE(full_queue_refuses_and_counts_drops) {
  BoundedQueue<int> q(3);
  CHECK(q.try_push(1));
  CHECK(q.try_push(2));
  CHECK(q.try_push(3));
  CHECK(!q.try_push(4));
  CHECK(!q.try_push(5));
  CHECK_EQ(q.dropped(), uint64_t{2});
  CHECK_EQ(q.size(), size_t{3});
  CHECK_EQ(*q.pop(0ns), 1);
  CHECK(q.try_push(6));
  const std::vector<int> rest = q.pop_many(10, 0ns);
  CHECK_EQ(rest.size(), size_t{3});
  CHECK(rest == std::vector<int>({2, 3, 6}));
}

TEST_CASE(pop_times_out_on_an_empty_queue) {
  BoundedQueue<int> q(2);
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(!q.pop(30ms).has_value());
  CHECK(std::chrono::steady_clock::now() - t0 >= 25ms);
  CHECK(q.pop_many(4, 10ms).empty());
}

TEST_CASE(close_wakes_blocked_waiters_and_keeps_queued_items) {
  BoundedQueue<int> q(4);
  std::atomic<int> woke{0};
  std::vector<std::thread> waiters;
  for (int i = 0; i < 3; ++i) {
    waiters.emplace_back([&] {
      if (!q.pop(-1ns).has_value()) ++woke;  // waits forever unless closed
    });
  }
  std::thread many([&] {
    if (q.pop_many(5, -1ns).empty()) ++woke;
  });
  std::this_thread::sleep_for(30ms);
  q.close();
  for (auto& t : waiters) t.join();
  many.join();
  CHECK_EQ(woke.load(), 4);
  CHECK(q.closed());
  CHECK(!q.try_push(1));
  CHECK_EQ(q.dropped(), uint64_t{0});  // refused because closed, not because full

  BoundedQueue<int> q2(4);
  q2.try_push(7);
  q2.close();
  CHECK_EQ(*q2.pop(-1ns), 7);  // queued items drain after close
  CHECK(!q2.pop(-1ns).has_value());
}

// Four producers and three consumers: every item is either delivered exactly once or
// counted as dropped.
TEST_CASE(contention_delivers_or_counts_every_item) {
  constexpr int kProducers = 4, kPerProducer = 50000;
  BoundedQueue<int> q(64);
  std::atomic<int> producers_left{kProducers};
  std::vector<std::atomic<int>> seen(kProducers * kPerProducer);
  std::atomic<uint64_t> refused{0};
  std::vector<std::thread> threads;
  for (int p = 0; p < kProducers; ++p) {
    threads.emplace_back([&, p] {
      for (int i = 0; i < kPerProducer; ++i) {
        if (!q.try_push(p * kPerProducer + i)) ++refused;
      }
      if (--producers_left == 0) q.close();
    });
  }
  for (int c = 0; c < 3; ++c) {
    threads.emplace_back([&, c] {
      for (;;) {
        if (c == 0) {
          auto item = q.pop(-1ns);
          if (!item) return;
          ++seen[*item];
        } else {
          auto items = q.pop_many(16, -1ns);
          if (items.empty()) return;
          for (int v : items) ++seen[v];
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  uint64_t delivered = 0;
  bool no_duplicates = true;
  for (auto& s : seen) {
    delivered += s.load();
    if (s.load() > 1) no_duplicates = false;
  }
  CHECK(no_duplicates);
  CHECK_EQ(refused.load(), q.dropped());
  CHECK_EQ(delivered + q.dropped(), uint64_t{kProducers * kPerProducer});
}

TEST_CASE(move_only_payloads_keep_their_contents) {
  BoundedQueue<std::unique_ptr<std::string>> q(2);
  CHECK(q.try_push(std::make_unique<std::string>("héllo")));
  CHECK(q.try_push(std::make_unique<std::string>("wörld")));
  CHECK(!q.try_push(std::make_unique<std::string>("dropped")));
  auto got = q.pop(0ns);
  CHECK(got.has_value() && *got && **got == "héllo");
  auto rest = q.pop_many(4, 0ns);
  CHECK(rest.size() == 1 && *rest[0] == "wörld");
  CHECK_EQ(q.dropped(), uint64_t{1});
}

TEST_CASE(mel_chunks_move_through_without_copying) {
  listenloop::ChunkQueue q(2);
  listenloop::MelChunk c;
  c.index = 12;
  c.mel.assign(128 * 40, 0.5f);
  c.peak = 0.5f;
  const float* data = c.mel.data();
  CHECK(q.try_push(std::move(c)));
  auto got = q.pop(0ns);
  CHECK(got.has_value());
  CHECK(got->mel.data() == data);  // the same buffer: moved, not copied
  CHECK_EQ(got->index, int64_t{12});
  CHECK_EQ(got->peak, 0.5f);
}

TEST_MAIN()
