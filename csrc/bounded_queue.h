// A bounded multi-producer / multi-consumer queue whose producers never wait.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <vector>

namespace listenloop {

// try_push never blocks: a full queue refuses the item and counts it as dropped, so a
// producer with a deadline (the chunk scheduler, the decoder) is never held up by a slow
// consumer. Consumers wait on a condition variable and return early once closed.
template <class T>
class BoundedQueue {
 public:
  explicit BoundedQueue(size_t capacity) : capacity_(capacity) {
    if (capacity == 0) throw std::invalid_argument("queue capacity must be at least 1");
  }
  BoundedQueue(const BoundedQueue&) = delete;
  BoundedQueue& operator=(const BoundedQueue&) = delete;

  // False when the queue is full (counted in dropped()) or closed (not counted).
  bool try_push(T item) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (closed_) return false;
      if (items_.size() >= capacity_) {
        ++dropped_;
        return false;
      }
      items_.push_back(std::move(item));
    }
    not_empty_.notify_one();
    return true;
  }

  // Waits up to `timeout` (negative: forever) for an item; nullopt on timeout, or once the
  // queue is closed and empty.
  std::optional<T> pop(std::chrono::nanoseconds timeout) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!wait_not_empty(lock, timeout)) return std::nullopt;
    T item = std::move(items_.front());
    items_.pop_front();
    return item;
  }

  // Waits like pop() for the first item, then takes up to `max_items` without waiting more.
  std::vector<T> pop_many(size_t max_items, std::chrono::nanoseconds timeout) {
    std::vector<T> out;
    std::unique_lock<std::mutex> lock(mutex_);
    if (max_items == 0 || !wait_not_empty(lock, timeout)) return out;
    const size_t n = std::min(max_items, items_.size());
    out.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      out.push_back(std::move(items_.front()));
      items_.pop_front();
    }
    return out;
  }

  // Refuses further pushes and wakes every waiter; items already queued can still be popped.
  void close() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      closed_ = true;
    }
    not_empty_.notify_all();
  }

  size_t size() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return items_.size();
  }
  uint64_t dropped() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return dropped_;
  }
  bool closed() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return closed_;
  }
  size_t capacity() const noexcept { return capacity_; }

 private:
  bool wait_not_empty(std::unique_lock<std::mutex>& lock, std::chrono::nanoseconds timeout) {
    const auto ready = [this] { return !items_.empty() || closed_; };
    if (timeout.count() < 0) {
      not_empty_.wait(lock, ready);
    } else {
      not_empty_.wait_for(lock, timeout, ready);
    }
    return !items_.empty();
  }

  const size_t capacity_;
  mutable std::mutex mutex_;
  std::condition_variable not_empty_;
  std::deque<T> items_;
  uint64_t dropped_ = 0;
  bool closed_ = false;
};

}  // namespace listenloop
