"""Property tests of the audio input: any array, any sample rate, any damaged WAV header.

Whatever comes in, Session.accept_waveform and the file reader either refuse it with one
AudioFormatError (a listenloop.Error) or run it correctly: the stream ends with Finished, and
there is one decision per started 0.4 s chunk of the 16 kHz audio the session took. Input
that is valid (a supported dtype and layout, a whole rate from 4 kHz to 384 kHz) is never
refused. Examples are small and bounded so the file runs in seconds.
"""
from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import soundfile as sf
import soxr
from hypothesis import HealthCheck, given, settings
from hypothesis import event as label
from hypothesis import strategies as st
from test_runtime_fixtures import runtime_package  # noqa: F401

import listenloop
from listenloop.audio import read_audio_blocks
from listenloop.protocol import CHUNK_SAMPLES, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, SAMPLE_RATE

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SUPPORTED = {np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.uint8)}
DTYPES = sorted(SUPPORTED, key=str) + [np.dtype(t) for t in (bool, np.complex64, object, np.int64, np.uint16)]


@pytest.fixture(scope="module")
def runtime(runtime_package):  # noqa: F811
    rt = listenloop.Runtime(runtime_package, speak_bias=-1e4)
    yield rt
    rt.close()


# --- arrays --------------------------------------------------------------------------------

SPECIALS = [np.nan, np.inf, -np.inf, 1e18, -1e18, 1e300, 3.4e38, 5e-324, 1e-40, 32767.0, -32768.0, 1.0, -1.0, 0.0]


@st.composite
def pcm_arrays(draw):
    # About half the draws are valid input, so both outcomes are well covered.
    dtype = draw(st.one_of(st.sampled_from(sorted(SUPPORTED, key=str)), st.sampled_from(DTYPES)))
    layout = draw(st.sampled_from(["1-d", "1-d", "n,ch", "n,ch", "ch,n", "0-d", "3-d"]))
    lengths = st.sampled_from([0, 1, 5, 160, 6399, 6400, 6401, 20_000]) | st.integers(0, 20_000)
    n = draw(lengths if layout in ("1-d", "n,ch") else st.integers(0, 300))
    ch = draw(st.integers(1, 4) if layout != "ch,n" else st.integers(1, 80))
    shape = {"0-d": (), "1-d": (n,), "n,ch": (n, ch), "ch,n": (ch, n), "3-d": (2, n % 7, 3)}[layout]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.0, 1e-3, 0.5, 1.0, 3.0, 1000.0, 32768.0, 1e18]))
    values = np.asarray(rng.standard_normal(shape) * scale)
    if values.size and draw(st.booleans()):
        flat = values.reshape(-1)
        for value in draw(st.lists(st.sampled_from(SPECIALS), min_size=1, max_size=5)):
            flat[rng.integers(flat.size)] = value
    if dtype == object:
        return values.astype(object)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        with np.errstate(invalid="ignore", over="ignore"):
            return np.clip(np.nan_to_num(values * info.max), info.min, info.max).astype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(dtype)


VALID_RATES = [4000, 8000, 16000, 22050, 44100, 48000, 384000, 16000.0, 4000.0, np.int32(48000),
               np.float32(22050), np.uint16(11025)]
RATES = st.one_of(
    st.sampled_from(VALID_RATES),
    st.sampled_from(VALID_RATES),
    st.integers(MIN_SAMPLE_RATE, MAX_SAMPLE_RATE),
    st.sampled_from([0, -16000, float("nan"), float("inf"), -float("inf"), 1, 3999, 384001, 44100.5, 2**70,
                     "16000", None, True, np.bool_(True), 16000j]),
    st.integers(-10, 500_000),
    st.floats(allow_nan=True, allow_infinity=True),
)


def _valid_rate(rate) -> bool:
    if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, (int, float, np.integer, np.floating)):
        return False
    if isinstance(rate, (float, np.floating)) and not (math.isfinite(rate) and float(rate).is_integer()):
        return False
    return MIN_SAMPLE_RATE <= int(rate) <= MAX_SAMPLE_RATE


def _valid_layout(pcm: np.ndarray) -> bool:
    if pcm.dtype not in SUPPORTED:
        return False
    if pcm.ndim == 1:
        return True
    return pcm.ndim == 2 and pcm.shape[1] > 0 and not (pcm.shape[1] > 64 and pcm.shape[0] <= 64)


def _check_run(session, samples_16k: int) -> list:
    session.finish(timeout=60)
    events = list(session.events(timeout=5))
    assert events and events[-1].kind == "Finished"
    decisions = [e for e in events if e.kind == "Decision"]
    assert len(decisions) == math.ceil(samples_16k / CHUNK_SAMPLES) == events[-1].chunks
    for event in events:
        json.dumps(event.to_dict())  # every event survives the JSON form
    return events


