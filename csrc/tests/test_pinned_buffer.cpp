// PinnedBuffer: allocation, alignment, writability, release, bad sizes.
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "pinned_buffer.h"

using listenloop::PinnedBuffer;

TEST_CASE(allocates_aligned_writable_memory_of_a_known_kind) {
  for (size_t nbytes : {size_t{1}, size_t{100}, size_t{4096}, size_t{1} << 20}) {
    PinnedBuffer buf(nbytes);
    CHECK(buf.data() != nullptr);
    CHECK_EQ(buf.size(), nbytes);
    CHECK_EQ(reinterpret_cast<uintptr_t>(buf.data()) % 64, uintptr_t{0});
    CHECK(buf.kind() == "cuda_host" || buf.kind() == "mlock" || buf.kind() == "aligned");
    std::memset(buf.data(), 0xAB, nbytes);
    CHECK_EQ(static_cast<unsigned char*>(buf.data())[nbytes - 1], static_cast<unsigned char>(0xAB));
  }
  // CUDA is used exactly when a runtime with a device was found.
  PinnedBuffer buf(64);
  CHECK_EQ(buf.kind() == "cuda_host", listenloop::cuda_runtime_available());
}

TEST_CASE(released_buffers_give_their_locked_pages_back) {
  // 500 x 1 MiB locked pages exceed any usual RLIMIT_MEMLOCK if release forgot munlock or
  // cudaFreeHost: later buffers would then fall back to another kind (LeakSanitizer checks
  // the frees too).
  const std::string first_kind = PinnedBuffer(size_t{1} << 20).kind();
  bool same_kind = true;
  for (int i = 0; i < 500; ++i) {
    PinnedBuffer buf(size_t{1} << 20);
    static_cast<char*>(buf.data())[0] = 1;
    if (buf.kind() != first_kind) same_kind = false;
  }
  CHECK(same_kind);
}

TEST_CASE(zero_bytes_is_refused) {
  bool threw = false;
  try {
    PinnedBuffer buf(0);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
}

TEST_MAIN()
