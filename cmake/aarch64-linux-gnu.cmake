# Cross-compiles for 64-bit Arm Linux (Jetson, Raspberry Pi 4/5, Graviton) with Debian's
# gcc-aarch64-linux-gnu / g++-aarch64-linux-gnu, and runs what it builds (ctest's tests)
# under qemu-user with the cross sysroot's loader and libraries:
#   cmake -S . -B build/aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake \
#     -DLISTENLOOP_BUILD_TESTS=ON -DLISTENLOOP_BUILD_PYTHON=OFF
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(LISTENLOOP_AARCH64_SYSROOT /usr/aarch64-linux-gnu CACHE PATH "aarch64 libraries and loader for qemu-aarch64 -L")
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)

# Headers and libraries from the cross toolchain only; programs (cmake, ninja) from the host.
set(CMAKE_FIND_ROOT_PATH ${LISTENLOOP_AARCH64_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# add_test() commands run through this, so ctest runs the aarch64 tests on an x86-64 host.
find_program(LISTENLOOP_QEMU_AARCH64 NAMES qemu-aarch64 qemu-aarch64-static)
if(LISTENLOOP_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${LISTENLOOP_QEMU_AARCH64} -L ${LISTENLOOP_AARCH64_SYSROOT})
endif()
