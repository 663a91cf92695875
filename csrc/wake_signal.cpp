#include "wake_signal.h"

#include <cerrno>
#include <ctime>
#include <system_error>

namespace listenloop {

WakeSignal::WakeSignal() {
  if (sem_init(&sem_, /*pshared=*/0, /*value=*/0) != 0) {
    throw std::system_error(errno, std::generic_category(), "sem_init");
  }
}

WakeSignal::~WakeSignal() { sem_destroy(&sem_); }

void WakeSignal::post() noexcept {
  // EOVERFLOW only means the count is already huge: the waiter will wake anyway.
  sem_post(&sem_);
}

void WakeSignal::wait(std::chrono::nanoseconds timeout) noexcept {
  if (timeout.count() < 0) {
    while (sem_wait(&sem_) != 0 && errno == EINTR) {
    }
    return;
  }
  // sem_clockwait (glibc >= 2.30) measures the deadline on CLOCK_MONOTONIC; older C
  // libraries only offer sem_timedwait on CLOCK_REALTIME.
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 30))
  constexpr clockid_t kClock = CLOCK_MONOTONIC;
#else
  constexpr clockid_t kClock = CLOCK_REALTIME;
#endif
  timespec deadline{};
  clock_gettime(kClock, &deadline);
  const long long total = static_cast<long long>(deadline.tv_nsec) + timeout.count();
  deadline.tv_sec += static_cast<time_t>(total / 1000000000LL);
  deadline.tv_nsec = static_cast<long>(total % 1000000000LL);
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 30))
  while (sem_clockwait(&sem_, kClock, &deadline) != 0 && errno == EINTR) {
  }
#else
  while (sem_timedwait(&sem_, &deadline) != 0 && errno == EINTR) {
  }
#endif
}

}  // namespace listenloop
