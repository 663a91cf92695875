// pybind11 layer of listenloop._core: argument checking, GIL handling, NumPy conversion.
// Waiting and compute-heavy calls release the GIL; the C++ classes do the work.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cmath>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "chunk_scheduler.h"
#include "echo_canceller.h"
#include "log_mel.h"
#include "mel_kernel.h"
#include "messages.h"
#include "pinned_buffer.h"
#include "playback_buffer.h"
#include "ring_buffer.h"
#include "wake_signal.h"

namespace py = pybind11;
using namespace listenloop;

namespace {

#ifndef LISTENLOOP_BUILD_TYPE
#define LISTENLOOP_BUILD_TYPE "unknown"
#endif
#ifndef LISTENLOOP_CXX_FLAGS
#define LISTENLOOP_CXX_FLAGS "unknown"
#endif
#ifndef LISTENLOOP_SANITIZE
#define LISTENLOOP_SANITIZE ""
#endif

// Raises listenloop.errors.<name>(message) so callers can catch listenloop.Error.
[[noreturn]] void raise_error(const char* name, const std::string& message) {
  py::object cls = py::module_::import("listenloop.errors").attr(name);
  PyErr_SetObject(cls.ptr(), py::str(message).ptr());
  throw py::error_already_set();
}

// None (or +inf) waits forever; otherwise seconds >= 0.
std::chrono::nanoseconds to_timeout(std::optional<double> seconds) {
  if (!seconds || (std::isinf(*seconds) && *seconds > 0)) return std::chrono::nanoseconds(-1);
  if (!(*seconds >= 0.0)) throw py::value_error("timeout must be None or a number of seconds >= 0");
  if (*seconds > 1e9) return std::chrono::nanoseconds(-1);  // ~31 years: forever, without overflow
  return std::chrono::nanoseconds(static_cast<int64_t>(*seconds * 1e9));
}

// A C-contiguous float32 array (1-D when `one_d`), checked without conversion: the ring never
// copies twice, and in-place work on a converted copy would be lost.
void check_float32(const py::array& a, const char* what, bool writable, bool one_d = true) {
  if (!a.dtype().is(py::dtype::of<float>())) {
    raise_error("AudioFormatError", std::string(what) + " needs float32 samples, got dtype " +
                                        py::str(a.dtype()).cast<std::string>());
  }
  if (one_d && a.ndim() != 1) {
    raise_error("AudioFormatError", std::string(what) + " needs a 1-D array, got " + std::to_string(a.ndim()) + " dimensions");
  }
  if (!(a.flags() & py::array::c_style)) {
    raise_error("AudioFormatError", std::string(what) + " needs a contiguous array (use numpy.ascontiguousarray)");
  }
  if (writable && !a.writeable()) raise_error("AudioFormatError", std::string(what) + " needs a writable array");
}

// Hands a vector's memory to NumPy without copying: a capsule owns it from here on.
py::array_t<float> to_numpy(std::vector<float>&& values, std::vector<py::ssize_t> shape) {
  auto owned = std::make_unique<std::vector<float>>(std::move(values));
  float* data = owned->data();
  py::capsule owner(owned.get(), [](void* p) { delete static_cast<std::vector<float>*>(p); });
  owned.release();  // the capsule deletes it
  return py::array_t<float>(std::move(shape), data, owner);
}

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

// LogMel and StreamingMel keep scratch buffers: one call at a time per object.
struct PyLogMel {
  explicit PyLogMel(const std::string& kernel) : mel(kernel) {}
  LogMel mel;
  std::mutex mutex;
};

struct PyStreamingMel {
  PyStreamingMel(size_t chunk_samples, const std::string& kernel) : mel(chunk_samples, kernel) {}
  StreamingMel mel;
  std::mutex mutex;
};

// A MelChunk as Python sees it: the mel is an ndarray that owns the chunk's memory.
struct PyMelChunk {
  int64_t index, first_sample, arrived_ns, ready_ns;
  int32_t valid_samples;
  float peak;
  bool playing;
  float playback_rms, mic_rms, out_rms;
  int32_t echo_delay;
  py::array_t<float> mel;
};

PyMelChunk to_python(MelChunk&& c) {
  PyMelChunk out{c.index,   c.first_sample, c.arrived_ns, c.ready_ns, c.valid_samples, c.peak,
                 c.playing, c.playback_rms, c.mic_rms,    c.out_rms,  c.echo_delay,    {}};
  out.mel = to_numpy(std::move(c.mel), {static_cast<py::ssize_t>(kNMels), static_cast<py::ssize_t>(c.frames)});
  return out;
}

py::object pop_chunk(ChunkQueue& q, std::optional<double> timeout) {
  const auto wait = to_timeout(timeout);
  std::optional<MelChunk> c;
  {
    py::gil_scoped_release release;
    c = q.pop(wait);
  }
  if (!c) return py::none();
  return py::cast(to_python(std::move(*c)));
}

py::list pop_chunks(ChunkQueue& q, size_t max_items, std::optional<double> timeout) {
  const auto wait = to_timeout(timeout);
  std::vector<MelChunk> chunks;
  {
    py::gil_scoped_release release;
    chunks = q.pop_many(max_items, wait);
  }
  py::list out;
  for (MelChunk& c : chunks) out.append(py::cast(to_python(std::move(c))));
  return out;
}

// In place, any shape.
void normalize_log_mel(py::array& mel, float peak) {
  check_float32(mel, "normalize_log_mel", true, false);
  normalise_log_mel(static_cast<float*>(mel.mutable_data()), static_cast<size_t>(mel.size()), peak);
}

py::dict build_info() {
  py::dict info;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  info["cxx_standard"] = static_cast<long>(__cplusplus);
  info["build_type"] = LISTENLOOP_BUILD_TYPE;
  info["cxx_flags"] = LISTENLOOP_CXX_FLAGS;
  info["sanitize"] = LISTENLOOP_SANITIZE;
  info["fft"] = "pocketfft";
  info["mel_kernel"] = best_frame_kernel();
  info["echo_canceller"] = kEchoCancellerName;
  const std::string cudart = cuda_runtime_library();
  info["cudart_found"] = !cudart.empty();
  info["cudart_library"] = cudart.empty() ? py::object(py::none()) : py::object(py::str(cudart));
  info["cuda_device_present"] = cuda_runtime_available();
  return info;
}

// An echo canceller with a playback buffer of its own, for offline use (benchmarks, tests):
// process() takes the microphone and the reference for the same span.
struct OfflineEchoCanceller {
  explicit OfflineEchoCanceller(const EchoSettings& settings)
      : playback(static_cast<size_t>(settings.max_delay + settings.filter_samples) * 4), canceller(playback, settings) {}
  PlaybackBuffer playback;
  EchoCanceller canceller;
  uint64_t position = 0;
};

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "listenloop's real-time core: PCM ring, log-mel, chunk scheduler, listen queue, wake signal, pinned memory.";
  m.attr("SAMPLE_RATE") = kSampleRate;
  m.attr("N_MELS") = kNMels;
  m.attr("HOP") = kHop;
  m.attr("CHUNK_SAMPLES") = kChunkSamples;
  m.attr("FRAMES_PER_CHUNK") = kFramesPerChunk;
  m.def("build_info", &build_info, "Compiler, flags, FFT and whether libcudart was found at run time.");

