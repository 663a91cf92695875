// LogMel invariants that need no NumPy (parity with features.py is in tests/test_core_mel.py).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "check.h"
#include "log_mel.h"
#include "mel_kernel.h"

using namespace listenloop;

TEST_CASE(filterbank_is_sparse_slaney) {
  MelFilterbank fb;
  CHECK_EQ(fb.filters.size(), kNMels);
  CHECK(fb.nonzeros() > 350 && fb.nonzeros() < 450);
  // 128 triangles over 201 bins: every filter covers at least one bin.
  for (const auto& f : fb.filters) CHECK(!f.weights.empty());
}

TEST_CASE(silence_is_the_constant_floor) {
  LogMel mel;
  std::vector<float> zeros(16000, 0.0f);
  const std::vector<float> out = mel.compute(zeros.data(), zeros.size());
  CHECK_EQ(out.size(), kNMels * 100);
  bool all = true;
  for (float v : out) all = all && v == -1.5f;
  CHECK(all);
}

TEST_CASE(streaming_peak_is_running_and_reset_clears_it) {
  StreamingMel mel;
  std::vector<float> chunk(kChunkSamples), out(kNMels * mel.frames());
  for (size_t i = 0; i < chunk.size(); ++i) chunk[i] = std::sin(0.05f * static_cast<float>(i));
  mel.compute(chunk.data(), out.data());
  const float loud_peak = mel.peak();
  for (float& x : chunk) x *= 0.01f;
  mel.compute(chunk.data(), out.data());
  CHECK_EQ(mel.peak(), loud_peak);  // quieter audio does not lower the running max
  mel.reset();
  CHECK(std::isinf(mel.peak()) && mel.peak() < 0);
  mel.compute(chunk.data(), out.data());
  CHECK(mel.peak() < loud_peak);
}

TEST_CASE(raw_chunks_normalised_by_the_caller_equal_compute) {
  StreamingMel normalised, raw;
  std::vector<float> chunk(kChunkSamples), want(kNMels * kFramesPerChunk), got(want.size());
  float running = -std::numeric_limits<float>::infinity();
  for (int c = 0; c < 4; ++c) {
    const float gain = c == 1 ? 4.0f : 0.02f;  // a loud chunk sets the floor for the rest
    for (size_t i = 0; i < chunk.size(); ++i) chunk[i] = gain * std::sin(0.013f * static_cast<float>(i * (c + 1)));
    normalised.compute(chunk.data(), want.data());
    const float peak = raw.compute_raw(chunk.data(), got.data());
    CHECK_EQ(peak, *std::max_element(got.begin(), got.end()));
    running = std::max(running, peak);
    normalise_log_mel(got.data(), got.size(), running);
    CHECK(got == want);
    CHECK_EQ(running, normalised.peak());
  }
  CHECK(std::isinf(raw.peak()));  // compute_raw leaves the running maximum alone
}

