"""Audio input conditioning: files, PCM conversion, clipping and resampling to 16 kHz mono float32."""
from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
# At import, not at the first resampled block: soxr's extension aborts the process when a
# signal's exception reaches it while it initializes, and a stream may be interrupted anytime.
import soxr

from .errors import AudioFormatError, DeviceError
from .protocol import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, SAMPLE_RATE

# Integer PCM is scaled by its full-scale value, as the model's training audio was for int16
# (/32768; docs/PROTOCOL.md, "Front end").
_INT_SCALE = {np.dtype(np.int16): 32768.0, np.dtype(np.int32): 2147483648.0, np.dtype(np.int8): 128.0}
RATE_RANGE = f"{MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz"


class AudioWarning(UserWarning):
    """A file that was read only in part (truncated, or its decoder stopped early)."""


# --- PCM -----------------------------------------------------------------------------------

def _downmix(pcm) -> tuple[np.ndarray, np.ndarray]:
    """(mono samples, the input array). Integers are scaled to float32; float16/32 give float32
    and float64 stays float64, so that finite float64 samples beyond the float32 range stay
    finite. Channels are averaged without overflow."""
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        raise AudioFormatError("raw bytes are ambiguous: pass a NumPy array (e.g. np.frombuffer(data, np.int16))")
    arr = np.asarray(pcm)
    if arr.dtype == np.uint8:
        mono_src = (arr.astype(np.float32) - 128.0) / 128.0
    elif arr.dtype in _INT_SCALE:
        mono_src = arr.astype(np.float32) / _INT_SCALE[arr.dtype]
    elif arr.dtype.kind == "f":
        mono_src = arr if arr.dtype in (np.float32, np.float64) else arr.astype(
            np.float32 if arr.dtype.itemsize < 4 else np.float64)
    else:
        raise AudioFormatError(f"unsupported PCM dtype {arr.dtype}: use float16/32/64, int8/16/32 or uint8")
    if arr.ndim == 2:
        if arr.shape[1] == 0:
            raise AudioFormatError("PCM of shape [n, 0] has no channels")
        if arr.shape[1] > 64 and arr.shape[0] <= 64:
            raise AudioFormatError(f"PCM shape {list(arr.shape)} looks like [channels, n]; pass [n, channels]")
        if arr.shape[1] == 1:
            mono = mono_src[:, 0]
        elif arr.dtype.kind != "f":
            mono = mono_src.mean(axis=1, dtype=np.float32)  # scaled integers: within [-1, 1]
        else:
            with np.errstate(over="ignore", invalid="ignore"):  # inf - inf is NaN, counted later
                if mono_src.dtype == np.float64:
                    mono = (mono_src / arr.shape[1]).sum(axis=1)  # scaled first: no overflow near the max
                else:
                    mono = mono_src.mean(axis=1, dtype=np.float64).astype(np.float32)  # float32 sums could overflow
    elif arr.ndim == 1:
        mono = mono_src
    else:
        raise AudioFormatError(f"PCM must be 1-D or [n, channels], got shape {list(arr.shape)}")
    return mono, arr


@dataclass(frozen=True)
class ConditionedPCM:
    """What the front end made of one block of PCM (docs/PROTOCOL.md, "Front end")."""

    samples: np.ndarray  # float32 mono, every sample finite and in [-1, 1]
    nonfinite: int = 0  # NaN/Inf samples replaced by 0
    clipped: int = 0  # samples outside [-1, 1], clipped
    peak: float = 0.0  # the largest finite magnitude before clipping
    int_pcm_as_float: bool = False  # the block looks like integer PCM passed as float

    @property
    def clip_reason(self) -> str:
        """One phrase: what the clipping means and, for integer PCM passed as float, the fix."""
        if not self.int_pcm_as_float:
            return "float samples belong in [-1, 1]"
        if self.peak <= 32768.0:
            return "this looks like int16 PCM stored as float; divide by 32768"
        return "this looks like int32 PCM stored as float; divide by 2147483648"


