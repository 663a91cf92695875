#include "pinned_buffer.h"

#include <dlfcn.h>
#include <sys/mman.h>

#include <cstdlib>
#include <new>
#include <stdexcept>

namespace listenloop {
namespace {

// The few CUDA runtime entry points we need, resolved with dlsym. cudaError_t is an int
// enum whose success value is 0.
struct CudaRuntime {
  using GetDeviceCount = int (*)(int*);
  using HostAlloc = int (*)(void**, size_t, unsigned int);
  using FreeHost = int (*)(void*);

  std::string library;
  GetDeviceCount get_device_count = nullptr;
  HostAlloc host_alloc = nullptr;
  FreeHost free_host = nullptr;
  bool usable = false;

  CudaRuntime() {
    for (const char* name : {"libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"}) {
      // Never dlclose'd: the CUDA runtime does not support being unloaded.
      void* handle = dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (handle == nullptr) continue;
      get_device_count = reinterpret_cast<GetDeviceCount>(dlsym(handle, "cudaGetDeviceCount"));
      host_alloc = reinterpret_cast<HostAlloc>(dlsym(handle, "cudaHostAlloc"));
      free_host = reinterpret_cast<FreeHost>(dlsym(handle, "cudaFreeHost"));
      if (get_device_count == nullptr || host_alloc == nullptr || free_host == nullptr) continue;
      library = name;
      int devices = 0;
      usable = get_device_count(&devices) == 0 && devices > 0;
      return;
    }
  }
};

const CudaRuntime& cuda_runtime() {
  static const CudaRuntime runtime;  // thread-safe one-time load
  return runtime;
}

constexpr size_t kAlignment = 64;
constexpr unsigned int kCudaHostAllocDefault = 0;

void release_cuda(void* ptr, size_t) { cuda_runtime().free_host(ptr); }
void release_locked(void* ptr, size_t nbytes) {
  munlock(ptr, nbytes);
  std::free(ptr);
}
void release_aligned(void* ptr, size_t) { std::free(ptr); }

}  // namespace

PinnedBuffer::PinnedBuffer(size_t nbytes) : nbytes_(nbytes), memory_(nullptr, Release{release_aligned, 0}) {
  if (nbytes == 0) throw std::invalid_argument("PinnedBuffer needs at least 1 byte");
  const CudaRuntime& cuda = cuda_runtime();
  if (cuda.usable) {
    void* ptr = nullptr;
    if (cuda.host_alloc(&ptr, nbytes, kCudaHostAllocDefault) == 0 && ptr != nullptr) {
      memory_ = std::unique_ptr<void, Release>(ptr, Release{release_cuda, nbytes});
      kind_ = "cuda_host";
      return;
    }
  }
  // aligned_alloc wants a size that is a multiple of the alignment.
  const size_t rounded = (nbytes + kAlignment - 1) / kAlignment * kAlignment;
  void* ptr = std::aligned_alloc(kAlignment, rounded);
  if (ptr == nullptr) throw std::bad_alloc();
  if (mlock(ptr, nbytes) == 0) {
    memory_ = std::unique_ptr<void, Release>(ptr, Release{release_locked, nbytes});
    kind_ = "mlock";
  } else {  // RLIMIT_MEMLOCK too small: still usable, just pageable
    memory_ = std::unique_ptr<void, Release>(ptr, Release{release_aligned, nbytes});
    kind_ = "aligned";
  }
}

bool cuda_runtime_available() noexcept {
  try {
    return cuda_runtime().usable;
  } catch (...) {
    return false;
  }
}

std::string cuda_runtime_library() { return cuda_runtime().library; }

}  // namespace listenloop
