#!/usr/bin/env bash
# The C++ core cross-compiled for aarch64 (Jetson, Raspberry Pi 4/5, Graviton) with Debian's
# cross g++/gcc and the same -Wall -Wextra -Werror as the native build (the log-mel kernel is
# "neon" there), then every C++ test run under qemu-user (cmake/aarch64-linux-gnu.cmake sets
# qemu-aarch64 as ctest's emulator).
# Without the cross compiler or qemu (and no way to install them) it says so and exits 0;
# once they are there, any build or test failure fails.
# The build tree lives in build/aarch64; reruns are incremental.
set -euo pipefail
cd "$(dirname "$0")/.."

jobs="${AARCH64_JOBS:-2}"
have_tools() {
  command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 && command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 &&
    { command -v qemu-aarch64 >/dev/null 2>&1 || command -v qemu-aarch64-static >/dev/null 2>&1; }
}
if ! have_tools; then
  echo "== aarch64: installing g++-aarch64-linux-gnu gcc-aarch64-linux-gnu qemu-user"
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends \
    g++-aarch64-linux-gnu gcc-aarch64-linux-gnu qemu-user >/dev/null) >/dev/null 2>&1 || true
fi
if ! have_tools; then
  echo "aarch64: skipped, the cross compiler or qemu-user could not be installed"
  exit 0
fi

generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
build=build/aarch64
echo "== aarch64: cross-build of the C++ core and its tests ($(aarch64-linux-gnu-g++ -dumpfullversion), -Werror)"
if [[ ! -f "$build/CMakeCache.txt" ]]; then
  cmake -S . -B "$build" "${generator[@]}" -DCMAKE_TOOLCHAIN_FILE="$PWD/cmake/aarch64-linux-gnu.cmake" \
    -DCMAKE_BUILD_TYPE=Release -DLISTENLOOP_BUILD_TESTS=ON -DLISTENLOOP_BUILD_PYTHON=OFF >/dev/null
fi
cmake --build "$build" --parallel "$jobs"

echo "== aarch64: C++ tests under qemu-user"
# The tests at their own sizes: under qemu all of them take about 10 s together (the echo
# canceller's the longest), far inside the 300 s allowed per test.
ctest --test-dir "$build" --output-on-failure --timeout 300

echo "aarch64: all passed"
