"""Type stub of listenloop._core, the C++ real-time core (csrc/, docs/DESIGN.md).

Every `*_ns` value is steady_clock nanoseconds: CLOCK_MONOTONIC on Linux, the same clock as
Python's time.monotonic_ns(), so the two can be subtracted directly.
Timeouts are seconds (float); None waits without limit. Waiting calls release the GIL.
"""
from typing import Any

import numpy as np
import numpy.typing as npt

SAMPLE_RATE: int  # 16000
N_MELS: int  # 128
HOP: int  # 160
CHUNK_SAMPLES: int  # 6400
FRAMES_PER_CHUNK: int  # 40 mel frames per chunk

def build_info() -> dict[str, Any]:
    """compiler, cxx_standard, build_type, cxx_flags, sanitize, fft, mel_kernel ("avx2" or
    "sse2": what LogMel/StreamingMel pick by default on this CPU),
    cudart_found (libcudart could be dlopen'ed), cudart_library (its name or None),
    cuda_device_present (cudaGetDeviceCount() > 0)."""

def mel_filterbank() -> npt.NDArray[np.float32]:
    """The [128, 201] Slaney filterbank (= features.mel_filterbank())."""

class RingBuffer:
    """Lock-free SPSC float32 PCM ring: one producer thread writes, one consumer reads.

    write() never blocks or allocates; on overrun it keeps what fits and drops the rest of
    the block (drop-newest), counted in dropped_samples. A ChunkScheduler attached to the
    ring is its consumer: do not read() from it as well.
    """

    def __init__(self, capacity: int) -> None:
        """capacity in samples, rounded up to a power of two (ValueError if 0)."""
    def write(self, samples: npt.NDArray[np.float32]) -> int:
        """Producer: copy a 1-D C-contiguous float32 array in; returns samples written.
        Anything else raises listenloop.AudioFormatError (a ValueError)."""
    def read(self, out: npt.NDArray[np.float32]) -> int:
        """Consumer: fill a writable 1-D C-contiguous float32 array; returns samples read."""
    def wait_for(self, n: int, timeout: float | None = None) -> bool:
        """Consumer: wait until n samples are readable; may return False early on wake-ups."""
    def available(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def written_total(self) -> int: ...
    @property
    def read_total(self) -> int: ...
    @property
    def dropped_samples(self) -> int: ...

class LogMel:
    """Whisper 128-bin log-mel of a whole array (= features.log_mel)."""

    def __init__(self, kernel: str = "auto") -> None:
        """kernel: "auto" (AVX2+FMA when the CPU has it, else the portable 4-wide "sse2"),
        or force "sse2" / "avx2" (ValueError if unknown, RuntimeError if unavailable)."""
    @property
    def kernel(self) -> str: ...
    def compute(self, samples: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """1-D samples (converted to float32) -> [128, len // 160]; the 80 dB floor follows
        the maximum of the whole array."""

class StreamingMel:
    """Chunk-by-chunk log-mel exactly like features.StreamingLogMel: 200 samples of real
    history on the left (reflect at stream start), reflect on the right edge, running max."""

    def __init__(self, chunk_samples: int = 6400, kernel: str = "auto") -> None:
        """chunk_samples: a multiple of 160, at least 400 (ValueError otherwise); kernel as LogMel."""
    @property
    def kernel(self) -> str: ...
    def __call__(self, chunk: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """[chunk_samples] -> [128, chunk_samples // 160] (AudioFormatError on a wrong shape)."""
    def reset(self) -> None:
        """Forget the history and the running maximum."""
    @property
    def peak(self) -> float:
        """Running maximum of log10 mel power (-inf after reset)."""
    @property
    def chunk_samples(self) -> int: ...
    @property
    def frames(self) -> int: ...

def normalize_log_mel(mel: npt.NDArray[np.float32], peak: float) -> None:
    """In place: mel = (max(mel, peak - 8) + 4) / 4, the Whisper clamp and rescale of raw
    log10 mel (MelChunk.mel) given the running maximum `peak` (taken as float32) of
    MelChunk.peak since the consumer last restarted it. Any shape; mel must be a writable
    C-contiguous float32 ndarray, else listenloop.AudioFormatError. Chunks normalised with
    running_peak = max(running_peak, chunk.peak) equal StreamingMel()(chunk) on the same
    chunks, bit for bit."""

class MelChunk:
    """One chunk of the listen queue (read-only attributes)."""

    index: int  # chunk number in the stream; dropped chunks use numbers too
    mel: npt.NDArray[np.float32]  # [128, 40] raw log10 mel, not normalised (see normalize_log_mel); owns its memory
    peak: float  # mel.max(): what the consumer folds into its running maximum
    first_sample: int  # stream position (ring written_total) of the chunk's first sample
    valid_samples: int  # 6400, or fewer for the zero-padded chunk emitted by flush()
    arrived_ns: int  # monotonic ns when the chunk's last sample was written to the ring
    ready_ns: int  # monotonic ns when the mel was computed

class ChunkQueue:
    """The listen queue: bounded; the scheduler's pushes never block (full -> dropped)."""

    def __init__(self, capacity: int) -> None:
        """ValueError if capacity is 0."""
    def pop(self, timeout: float | None = None) -> MelChunk | None:
        """None on timeout, or once closed and empty."""
    def pop_many(self, max_items: int, timeout: float | None = None) -> list[MelChunk]:
        """Waits like pop() for the first chunk, then takes up to max_items without waiting."""
    def close(self) -> None:
        """Wake every waiter and refuse further pushes; queued chunks can still be popped."""
    def size(self) -> int: ...
    def __len__(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    @property
    def closed(self) -> bool: ...

class WakeSignal:
    """A counting wake-up (POSIX semaphore) shared by any number of ChunkSchedulers: one
    worker thread serving many sessions sleeps on it until any of their queues has a chunk.
    Each post() lets exactly one wait() return; posting never blocks."""

    def __init__(self) -> None: ...
    def post(self) -> None: ...
    def wait(self, timeout: float | None = None) -> None:
        """Returns once posted or after timeout seconds (None: no limit), which look the
        same: check the queues after every return. ValueError if timeout < 0."""

class ChunkScheduler:
    """A C++ thread: ring -> chunk_samples chunks -> raw streaming log10 mel -> try_push to
    the queue.

    Each chunk's mel has 200 samples of real history on the left (reflect at stream start)
    and reflect padding on the right; the history is kept for the whole stream. Normalising
    (and restarting the running maximum) is the consumer's: see normalize_log_mel.
    Keeps ring, queue and wake alive. Exceptions never escape the thread (see last_error).
    """

    def __init__(self, ring: RingBuffer, queue: ChunkQueue, chunk_samples: int = 6400,
                 wake: WakeSignal | None = None, playback: PlaybackBuffer | None = None) -> None:
        """wake: posted after every chunk pushed to the queue (not for dropped ones) and
        after every completed flush(). playback: each chunk first goes through an echo
        canceller fed from it (positions are the ring's). ValueError if the ring cannot hold a
        whole chunk."""
    def start(self) -> None:
        """Start the thread (no-op while running)."""
    def stop(self) -> None:
        """Stop and join the thread (idempotent; also done when the object is freed)."""
    def flush(self, timeout: float | None = None) -> bool:
        """Take every sample written so far and emit the partial chunk zero-padded (with
        valid_samples < chunk_samples); True once pushed (or dropped), False on timeout.
        listenloop.Error if the scheduler is not running."""
    @property
    def running(self) -> bool: ...
    @property
    def chunk_samples(self) -> int: ...
    @property
    def chunks_emitted(self) -> int: ...
    @property
    def chunks_dropped(self) -> int:
        """Chunks lost to a full (or closed) queue."""
    @property
    def samples_consumed(self) -> int: ...
    @property
    def last_error(self) -> str | None: ...

class PinnedBuffer:
    """Page-locked host memory: cudaHostAlloc via a run-time loaded libcudart when a GPU is
    present (kind "cuda_host"), else 64-byte aligned memory, mlock'ed when allowed (kind
    "mlock") or not (kind "aligned"). Supports the buffer protocol (1-D uint8), so
    np.frombuffer(buf, dtype) is a zero-copy view."""

    def __init__(self, nbytes: int) -> None: ...
    @property
    def ptr(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def kind(self) -> str: ...
    def as_array(self, dtype: str, shape: tuple[int, ...], offset_bytes: int = 0) -> npt.NDArray[Any]:
        """A C-ordered view at offset_bytes that keeps this buffer alive (ValueError if it
        does not fit or offset_bytes is misaligned for dtype)."""
    def __buffer__(self, flags: int, /) -> memoryview: ...
