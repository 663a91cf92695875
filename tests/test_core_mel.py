"""listenloop._core log-mel against the NumPy reference in listenloop.features (<= 1e-4)."""
import numpy as np
import pytest

from listenloop import AudioFormatError, features
from listenloop._core import FRAMES_PER_CHUNK, LogMel, StreamingMel, build_info, mel_filterbank, normalize_log_mel

TOL = 1e-4
# Every kernel this build and CPU run: neon on arm64; sse2, and avx2 where the CPU has it, on x86-64.
KERNELS = ["neon"] if build_info()["mel_kernel"] == "neon" else ["sse2"] + (["avx2"] if build_info()["mel_kernel"] == "avx2" else [])
rng = np.random.default_rng(0)
t = np.arange(16000 * 2) / 16000
SIGNALS = {
    "random": (0.3 * rng.standard_normal(32000)).astype(np.float32),
    "sine": (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
    "silence": np.zeros(32000, np.float32),
    "loud_clipped": np.clip(20 * rng.standard_normal(32000), -1, 1).astype(np.float32),
    "odd_length": (0.1 * rng.standard_normal(16000 + 123)).astype(np.float32),
    "short": (0.1 * rng.standard_normal(170)).astype(np.float32),
}


def test_filterbank_matches_the_reference():
    fb = mel_filterbank()
    assert fb.shape == (128, 201) and fb.dtype == np.float32
    np.testing.assert_array_equal(fb, features.mel_filterbank())
    assert np.count_nonzero(fb) == np.count_nonzero(features.mel_filterbank())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", SIGNALS)
def test_whole_array_log_mel_matches_the_reference(name, kernel):
    x = SIGNALS[name]
    mel = LogMel(kernel=kernel)
    assert mel.kernel == kernel
    got = mel.compute(x)
    want = features.log_mel(x)
    assert got.shape == want.shape == (128, len(x) // 160) and got.dtype == np.float32
    assert np.abs(got - want).max() <= TOL


def test_silence_is_the_constant_floor():
    np.testing.assert_array_equal(LogMel().compute(np.zeros(6400, np.float32)), np.full((128, 40), -1.5, np.float32))
    np.testing.assert_array_equal(StreamingMel()(np.zeros(6400, np.float32)), np.full((128, 40), -1.5, np.float32))


@pytest.mark.parametrize("kernel", KERNELS)
def test_streaming_matches_the_reference_across_chunks_and_reset(kernel):
    stream = np.concatenate([SIGNALS["random"], SIGNALS["silence"][:6400], SIGNALS["loud_clipped"], SIGNALS["sine"]])
    chunks = stream[: len(stream) // 6400 * 6400].reshape(-1, 6400)
    ours, ref = StreamingMel(kernel=kernel), features.StreamingLogMel()
    for i, chunk in enumerate(chunks):
        if i == 7:  # a context reset mid-stream: no history, running max restarts
            ours.reset()
            ref.reset()
        got, want = ours(chunk), ref(chunk)
        assert got.shape == (128, 40)
        assert np.abs(got - want).max() <= TOL, f"chunk {i}"
        assert ours.peak == pytest.approx(ref._peak, abs=1e-5)


def test_streaming_differs_from_whole_array_only_in_each_chunks_last_frame():
    x = SIGNALS["random"][:6400 * 2]  # noise: nothing is clamped, so the peaks do not matter
    whole = features.log_mel(x)
    mel = StreamingMel()
    first, second = mel(x[:6400]), mel(x[6400:])
    assert np.abs(first[:, :39] - whole[:, :39]).max() <= TOL
    assert np.abs(second[:, :39] - whole[:, 40:79]).max() <= TOL  # real history, not reflection
    assert np.abs(first[:, 39] - whole[:, 39]).max() > 1e-3  # right-edge reflection


def test_wrong_chunk_shape_is_a_clear_error():
    with pytest.raises(AudioFormatError, match="6400 samples"):
        StreamingMel()(np.zeros(6000, np.float32))
    with pytest.raises(AudioFormatError):
        LogMel().compute(np.zeros((2, 400), np.float32))
    with pytest.raises(ValueError):
        StreamingMel(chunk_samples=1000)  # not a multiple of the hop
    with pytest.raises(ValueError, match="auto, sse2 or avx2"):
        LogMel(kernel="avx512")


def test_normalize_log_mel_is_the_clamp_and_rescale_in_place():
    raw = np.array([[-12.0, -5.0], [-1.5, 0.25]], np.float32)
    out = raw.copy()
    assert normalize_log_mel(out, 0.25) is None
    want = (np.maximum(raw, np.float32(0.25 - 8.0)) + np.float32(4)) / np.float32(4)
    np.testing.assert_array_equal(out, want)
    silence = np.full((128, FRAMES_PER_CHUNK), -10.0, np.float32)
    normalize_log_mel(silence, -10.0)
    np.testing.assert_array_equal(silence, np.full((128, 40), -1.5, np.float32))


def test_normalize_log_mel_refuses_what_it_cannot_change_in_place():
    with pytest.raises(AudioFormatError, match="float32"):
        normalize_log_mel(np.zeros((128, 40), np.float64), 0.0)
    with pytest.raises(AudioFormatError, match="contiguous"):
        normalize_log_mel(np.zeros((128, 80), np.float32)[:, ::2], 0.0)
    with pytest.raises(AudioFormatError, match="contiguous"):
        normalize_log_mel(np.zeros((40, 128), np.float32).T, 0.0)
    frozen = np.zeros((128, 40), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(AudioFormatError, match="writable"):
        normalize_log_mel(frozen, 0.0)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("amplitude", [1e18, 1e30, float(np.finfo(np.float32).max)])
def test_huge_finite_samples_give_finite_features(kernel, amplitude):
    """The float power spectrum overflows past ~1e17 (and the FFT near FLT_MAX): the mel power is
    clamped to FLT_MAX, so the features and the running peak stay finite."""
    x = np.full(6400, amplitude, np.float32)
    x[::3] *= -1
    whole = LogMel(kernel=kernel).compute(x)
    assert np.isfinite(whole).all()
    stream = StreamingMel(kernel=kernel)
    loud = stream(x)
    assert np.isfinite(loud).all() and np.isfinite(stream.peak)
    assert stream.peak <= np.log10(np.finfo(np.float32).max) + 1e-3
    quiet = stream(np.zeros(6400, np.float32))  # normalised against the finite peak
    assert np.isfinite(quiet).all()
    # frames 2.. no longer reach the loud chunk's history: the floor 80 dB below the peak
    np.testing.assert_allclose(quiet[:, 2:], (stream.peak - 8 + 4) / 4, rtol=1e-6)