  // --- RingBuffer -----------------------------------------------------------------------
  py::class_<RingBuffer>(m, "RingBuffer")
      .def(py::init<size_t>(), py::arg("capacity"))
      .def(
          "write",
          [](RingBuffer& r, const py::array& samples) {
            check_float32(samples, "RingBuffer.write", false);
            return r.write(static_cast<const float*>(samples.data()), static_cast<size_t>(samples.size()));
          },
          py::arg("samples"))
      .def(
          "read",
          [](RingBuffer& r, py::array& out) {
            check_float32(out, "RingBuffer.read", true);
            return r.read(static_cast<float*>(out.mutable_data()), static_cast<size_t>(out.size()));
          },
          py::arg("out"))
      .def(
          "wait_for",
          [](RingBuffer& r, size_t n, std::optional<double> timeout) {
            const auto wait = to_timeout(timeout);
            py::gil_scoped_release release;
            return r.wait_for(n, wait);
          },
          py::arg("n"), py::arg("timeout") = py::none())
      .def("available", &RingBuffer::available)
      .def_property_readonly("capacity", &RingBuffer::capacity)
      .def_property_readonly("written_total", &RingBuffer::written_total)
      .def_property_readonly("read_total", &RingBuffer::read_total)
      .def_property_readonly("dropped_samples", &RingBuffer::dropped_samples);