def condition_pcm(pcm) -> ConditionedPCM:
    """PCM of any supported dtype and layout -> finite float32 mono in [-1, 1], with counts.

    Non-finite samples become 0; samples beyond [-1, 1] are clipped, never rescaled. A float
    block whose peak is above 2 and whose samples are mostly at or above 1 in magnitude, or
    all whole numbers, is flagged as integer PCM passed as float (peak at most 2^31).
    """
    mono, arr = _downmix(pcm)
    finite = np.isfinite(mono)
    nonfinite = int(mono.size - np.count_nonzero(finite))
    if nonfinite:
        mono = np.where(finite, mono, mono.dtype.type(0.0))
    magnitude = np.abs(mono)
    peak = float(magnitude.max()) if mono.size else 0.0
    clipped, int_like = 0, False
    if peak > 1.0:
        clipped = int(np.count_nonzero(magnitude > 1.0))
        mono = np.clip(mono, -1.0, 1.0)
        if arr.dtype.kind == "f" and 2.0 < peak <= 2147483648.0:  # no integer PCM goes past 2^31
            values = arr[np.isfinite(arr)]
            integral = bool(np.all(values == np.trunc(values)))
            int_like = integral or int(np.count_nonzero(magnitude >= 1.0)) * 2 > mono.size
    return ConditionedPCM(np.ascontiguousarray(mono, dtype=np.float32), nonfinite, clipped, peak, int_like)


def check_sample_rate(sample_rate, what: str = "sample_rate") -> int:
    """`sample_rate` as an int Hz: a whole number from MIN_SAMPLE_RATE to MAX_SAMPLE_RATE
    inclusive; anything else is an AudioFormatError that names `what`."""
    if isinstance(sample_rate, (bool, np.bool_)) or not isinstance(sample_rate, (int, float, np.integer, np.floating)):
        raise AudioFormatError(f"{what} must be a number, got {sample_rate!r}")
    if isinstance(sample_rate, (int, np.integer)):
        rate = int(sample_rate)
    else:
        value = float(sample_rate)
        if not math.isfinite(value) or not value.is_integer():
            raise AudioFormatError(f"{what} must be a whole number of Hz from {RATE_RANGE}, got {sample_rate}")
        rate = int(value)
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioFormatError(f"{what} {sample_rate} Hz is outside the supported range, {RATE_RANGE}")
    return rate


def resample(samples: np.ndarray, sample_rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """One-shot band-limited resampling (soxr HQ); a no-op at the target rate."""
    if sample_rate == target:
        return samples
    return soxr.resample(samples, sample_rate, target).astype(np.float32, copy=False)


class StreamResampler:
    """soxr's streaming resampler: block boundaries give the same samples as one-shot."""

    def __init__(self, in_rate: int, out_rate: int = SAMPLE_RATE):
        self.in_rate, self.out_rate = in_rate, out_rate
        self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32") if in_rate != out_rate else None

    def __call__(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        if self._stream is None:
            return samples
        return self._stream.resample_chunk(samples, last=last)


# --- files ---------------------------------------------------------------------------------

_STDERR_LOCK = threading.Lock()
_MAX_BLOCK_VALUES = 1 << 22  # samples (frames x channels) per read, whatever the channel count
_UNKNOWN_LENGTH = 1 << 60  # libsndfile's frame count for a stream of unknown length is near 2^63
_RESAMPLE_LIMIT = 1e30  # magnitudes past this are limited before resampling, so it cannot overflow


@contextlib.contextmanager
def _quiet_c_stderr():
    """File descriptor 2 goes to the null device inside the block, then back.

    Decoders inside libsndfile (libmpg123 for MP3) print notes straight to the C-level stderr
    when given damaged data; the real error still arrives as an exception. Python's own
    sys.stderr is flushed first, so nothing written before is lost.
    """
    with _STDERR_LOCK:
        saved = None
        try:
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):
            pass
        try:
            saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, 2)
            finally:
                os.close(devnull)
        except OSError:  # no fd 2, or no null device: leave stderr alone
            if saved is not None:
                os.close(saved)
            saved = None
        try:
            yield
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)


# WAV sample widths by format tag (PCM, IEEE float); libsndfile reads other PCM widths as
# something else (7 bits as unsigned 8-bit: twice the frames, all noise).
_WAV_BITS = {1: (8, 16, 24, 32), 3: (32, 64)}
_WAV_EXTENSIBLE = 0xFFFE


@dataclass(frozen=True)
class _WavHeader:
    frames: int | None  # what the data chunk announces (None: not known)
    format_tag: int | None
    bits: int | None


