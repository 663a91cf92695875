// The one clock every timestamp in the core uses.
#pragma once

#include <chrono>
#include <cstdint>

namespace listenloop {

// steady_clock is CLOCK_MONOTONIC on Linux, the clock behind Python's time.monotonic_ns(),
// so stamps taken here compare directly with stamps taken in Python.
inline int64_t monotonic_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace listenloop