@SETTINGS
@given(pcm=pcm_arrays(), rate=RATES)
def test_any_array_at_any_rate_is_refused_or_run_correctly(runtime, pcm, rate):
    valid = _valid_layout(np.asarray(pcm)) and _valid_rate(rate)
    with runtime.session() as session:
        try:
            session.accept_waveform(pcm, rate)
        except listenloop.Error:
            assert not valid, f"valid input refused: {pcm.dtype} {pcm.shape} at {rate!r}"
            label("refused")
            _check_run(session, 0)  # the session survives a refused call
            return
        assert valid, f"invalid input accepted: {pcm.dtype} {pcm.shape} at {rate!r}"
        frames = len(pcm)
        expected = frames if int(rate) == SAMPLE_RATE else len(soxr.resample(np.zeros(frames, np.float32), int(rate),
                                                                             SAMPLE_RATE)) if frames else 0
        events = _check_run(session, expected)
    clipped = [e for e in events if e.kind == "AudioClipped"]
    assert len(clipped) <= 1  # at most one per call
    label(f"ran, {len([e for e in events if e.kind == 'Decision'])} decisions, {len(clipped)} clipped")
    for event in clipped:
        assert event.samples > 0 and event.peak > 1 and math.isfinite(event.peak)
    for event in events:
        if event.kind == "Decision":
            assert math.isfinite(event.p_speak)


# --- WAV files with damaged headers --------------------------------------------------------

def _chunk_offsets(data: bytes) -> dict:
    """Offsets of the RIFF chunks' bodies: {b"fmt ": offset, b"data": offset, ...}."""
    offsets, pos = {}, 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        offsets[cid] = pos + 8
        if cid == b"data":
            break
        pos += 8 + size + (size & 1)
    return offsets


U32 = st.one_of(st.sampled_from([0, 1, 7, 3999, 4000, 16000, 384000, 384001, 2**31, 2**32 - 1]),
                st.integers(0, 2**32 - 1))
U16 = st.one_of(st.sampled_from([0, 1, 2, 3, 8, 64, 1024, 65535]), st.integers(0, 2**16 - 1))
MUTATIONS = st.lists(st.one_of(
    st.tuples(st.just("rate"), U32),
    st.tuples(st.just("channels"), U16),
    st.tuples(st.just("format"), st.sampled_from([0, 1, 2, 3, 6, 7, 0x11, 0x55, 0xFFFE, 0x1234])),
    st.tuples(st.just("block_align"), U16),
    st.tuples(st.just("bits"), U16),
    st.tuples(st.just("data_size"), U32),
    st.tuples(st.just("riff_size"), U32),
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
), min_size=0, max_size=3)


@st.composite
def damaged_wavs(draw):
    subtype = draw(st.sampled_from(["PCM_16", "PCM_24", "PCM_U8", "FLOAT", "DOUBLE", "PCM_32"]))
    channels = draw(st.integers(1, 3))
    rate = draw(st.sampled_from([4000, 8000, 16000, 44100, 48000]))
    seconds = draw(st.floats(0.0, 1.0))
    amplitude = draw(st.sampled_from([0.3, 1.0, 900.0]) if subtype in ("FLOAT", "DOUBLE") else st.just(0.3))
    return subtype, channels, rate, seconds, amplitude, draw(MUTATIONS)


def _write_damaged(path, subtype, channels, rate, seconds, amplitude, mutations):
    n = int(seconds * rate)
    t = np.arange(n) / rate
    pcm = np.stack([amplitude * np.sin(2 * np.pi * 330 * (c + 1) * t) for c in range(channels)], axis=1)
    sf.write(path, pcm, rate, subtype=subtype, format="WAV")
    data = bytearray(path.read_bytes())
    at = _chunk_offsets(bytes(data))
    fmt, body = at[b"fmt "], at[b"data"]
    for field, value in mutations:
        if field == "rate":
            struct.pack_into("<I", data, fmt + 4, value)
        elif field == "channels":
            struct.pack_into("<H", data, fmt + 2, value)
        elif field == "format":
            struct.pack_into("<H", data, fmt, value)
        elif field == "block_align":
            struct.pack_into("<H", data, fmt + 12, value)
        elif field == "bits":
            struct.pack_into("<H", data, fmt + 14, value)
        elif field == "data_size":
            struct.pack_into("<I", data, body - 4, value)
        elif field == "riff_size":
            struct.pack_into("<I", data, 4, value)
        elif field == "truncate":
            del data[int(body + value * (len(data) - body)):]
    path.write_bytes(bytes(data))


@SETTINGS
@given(wav=damaged_wavs())
def test_a_damaged_wav_is_refused_or_run_correctly(runtime, tmp_path_factory, wav):
    path = tmp_path_factory.mktemp("wav") / "damaged.wav"
    _write_damaged(path, *wav)
    warnings = []
    with runtime.session() as session:
        fed = 0
        try:
            for block in read_audio_blocks(path, block_seconds=0.25, on_warning=warnings.append):
                assert block.dtype == np.float32 and block.ndim == 1
                session.accept_waveform(block, SAMPLE_RATE)
                fed += len(block)
        except listenloop.AudioFormatError as exc:
            assert "\n" not in str(exc) and str(exc).startswith(str(path))
            label(f"refused after {fed} samples: {str(exc)[len(str(path)) + 2:][:30]}")
        else:
            label(f"ran {fed} samples" + (", with a warning" if warnings else ""))
        _check_run(session, fed)
    assert len(warnings) <= 1 and all("\n" not in w for w in warnings)
