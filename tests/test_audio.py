"""Audio conditioning: file decoding, PCM conversion, resampling, and clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import soxr

from listenloop.audio import StreamResampler, read_audio, to_float32_mono
from listenloop.errors import AudioFormatError


def _tone(seconds, rate, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.5 * np.sin(2 * np.pi * 440 * t)
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


@pytest.mark.parametrize("fmt,subtype,rate,channels", [
    ("WAV", "PCM_16", 44100, 2), ("WAV", "FLOAT", 16000, 1), ("FLAC", "PCM_24", 48000, 1),
    ("OGG", "VORBIS", 22050, 2),
])
def test_read_audio_formats(tmp_path, fmt, subtype, rate, channels):
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, _tone(1.0, rate, channels), rate, format=fmt, subtype=subtype)
    audio = read_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 16000) <= 1
    expected = _tone(1.0, 16000)
    tol = 0.05 if fmt == "OGG" else 0.01
    assert np.sqrt(np.mean((audio[1000:15000] - expected[1000:15000]) ** 2)) < tol


def test_read_mp3_when_libsndfile_supports_it(tmp_path):
    if "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile has no MP3")
    path = tmp_path / "a.mp3"
    sf.write(path, _tone(1.0, 44100), 44100, format="MP3")
    assert abs(len(read_audio(path)) - 16000) < 1200  # mp3 encoder delay/padding


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioFormatError, match="empty"):
        read_audio(path)


def test_header_only_wav(tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, _tone(0.5, 16000), 16000)
    path.write_bytes(path.read_bytes()[:44])
    with pytest.raises(AudioFormatError, match="no audio samples|cannot decode"):
        read_audio(path)


def test_truncated_header(tmp_path):
    path = tmp_path / "cut.wav"
    sf.write(path, _tone(0.5, 16000), 16000)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(AudioFormatError, match="cannot decode"):
        read_audio(path)


def test_not_audio(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio at all, just text " * 20)
    with pytest.raises(AudioFormatError, match="cannot decode"):
        read_audio(path)


def test_missing_file(tmp_path):
    with pytest.raises(AudioFormatError, match="no such file"):
        read_audio(tmp_path / "nope.wav")


def test_int_pcm_scaling_and_downmix():
    stereo = np.array([[16384, -16384], [32767, 32767], [-32768, -32768]], np.int16)
    mono, bad = to_float32_mono(stereo)
    np.testing.assert_allclose(mono, [0.0, 32767 / 32768, -1.0])
    assert bad == 0
    assert to_float32_mono(np.array([128, 255, 0], np.uint8))[0].tolist() == [0.0, 127 / 128, -1.0]
    assert to_float32_mono(np.array([2**30], np.int32))[0][0] == pytest.approx(0.5)


def test_non_finite_samples_are_counted():
    mono, bad = to_float32_mono(np.array([0.1, np.nan, np.inf, -np.inf], np.float64))
    assert bad == 3 and mono.tolist() == pytest.approx([0.1, 0, 0, 0])


def test_channels_first_is_rejected():
    with pytest.raises(AudioFormatError, match="channels, n"):
        to_float32_mono(np.zeros((2, 16000), np.float32))


def test_stream_resampler_matches_one_shot():
    x = np.random.default_rng(0).normal(size=48000).astype(np.float32)
    stream = StreamResampler(48000)
    pieces = [stream(x[i:i + 999]) for i in range(0, len(x), 999)] + [stream(np.zeros(0, np.float32), last=True)]
    np.testing.assert_allclose(np.concatenate(pieces), soxr.resample(x, 48000, 16000), atol=1e-6)
