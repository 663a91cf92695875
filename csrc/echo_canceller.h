// Removes the device's own playback from the microphone, before the log-mel.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "playback_buffer.h"

struct SpeexEchoState_;
struct SpeexPreprocessState_;

namespace listenloop {

// What listenloop._core.build_info() reports as the canceller.
inline constexpr const char* kEchoCancellerName = "speexdsp-1.2.1-mdf+residual-suppressor, bulk-delay aligned";

// Settings of one canceller; the defaults are the runtime's (docs/DESIGN.md, "Echo cancellation").
struct EchoSettings {
  int sample_rate = 16000;
  int frame = 160;            // 10 ms: SpeexDSP works in frames of this many samples
  int filter_samples = 4000;  // 250 ms of room response after the bulk delay
  int max_delay = 4800;       // bulk delay searched (speaker latency + distance), 300 ms
  int echo_suppress_db = -40; // residual-echo suppressor: attenuation while only the far end talks
  int echo_suppress_active_db = -15;  // ... and while the near end talks over it
};

// What the canceller saw in one span of microphone audio (a chunk).
struct EchoReport {
  bool playing = false;        // reference energy in reach of this span (its echo may be in it)
  float playback_rms = 0.0f;   // RMS of the reference that can echo into this span
  float mic_rms = 0.0f;        // RMS of the microphone before cancellation
  float out_rms = 0.0f;        // RMS after cancellation
  int delay_samples = 0;       // bulk delay in use
};

// SpeexDSP's multidelay adaptive filter (MDF) and residual-echo suppressor, fed a reference
// aligned by a bulk-delay estimate. Deterministic: the output depends only on the microphone
// and reference samples. Until the reference first carries sound, and whenever no reference
// sound is within reach (max_delay + filter_samples), the microphone passes unchanged.
class EchoCanceller {
 public:
  EchoCanceller(PlaybackBuffer& playback, const EchoSettings& settings = EchoSettings());
  ~EchoCanceller();
  EchoCanceller(const EchoCanceller&) = delete;
  EchoCanceller& operator=(const EchoCanceller&) = delete;

  // Cancels in place the microphone samples at positions [at, at + n) (`n` whole frames),
  // reading the reference for the same positions. Spans follow each other.
  EchoReport process(uint64_t at, float* mic, size_t n);

  const EchoSettings& settings() const noexcept { return settings_; }
  int delay_samples() const noexcept { return delay_; }
  uint64_t delay_changes() const noexcept { return delay_changes_; }

 private:
  class DelayEstimator;
  struct SpeexDeleter {
    void operator()(SpeexEchoState_* s) const noexcept;
    void operator()(SpeexPreprocessState_* s) const noexcept;
  };

  void process_frame(float* mic, const float* ref_raw, EchoReport& report);
  void set_delay(int delay);

  PlaybackBuffer& playback_;
  const EchoSettings settings_;
  std::unique_ptr<SpeexEchoState_, SpeexDeleter> echo_;
  std::unique_ptr<SpeexPreprocessState_, SpeexDeleter> suppressor_;
  std::unique_ptr<DelayEstimator> estimator_;

  std::vector<float> history_;     // raw reference, the last history_.size() positions (ring)
  uint64_t written_ = 0;           // reference samples kept so far (= microphone samples processed)
  uint64_t last_sound_ = 0;        // `written_` just after the last reference frame with sound
  bool heard_reference_ = false;
  int delay_ = 0;
  uint64_t delay_changes_ = 0;
  std::vector<float> ref_frame_, raw_frame_;
  std::vector<int16_t> mic16_, ref16_, out16_;
};

}  // namespace listenloop