def _wav_header(path: Path) -> _WavHeader:
    """The fmt and data chunks of a RIFF/WAVE header. libsndfile reports the frames actually
    present, so `frames` is how a truncated WAV is recognised."""
    format_tag = bits = None
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return _WavHeader(None, None, None)
            block_align = 0
            for _ in range(256):  # chunks before "data": fmt, fact, LIST, ...
                header = f.read(8)
                if len(header) < 8:
                    break
                chunk, size = header[:4], int.from_bytes(header[4:], "little")
                if chunk == b"data":
                    frames = size // block_align if block_align and size not in (0, 0xFFFFFFFF) else None
                    return _WavHeader(frames, format_tag, bits)
                if chunk == b"fmt ":
                    fmt = f.read(min(size, 26))
                    if len(fmt) < 16:
                        break
                    format_tag = int.from_bytes(fmt[0:2], "little")
                    block_align = int.from_bytes(fmt[12:14], "little")
                    bits = int.from_bytes(fmt[14:16], "little")
                    if format_tag == _WAV_EXTENSIBLE and len(fmt) >= 26:  # the sub-format's tag
                        format_tag = int.from_bytes(fmt[24:26], "little")
                    f.seek(size - len(fmt) + (size & 1), os.SEEK_CUR)
                else:
                    f.seek(size + (size & 1), os.SEEK_CUR)
    except OSError:
        pass
    return _WavHeader(None, format_tag, bits)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    line = text[0].strip() if text else type(exc).__name__
    for prefix in ("Error : ", "Error: "):  # libsndfile's own prefix, redundant in our messages
        line = line[len(prefix):] if line.startswith(prefix) else line
    return line.rstrip(".") or type(exc).__name__


def _seconds(frames: int, rate: int) -> str:
    return f"{frames / rate:.1f} s"


