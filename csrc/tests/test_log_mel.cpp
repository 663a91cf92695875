// LogMel invariants that need no NumPy (parity with features.py is in tests/test_core_mel.py).
#include <cmath>
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
  LogMel baseline("sse2");
  CHECK(std::string(baseline.kernel_name()) == "sse2");
  const std::vector<float> want = baseline.compute(x.data(), x.size());
  const std::string best = best_frame_kernel();
  LogMel fastest("auto");
  CHECK(std::string(fastest.kernel_name()) == best);
  const std::vector<float> got = fastest.compute(x.data(), x.size());
  float worst = 0.0f;
  for (size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::fabs(got[i] - want[i]));
  CHECK(worst <= 1e-4f);  // the parity budget vs features.py; FFT rounding differs slightly
  bool threw = false;
  try {
    LogMel bad("avx512");
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
}

TEST_CASE(huge_finite_samples_give_finite_features) {
  // 1e18 overflows the float power spectrum; FLT_MAX overflows the FFT itself (inf - inf).
  std::vector<std::string> kernels{"sse2"};
  if (best_frame_kernel() == "avx2") kernels.push_back("avx2");
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