TEST_CASE(bad_chunk_sizes_are_refused) {
  for (size_t bad : {size_t{0}, size_t{161}, size_t{320}}) {
    bool threw = false;
    try {
      StreamingMel mel(bad);
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    CHECK(threw);
  }
}

TEST_CASE(every_kernel_this_cpu_runs_gives_the_same_features) {
  std::vector<float> x(16000);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.4f * std::sin(0.031f * static_cast<float>(i)) + 0.01f * std::cos(1.7f * static_cast<float>(i * i % 977));
  const std::vector<std::string> kernels = frame_kernels();
  CHECK(!kernels.empty());
  CHECK(kernels.back() == best_frame_kernel());
  LogMel baseline(kernels.front());
  CHECK(std::string(baseline.kernel_name()) == kernels.front());
  const std::vector<float> want = baseline.compute(x.data(), x.size());
  LogMel fastest("auto");
  CHECK(std::string(fastest.kernel_name()) == best_frame_kernel());
  for (const std::string& kernel : kernels) {
    LogMel mel(kernel);
    CHECK(std::string(mel.kernel_name()) == kernel);
    const std::vector<float> got = mel.compute(x.data(), x.size());
    float worst = 0.0f;
    for (size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::fabs(got[i] - want[i]));
    CHECK(worst <= 1e-4f);  // the parity budget vs features.py; FFT rounding differs slightly
  }
  bool threw = false;
  try {
    LogMel bad("avx512");
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
}

TEST_CASE(every_kernel_matches_a_double_precision_reference) {
  // Independent of the SIMD width and the FFT: a direct DFT in double of each windowed frame,
  // the dense filterbank, log10 of the clamped mel power. 37 frames: a partial last vector.
  constexpr size_t n_frames = 37;
  std::vector<float> padded((n_frames - 1) * kHop + kNFft);
  uint32_t seed = 12345;
  for (size_t i = 0; i < padded.size(); ++i) {
    seed = seed * 1664525u + 1013904223u;  // white noise keeps every mel band well above the floor
    const float noise = static_cast<float>(seed >> 8) / 16777216.0f - 0.5f;
    padded[i] = 0.2f * noise + 0.5f * std::sin(0.07f * static_cast<float>(i));
  }
  const double pi = std::acos(-1.0);
  const std::vector<float> dense = MelFilterbank().dense();
  std::vector<double> want(kNMels * n_frames);
  for (size_t f = 0; f < n_frames; ++f) {
    std::vector<double> power(kNBins);
    for (size_t k = 0; k < kNBins; ++k) {
      double re = 0.0, im = 0.0;
      for (size_t i = 0; i < kNFft; ++i) {
        const double w = 0.5 - 0.5 * std::cos(2.0 * pi * static_cast<double>(i) / kNFft);
        const double v = w * padded[f * kHop + i];
        const double angle = 2.0 * pi * static_cast<double>((k * i) % kNFft) / kNFft;
        re += v * std::cos(angle);
        im -= v * std::sin(angle);
      }
      power[k] = re * re + im * im;
    }
    for (size_t m = 0; m < kNMels; ++m) {
      double mel = 0.0;
      for (size_t k = 0; k < kNBins; ++k) mel += dense[m * kNBins + k] * power[k];
      want[m * n_frames + f] = std::log10(std::max(mel, 1e-10));
    }
  }
  for (const std::string& kernel : frame_kernels()) {
    LogMelKernel mel(kernel);
    std::vector<float> got(kNMels * n_frames);
    const float peak = mel.log10_mel(padded.data(), n_frames, got.data(), n_frames);
    CHECK_EQ(peak, *std::max_element(got.begin(), got.end()));
    double worst = 0.0;
    for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::fabs(got[i] - want[i]));
    if (!(worst <= 1e-4)) std::fprintf(stderr, "%s kernel: worst |log10 mel - reference| = %g\n", kernel.c_str(), worst);
    CHECK(worst <= 1e-4);
  }
}

TEST_CASE(each_build_has_the_kernels_of_its_instruction_set) {
#if defined(__aarch64__)
  CHECK(frame_kernels() == std::vector<std::string>{"neon"});
  const std::vector<std::string> absent{"sse2", "avx2"};
#else
  CHECK(frame_kernels().front() == "sse2");
  const std::vector<std::string> absent{"neon"};
#endif
  for (const std::string& kernel : absent) {  // a known name this build lacks is a runtime_error
    bool threw = false;
    try {
      LogMel mel(kernel);
    } catch (const std::runtime_error&) {
      threw = true;
    }
    CHECK(threw);
  }
}

TEST_CASE(huge_finite_samples_give_finite_features) {
  // 1e18 overflows the float power spectrum; FLT_MAX overflows the FFT itself (inf - inf).
  const std::vector<std::string> kernels = frame_kernels();
  const float max_log = std::log10(std::numeric_limits<float>::max());
  for (const std::string& kernel : kernels) {
    for (float amplitude : {1e18f, 1e30f, std::numeric_limits<float>::max()}) {
      std::vector<float> x(kChunkSamples);
      for (size_t i = 0; i < x.size(); ++i) x[i] = (i % 3 == 0 ? -amplitude : amplitude) * (i % 7 == 0 ? 0.5f : 1.0f);
      LogMel whole(kernel);
      const std::vector<float> a = whole.compute(x.data(), x.size());
      StreamingMel streaming(kChunkSamples, kernel);
      std::vector<float> raw(kNMels * kFramesPerChunk), out(raw.size());
      const float peak = streaming.compute_raw(x.data(), raw.data());
      streaming.compute(x.data(), out.data());
      CHECK(std::isfinite(peak) && peak <= max_log + 1e-3f);
      CHECK(std::isfinite(streaming.peak()));
      bool finite = true;
      for (float v : a) finite = finite && std::isfinite(v);
      for (float v : raw) finite = finite && std::isfinite(v) && v <= max_log + 1e-3f;
      for (float v : out) finite = finite && std::isfinite(v);
      CHECK(finite);
      // A quiet chunk after the loud one is normalised against a finite peak.
      std::vector<float> quiet(kChunkSamples, 0.0f);
      streaming.compute(quiet.data(), out.data());
      for (float v : out) finite = finite && std::isfinite(v);
      CHECK(finite);
    }
  }
}

TEST_MAIN()
