#include "echo_canceller.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "speex/speex_echo.h"
#include "speex/speex_preprocess.h"

namespace listenloop {
namespace {

// A reference frame quieter than this (RMS, full scale 1) carries no sound: about -70 dBFS.
constexpr float kSoundRms = 3e-4f;

float rms(const float* x, size_t n) {
  double sum = 0.0;
  for (size_t i = 0; i < n; ++i) sum += static_cast<double>(x[i]) * x[i];
  return n ? static_cast<float>(std::sqrt(sum / static_cast<double>(n))) : 0.0f;
}

int16_t to_int16(float x) {
  const float scaled = std::nearbyint(std::clamp(x, -1.0f, 1.0f) * 32767.0f);
  return static_cast<int16_t>(scaled);
}

}  // namespace

// Bulk delay between the reference and its echo, from the correlation of their 10 ms
// amplitude envelopes: cheap, robust to reverberation and to the level of the echo. The
// adaptive filter then only has to model the room after that delay.
class EchoCanceller::DelayEstimator {
 public:
  static constexpr int kWindow = 200;        // frames correlated at most (2 s)
  static constexpr int kMinWindow = 30;      // ... and at least, for a first estimate soon
  static constexpr int kEvery = 20;          // frames between estimates (0.2 s)
  static constexpr float kMinCorrelation = 0.5f;
  static constexpr float kMinActive = 0.25f; // share of window frames with reference sound

  explicit DelayEstimator(int max_lag) : max_lag_(max_lag), ref_(kWindow + max_lag, 0.0f), mic_(kWindow, 0.0f) {}

  // One frame's envelopes; returns a confirmed new lag in frames, or -1.
  int push(float ref_rms, float mic_rms) {
    ref_[ref_pos_ % ref_.size()] = ref_rms;
    mic_[mic_pos_ % mic_.size()] = mic_rms;
    ++ref_pos_;
    ++mic_pos_;
    if (mic_pos_ < static_cast<uint64_t>(kMinWindow + max_lag_) || mic_pos_ % kEvery != 0) return -1;
    const int lag = best_lag();
    if (lag < 0) {
      candidate_ = -1;
      return -1;
    }
    // The first lag is taken at once (nothing is cancelled without one); a change needs two
    // estimates in a row within a frame of each other.
    const bool confirmed = !found_ || (candidate_ >= 0 && std::abs(lag - candidate_) <= 1);
    candidate_ = lag;
    if (!confirmed) return -1;
    found_ = true;
    return lag;
  }

 private:
  float ref_at(uint64_t frame) const { return ref_[frame % ref_.size()]; }
  float mic_at(uint64_t frame) const { return mic_[frame % mic_.size()]; }

  int best_lag() const {
    // mic frames [first, mic_pos_); their reference frames up to max_lag_ earlier are kept
    const uint64_t window = std::min<uint64_t>(kWindow, mic_pos_ - static_cast<uint64_t>(max_lag_));
    const uint64_t first = mic_pos_ - window;
    double mic_mean = 0.0;
    for (uint64_t t = first; t < mic_pos_; ++t) mic_mean += mic_at(t);
    mic_mean /= static_cast<double>(window);
    double mic_var = 0.0;
    for (uint64_t t = first; t < mic_pos_; ++t) mic_var += (mic_at(t) - mic_mean) * (mic_at(t) - mic_mean);
    if (mic_var <= 0.0) return -1;
    int best = -1;
    double best_corr = kMinCorrelation;
    for (int lag = 0; lag <= max_lag_; ++lag) {
      double ref_mean = 0.0;
      int active = 0;
      for (uint64_t t = first; t < mic_pos_; ++t) {
        const float r = ref_at(t - lag);
        ref_mean += r;
        active += r > kSoundRms;
      }
      if (active < kMinActive * static_cast<double>(window)) continue;
      ref_mean /= static_cast<double>(window);
      double cross = 0.0, ref_var = 0.0;
      for (uint64_t t = first; t < mic_pos_; ++t) {
        const double r = ref_at(t - lag) - ref_mean;
        cross += r * (mic_at(t) - mic_mean);
        ref_var += r * r;
      }
      if (ref_var <= 0.0) continue;
      const double corr = cross / std::sqrt(ref_var * mic_var);
      if (corr > best_corr) {
        best_corr = corr;
        best = lag;
      }
    }
    return best;
  }

