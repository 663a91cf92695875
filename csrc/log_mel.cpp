#include "log_mel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "mel_kernel.h"

namespace listenloop {
namespace {

constexpr float kLogFloor = 1e-10f;
constexpr double kDynamicRangeLog10 = 8.0;

// Slaney mel scale: linear below 1 kHz, logarithmic above (librosa's htk=False).
constexpr double kFSp = 200.0 / 3.0;
constexpr double kMinLogHz = 1000.0;
constexpr double kMinLogMel = kMinLogHz / kFSp;
const double kLogStep = std::log(6.4) / 27.0;

double hz_to_mel(double hz) {
  return hz >= kMinLogHz ? kMinLogMel + std::log(hz / kMinLogHz) / kLogStep : hz / kFSp;
}

double mel_to_hz(double mel) {
  return mel >= kMinLogMel ? kMinLogHz * std::exp(kLogStep * (mel - kMinLogMel)) : mel * kFSp;
}

// numpy.linspace(start, stop, num) with endpoint=True.
std::vector<double> linspace(double start, double stop, size_t num) {
  std::vector<double> out(num);
  const double step = (stop - start) / static_cast<double>(num - 1);
  for (size_t i = 0; i < num; ++i) out[i] = static_cast<double>(i) * step + start;
  out[num - 1] = stop;
  return out;
}

// numpy.pad(mode="reflect") index for any offset, including pads longer than the signal.
size_t reflect_index(long long j, size_t n) {
  if (n == 1) return 0;
  const long long period = 2 * static_cast<long long>(n - 1);
  long long m = j % period;
  if (m < 0) m += period;
  if (m >= static_cast<long long>(n)) m = period - m;
  return static_cast<size_t>(m);
}

}  // namespace

MelFilterbank::MelFilterbank() : filters(kNMels) {
  const std::vector<double> fft_freqs = linspace(0.0, kSampleRate / 2.0, kNBins);
  std::vector<double> mel_points = linspace(hz_to_mel(0.0), hz_to_mel(kSampleRate / 2.0), kNMels + 2);
  for (double& m : mel_points) m = mel_to_hz(m);

  std::vector<float> row(kNBins);
  for (size_t m = 0; m < kNMels; ++m) {
    const double lower_width = mel_points[m + 1] - mel_points[m];
    const double upper_width = mel_points[m + 2] - mel_points[m + 1];
    const double norm = 2.0 / (mel_points[m + 2] - mel_points[m]);
    size_t first = kNBins, last = 0;
    for (size_t k = 0; k < kNBins; ++k) {
      const double lower = -(mel_points[m] - fft_freqs[k]) / lower_width;
      const double upper = (mel_points[m + 2] - fft_freqs[k]) / upper_width;
      row[k] = static_cast<float>(std::max(0.0, std::min(lower, upper)) * norm);
      if (row[k] != 0.0f) {
        first = std::min(first, k);
        last = k;
      }
    }
    Filter& f = filters[m];
    if (first <= last) {
      f.first_bin = first;
      f.weights.assign(row.begin() + static_cast<long>(first), row.begin() + static_cast<long>(last) + 1);
    }
  }
}

std::vector<float> MelFilterbank::dense() const {
  std::vector<float> out(kNMels * kNBins, 0.0f);
  for (size_t m = 0; m < kNMels; ++m) {
    const Filter& f = filters[m];
    std::copy(f.weights.begin(), f.weights.end(), out.begin() + static_cast<long>(m * kNBins + f.first_bin));
  }
  return out;
}

size_t MelFilterbank::nonzeros() const {
  size_t n = 0;
  for (const Filter& f : filters) {
    for (float w : f.weights) n += (w != 0.0f);
  }
  return n;
}

bool cpu_has_avx2() noexcept {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

std::vector<std::string> frame_kernels() {
#if defined(__aarch64__)
  return {"neon"};  // Advanced SIMD is part of every AArch64 CPU: no run-time check
#else
  std::vector<std::string> names{"sse2"};
  if (cpu_has_avx2() && kernels::make_avx2(MelFilterbank()) != nullptr) names.push_back("avx2");
  return names;
#endif
}

std::string best_frame_kernel() { return frame_kernels().back(); }

std::unique_ptr<FrameKernel> make_frame_kernel(const MelFilterbank& filterbank, const std::string& which) {
  if (which != "auto" && which != "sse2" && which != "avx2" && which != "neon") {
    throw std::invalid_argument("mel kernel must be auto, sse2 or avx2 (x86-64) or neon (arm64), got '" + which + "'");
  }
#if defined(__aarch64__)
  if (which != "auto" && which != "neon") throw std::runtime_error("this arm64 build has no " + which + " mel kernel, only neon");
  return kernels::make_neon(filterbank);
#else
  if (which == "neon") throw std::runtime_error("this build has no neon mel kernel (arm64 builds only)");
  if (which == "avx2" || (which == "auto" && cpu_has_avx2())) {
    if (!cpu_has_avx2()) throw std::runtime_error("this CPU has no AVX2+FMA for the avx2 mel kernel");
    std::unique_ptr<FrameKernel> kernel = kernels::make_avx2(filterbank);
    if (kernel) return kernel;
    if (which == "avx2") throw std::runtime_error("this build has no avx2 mel kernel");
  }
  return kernels::make_sse2(filterbank);
#endif
}

LogMelKernel::LogMelKernel(const std::string& kernel) : kernel_(make_frame_kernel(filterbank_, kernel)) {}

LogMelKernel::~LogMelKernel() = default;

float LogMelKernel::log10_mel(const float* padded, size_t n_frames, float* out, size_t out_stride) {
  return kernel_->log10_mel(padded, n_frames, out, out_stride);
}

const char* LogMelKernel::name() const noexcept { return kernel_->name(); }

void normalise_log_mel(float* log_spec, size_t n, float peak) noexcept {
  // The floor is computed in double and rounded once, as NumPy does with a Python float.
  const float floor = static_cast<float>(static_cast<double>(peak) - kDynamicRangeLog10);
  for (size_t i = 0; i < n; ++i) log_spec[i] = (std::max(log_spec[i], floor) + 4.0f) / 4.0f;
}

std::vector<float> LogMel::compute(const float* samples, size_t n) {
  const size_t n_frames = frames_for(n);
  std::vector<float> out(kNMels * n_frames);
  if (n_frames == 0) return out;
  padded_.resize(n + 2 * kHistory);
  for (size_t i = 0; i < kHistory; ++i) {
    padded_[i] = samples[reflect_index(static_cast<long long>(i) - static_cast<long long>(kHistory), n)];
    padded_[kHistory + n + i] = samples[reflect_index(static_cast<long long>(n + i), n)];
  }
  std::copy(samples, samples + n, padded_.begin() + kHistory);
  const float peak = kernel_.log10_mel(padded_.data(), n_frames, out.data(), n_frames);
  normalise_log_mel(out.data(), out.size(), peak);
  return out;
}

StreamingMel::StreamingMel(size_t chunk_samples, const std::string& kernel)
    : chunk_samples_(chunk_samples), kernel_(kernel), padded_(chunk_samples + 2 * kHistory), peak_(-std::numeric_limits<float>::infinity()) {
  if (chunk_samples % kHop != 0 || chunk_samples < kNFft) {
    throw std::invalid_argument("chunk_samples must be a multiple of " + std::to_string(kHop) + " and at least " +
                                std::to_string(kNFft) + ", got " + std::to_string(chunk_samples));
  }
}

void StreamingMel::reset() noexcept {
  has_history_ = false;
  peak_ = -std::numeric_limits<float>::infinity();
}

float StreamingMel::compute_raw(const float* chunk, float* out) {
  const size_t c = chunk_samples_;
  float* left = padded_.data();
  if (!has_history_) {
    for (size_t i = 0; i < kHistory; ++i) left[i] = chunk[kHistory - i];  // chunk[200:0:-1]
  }
  std::copy(chunk, chunk + c, padded_.begin() + kHistory);
  float* right = padded_.data() + kHistory + c;
  for (size_t i = 0; i < kHistory; ++i) right[i] = chunk[c - 2 - i];  // chunk[-2:-202:-1]

  const float chunk_peak = kernel_.log10_mel(padded_.data(), frames(), out, frames());

  std::copy(chunk + c - kHistory, chunk + c, left);  // history for the next chunk
  has_history_ = true;
  return chunk_peak;
}

void StreamingMel::compute(const float* chunk, float* out) {
  peak_ = std::max(peak_, compute_raw(chunk, out));
  normalise_log_mel(out, kNMels * frames(), peak_);
}

}  // namespace listenloop
