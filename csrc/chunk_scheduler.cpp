#include "chunk_scheduler.h"

#include <algorithm>
#include <stdexcept>

#include "clock.h"

namespace listenloop {
namespace {

// How long the thread sleeps between checks of its flags when no audio arrives; wake-ups
// for audio, stop and flush come through the ring's signal, so this is only a backstop.
constexpr std::chrono::milliseconds kIdleWait{100};

}  // namespace

ChunkScheduler::ChunkScheduler(RingBuffer& ring, ChunkQueue& queue, size_t chunk_samples, WakeSignal* wake,
                               PlaybackBuffer* playback)
    : ring_(ring),
      queue_(queue),
      wake_(wake),
      chunk_samples_(chunk_samples),
      mel_(chunk_samples),
      playback_(playback),
      chunk_buf_(chunk_samples) {
  if (playback_ && chunk_samples % static_cast<size_t>(EchoSettings().frame) != 0) {
    throw std::invalid_argument("echo cancellation needs chunks of whole " + std::to_string(EchoSettings().frame) +
                                "-sample frames, got " + std::to_string(chunk_samples));
  }
  if (ring.capacity() < chunk_samples) {
    throw std::invalid_argument("the ring (" + std::to_string(ring.capacity()) + " samples) must hold a whole chunk (" +
                                std::to_string(chunk_samples) + " samples)");
  }
}

ChunkScheduler::~ChunkScheduler() { stop(); }

void ChunkScheduler::start() {
  std::lock_guard<std::mutex> lock(control_mutex_);
  if (thread_.joinable()) return;
  stop_requested_.store(false, std::memory_order_release);
  chunk_start_ = ring_.read_total() - pending_;  // pending_ survives a stop/start
  running_.store(true, std::memory_order_release);
  thread_ = std::thread([this] { run(); });
}

void ChunkScheduler::stop() {
  std::lock_guard<std::mutex> lock(control_mutex_);
  if (!thread_.joinable()) return;
  stop_requested_.store(true, std::memory_order_release);
  ring_.wake();
  thread_.join();
}

bool ChunkScheduler::flush(std::chrono::nanoseconds timeout) {
  std::unique_lock<std::mutex> lock(flush_mutex_);
  if (!running()) throw std::logic_error("flush() needs a running scheduler: call start() first");
  const uint64_t ticket = ++flush_requested_;
  flush_pending_.store(true, std::memory_order_release);
  ring_.wake();
  const auto done = [&] { return flush_done_ >= ticket || !running(); };
  if (timeout.count() < 0) {
    flush_cv_.wait(lock, done);
  } else {
    flush_cv_.wait_for(lock, timeout, done);
  }
  return flush_done_ >= ticket;
}

uint64_t ChunkScheduler::flush_done_seen() const {
  std::lock_guard<std::mutex> lock(flush_mutex_);
  return flush_done_;
}

std::string ChunkScheduler::last_error() const {
  std::lock_guard<std::mutex> lock(flush_mutex_);
  return last_error_;
}

void ChunkScheduler::note_error(const char* what) {
  std::lock_guard<std::mutex> lock(flush_mutex_);
  last_error_ = what;
}

void ChunkScheduler::run() noexcept {
  try {
    while (!stop_requested_.load(std::memory_order_acquire)) {
      if (flush_pending_.exchange(false, std::memory_order_acq_rel)) {
        uint64_t ticket;
        {
          std::lock_guard<std::mutex> lock(flush_mutex_);
          ticket = flush_requested_;
        }
        if (ticket <= flush_done_seen()) continue;  // already answered together with an earlier one
        take_available();
        if (pending_ > 0) {
          std::fill(chunk_buf_.begin() + static_cast<long>(pending_), chunk_buf_.end(), 0.0f);
          emit(pending_);
        }
        {
          std::lock_guard<std::mutex> lock(flush_mutex_);
          flush_done_ = std::max(flush_done_, ticket);
        }
        flush_cv_.notify_all();
        if (wake_) wake_->post();
        continue;
      }
      ring_.wait_for(chunk_samples_ - pending_, kIdleWait);
      take_available();
    }
  } catch (const std::exception& e) {
    note_error(e.what());
  } catch (...) {
    note_error("unknown error in the chunk scheduler thread");
  }
  {
    std::lock_guard<std::mutex> lock(flush_mutex_);
    running_.store(false, std::memory_order_release);
  }
  flush_cv_.notify_all();
}

void ChunkScheduler::take_available() {
  for (;;) {
    const size_t got = ring_.read(chunk_buf_.data() + pending_, chunk_samples_ - pending_);
    if (got == 0) return;
    pending_ += got;
    samples_consumed_.fetch_add(got, std::memory_order_relaxed);
    if (pending_ == chunk_samples_) emit(chunk_samples_);
  }
}

void ChunkScheduler::emit(size_t valid) {
  MelChunk chunk;
  chunk.index = next_index_++;
  chunk.first_sample = static_cast<int64_t>(chunk_start_);
  chunk.valid_samples = static_cast<int32_t>(valid);
  chunk.arrived_ns = ring_.arrival_ns(chunk_start_ + valid);
  chunk_start_ += valid;
  pending_ = 0;
  try {
    // The canceller is made when the first playback arrives: until then the microphone passes
    // untouched anyway, and a session that never plays does not pay for its filter.
    if (!canceller_ && playback_ && playback_->ever_written()) {
      canceller_ = std::make_unique<EchoCanceller>(*playback_);
    }
    if (canceller_) {
      // The whole chunk, zero padding of a final partial chunk included: spans stay whole frames.
      const EchoReport echo = canceller_->process(static_cast<uint64_t>(chunk.first_sample), chunk_buf_.data(),
                                                  chunk_samples_);
      chunk.playing = echo.playing;
      chunk.playback_rms = echo.playback_rms;
      chunk.mic_rms = echo.mic_rms;
      chunk.out_rms = echo.out_rms;
      chunk.echo_delay = echo.delay_samples;
    }
    chunk.frames = static_cast<int64_t>(mel_.frames());
    chunk.mel.resize(kNMels * mel_.frames());
    chunk.peak = mel_.compute_raw(chunk_buf_.data(), chunk.mel.data());
    chunk.ready_ns = monotonic_ns();
  } catch (const std::exception& e) {  // e.g. out of memory: lose this chunk, keep running
    note_error(e.what());
    chunks_dropped_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  if (queue_.try_push(std::move(chunk))) {
    chunks_emitted_.fetch_add(1, std::memory_order_relaxed);
    if (wake_) wake_->post();
  } else {
    chunks_dropped_.fetch_add(1, std::memory_order_relaxed);
  }
}

}  // namespace listenloop