  const int max_lag_;
  std::vector<float> ref_, mic_;
  uint64_t ref_pos_ = 0, mic_pos_ = 0;
  int candidate_ = -1;
  bool found_ = false;
};

void EchoCanceller::SpeexDeleter::operator()(SpeexEchoState_* s) const noexcept { speex_echo_state_destroy(s); }
void EchoCanceller::SpeexDeleter::operator()(SpeexPreprocessState_* s) const noexcept {
  speex_preprocess_state_destroy(s);
}

EchoCanceller::EchoCanceller(PlaybackBuffer& playback, const EchoSettings& settings)
    : playback_(playback), settings_(settings) {
  const EchoSettings& s = settings_;
  if (s.frame <= 0 || s.filter_samples < s.frame || s.max_delay < 0 || s.sample_rate <= 0) {
    throw std::invalid_argument("echo canceller: bad settings (frame " + std::to_string(s.frame) + ", filter " +
                                std::to_string(s.filter_samples) + ", max delay " + std::to_string(s.max_delay) + ")");
  }
  echo_.reset(speex_echo_state_init(s.frame, s.filter_samples));
  suppressor_.reset(speex_preprocess_state_init(s.frame, s.sample_rate));
  if (!echo_ || !suppressor_) throw std::bad_alloc();
  spx_int32_t rate = s.sample_rate;
  speex_echo_ctl(echo_.get(), SPEEX_ECHO_SET_SAMPLING_RATE, &rate);
  // The suppressor removes residual echo only: its noise suppression is floored at -1 dB,
  // and its gain control and dereverberation stay off (voice detection is off by default).
  spx_int32_t on = 1, off = 0, noise_db = -1, echo_db = s.echo_suppress_db, active_db = s.echo_suppress_active_db;
  speex_preprocess_ctl(suppressor_.get(), SPEEX_PREPROCESS_SET_DENOISE, &on);
  speex_preprocess_ctl(suppressor_.get(), SPEEX_PREPROCESS_SET_NOISE_SUPPRESS, &noise_db);
  speex_preprocess_ctl(suppressor_.get(), SPEEX_PREPROCESS_SET_AGC, &off);
  speex_preprocess_ctl(suppressor_.get(), SPEEX_PREPROCESS_SET_DEREVERB, &off);
  speex_preprocess_ctl(suppressor_.get(), SPEEX_PREPROCESS_SET_ECHO_SUPPRESS, &echo_db);
  speex_preprocess_ctl(suppressor_.get(), SPEEX_PREPROCESS_SET_ECHO_SUPPRESS_ACTIVE, &active_db);
  speex_preprocess_ctl(suppressor_.get(), SPEEX_PREPROCESS_SET_ECHO_STATE, echo_.get());
  estimator_ = std::make_unique<DelayEstimator>(s.max_delay / s.frame);
  history_.assign(static_cast<size_t>(s.max_delay + s.frame), 0.0f);
  ref_frame_.resize(s.frame);
  raw_frame_.resize(s.frame);
  mic16_.resize(s.frame);
  ref16_.resize(s.frame);
  out16_.resize(s.frame);
}

EchoCanceller::~EchoCanceller() = default;

void EchoCanceller::set_delay(int delay) {
  if (delay == delay_) return;
  delay_ = delay;
  ++delay_changes_;
  // The filter modelled the old alignment: start it again rather than unlearn it.
  speex_echo_state_reset(echo_.get());
}

EchoReport EchoCanceller::process(uint64_t at, float* mic, size_t n) {
  const size_t frame = static_cast<size_t>(settings_.frame);
  if (n % frame != 0) throw std::logic_error("echo canceller: spans must be whole frames");
  EchoReport report;
  double mic_sum = 0.0, out_sum = 0.0, ref_sum = 0.0;
  for (size_t offset = 0; offset < n; offset += frame) {
    float* x = mic + offset;
    playback_.read(at + offset, raw_frame_.data(), frame);
    for (size_t i = 0; i < frame; ++i) mic_sum += static_cast<double>(x[i]) * x[i];
    EchoReport frame_report;
    process_frame(x, raw_frame_.data(), frame_report);
    for (size_t i = 0; i < frame; ++i) out_sum += static_cast<double>(x[i]) * x[i];
    if (frame_report.playing) {
      report.playing = true;
      for (size_t i = 0; i < frame; ++i) ref_sum += static_cast<double>(ref_frame_[i]) * ref_frame_[i];
    }
  }
  const double count = static_cast<double>(std::max<size_t>(n, 1));
  report.mic_rms = static_cast<float>(std::sqrt(mic_sum / count));
  report.out_rms = static_cast<float>(std::sqrt(out_sum / count));
  report.playback_rms = static_cast<float>(std::sqrt(ref_sum / count));
  report.delay_samples = delay_;
  return report;
}

void EchoCanceller::process_frame(float* mic, const float* ref_raw, EchoReport& report) {
  const size_t frame = static_cast<size_t>(settings_.frame);
  const size_t span = history_.size();
  // Keep the raw reference; the filter reads it `delay_` samples back.
  const float ref_level = rms(ref_raw, frame);
  for (size_t i = 0; i < frame; ++i) history_[(written_ + i) % span] = ref_raw[i];
  written_ += frame;
  if (ref_level > kSoundRms) {
    heard_reference_ = true;
    last_sound_ = written_;
  }
  if (!heard_reference_) return;  // never any playback: the microphone passes bit for bit

  const int lag = estimator_->push(ref_level, rms(mic, frame));
  if (lag >= 0) {
    // A little earlier than the envelope peak: the direct path must lie inside the filter.
    const int margin = 3 * settings_.frame;
    set_delay(std::max(0, lag * settings_.frame - margin));
  }
  for (size_t i = 0; i < frame; ++i) {
    const uint64_t p = written_ - frame + i;
    ref_frame_[i] = p >= static_cast<uint64_t>(delay_) ? history_[(p - delay_) % span] : 0.0f;
  }
  // Within reach of sound: the reference sounded within max_delay + filter before this frame.
  const uint64_t reach = static_cast<uint64_t>(settings_.max_delay + settings_.filter_samples);
  if (written_ - last_sound_ > reach) return;  // the speaker is silent: nothing to cancel
  report.playing = true;
  for (size_t i = 0; i < frame; ++i) {
    mic16_[i] = to_int16(mic[i]);
    ref16_[i] = to_int16(ref_frame_[i]);
  }
  speex_echo_cancellation(echo_.get(), mic16_.data(), ref16_.data(), out16_.data());
  speex_preprocess_run(suppressor_.get(), out16_.data());
  for (size_t i = 0; i < frame; ++i) mic[i] = static_cast<float>(out16_[i]) / 32767.0f;
}

}  // namespace listenloop
