"""Audio input conditioning: files, PCM conversion and resampling to 16 kHz mono float32."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from .errors import AudioFormatError, DeviceError
from .protocol import SAMPLE_RATE

# Integer PCM is scaled by its full-scale value, as the model's training audio was for int16
# (/32768; docs/PROTOCOL.md, "Front end").
_INT_SCALE = {np.dtype(np.int16): 32768.0, np.dtype(np.int32): 2147483648.0, np.dtype(np.int8): 128.0}


def to_float32_mono(pcm) -> tuple[np.ndarray, int]:
    """PCM of any supported dtype, 1-D or [n, channels] -> (float32 mono, count of NaN/Inf zeroed).

    Supported: float16/32/64, int8/16/32 (scaled to [-1, 1)), uint8 (offset binary, 128 = 0).
    Channels are averaged. Non-finite samples are replaced by 0 and counted.
    """
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        raise AudioFormatError("raw bytes are ambiguous: pass a NumPy array (e.g. np.frombuffer(data, np.int16))")
    arr = np.asarray(pcm)
    if arr.dtype == np.uint8:
        arr = (arr.astype(np.float32) - 128.0) / 128.0
    elif arr.dtype in _INT_SCALE:
        arr = arr.astype(np.float32) / _INT_SCALE[arr.dtype]
    elif arr.dtype.kind == "f":
        arr = arr.astype(np.float32, copy=False)
    else:
        raise AudioFormatError(f"unsupported PCM dtype {arr.dtype}: use float16/32/64, int8/16/32 or uint8")
    if arr.ndim == 2:
        if arr.shape[1] == 0:
            raise AudioFormatError("PCM of shape [n, 0] has no channels")
        if arr.shape[1] > 64 and arr.shape[0] <= 64:
            raise AudioFormatError(f"PCM shape {list(arr.shape)} looks like [channels, n]; pass [n, channels]")
        arr = arr.mean(axis=1, dtype=np.float32) if arr.shape[1] > 1 else arr[:, 0]
    elif arr.ndim != 1:
        raise AudioFormatError(f"PCM must be 1-D or [n, channels], got shape {list(arr.shape)}")
    bad = ~np.isfinite(arr)
    n_bad = int(bad.sum())
    if n_bad:
        arr = np.where(bad, np.float32(0.0), arr)
    return np.ascontiguousarray(arr, dtype=np.float32), n_bad


def check_sample_rate(sample_rate) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float, np.integer, np.floating)):
        raise AudioFormatError(f"sample_rate must be a number, got {sample_rate!r}")
    if not np.isfinite(sample_rate) or sample_rate <= 0:
        raise AudioFormatError(f"sample_rate must be > 0, got {sample_rate}")
    if int(sample_rate) != sample_rate:
        raise AudioFormatError(f"sample_rate must be a whole number of Hz, got {sample_rate}")
    return int(sample_rate)


def resample(samples: np.ndarray, sample_rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """One-shot band-limited resampling (soxr HQ); a no-op at the target rate."""
    if sample_rate == target:
        return samples
    import soxr

    return soxr.resample(samples, sample_rate, target).astype(np.float32, copy=False)


class StreamResampler:
    """soxr's streaming resampler: block boundaries give the same samples as one-shot."""

    def __init__(self, in_rate: int, out_rate: int = SAMPLE_RATE):
        import soxr

        self.in_rate, self.out_rate = in_rate, out_rate
        self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32") if in_rate != out_rate else None

    def __call__(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        if self._stream is None:
            return samples
        return self._stream.resample_chunk(samples, last=last)


def read_audio(path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode an audio file (wav, flac, ogg, mp3 where libsndfile supports it) to float32 mono at 16 kHz."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioFormatError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioFormatError(f"{path}: file is empty")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        detail = _first_line(exc)
        if "not a regular file" in detail or "unknown format" in detail.lower():
            detail = "unrecognised format or corrupt data"  # libsndfile's generic open failure
        raise AudioFormatError(f"{path}: cannot decode audio ({detail}); "
                               f"supported: {', '.join(sorted(sf.available_formats()))}") from None
    if data.shape[0] == 0:
        raise AudioFormatError(f"{path}: contains no audio samples")
    mono, n_bad = to_float32_mono(data)
    if n_bad:
        raise AudioFormatError(f"{path}: {n_bad} samples are NaN or infinite")
    return resample(mono, int(rate), sample_rate)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- microphone ----------------------------------------------------------------------------

def _sounddevice():
    try:
        import sounddevice as sd
    except OSError as exc:  # the module raises OSError when libportaudio is missing
        raise DeviceError(f"audio input is unavailable: {exc} (install PortAudio, e.g. apt install libportaudio2)") from None
    except ImportError:
        raise DeviceError("audio input needs the sounddevice package: pip install sounddevice") from None
    return sd


def list_input_devices() -> list[dict]:
    """Input-capable audio devices: index, name, channels, default sample rate, default flag."""
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
        default = sd.default.device[0]
    except Exception as exc:  # noqa: BLE001 - PortAudio reports host problems with several types
        raise DeviceError(f"cannot list audio devices: {exc}") from None
    return [{"index": i, "name": d["name"], "channels": d["max_input_channels"],
             "sample_rate": d["default_samplerate"], "default": i == default}
            for i, d in enumerate(devices) if d["max_input_channels"] > 0]


class Microphone:
    """Captures a device into a session's ring buffer.

    The PortAudio callback does one thing: write the block into a ring (no allocation, no
    resampling, no locks). If the device opens at 16 kHz mono it writes the session's ring
    directly; otherwise it writes a raw ring that a worker thread drains, resamples and
    forwards. A monitor turns ring overruns into AudioDropped events.
    """

    def __init__(self, session, device=None, block_ms: int = 20):
        self._sd = sd = _sounddevice()
        self.session = session
        try:
            info = sd.query_devices(device, kind="input")
        except Exception as exc:  # noqa: BLE001
            raise DeviceError(f"no usable audio input device{'' if device is None else f' {device!r}'}: {exc}") from None
        self.device_name = info["name"]
        try:
            sd.check_input_settings(device=device, channels=1, samplerate=SAMPLE_RATE, dtype="float32")
            self.rate = SAMPLE_RATE
        except Exception:  # noqa: BLE001 - the device cannot do 16 kHz: capture natively, resample aside
            self.rate = int(info["default_samplerate"])
        from . import _core

        self._target = session._ring if self.rate == SAMPLE_RATE else _core.RingBuffer(self.rate * 4)
        target = self._target

        def callback(indata, frames, time_info, status):  # real-time thread: only the write
            target.write(indata[:, 0])

        try:
            self._stream = sd.InputStream(device=device, channels=1, samplerate=self.rate, dtype="float32",
                                          blocksize=int(self.rate * block_ms / 1000), callback=callback)
        except Exception as exc:  # noqa: BLE001
            raise DeviceError(f"cannot open audio input {self.device_name!r}: {exc}") from None
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._forward, name="listenloop-mic", daemon=True)

    def start(self) -> Microphone:
        self._stream.start()
        self._worker.start()
        return self

    def _forward(self) -> None:
        resampler = StreamResampler(self.rate) if self._target is not self.session._ring else None
        buf = np.zeros(self.rate // 10, np.float32)
        self._seen_drops = 0
        while not self._stop.is_set():
            if resampler is not None and self._drain_once(resampler, buf):
                continue
            self._account()
            self._stop.wait(0.02)
        # the stream is stopped: forward what is left
        if resampler is not None:
            while self._drain_once(resampler, buf):
                pass
            self.session._write(resampler(np.zeros(0, np.float32), last=True), block=False)
        self._account()

    def _drain_once(self, resampler, buf) -> bool:
        n = self._target.read(buf)
        if n:
            self.session._write(resampler(buf[:n]), block=False)
        return n > 0

    def _account(self) -> None:
        from .events import AudioDropped

        if self._target is self.session._ring:
            self.session._note_external_samples()  # samples written straight into the ring
        drops = int(self._target.dropped_samples)
        if drops > self._seen_drops:
            self.session._emit(AudioDropped(self.session._stream_time(), time.monotonic(),
                                            drops - self._seen_drops, "microphone ring overrun"))
            self._seen_drops = drops

    @property
    def active(self) -> bool:
        return not self._stop.is_set()

    def stop(self) -> None:
        """Stop capturing and forward what was captured (idempotent)."""
        if self._stop.is_set():
            return
        try:
            self._stream.stop()
            self._stream.close()
        finally:
            self._stop.set()
            if self._worker.is_alive():
                self._worker.join(timeout=5)

    def __enter__(self) -> Microphone:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
