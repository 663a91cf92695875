#!/usr/bin/env bash
# Sanitizer builds of the C++ core's tests (no Python needed):
#   1. ASan + UBSan: every C++ test.
#   2. TSan: the concurrent parts (ring buffer, queues, scheduler).
# Build trees live in build/sanitize-*; reruns are incremental.
set -euo pipefail
cd "$(dirname "$0")/.."

jobs="${SANITIZE_JOBS:-2}"
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)

configure_and_build() {  # $1: sanitizer, $2: build dir, $3...: targets (default: all)
  if [[ ! -f "$2/CMakeCache.txt" ]]; then
    # -O0 -g: readable reports; with sanitizers -O1 takes minutes on the pocketfft sources.
    cmake -S . -B "$2" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O0 -g" \
      -DLISTENLOOP_BUILD_TESTS=ON -DLISTENLOOP_BUILD_PYTHON=OFF -DLISTENLOOP_SANITIZE="$1" >/dev/null
  fi
  local targets=()
  for t in "${@:3}"; do targets+=(--target "$t"); done
  cmake --build "$2" --parallel "$jobs" "${targets[@]}"
}

echo "== ASan + UBSan: all C++ tests"
configure_and_build address build/sanitize-address
ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:strict_string_checks=1" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  ctest --test-dir build/sanitize-address --output-on-failure --timeout 300

echo "== TSan: ring buffer, playback buffer, queues, scheduler"
configure_and_build thread build/sanitize-thread test_ring_buffer test_bounded_queue test_chunk_scheduler test_playback_buffer
TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1" \
  ctest --test-dir build/sanitize-thread --output-on-failure --timeout 300 \
    -R 'test_(ring_buffer|bounded_queue|chunk_scheduler|playback_buffer)$'

echo "sanitize: all passed"
