// Whisper's 128-bin log-mel front-end (docs/PROTOCOL.md, "Log-mel"), matching python/listenloop/features.py.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace listenloop {

constexpr size_t kSampleRate = 16000;
constexpr size_t kNFft = 400;
constexpr size_t kHop = 160;
constexpr size_t kNMels = 128;
constexpr size_t kNBins = kNFft / 2 + 1;
constexpr size_t kHistory = kNFft / 2;  // real samples of history a chunk's first frames reach back to
constexpr size_t kChunkSamples = 6400;
constexpr size_t kFramesPerChunk = kChunkSamples / kHop;

// Slaney-scale, Slaney-normalised triangular filters, kept sparse (~394 nonzeros of 128x201).
struct MelFilterbank {
  struct Filter {
    size_t first_bin = 0;
    std::vector<float> weights;  // bins first_bin .. first_bin + weights.size() - 1
  };
  std::vector<Filter> filters;

  MelFilterbank();  // built in double precision, stored as float32 like features.py
  std::vector<float> dense() const;  // [kNMels, kNBins], for tests
  size_t nonzeros() const;
};

class FrameKernel;

// The frame kernel shared by the whole-array and the streaming paths: windowed real FFT,
// power, sparse mel product, log10 of the mel power clamped to [1e-10, FLT_MAX] (a power
// that overflows float counts as FLT_MAX, so finite samples always give finite features).
// Owns its FFT plan and scratch.
// `kernel`: "auto" (widest the CPU runs), "sse2" or "avx2" (x86-64), "neon" (arm64).
class LogMelKernel {
 public:
  explicit LogMelKernel(const std::string& kernel = "auto");
  ~LogMelKernel();
  LogMelKernel(const LogMelKernel&) = delete;
  LogMelKernel& operator=(const LogMelKernel&) = delete;

  // log10 mel of `n_frames` frames starting every kHop samples in an already padded signal
  // of at least (n_frames - 1) * kHop + kNFft samples. Writes out[mel * out_stride + frame]
  // and returns the maximum value written (-inf if none).
  float log10_mel(const float* padded, size_t n_frames, float* out, size_t out_stride);
  const char* name() const noexcept;

 private:
  MelFilterbank filterbank_;
  std::unique_ptr<FrameKernel> kernel_;
};

// (max(log_spec, peak - 8) + 4) / 4, in place.
void normalise_log_mel(float* log_spec, size_t n, float peak) noexcept;

// features.log_mel: the whole array, centred frames, reflect padding, global maximum.
class LogMel {
 public:
  explicit LogMel(const std::string& kernel = "auto") : kernel_(kernel) {}
  // Returns [kNMels, n / kHop] row-major.
  std::vector<float> compute(const float* samples, size_t n);
  static size_t frames_for(size_t n) { return n / kHop; }
  const char* kernel_name() const noexcept { return kernel_.name(); }

 private:
  LogMelKernel kernel_;
  std::vector<float> padded_;
};

// features.StreamingLogMel: chunk by chunk, real history on the left (reflect at stream
// start), reflect on each chunk's right edge, running maximum cleared by reset().
// compute() and compute_raw() do not allocate.
class StreamingMel {
 public:
  explicit StreamingMel(size_t chunk_samples = kChunkSamples, const std::string& kernel = "auto");
  const char* kernel_name() const noexcept { return kernel_.name(); }

  size_t chunk_samples() const { return chunk_samples_; }
  size_t frames() const { return chunk_samples_ / kHop; }
  // chunk: chunk_samples() samples; out: [kNMels, frames()] row-major, normalised with the
  // running maximum.
  void compute(const float* chunk, float* out);
  // Like compute() but writes raw log10 mel and returns the chunk's maximum; the running
  // maximum is left alone (normalising is the caller's: normalise_log_mel).
  float compute_raw(const float* chunk, float* out);
  void reset() noexcept;
  float peak() const noexcept { return peak_; }

 private:
  size_t chunk_samples_;
  LogMelKernel kernel_;
  std::vector<float> padded_;  // history | chunk | right reflection
  bool has_history_ = false;
  float peak_;
};

}  // namespace listenloop