class AudioFile:
    """An audio file opened for streaming, block by block, in bounded memory.

    Opening checks the file (it exists and is a regular file, the decoder takes it, its sample
    rate is within MIN_SAMPLE_RATE..MAX_SAMPLE_RATE) and decodes the first block, so a bad file
    fails here with one AudioFormatError line. Iterating yields mono blocks at the file's own
    rate (`sample_rate`): float32, or float64 for 64-bit float files; samples are as stored,
    not clipped (Session.accept_waveform clips and reports). A file that ends before its header
    said (or whose decoder stops part way) ends the iteration with one warning passed to
    `on_warning` (default: warnings.warn with AudioWarning).
    """

    def __init__(self, path, block_seconds: float = 1.0, on_warning: Callable[[str], None] | None = None):
        import soundfile as sf

        if not (isinstance(block_seconds, (int, float)) and math.isfinite(block_seconds) and block_seconds > 0):
            raise ValueError(f"block_seconds must be a positive number of seconds, got {block_seconds!r}")
        self.path = Path(path)
        self._on_warning = on_warning
        self._file = None
        self.frames_read = 0
        self.truncated = False
        name = str(path)
        if not self.path.exists():
            raise AudioFormatError(f"{name}: no such file")
        if self.path.is_dir():
            raise AudioFormatError(f"{name}: is a directory, not an audio file")
        if not self.path.is_file():
            raise AudioFormatError(f"{name}: not a regular file")
        if self.path.stat().st_size == 0:
            raise AudioFormatError(f"{name}: file is empty")
        self.name = name
        with _quiet_c_stderr():
            try:
                self._file = sf.SoundFile(name)
            except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as exc:
                raise self._decode_error(exc) from None
        try:
            f = self._file
            self.sample_rate = check_sample_rate(f.samplerate, f"{name}: sample rate")
            self.channels = int(f.channels)
            if self.channels < 1:
                raise AudioFormatError(f"{name}: header says {self.channels} channels")
            self._dtype = "float64" if f.subtype == "DOUBLE" else "float32"
            self._noisy = f.format == "MP3"  # libmpg123 may print notes on any read
            header = None
            if f.format in ("WAV", "WAVEX"):
                wav = _wav_header(self.path)
                widths = _WAV_BITS.get(wav.format_tag)
                if widths is not None and wav.bits not in widths:
                    raise AudioFormatError(f"{name}: WAV header says {wav.bits} bits per sample; "
                                           f"{'PCM' if wav.format_tag == 1 else 'float'} WAV files have "
                                           f"{', '.join(map(str, widths))}")
                header = wav.frames
            if header is None and not self._noisy:
                header = int(f.frames) if 0 <= f.frames < _UNKNOWN_LENGTH else 0
            # (an MP3's frame count is libsndfile's estimate, which an ID3 tag inflates: it
            # promises nothing, and a decoder that stops early still warns)
            self.header_frames = header or 0  # what the header promises (0: not known)
            self._block = max(1, min(round(block_seconds * self.sample_rate), _MAX_BLOCK_VALUES // self.channels))
            with _quiet_c_stderr():
                first = self._read()
            if first is None or len(first) == 0:
                raise AudioFormatError(f"{name}: contains no audio samples")
            self._pending = first
        except BaseException:
            self.close()
            raise

    def _decode_error(self, exc: Exception) -> AudioFormatError:
        import soundfile as sf

        detail = _first_line(exc)
        if "not a regular file" in detail or "unknown format" in detail.lower():
            detail = "unrecognised format or corrupt data"  # libsndfile's generic open failures
        return AudioFormatError(f"{self.name}: cannot decode audio ({detail}); "
                                f"supported: {', '.join(sorted(sf.available_formats()))}")

    def _read(self) -> np.ndarray | None:
        """The next block as mono, or None at the end; a decoder failure after some audio is
        reported once and ends the file, before any audio it is an AudioFormatError."""
        import soundfile as sf

        try:
            data = self._file.read(self._block, dtype=self._dtype, always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as exc:
            if self.frames_read == 0:
                raise self._decode_error(exc) from None
            self._warn_short(f"decoding stopped ({_first_line(exc)})")
            return None
        if len(data) == 0:
            return None
        finite = np.isfinite(data)
        if not finite.all():
            first = self.frames_read + int(np.argmin(finite.all(axis=1)))
            bad = int(data.size - np.count_nonzero(finite))
            try:
                while len(rest := self._file.read(self._block, dtype=self._dtype, always_2d=True)):
                    bad += int(rest.size - np.count_nonzero(np.isfinite(rest)))  # the whole file's count
            except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError):
                pass  # counted up to where the decoder stopped
            raise AudioFormatError(f"{self.name}: {bad} samples are NaN or infinite "
                                   f"(the first at {_seconds(first, self.sample_rate)})")
        self.frames_read += len(data)
        if data.shape[1] == 1:
            return np.ascontiguousarray(data[:, 0])
        return data.mean(axis=1, dtype=np.float64).astype(data.dtype, copy=False)

    def _warn_short(self, what: str) -> None:
        self.truncated = True
        rate, read = self.sample_rate, self.frames_read
        if self.header_frames > read:
            message = (f"{self.name}: {what}: read {_seconds(read, rate)} of the "
                       f"{_seconds(self.header_frames, rate)} its header promises")
        else:
            message = f"{self.name}: {what} after {_seconds(read, rate)}"
        if self._on_warning is None:
            warnings.warn(message, AudioWarning, stacklevel=3)
        else:
            self._on_warning(message)

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._file is None:
            return
        try:
            block, self._pending = self._pending, None
            while block is not None:
                yield block
                if self._noisy:
                    with _quiet_c_stderr():
                        block = self._read()
                else:
                    block = self._read()
            if not self.truncated and self.header_frames > self.frames_read:
                self._warn_short("file is truncated")
        finally:
            self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> AudioFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_audio_blocks(path, block_seconds: float = 1.0, sample_rate: int = SAMPLE_RATE,
                      on_warning: Callable[[str], None] | None = None) -> Iterator[np.ndarray]:
    """Decode an audio file block by block to float32 mono at `sample_rate` (16 kHz).

    Any format libsndfile reads (wav, flac, ogg, mp3 where supported). Memory does not depend
    on the file's length: each block is about `block_seconds` of audio, resampled with a
    streaming resampler (the blocks join into exactly the one-shot result). Errors and
    warnings are AudioFile's; samples are as stored, not clipped.
    """
    with AudioFile(path, block_seconds, on_warning) as audio:
        resampler = StreamResampler(audio.sample_rate, sample_rate)
        for block in audio:
            if block.dtype != np.float32:
                block = np.clip(block, -_RESAMPLE_LIMIT, _RESAMPLE_LIMIT).astype(np.float32)
            elif audio.sample_rate != sample_rate and np.abs(block).max() > _RESAMPLE_LIMIT:
                block = np.clip(block, -_RESAMPLE_LIMIT, _RESAMPLE_LIMIT)
            out = resampler(block)
            if out.size:
                yield out
        tail = resampler(np.zeros(0, np.float32), last=True)
        if tail.size:
            yield tail


def read_audio(path, sample_rate: int = SAMPLE_RATE, on_warning: Callable[[str], None] | None = None) -> np.ndarray:
    """Decode a whole audio file (wav, flac, ogg, mp3 where libsndfile supports it) to float32
    mono at 16 kHz; see read_audio_blocks for long files."""
    blocks = list(read_audio_blocks(path, block_seconds=10.0, sample_rate=sample_rate, on_warning=on_warning))
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


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


class _AudioStream:
    """What Microphone and Duplex share: a PortAudio stream (`_stream`), the worker that
    forwards what it captures (`_worker`, which runs until `_stop` is set), and the report of
    what the capture ring dropped."""

    _seen_drops = 0  # capture-ring drops already reported

    def start(self):
        self._stream.start()
        self._worker.start()
        return self

    def _report_drops(self, ring) -> None:
        from .events import AudioDropped

        drops = int(ring.dropped_samples)
        if drops > self._seen_drops:
            self.session._emit(AudioDropped(self.session._stream_time(), time.monotonic(),
                                            drops - self._seen_drops, "microphone ring overrun"))
            self._seen_drops = drops

    @property
    def active(self) -> bool:
        return not self._stop.is_set()

    def stop(self) -> None:
        """Stop the stream and forward what it captured (idempotent)."""
        if self._stop.is_set():
            return
        try:
            self._stream.stop()
            self._stream.close()
        finally:
            self._stop.set()
            if self._worker.is_alive():
                self._worker.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Microphone(_AudioStream):
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
            native = float(info["default_samplerate"])
            if not (math.isfinite(native) and MIN_SAMPLE_RATE <= round(native) <= MAX_SAMPLE_RATE):
                raise AudioFormatError(f"audio input {self.device_name!r} runs at {native:g} Hz, outside the "
                                       f"supported range, {RATE_RANGE}") from None
            self.rate = int(round(native))
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

    def _forward(self) -> None:
        resampler = StreamResampler(self.rate) if self._target is not self.session._ring else None
        buf = np.zeros(self.rate // 10, np.float32)
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
        if self._target is self.session._ring:
            self.session._note_external_samples()  # samples written straight into the ring
        self._report_drops(self._target)


# --- microphone and speaker ----------------------------------------------------------------

DUPLEX_RING_SECONDS = 4.0  # played and captured audio waiting for the worker
SPEECH_RING_SECONDS = 8.0  # speech queued for the speaker; a longer utterance is topped up as it plays
_DUPLEX_POLL_S = 0.01


class Duplex(_AudioStream):
    """Microphone and speaker on one PortAudio stream, so that both run on one sample clock,
    feeding a session its microphone audio and, as the echo reference, everything the speaker
    played (docs/PROTOCOL.md, "Playback reference").

    The callback is the only real-time code: it plays the next block of queued speech (silence
    when there is none), then writes the block it played and the block it captured into two
    rings, in that order. It copies between preallocated buffers and never blocks. A worker
    thread forwards each played block to `session.accept_playback` before the microphone block
    captured with it goes to `session.accept_waveform`, both at the stream's rate (the session
    resamples them alike); since silence is played and fed too, the reference is continuous
    and needs no `at`.

    `play(samples)` queues mono float32 speech at `rate`, replacing what is still playing. The
    speech ring has one producer (the worker) and one consumer (the callback); to drop queued
    speech the worker asks and the callback discards, so neither side ever writes the other's
    end.
    """

    def __init__(self, session, device=None, output_device=None, block_ms: int = 20):
        from . import _core

        self._sd = sd = _sounddevice()
        self.session = session
        try:
            info = sd.query_devices(device, kind="input")
            out_info = sd.query_devices(output_device, kind="output")
        except Exception as exc:  # noqa: BLE001 - PortAudio reports host problems with several types
            raise DeviceError(f"no usable audio input and output device: {exc}") from None
        self.device_name = info["name"]
        self.output_name = out_info["name"]
        self.rate = self._choose_rate(device, output_device, info)
        self._played = _core.RingBuffer(int(self.rate * DUPLEX_RING_SECONDS))
        self._captured = _core.RingBuffer(int(self.rate * DUPLEX_RING_SECONDS))
        self._speech = _core.RingBuffer(int(self.rate * SPEECH_RING_SECONDS))
        self._discard = np.zeros(self._speech.capacity, np.float32)  # the callback drops queued speech into it
        self._flush_asked = 0  # worker: flushes asked for
        self._flush_done = 0  # callback: flushes done
        self._next: np.ndarray | None = None  # speech handed to play(), not yet taken by the worker
        self._next_lock = threading.Lock()
        self._utterance = np.zeros(0, np.float32)  # worker: the speech playing, and how much is queued
        self._queued = 0
        try:
            self._stream = sd.Stream(device=(device, output_device), channels=1, samplerate=self.rate,
                                     dtype="float32", blocksize=int(self.rate * block_ms / 1000),
                                     callback=self._callback)
        except Exception as exc:  # noqa: BLE001
            raise DeviceError(f"cannot open {self.device_name!r} with {self.output_name!r}: {exc}") from None
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="listenloop-duplex", daemon=True)

    def _choose_rate(self, device, output_device, info) -> int:
        """16 kHz if both sides take it, else the input's native rate if the output takes that."""
        sd = self._sd

        def both(rate) -> bool:
            try:
                sd.check_input_settings(device=device, channels=1, samplerate=rate, dtype="float32")
                sd.check_output_settings(device=output_device, channels=1, samplerate=rate, dtype="float32")
            except Exception:  # noqa: BLE001 - PortAudio refuses settings with several types
                return False
            return True

        if both(SAMPLE_RATE):
            return SAMPLE_RATE
        native = float(info["default_samplerate"])
        if not (math.isfinite(native) and MIN_SAMPLE_RATE <= round(native) <= MAX_SAMPLE_RATE):
            raise AudioFormatError(f"audio input {self.device_name!r} runs at {native:g} Hz, outside the "
                                   f"supported range, {RATE_RANGE}")
        if not both(round(native)):
            raise DeviceError(f"audio output {self.output_name!r} cannot run at {SAMPLE_RATE} Hz or at the "
                              f"input's {native:g} Hz; choose another pair (--device, --output-device)")
        return int(round(native))

    # -- real-time thread -------------------------------------------------------------------

    def _callback(self, indata, outdata, frames, time_info, status) -> None:
        out = outdata[:, 0]
        if self._flush_done != self._flush_asked:
            asked = self._flush_asked
            self._speech.read(self._discard)  # the ring holds at most what _discard does
            self._flush_done = asked
        outdata.fill(0.0)  # silence where no speech is queued
        self._speech.read(out)
        self._played.write(out)  # the reference first: never after the microphone it plays over
        self._captured.write(indata[:, 0])

    # -- worker -----------------------------------------------------------------------------

    def play(self, samples: np.ndarray) -> None:
        """Speak mono float32 `samples` at `rate`, replacing what is still playing."""
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        with self._next_lock:
            self._next = samples

    @property
    def speaking(self) -> bool:
        """Speech is waiting to be played or playing."""
        with self._next_lock:
            return self._next is not None or self._queued < self._utterance.size or self._speech.available() > 0

    def _work(self) -> None:
        played = np.zeros(self._played.capacity, np.float32)
        captured = np.zeros(self._captured.capacity, np.float32)
        while not self._stop.is_set():
            self._queue_speech()
            self._forward(played, captured)
            self._stop.wait(_DUPLEX_POLL_S)
        self._forward(played, captured)  # the stream is stopped: what it captured last

    def _queue_speech(self) -> None:
        with self._next_lock:  # with `speaking`: the handover is never seen half done
            if self._next is not None:
                self._utterance, self._queued, self._next = self._next, 0, None
                self._flush_asked += 1  # the callback drops what is queued of the previous one
        if self._flush_done != self._flush_asked:
            return  # anything written now could be dropped by the flush
        if self._queued < self._utterance.size:
            self._queued += self._speech.write(self._utterance[self._queued:])

    def _forward(self, played: np.ndarray, captured: np.ndarray) -> None:
        n = self._captured.available()  # its played block was written before it
        if n:
            self._played.read(played[:n])
            self._captured.read(captured[:n])
            self.session.accept_playback(played[:n], self.rate, block=False)
            self.session.accept_waveform(captured[:n], self.rate, block=False)
        self._report_drops(self._captured)  # the played ring drops the same blocks
