// The per-frame log-mel kernel, built once per instruction set and picked at run time.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

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

// The kernels: "sse2" and "avx2" (AVX2+FMA CPUs) in x86-64 builds, "neon" in arm64 builds.
// "auto" takes the widest kernel this CPU runs; a name forces one (std::invalid_argument if
// unknown, std::runtime_error if this build or CPU lacks it).
std::unique_ptr<FrameKernel> make_frame_kernel(const MelFilterbank& filterbank, const std::string& which = "auto");
// The kernels this build runs on this CPU, narrowest first: {"sse2"}, {"sse2", "avx2"} or {"neon"}.
std::vector<std::string> frame_kernels();
// Name of the kernel "auto" picks on this machine (the last of frame_kernels()).
std::string best_frame_kernel();

namespace kernels {
// One source per instruction set, chosen in CMakeLists.txt by target processor: arm64 builds
// compile mel_kernel_neon.cpp, the others mel_kernel_sse2.cpp and mel_kernel_avx2.cpp (whose
// make_avx2 returns nullptr off x86-64 gcc/clang).
std::unique_ptr<FrameKernel> make_sse2(const MelFilterbank& filterbank);
std::unique_ptr<FrameKernel> make_avx2(const MelFilterbank& filterbank);
std::unique_ptr<FrameKernel> make_neon(const MelFilterbank& filterbank);
}  // namespace kernels

}  // namespace listenloop
