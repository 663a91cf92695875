// EchoCanceller: the microphone passes bit for bit until the reference carries sound; a
// delayed, reverberant echo of noise is removed; the same inputs give the same output.
#include <cmath>
#include <random>
#include <vector>

#include "check.h"
#include "echo_canceller.h"

using listenloop::EchoCanceller;
using listenloop::PlaybackBuffer;

namespace {

constexpr size_t kChunk = 6400;

struct Scene {
  std::vector<float> ref, mic, echo;
};

// Speech-like reference (noise with a syllable-rate envelope), heard 60 ms later through a
// decaying tail, plus quiet microphone noise.
Scene make_scene(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  Scene s;
  s.ref.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const float envelope = 0.5f + 0.5f * std::sin(2.0f * 3.14159265f * 4.0f * static_cast<float>(i) / 16000.0f);
    s.ref[i] = 0.05f * envelope * gauss(rng);
  }
  std::vector<float> h(1600, 0.0f);
  h[960] = 0.8f;
  for (size_t k = 961; k < h.size(); ++k) h[k] = 0.05f * gauss(rng) * std::exp(-static_cast<float>(k - 961) / 300.0f);
  s.echo.assign(n, 0.0f);
  for (size_t i = 0; i < n; ++i) {
    for (size_t k = 960; k < h.size() && k <= i; ++k) s.echo[i] += h[k] * s.ref[i - k];
  }
  s.mic.resize(n);
  for (size_t i = 0; i < n; ++i) s.mic[i] = s.echo[i] + 1e-4f * gauss(rng);
  return s;
}

std::vector<float> cancel(const Scene& s, size_t reference_from) {
  PlaybackBuffer playback(65536);
  EchoCanceller canceller(playback);
  std::vector<float> out = s.mic;
  for (size_t at = 0; at + kChunk <= out.size(); at += kChunk) {
    if (at + kChunk > reference_from) {  // the reference pushed before the microphone chunk
      const size_t from = std::max(at, reference_from);
      playback.write(from, s.ref.data() + from, at + kChunk - from);
    }
    canceller.process(at, out.data() + at, kChunk);
  }
  return out;
}

double energy(const std::vector<float>& x, size_t from, size_t to) {
  double e = 0.0;
  for (size_t i = from; i < to; ++i) e += static_cast<double>(x[i]) * x[i];
  return e;
}

}  // namespace

TEST_CASE(without_a_reference_the_microphone_passes_bit_for_bit) {
  const Scene s = make_scene(kChunk * 10, 1);
  const auto out = cancel(s, s.mic.size());  // no reference ever
  CHECK(out == s.mic);
}

TEST_CASE(a_delayed_reverberant_echo_is_reduced_by_more_than_15_db) {
  const Scene s = make_scene(kChunk * 40, 2);  // 16 s
  const auto out = cancel(s, 0);
  const size_t from = 16000 * 8;  // after 8 s of convergence
  const double erle = 10.0 * std::log10(energy(s.echo, from, s.echo.size()) / energy(out, from, out.size()));
  std::printf("  ERLE %.1f dB\n", erle);
  CHECK(erle > 15.0);
}

TEST_CASE(the_same_inputs_give_the_same_output) {
  const Scene s = make_scene(kChunk * 12, 3);
  CHECK(cancel(s, kChunk * 2) == cancel(s, kChunk * 2));
}

int main() { return check::run_all(); }
