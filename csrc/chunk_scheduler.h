// The thread that turns the PCM ring into mel chunks for the listen queue.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "echo_canceller.h"
#include "log_mel.h"
#include "messages.h"
#include "ring_buffer.h"
#include "wake_signal.h"

namespace listenloop {

// Consumes the ring (it must be the ring's only consumer), cuts chunk_samples-sample chunks,
// computes their raw streaming log-mel (history kept across the whole stream) and
// try_pushes them: a full queue drops the chunk and counts it, so the scheduler never waits
// on the model. The consumer normalises (normalise_log_mel with its running max of
// MelChunk::peak). Nothing thrown inside the thread escapes it; the last error is kept in
// last_error().
//
// With a WakeSignal, every pushed chunk and every completed flush posts it, so one consumer
// can sleep on a single signal shared by many schedulers.
//
// With a PlaybackBuffer, once playback has arrived each chunk first goes through an
// EchoCanceller fed from it (the scheduler owns the canceller: it is the stream's front-end
// state), and the chunk carries the canceller's report. Positions in the buffer are the ring's
// sample positions.
class ChunkScheduler {
 public:
  // `ring`, `queue` and `wake` (optional) must outlive the scheduler.
  ChunkScheduler(RingBuffer& ring, ChunkQueue& queue, size_t chunk_samples = kChunkSamples,
                 WakeSignal* wake = nullptr, PlaybackBuffer* playback = nullptr);
  ~ChunkScheduler();
  ChunkScheduler(const ChunkScheduler&) = delete;
  ChunkScheduler& operator=(const ChunkScheduler&) = delete;

  void start();  // no-op while running
  void stop();   // joins the thread; idempotent
  // Emits the buffered partial chunk (zero-padded, valid_samples < chunk_samples) after
  // taking every sample written so far. Returns false if not done within `timeout`
  // (negative: wait forever). Throws if the scheduler is not running.
  bool flush(std::chrono::nanoseconds timeout);

  bool running() const noexcept { return running_.load(std::memory_order_acquire); }
  size_t chunk_samples() const noexcept { return chunk_samples_; }
  uint64_t chunks_emitted() const noexcept { return chunks_emitted_.load(std::memory_order_relaxed); }
  uint64_t chunks_dropped() const noexcept { return chunks_dropped_.load(std::memory_order_relaxed); }
  uint64_t samples_consumed() const noexcept { return samples_consumed_.load(std::memory_order_relaxed); }
  std::string last_error() const;

 private:
  void run() noexcept;
  void take_available();     // reads whatever the ring holds, emitting every full chunk
  void emit(size_t valid);   // computes and pushes the chunk in chunk_buf_
  void note_error(const char* what);
  uint64_t flush_done_seen() const;

  RingBuffer& ring_;
  ChunkQueue& queue_;
  WakeSignal* const wake_;
  const size_t chunk_samples_;
  StreamingMel mel_;
  PlaybackBuffer* const playback_;
  std::unique_ptr<EchoCanceller> canceller_;  // made at the first chunk after playback arrives
  std::vector<float> chunk_buf_;
  size_t pending_ = 0;          // samples in chunk_buf_ (scheduler thread only)
  int64_t next_index_ = 0;      // scheduler thread only
  uint64_t chunk_start_ = 0;    // ring read_total at chunk_buf_[0] (scheduler thread only)

  std::thread thread_;
  std::mutex control_mutex_;    // start/stop/flush callers
  std::atomic<bool> running_{false};
  std::atomic<bool> stop_requested_{false};
  std::atomic<uint64_t> chunks_emitted_{0};
  std::atomic<uint64_t> chunks_dropped_{0};
  std::atomic<uint64_t> samples_consumed_{0};

  // Flush handshake: a caller bumps requested, the thread answers by raising done.
  mutable std::mutex flush_mutex_;
  std::condition_variable flush_cv_;
  uint64_t flush_requested_ = 0;
  uint64_t flush_done_ = 0;
  std::atomic<bool> flush_pending_{false};
  std::string last_error_;  // guarded by flush_mutex_
};

}  // namespace listenloop
