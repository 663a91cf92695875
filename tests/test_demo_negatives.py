"""The demo model's negatives: its own replies heard back through a room (never a target), and
real recordings split by voice, language and track so that the real-audio check hears none
that training heard."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # demo/ is a top-level folder, not installed

from demo import negatives, realworld, speech, streams, tasks  # noqa: E402

needs_synth = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("flite") is None,
    reason="espeak-ng or flite is not installed (apt-get install espeak-ng flite)")
needs_recordings = pytest.mark.skipif(
    not all((realworld.CACHE_DIR / "packages" / s.package).is_dir() for s in realworld.SOURCES),
    reason="the real recordings are not unpacked (python -m demo.realworld --fetch)")


@pytest.fixture(autouse=True)
def private_speech_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(speech, "CACHE_DIR", tmp_path / "speech")


@needs_synth
def test_own_replies_are_heard_but_never_a_target():
    replies = {r.text for r in tasks.REPLIES}
    for seed in range(4):
        stream = negatives.make_own_stream(seed)
        again = negatives.make_own_stream(seed)
        assert np.array_equal(stream.audio, again.audio) and stream.segments == again.segments
        own = [s for s in stream.segments if s.text in replies]
        assert own and all(s.reply is None for s in own)
        targets = {int(k) for k in np.flatnonzero(stream.labels() >= 0)}
        expected = {s.reply_chunk for s in stream.segments if s.reply is not None}
        assert targets == expected  # only the user's commands and sounds are answered
        assert np.abs(stream.audio).max() <= 1.0 and np.sqrt(np.mean(stream.audio ** 2)) > 1e-4


def test_held_out_groups_are_a_stable_quarter():
    groups = [f"pack:{i}" for i in range(400)]
    held = [g for g in groups if realworld.held_out(g)]
    assert 60 < len(held) < 140
    assert held == [g for g in groups if realworld.held_out(g)]


@needs_recordings
def test_real_check_hears_no_voice_language_or_track_that_training_heard():
    for kind in realworld.KINDS:
        train = {g for _, g in realworld.catalogue(kind, "train")}
        held = {g for _, g in realworld.catalogue(kind, "eval")}
        assert train and held and not train & held
    assert not any(realworld._ALERT_LIKE.search(p) for p, _ in realworld.catalogue("sounds", "train"))


@needs_recordings
@needs_synth
def test_real_streams():
    check = negatives.make_real_stream(5, "eval")
    assert check.segments == [] and (check.labels() < 0).all()  # every reply on it is a false one
    assert np.array_equal(check.audio, negatives.make_real_stream(5, "eval").audio)
    level = 20 * np.log10(np.sqrt(np.mean(check.audio.astype(np.float64) ** 2)))
    assert negatives.EVAL_LEVEL_DB[0] - 1 < level < negatives.EVAL_LEVEL_DB[1] + 1
    with_items = [s for s in (negatives.make_real_stream(seed, "train") for seed in range(12)) if s.segments]
    assert with_items  # some training streams carry commands and sounds over the real audio
    for stream in with_items:
        expected = {seg.reply_chunk for seg in stream.segments if seg.reply is not None}
        assert {int(k) for k in np.flatnonzero(stream.labels() >= 0)} == expected
    assert all(len(s.audio) % streams.CHUNK_SAMPLES == 0 for s in with_items)
