// What travels through the listen queue and the speak queue.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "bounded_queue.h"

namespace listenloop {

// One chunk's features, cut and computed by the ChunkScheduler.
struct MelChunk {
  int64_t index = 0;         // chunk number in the stream (dropped chunks use up numbers too)
  std::vector<float> mel;    // [kNMels, frames] row-major
  int64_t frames = 0;
  int64_t first_sample = 0;  // stream position (ring written_total) of the chunk's first sample
  int32_t valid_samples = 0; // real samples; the rest of a flushed final chunk is zero padding
  int64_t arrived_ns = -1;   // monotonic ns when the chunk's last sample was written to the ring
  int64_t ready_ns = 0;      // monotonic ns when the mel was computed
};

// A runtime event on its way to the application (the speak queue).
struct Event {
  int kind = 0;
  int64_t chunk = 0;
  double stream_time = 0.0;
  int64_t wall_ns = 0;
  double value = 0.0;
  bool flag = false;
  std::string text;  // UTF-8
  std::vector<int32_t> token_ids;
};

using ChunkQueue = BoundedQueue<MelChunk>;
using EventQueue = BoundedQueue<Event>;

}  // namespace listenloop
