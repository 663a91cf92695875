// What travels through the listen queue.
#pragma once

#include <cstdint>
#include <vector>

#include "bounded_queue.h"

namespace listenloop {

// One chunk's features, cut and computed by the ChunkScheduler. The mel is raw log10 mel
// power: the consumer normalises it with its own running maximum of `peak`, so it decides
// at which chunk that maximum restarts (docs/PROTOCOL.md, "Log-mel").
struct MelChunk {
  int64_t index = 0;         // chunk number in the stream (dropped chunks use up numbers too)
  std::vector<float> mel;    // [kNMels, frames] row-major, raw log10 mel
  int64_t frames = 0;
  float peak = 0.0f;         // maximum of `mel`
  int64_t first_sample = 0;  // stream position (ring written_total) of the chunk's first sample
  int32_t valid_samples = 0; // real samples; the rest of a flushed final chunk is zero padding
  int64_t arrived_ns = -1;   // monotonic ns when the chunk's last sample was written to the ring
  int64_t ready_ns = 0;      // monotonic ns when the mel was computed
  // The echo canceller's account of the chunk (all zero without a playback reference).
  bool playing = false;      // the device's playback could echo into this chunk
  float playback_rms = 0.0f; // RMS of that playback (aligned by the estimated delay)
  float mic_rms = 0.0f;      // RMS of the microphone before / after cancellation
  float out_rms = 0.0f;
  int32_t echo_delay = 0;    // bulk delay in samples the canceller uses
};

using ChunkQueue = BoundedQueue<MelChunk>;

}  // namespace listenloop