  // --- log-mel --------------------------------------------------------------------------
  m.def(
      "mel_filterbank",
      [] { return to_numpy(MelFilterbank().dense(), {static_cast<py::ssize_t>(kNMels), static_cast<py::ssize_t>(kNBins)}); },
      "The dense [128, 201] float32 Slaney filterbank the kernel stores sparsely.");

  py::class_<PyLogMel>(m, "LogMel")
      .def(py::init<const std::string&>(), py::arg("kernel") = "auto")
      .def_property_readonly("kernel", [](const PyLogMel& self) { return self.mel.kernel_name(); })
      .def(
          "compute",
          [](PyLogMel& self, const FloatArray& samples) {
            if (samples.ndim() != 1) raise_error("AudioFormatError", "LogMel.compute needs a 1-D array of samples");
            const float* data = samples.data();
            const size_t n = static_cast<size_t>(samples.size());
            std::vector<float> out;
            {
              py::gil_scoped_release release;
              std::lock_guard<std::mutex> lock(self.mutex);
              out = self.mel.compute(data, n);
            }
            return to_numpy(std::move(out), {static_cast<py::ssize_t>(kNMels), static_cast<py::ssize_t>(LogMel::frames_for(n))});
          },
          py::arg("samples"));

  py::class_<PyStreamingMel>(m, "StreamingMel")
      .def(py::init<size_t, const std::string&>(), py::arg("chunk_samples") = kChunkSamples, py::arg("kernel") = "auto")
      .def_property_readonly("kernel", [](const PyStreamingMel& self) { return self.mel.kernel_name(); })
      .def(
          "__call__",
          [](PyStreamingMel& self, const FloatArray& chunk) {
            const size_t c = self.mel.chunk_samples();
            if (chunk.ndim() != 1 || static_cast<size_t>(chunk.size()) != c) {
              raise_error("AudioFormatError", "a chunk has " + std::to_string(c) + " samples, got shape " +
                                                  py::str(py::tuple(py::cast(std::vector<py::ssize_t>(
                                                      chunk.shape(), chunk.shape() + chunk.ndim()))))
                                                      .cast<std::string>());
            }
            std::vector<float> out(kNMels * self.mel.frames());
            {
              py::gil_scoped_release release;
              std::lock_guard<std::mutex> lock(self.mutex);
              self.mel.compute(chunk.data(), out.data());
            }
            return to_numpy(std::move(out), {static_cast<py::ssize_t>(kNMels), static_cast<py::ssize_t>(self.mel.frames())});
          },
          py::arg("chunk"))
      .def("reset", [](PyStreamingMel& self) {
        std::lock_guard<std::mutex> lock(self.mutex);
        self.mel.reset();
      })
      .def_property_readonly("peak", [](PyStreamingMel& self) {
        std::lock_guard<std::mutex> lock(self.mutex);
        return self.mel.peak();
      })
      .def_property_readonly("chunk_samples", [](PyStreamingMel& self) { return self.mel.chunk_samples(); })
      .def_property_readonly("frames", [](PyStreamingMel& self) { return self.mel.frames(); });

  m.def("normalize_log_mel", &normalize_log_mel, py::arg("mel"), py::arg("peak"),
        "In place: (max(mel, peak - 8) + 4) / 4 on a writable C-contiguous float32 array of raw "
        "log10 mel, `peak` being the running maximum of MelChunk.peak.");

  // --- queues ---------------------------------------------------------------------------
  py::class_<PyMelChunk>(m, "MelChunk")
      .def_readonly("index", &PyMelChunk::index)
      .def_readonly("mel", &PyMelChunk::mel)
      .def_readonly("first_sample", &PyMelChunk::first_sample)
      .def_readonly("peak", &PyMelChunk::peak)
      .def_readonly("valid_samples", &PyMelChunk::valid_samples)
      .def_readonly("arrived_ns", &PyMelChunk::arrived_ns)
      .def_readonly("ready_ns", &PyMelChunk::ready_ns)
      .def_readonly("playing", &PyMelChunk::playing)
      .def_readonly("playback_rms", &PyMelChunk::playback_rms)
      .def_readonly("mic_rms", &PyMelChunk::mic_rms)
      .def_readonly("out_rms", &PyMelChunk::out_rms)
      .def_readonly("echo_delay", &PyMelChunk::echo_delay)
      .def("__repr__", [](const PyMelChunk& c) {
        return "MelChunk(index=" + std::to_string(c.index) + ", first_sample=" + std::to_string(c.first_sample) +
               ", valid_samples=" + std::to_string(c.valid_samples) + ")";
      });

