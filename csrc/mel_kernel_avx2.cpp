// The AVX2+FMA frame kernel: 8-float vectors, used only when the CPU reports AVX2 and FMA.
// Every standard header is included before the target pragma so that no inline library
// function shared with the other sources is ever compiled for AVX2; pocketfft is renamed so
// its AVX2 copy shares no symbol with the baseline one.
#include <algorithm>
#include <cmath>
#include <complex>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <vector>

#include "log_mel.h"
#include "mel_kernel.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#define POCKETFFT_NO_MULTITHREADING
#define pocketfft pocketfft_avx2
#include <pocketfft_hdronly.h>

#define LISTENLOOP_KERNEL_NS avx2
#define LISTENLOOP_KERNEL_NAME "avx2"
#define LISTENLOOP_LANES 8
#include "mel_kernel_impl.h"

namespace listenloop::kernels {
std::unique_ptr<FrameKernel> make_avx2(const MelFilterbank& filterbank) {
  return std::make_unique<avx2::Kernel>(filterbank);
}
}  // namespace listenloop::kernels

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // no AVX2 build on this target

namespace listenloop::kernels {
std::unique_ptr<FrameKernel> make_avx2(const MelFilterbank&) { return nullptr; }
}  // namespace listenloop::kernels

#endif
