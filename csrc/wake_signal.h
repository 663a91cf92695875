// A counting wake-up signal a real-time thread can raise without blocking.
#pragma once

#include <semaphore.h>

#include <chrono>

namespace listenloop {

// POSIX semaphore: sem_post never blocks and is async-signal-safe, which is what an audio
// callback may call. Waiting is on CLOCK_MONOTONIC (glibc >= 2.30) so wall-clock jumps do
// not shorten waits.
class WakeSignal {
 public:
  WakeSignal();
  ~WakeSignal();
  WakeSignal(const WakeSignal&) = delete;
  WakeSignal& operator=(const WakeSignal&) = delete;

  void post() noexcept;
  // Returns once posted or when `timeout` has passed; a negative timeout waits forever.
  void wait(std::chrono::nanoseconds timeout) noexcept;

 private:
  sem_t sem_;
};

}  // namespace listenloop