  py::class_<ChunkQueue>(m, "ChunkQueue")
      .def(py::init<size_t>(), py::arg("capacity"))
      .def("pop", &pop_chunk, py::arg("timeout") = py::none())
      .def("pop_many", &pop_chunks, py::arg("max_items"), py::arg("timeout") = py::none())
      .def("close", &ChunkQueue::close)
      .def("size", &ChunkQueue::size)
      .def("__len__", &ChunkQueue::size)
      .def_property_readonly("capacity", &ChunkQueue::capacity)
      .def_property_readonly("dropped", &ChunkQueue::dropped)
      .def_property_readonly("closed", &ChunkQueue::closed);

  // --- scheduler ------------------------------------------------------------------------
  py::class_<WakeSignal>(m, "WakeSignal")
      .def(py::init<>())
      .def("post", &WakeSignal::post)
      .def(
          "wait",
          [](WakeSignal& w, std::optional<double> timeout) {
            const auto wait = to_timeout(timeout);
            py::gil_scoped_release release;
            w.wait(wait);
          },
          py::arg("timeout") = py::none());

  // --- playback reference and echo cancellation ---------------------------------------
  py::class_<PlaybackBuffer>(m, "PlaybackBuffer")
      .def(py::init<size_t>(), py::arg("capacity"))
      .def(
          "write",
          [](PlaybackBuffer& b, uint64_t at, const py::array& samples) {
            check_float32(samples, "PlaybackBuffer.write", false);
            const float* data = static_cast<const float*>(samples.data());
            const auto n = static_cast<size_t>(samples.size());
            PlaybackBuffer::WriteResult r;
            {
              py::gil_scoped_release release;
              r = b.write(at, data, n);
            }
            py::dict out;
            out["written"] = r.written;
            out["late"] = r.late;
            out["overlap"] = r.overlap;
            out["ahead"] = r.ahead;
            return out;
          },
          py::arg("at"), py::arg("samples"),
          "Places float32 samples from microphone position `at` on; says how many were written, "
          "late (the canceller had passed them), overlapping what was written, or too far ahead.")
      .def_property_readonly("end_position", &PlaybackBuffer::end_position)
      .def_property_readonly("read_position", &PlaybackBuffer::read_position)
      .def_property_readonly("capacity", &PlaybackBuffer::capacity);

  py::class_<EchoSettings>(m, "EchoSettings")
      .def(py::init<>())
      .def_readwrite("sample_rate", &EchoSettings::sample_rate)
      .def_readwrite("frame", &EchoSettings::frame)
      .def_readwrite("filter_samples", &EchoSettings::filter_samples)
      .def_readwrite("max_delay", &EchoSettings::max_delay)
      .def_readwrite("echo_suppress_db", &EchoSettings::echo_suppress_db)
      .def_readwrite("echo_suppress_active_db", &EchoSettings::echo_suppress_active_db);

  py::class_<OfflineEchoCanceller>(m, "EchoCanceller")
      .def(py::init<const EchoSettings&>(), py::arg("settings") = EchoSettings())
      .def(
          "process",
          [](OfflineEchoCanceller& c, const py::array& mic, const py::array& ref) {
            check_float32(mic, "EchoCanceller.process microphone", false);
            check_float32(ref, "EchoCanceller.process reference", false);
            if (mic.size() != ref.size()) raise_error("AudioFormatError", "EchoCanceller.process needs equal lengths");
            const auto frame = static_cast<size_t>(c.canceller.settings().frame);
            const auto n = static_cast<size_t>(mic.size()) / frame * frame;  // whole frames
            std::vector<float> out(static_cast<const float*>(mic.data()), static_cast<const float*>(mic.data()) + n);
            const float* r = static_cast<const float*>(ref.data());
            {
              py::gil_scoped_release release;
              for (size_t offset = 0; offset < n; offset += frame) {
                c.playback.write(c.position + offset, r + offset, frame);
                c.canceller.process(c.position + offset, out.data() + offset, frame);
              }
              c.position += n;
            }
            return to_numpy(std::move(out), {static_cast<py::ssize_t>(n)});
          },
          py::arg("mic"), py::arg("ref"),
          "Cancels the reference's echo from the microphone (float32, same length, whole 10 ms frames "
          "kept; a trailing partial frame is dropped). Successive calls continue the stream.")
      .def_property_readonly("delay_samples", [](const OfflineEchoCanceller& c) { return c.canceller.delay_samples(); })
      .def_property_readonly("delay_changes", [](const OfflineEchoCanceller& c) { return c.canceller.delay_changes(); });

