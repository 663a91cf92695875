"""Audio conditioning: file decoding, PCM conversion, resampling, and clear errors."""
from __future__ import annotations

import os
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from test_runtime_fixtures import runtime_package  # noqa: F401

from listenloop.audio import (AudioFile, AudioWarning, StreamResampler, check_sample_rate, condition_pcm, read_audio,
                              read_audio_blocks)
from listenloop.errors import AudioFormatError
from listenloop.protocol import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE


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
    pcm = condition_pcm(stereo)
    np.testing.assert_allclose(pcm.samples, [0.0, 32767 / 32768, -1.0])
    assert pcm.nonfinite == 0
    assert condition_pcm(np.array([128, 255, 0], np.uint8)).samples.tolist() == [0.0, 127 / 128, -1.0]
    assert condition_pcm(np.array([2**30], np.int32)).samples[0] == pytest.approx(0.5)


def test_non_finite_samples_are_counted():
    pcm = condition_pcm(np.array([0.1, np.nan, np.inf, -np.inf], np.float64))
    assert pcm.nonfinite == 3 and pcm.samples.tolist() == pytest.approx([0.1, 0, 0, 0])


def test_channels_first_is_rejected():
    with pytest.raises(AudioFormatError, match="channels, n"):
        condition_pcm(np.zeros((2, 16000), np.float32))


def test_stream_resampler_matches_one_shot():
    x = np.random.default_rng(0).normal(size=48000).astype(np.float32)
    stream = StreamResampler(48000)
    pieces = [stream(x[i:i + 999]) for i in range(0, len(x), 999)] + [stream(np.zeros(0, np.float32), last=True)]
    np.testing.assert_allclose(np.concatenate(pieces), soxr.resample(x, 48000, 16000), atol=1e-6)


# --- streaming files ---------------------------------------------------------------------

@pytest.mark.parametrize("block_seconds", [0.05, 1.0, 10.0])
def test_blocks_join_into_the_one_shot_result(tmp_path, block_seconds):
    path = tmp_path / "a.wav"
    sf.write(path, _tone(2.3, 44100, channels=2), 44100, subtype="FLOAT")
    blocks = list(read_audio_blocks(path, block_seconds=block_seconds))
    assert all(b.dtype == np.float32 and b.ndim == 1 for b in blocks)
    assert len(blocks) >= (2 if block_seconds < 2.3 else 1)
    pcm, _ = sf.read(path, dtype="float32", always_2d=True)
    want = soxr.resample(pcm.mean(axis=1), 44100, 16000)
    np.testing.assert_allclose(np.concatenate(blocks), want, atol=1e-6)
    np.testing.assert_array_equal(read_audio(path), np.concatenate(blocks))


