// The baseline frame kernel of x86-64: 4-float vectors (SSE2, part of every x86-64 CPU).
// Other targets without a kernel of their own (not arm64) get the same 4-lane code under this name.
#define POCKETFFT_NO_MULTITHREADING
#include <pocketfft_hdronly.h>

#define LISTENLOOP_KERNEL_NS sse2
#define LISTENLOOP_KERNEL_NAME "sse2"
#define LISTENLOOP_LANES 4
#include "mel_kernel_impl.h"

namespace listenloop::kernels {
std::unique_ptr<FrameKernel> make_sse2(const MelFilterbank& filterbank) {
  return std::make_unique<sse2::Kernel>(filterbank);
}
}  // namespace listenloop::kernels