  py::class_<ChunkScheduler>(m, "ChunkScheduler")
      .def(py::init<RingBuffer&, ChunkQueue&, size_t, WakeSignal*, PlaybackBuffer*>(), py::arg("ring"),
           py::arg("queue"), py::arg("chunk_samples") = kChunkSamples, py::arg("wake") = py::none(),
           py::arg("playback") = py::none(), py::keep_alive<1, 2>(), py::keep_alive<1, 3>(), py::keep_alive<1, 5>(),
           py::keep_alive<1, 6>())
      .def("start", &ChunkScheduler::start)
      .def("stop", &ChunkScheduler::stop, py::call_guard<py::gil_scoped_release>())
      .def(
          "flush",
          [](ChunkScheduler& s, std::optional<double> timeout) {
            const auto wait = to_timeout(timeout);
            if (!s.running()) raise_error("Error", "ChunkScheduler.flush() needs a running scheduler: call start() first");
            py::gil_scoped_release release;
            return s.flush(wait);
          },
          py::arg("timeout") = py::none())
      .def_property_readonly("running", &ChunkScheduler::running)
      .def_property_readonly("chunk_samples", &ChunkScheduler::chunk_samples)
      .def_property_readonly("chunks_emitted", &ChunkScheduler::chunks_emitted)
      .def_property_readonly("chunks_dropped", &ChunkScheduler::chunks_dropped)
      .def_property_readonly("samples_consumed", &ChunkScheduler::samples_consumed)
      .def_property_readonly("last_error", [](const ChunkScheduler& s) -> std::optional<std::string> {
        std::string e = s.last_error();
        if (e.empty()) return std::nullopt;
        return e;
      });

  // --- pinned memory --------------------------------------------------------------------
  py::class_<PinnedBuffer>(m, "PinnedBuffer", py::buffer_protocol())
      .def(py::init<size_t>(), py::arg("nbytes"))
      .def_buffer([](PinnedBuffer& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.size())}, {1});
      })
      .def_property_readonly("ptr", [](const PinnedBuffer& b) { return reinterpret_cast<uintptr_t>(b.data()); })
      .def_property_readonly("nbytes", &PinnedBuffer::size)
      .def_property_readonly("kind", &PinnedBuffer::kind)
      .def(
          "as_array",
          [](py::object self, const std::string& dtype, const std::vector<py::ssize_t>& shape, size_t offset_bytes) {
            PinnedBuffer& b = self.cast<PinnedBuffer&>();
            const py::dtype dt(dtype);
            const size_t itemsize = static_cast<size_t>(dt.itemsize());
            size_t count = 1;
            for (py::ssize_t d : shape) {
              if (d < 0) throw py::value_error("as_array: negative dimension in shape");
              count *= static_cast<size_t>(d);
            }
            const size_t alignment = dt.attr("alignment").cast<size_t>();
            if (offset_bytes % alignment != 0) {
              throw py::value_error("as_array: offset_bytes " + std::to_string(offset_bytes) + " is not a multiple of " +
                                    dtype + "'s alignment " + std::to_string(alignment));
            }
            if (offset_bytes > b.size() || count * itemsize > b.size() - offset_bytes) {
              throw py::value_error("as_array: " + std::to_string(count * itemsize) + " bytes at offset " +
                                    std::to_string(offset_bytes) + " do not fit in a " + std::to_string(b.size()) +
                                    "-byte buffer");
            }
            // The array's base is this PinnedBuffer, which therefore lives as long as the view.
            return py::array(dt, shape, {}, static_cast<char*>(b.data()) + offset_bytes, self);
          },
          py::arg("dtype"), py::arg("shape"), py::arg("offset_bytes") = 0);
}
