// The per-frame log-mel kernel, built once per instruction set and picked at run time.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

namespace listenloop {

struct MelFilterbank;

// log10 mel power of frames starting every kHop samples in an already padded signal.
class FrameKernel {
 public:
  virtual ~FrameKernel() = default;
  // Writes out[mel * out_stride + frame] for n_frames frames; returns the maximum written.
  virtual float log10_mel(const float* padded, size_t n_frames, float* out, size_t out_stride) = 0;
  virtual const char* name() const noexcept = 0;
};

// "auto" takes the widest kernel this CPU runs; "sse2"/"avx2" force one (std::invalid_argument
// if unknown, std::runtime_error if this build or CPU lacks it).
std::unique_ptr<FrameKernel> make_frame_kernel(const MelFilterbank& filterbank, const std::string& which = "auto");
// Name of the kernel "auto" picks on this machine.
std::string best_frame_kernel();

namespace kernels {
// Defined in mel_kernel_sse2.cpp / mel_kernel_avx2.cpp (the latter only on x86-64 gcc/clang).
std::unique_ptr<FrameKernel> make_sse2(const MelFilterbank& filterbank);
std::unique_ptr<FrameKernel> make_avx2(const MelFilterbank& filterbank);
}  // namespace kernels

}  // namespace listenloop