def test_reading_memory_does_not_depend_on_the_length(tmp_path):
    import tracemalloc

    peaks = []
    for seconds in (20, 200):
        path = tmp_path / f"{seconds}.wav"
        rng = np.random.default_rng(0)
        with sf.SoundFile(path, "w", 8000, 2, subtype="PCM_16") as f:  # written in pieces too
            for _ in range(seconds // 10):
                f.write(0.1 * rng.standard_normal((80000, 2)))
        tracemalloc.start()
        total = sum(len(block) for block in read_audio_blocks(path, block_seconds=1.0))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert total == seconds * 16000
    # 200 s decoded whole would be 12.8 MB of float32 at 16 kHz; block by block it is a few blocks.
    assert peaks[1] < 2e6 and peaks[1] < 1.5 * peaks[0] + 2e5, peaks


def test_truncated_wav_is_read_with_one_warning(tmp_path):
    path = tmp_path / "cut.wav"
    sf.write(path, _tone(22.0, 16000), 16000, subtype="PCM_16")
    path.write_bytes(path.read_bytes()[:44 + int(3.1 * 16000) * 2])
    with pytest.warns(AudioWarning, match=r"cut.wav: file is truncated: read 3.1 s of the 22.0 s its header promises"):
        audio = read_audio(path)
    assert len(audio) == int(3.1 * 16000)
    messages = []
    blocks = list(read_audio_blocks(path, block_seconds=0.5, on_warning=messages.append))
    assert sum(map(len, blocks)) == len(audio) and len(messages) == 1 and "\n" not in messages[0]


def test_a_decoder_that_stops_part_way_is_a_warning(tmp_path):
    path = tmp_path / "cut.flac"
    sf.write(path, _tone(22.0, 16000), 16000, format="FLAC")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 3 // 22])
    messages = []
    audio = np.concatenate(list(read_audio_blocks(path, on_warning=messages.append)))
    assert 0 < len(audio) < 22 * 16000
    assert len(messages) == 1 and re.search(r"cut.flac: .*read \d+\.\d s of the 22.0 s its header promises", messages[0])


def test_complete_files_give_no_warning(tmp_path, recwarn):
    formats = [("WAV", "wav"), ("FLAC", "flac"), ("OGG", "ogg")]
    if "MP3" in sf.available_formats():
        formats.append(("MP3", "mp3"))
    for fmt, ext in formats:
        path = tmp_path / f"a.{ext}"
        sf.write(path, _tone(1.3, 22050), 22050, format=fmt)
        read_audio(path)
    assert not [w for w in recwarn if issubclass(w.category, AudioWarning)]


def test_directory_and_special_files(tmp_path):
    with pytest.raises(AudioFormatError, match=r"is a directory, not an audio file$"):
        read_audio(tmp_path)
    if Path("/dev/null").exists():
        with pytest.raises(AudioFormatError, match="not a regular file"):
            read_audio("/dev/null")


@pytest.mark.parametrize("rate", [1, 7, 3999, 384001])
def test_a_header_rate_out_of_range_is_refused_before_reading(tmp_path, rate, monkeypatch):
    path = tmp_path / f"r{rate}.wav"
    sf.write(path, _tone(22.0, 16000), 16000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    struct.pack_into("<II", data, 24, rate, rate * 2)  # sample rate, byte rate
    path.write_bytes(bytes(data))

    def no_reading(*args, **kwargs):
        raise AssertionError("a refused file must not be read")

    monkeypatch.setattr(sf.SoundFile, "read", no_reading)
    with pytest.raises(AudioFormatError, match=rf"r{rate}.wav: sample rate {rate} Hz is outside the supported "
                                                r"range, 4000 to 384000 Hz$"):
        list(read_audio_blocks(path))


@pytest.mark.parametrize("rate", [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE])
def test_the_rate_range_is_inclusive(tmp_path, rate):
    path = tmp_path / "edge.wav"
    sf.write(path, _tone(0.5, rate), rate, subtype="PCM_16")
    assert abs(len(read_audio(path)) - 8000) <= 1


def test_random_bytes_named_mp3_are_one_error_and_no_decoder_noise(tmp_path, capfd):
    path = tmp_path / "noise.mp3"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    with pytest.raises(AudioFormatError, match=r"noise.mp3: cannot decode audio") as info:
        read_audio(path)
    assert "\n" not in str(info.value)
    os.write(2, b"stderr is back\n")  # the C-level stderr was restored
    assert capfd.readouterr().err == "stderr is back\n"


def test_nan_in_a_float_file_is_an_error(tmp_path):
    path = tmp_path / "nan.wav"
    pcm = _tone(1.0, 16000).astype(np.float32)
    pcm[8000:8003] = np.nan
    sf.write(path, pcm, 16000, subtype="FLOAT")
    with pytest.raises(AudioFormatError, match=r"nan.wav: 3 samples are NaN or infinite \(the first at 0.5 s\)"):
        read_audio(path)


def test_every_nan_of_the_file_is_counted_whatever_the_block(tmp_path):
    path = tmp_path / "nan.wav"
    pcm = _tone(1.0, 16000).astype(np.float32)
    pcm[[100, 9000]] = np.nan, np.inf  # in different 0.1 s blocks
    sf.write(path, pcm, 16000, subtype="FLOAT")
    with pytest.raises(AudioFormatError, match=r"nan.wav: 2 samples are NaN or infinite \(the first at 0.0 s\)"):
        list(AudioFile(path, block_seconds=0.1))


def test_a_wav_header_with_an_odd_sample_width_is_refused(tmp_path):
    path = tmp_path / "bits7.wav"
    sf.write(path, _tone(1.0, 16000), 16000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    fmt = data.find(b"fmt ")
    data[fmt + 22:fmt + 24] = (7).to_bytes(2, "little")  # bits per sample
    path.write_bytes(bytes(data))
    with pytest.raises(AudioFormatError) as info:
        read_audio(path)
    assert str(info.value) == f"{path}: WAV header says 7 bits per sample; PCM WAV files have 8, 16, 24, 32"


def test_an_mp3_with_an_id3_tag_is_not_called_truncated(tmp_path, recwarn):
    if "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile has no MP3")
    plain = tmp_path / "plain.mp3"
    sf.write(plain, _tone(2.0, 44100), 44100, format="MP3")
    # Without a Xing header (many encoders write none) libsndfile estimates the length from
    # the file's size, and an ID3v2 tag (cover art, say) inflates that estimate.
    data = plain.read_bytes().replace(b"Xing", b"\x00" * 4, 1)
    picture = b"\x00image/jpeg\x00\x03\x00" + bytes(100_000)
    frame = b"APIC" + struct.pack(">I", len(picture)) + b"\x00\x00" + picture
    syncsafe = bytes((len(frame) >> shift) & 0x7F for shift in (21, 14, 7, 0))
    tagged = tmp_path / "tagged.mp3"
    tagged.write_bytes(b"ID3\x03\x00\x00" + syncsafe + frame + data)
    with sf.SoundFile(tagged) as f:
        assert f.frames > 2 * len(f.read())  # the estimate this test is about
    assert len(read_audio(tagged)) > 0
    assert not [w for w in recwarn if issubclass(w.category, AudioWarning)]


def test_many_channels_are_read_in_bounded_blocks(tmp_path):
    path = tmp_path / "wide.wav"
    sf.write(path, np.tile(_tone(0.2, 16000)[:, None], (1, 100)) / 2, 16000, subtype="PCM_16", format="WAV")
    np.testing.assert_allclose(read_audio(path), _tone(0.2, 16000) / 2, atol=1e-4)


def test_float_files_are_not_clipped_by_the_reader(tmp_path):
    path = tmp_path / "loud.wav"
    sf.write(path, 1000 * _tone(0.5, 16000), 16000, subtype="FLOAT")
    assert np.abs(read_audio(path)).max() == pytest.approx(1000 * 0.5, rel=1e-3)  # the session clips


# --- PCM conditioning ----------------------------------------------------------------------

@pytest.mark.parametrize("rate,ok", [
    (MIN_SAMPLE_RATE, True), (MAX_SAMPLE_RATE, True), (16000.0, True), (np.int64(44100), True),
    (3999, False), (384001, False), (1, False), (0, False), (-16000, False), (44100.5, False),
    (float("nan"), False), (float("inf"), False), (2**80, False), (True, False), ("16000", False), (None, False),
])
def test_check_sample_rate(rate, ok):
    if ok:
        assert check_sample_rate(rate) == int(rate)
    else:
        with pytest.raises(AudioFormatError, match="sample_rate") as info:
            check_sample_rate(rate)
        assert "\n" not in str(info.value)


def test_clipping_is_counted_and_never_rescaled():
    quiet = condition_pcm(np.array([0.5, -0.25, 0.0], np.float32))
    assert quiet.clipped == 0 and quiet.peak == 0.5 and not quiet.int_pcm_as_float
    loud = condition_pcm(np.array([0.5, 1.5, -3.0, 0.1], np.float32))
    assert loud.clipped == 2 and loud.peak == 3.0 and loud.samples.tolist() == [0.5, 1.0, -1.0, pytest.approx(0.1)]
    assert not loud.int_pcm_as_float and "[-1, 1]" in loud.clip_reason


def test_int16_pcm_passed_as_float_is_named():
    pcm = (_tone(1.0, 16000) * 65534).astype(np.int16)  # full scale
    as_float = condition_pcm(pcm.astype(np.float32))  # the classic mistake: no / 32768
    assert as_float.int_pcm_as_float and as_float.peak == 32767.0
    assert as_float.clip_reason == "this looks like int16 PCM stored as float; divide by 32768"
    assert np.abs(as_float.samples).max() == 1.0  # clipped, not scaled
    ok = condition_pcm(pcm)
    assert ok.clipped == 0 and np.abs(ok.samples).max() == pytest.approx(32767 / 32768)
    # float audio around +-1000 with fractions: most samples are at or above 1 in magnitude
    assert condition_pcm(1000.3 * _tone(1.0, 16000)).int_pcm_as_float
    # a few overs in ordinary float audio, or a magnitude no integer PCM has, are plain clipping
    assert not condition_pcm(np.r_[0.1 * _tone(1.0, 16000), 2.5]).int_pcm_as_float
    huge = condition_pcm(1e18 * _tone(0.1, 16000))
    assert huge.clipped and not huge.int_pcm_as_float and huge.peak == pytest.approx(5e17, rel=1e-3)


def test_conditioning_survives_extreme_floats():
    pcm = np.array([[1e300, 1e300], [-1e308, -1e308], [np.nan, 0.0], [np.inf, -np.inf], [5e-324, 0.0]], np.float64)
    c = condition_pcm(pcm)
    assert c.nonfinite == 2 and c.clipped == 2 and c.samples.tolist() == [1.0, -1.0, 0.0, 0.0, 0.0]
    assert np.isfinite(c.peak)
    wide = np.full((10, 2), np.finfo(np.float32).max, np.float32)
    assert condition_pcm(wide).samples.tolist() == [1.0] * 10  # the float32 average does not overflow


def test_microphone_rate_out_of_range_is_refused(runtime_package, monkeypatch):  # noqa: F811
    import types

    import listenloop

    fake = types.ModuleType("sounddevice")
    fake.query_devices = lambda device=None, kind=None: {"name": "odd mic", "default_samplerate": 2000.0,
                                                         "max_input_channels": 1}

    def check_input_settings(**kwargs):
        raise ValueError("Invalid sample rate")

    fake.check_input_settings = check_input_settings
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    with listenloop.Runtime(runtime_package) as rt, rt.session() as s:
        with pytest.raises(AudioFormatError, match=r"'odd mic' runs at 2000 Hz, outside the supported range"):
            s.listen()
