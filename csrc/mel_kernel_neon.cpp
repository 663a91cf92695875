// The arm64 frame kernel: 4-float vectors in NEON (Advanced SIMD) registers, which every
// AArch64 CPU has, so it is both the baseline and "auto" there. The body is the one in
// mel_kernel_impl.h; its 16-byte vectors compile to NEON .4s instructions (fmul, fmla, ...).
#if !defined(__aarch64__)
#error "mel_kernel_neon.cpp is the arm64 kernel; CMakeLists.txt compiles it only for aarch64/arm64"
#endif

#define POCKETFFT_NO_MULTITHREADING
#include <pocketfft_hdronly.h>

#define LISTENLOOP_KERNEL_NS neon
#define LISTENLOOP_KERNEL_NAME "neon"
#define LISTENLOOP_LANES 4
#include "mel_kernel_impl.h"

namespace listenloop::kernels {
std::unique_ptr<FrameKernel> make_neon(const MelFilterbank& filterbank) {
  return std::make_unique<neon::Kernel>(filterbank);
}
}  // namespace listenloop::kernels
