// Page-locked host memory for zero-copy staging of model inputs and outputs.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

namespace listenloop {

// cudaHostAlloc through a libcudart loaded at run time when a GPU is present (no CUDA
// headers or link-time dependency), otherwise 64-byte aligned memory locked with mlock
// when the process may (kind "mlock"), else just aligned (kind "aligned").
class PinnedBuffer {
 public:
  explicit PinnedBuffer(size_t nbytes);

  void* data() const noexcept { return memory_.get(); }
  size_t size() const noexcept { return nbytes_; }
  const std::string& kind() const noexcept { return kind_; }

 private:
  struct Release {
    void (*release)(void* ptr, size_t nbytes) = nullptr;
    size_t nbytes = 0;
    void operator()(void* ptr) const noexcept { release(ptr, nbytes); }
  };
  size_t nbytes_;
  std::string kind_;
  std::unique_ptr<void, Release> memory_;
};

// Whether libcudart could be loaded and reports at least one device (checked once).
bool cuda_runtime_available() noexcept;
// The libcudart name that was loaded (even without a device), or "" if none.
std::string cuda_runtime_library();

}  // namespace listenloop
