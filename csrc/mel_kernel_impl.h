// The frame kernel's code, written once for a vector of LISTENLOOP_LANES floats. Included by
// one source file per instruction set, each with its own LISTENLOOP_KERNEL_NS, so the
// builds never share a symbol (and never hand wide-vector code to a CPU without it).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>

#include "log_mel.h"
#include "mel_kernel.h"

namespace listenloop {
namespace kernels {
namespace LISTENLOOP_KERNEL_NS {
namespace {

constexpr size_t kLanes = LISTENLOOP_LANES;
using Lanes = float __attribute__((vector_size(kLanes * sizeof(float))));  // kLanes frames side by side
using IntLanes = int32_t __attribute__((vector_size(kLanes * sizeof(float))));
constexpr float kLogFloor = 1e-10f;
constexpr float kMaxPower = std::numeric_limits<float>::max();

template <class To, class From>
inline To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To to;
  std::memcpy(&to, &from, sizeof to);
  return to;
}

// where(mask, a, b): a in lanes where mask is all ones, else b.
inline Lanes where(IntLanes mask, Lanes a, Lanes b) {
  return bit_cast<Lanes>((bit_cast<IntLanes>(a) & mask) | (bit_cast<IntLanes>(b) & ~mask));
}

// log10 of positive finite floats, kLanes at a time: Cephes' logf polynomial (a couple of
// ulp) scaled by log10(e). libm's log10f is a scalar call and took half of the chunk time.
inline Lanes log10_lanes(Lanes x) {
  const IntLanes bits = bit_cast<IntLanes>(x);
  Lanes e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, Lanes);  // x = m * 2^e, m in [0.5, 1)
  Lanes m = bit_cast<Lanes>((bits & 0x007fffff) | 0x3f000000);
  // Below sqrt(1/2), use 2m and e - 1 so the polynomial sees m - 1 in [-0.29, 0.41].
  const Lanes below = where(m < 0.707106781186547524f, Lanes{} + 1.0f, Lanes{});
  e -= below;
  m = (m - 1.0f) + below * m;  // exact: m - 1 or 2m - 1
  const Lanes z = m * m;
  Lanes y = Lanes{} + 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  const Lanes ln = (m + y) + 0.693359375f * e;
  return ln * 0.434294481903251828f;
}

class Kernel final : public FrameKernel {
 public:
  explicit Kernel(const MelFilterbank& filterbank)
      : plan_(kNFft),
        window_(std::make_unique<float[]>(kNFft)),
        zeros_(std::make_unique<float[]>(kNFft)),
        frames_(std::make_unique<Lanes[]>(kNFft)),
        power_(std::make_unique<Lanes[]>(kNBins)),
        mel_(std::make_unique<Lanes[]>(kNMels)),
        logs_(std::make_unique<Lanes[]>(kNMels)) {
    const double pi = std::acos(-1.0);
    for (size_t i = 0; i < kNFft; ++i) {  // periodic Hann, rounded like features._hann
      window_[i] = static_cast<float>(0.5 - 0.5 * std::cos(2.0 * pi * static_cast<double>(i) / kNFft));
    }
    for (size_t m = 0; m < kNMels; ++m) {
      const auto& f = filterbank.filters[m];
      first_bin_[m] = f.first_bin;
      weight_start_[m] = weights_count_;
      n_weights_[m] = f.weights.size();
      weights_count_ += f.weights.size();
    }
    weights_ = std::make_unique<float[]>(weights_count_);
    for (size_t m = 0; m < kNMels; ++m) {
      std::copy(filterbank.filters[m].weights.begin(), filterbank.filters[m].weights.end(), &weights_[weight_start_[m]]);
    }
  }

  const char* name() const noexcept override { return LISTENLOOP_KERNEL_NAME; }

  float log10_mel(const float* padded, size_t n_frames, float* out, size_t out_stride) override {
    float peak = -std::numeric_limits<float>::infinity();
    Lanes* frames = frames_.get();
    Lanes* power = power_.get();
    Lanes* mel = mel_.get();
    Lanes* logs = logs_.get();
    for (size_t first = 0; first < n_frames; first += kLanes) {
      const size_t lanes = std::min(kLanes, n_frames - first);
      // Lanes past the last frame read zeros, so the gather has no branches.
      const float* src[kLanes];
      for (size_t lane = 0; lane < kLanes; ++lane) src[lane] = lane < lanes ? padded + (first + lane) * kHop : zeros_.get();
      for (size_t i = 0; i < kNFft; ++i) {
        Lanes v;
        for (size_t lane = 0; lane < kLanes; ++lane) v[lane] = src[lane][i];
        frames[i] = v * window_[i];
      }
      plan_.exec(frames, 1.0f, /*forward=*/true);
      // FFTPACK half-complex order: r0, r1, i1, r2, i2, ..., r(n/2).
      power[0] = frames[0] * frames[0];
      for (size_t k = 1; k < kNBins - 1; ++k) power[k] = frames[2 * k - 1] * frames[2 * k - 1] + frames[2 * k] * frames[2 * k];
      power[kNBins - 1] = frames[kNFft - 1] * frames[kNFft - 1];
      // Three passes of independent iterations: sparse mel product, log10 (a long dependency
      // chain per value that the CPU overlaps across values), scatter.
      for (size_t m = 0; m < kNMels; ++m) {
        const float* w = &weights_[weight_start_[m]];
        const Lanes* p = power + first_bin_[m];
        Lanes acc{};
        for (size_t j = 0, nw = n_weights_[m]; j < nw; ++j) acc += p[j] * w[j];
        // Clamped to [kLogFloor, kMaxPower]. `acc <= kMaxPower` is false for +inf and NaN: a
        // power past the float range (samples beyond about 1e17 overflow the square; near
        // FLT_MAX the FFT itself overflows, and inf - inf gives NaN) counts as kMaxPower, so
        // every finite input gives finite features, at most log10(FLT_MAX) ~ 38.53.
        mel[m] = where(acc < kLogFloor, Lanes{} + kLogFloor, where(acc <= kMaxPower, acc, Lanes{} + kMaxPower));
      }
      for (size_t m = 0; m < kNMels; ++m) logs[m] = log10_lanes(mel[m]);
      Lanes group_peak = Lanes{} - std::numeric_limits<float>::infinity();
      for (size_t m = 0; m < kNMels; ++m) {
        const Lanes v = logs[m];
        float* row = out + m * out_stride + first;
        for (size_t lane = 0; lane < lanes; ++lane) row[lane] = v[lane];
        group_peak = where(v > group_peak, v, group_peak);
      }
      for (size_t lane = 0; lane < lanes; ++lane) peak = std::max(peak, group_peak[lane]);
    }
    return peak;
  }

 private:
  pocketfft::detail::pocketfft_r<float> plan_;  // created once; runs kLanes frames per call
  std::unique_ptr<float[]> window_, zeros_;
  std::unique_ptr<Lanes[]> frames_, power_, mel_, logs_;
  // The sparse filterbank, flattened: filter m has n_weights_[m] weights from first_bin_[m].
  size_t first_bin_[kNMels] = {}, weight_start_[kNMels] = {}, n_weights_[kNMels] = {};
  size_t weights_count_ = 0;
  std::unique_ptr<float[]> weights_;
};

}  // namespace
}  // namespace LISTENLOOP_KERNEL_NS
}  // namespace kernels
}  // namespace listenloop
