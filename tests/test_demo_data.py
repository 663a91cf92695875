"""The demo model's synthetic data: reproducible, correctly labelled, sane levels."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # demo/ is a top-level folder, not installed

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("flite") is None,
    reason="espeak-ng or flite is not installed (apt-get install espeak-ng flite); "
    "they are needed only to generate the demo model's training data"
)

from demo import augment, backgrounds, dataset, speech, streams, tasks  # noqa: E402
from demo.sounds import SOUND_EVENTS  # noqa: E402
from listenloop.features import StreamingLogMel  # noqa: E402

CHUNK = streams.CHUNK_SAMPLES


@pytest.fixture(autouse=True)
def private_speech_cache(tmp_path, monkeypatch):
    """Each test renders into its own cache, so cached and fresh renders are both exercised."""
    monkeypatch.setattr(speech, "CACHE_DIR", tmp_path / "speech")


def _same_stream(a: streams.Stream, b: streams.Stream) -> bool:
    return np.array_equal(a.audio, b.audio) and a.segments == b.segments


def test_a_seed_gives_the_same_stream_every_time():
    first = streams.make_stream(7, "train")  # renders speech into an empty cache
    again = streams.make_stream(7, "train")  # reads it back
    assert _same_stream(first, again)
    assert not _same_stream(first, streams.make_stream(8, "train"))
    assert not np.array_equal(first.audio[:CHUNK], streams.make_stream(7, "eval").audio[:CHUNK])


def test_reply_goes_to_the_first_chunk_boundary_at_or_after_the_end():
    assert streams.reply_chunk(1) == 0
    assert streams.reply_chunk(CHUNK) == 0  # ends exactly on boundary 1: answered after chunk 0
    assert streams.reply_chunk(CHUNK + 1) == 1
    assert streams.reply_chunk(5 * CHUNK - 100) == 4
    with pytest.raises(ValueError):
        streams.reply_chunk(0)


def test_a_placed_item_is_labelled_on_its_end_chunk_only():
    rng = np.random.default_rng(0)
    item = streams.render_item(rng, "event", "doorbell", "train")
    start = 3 * CHUNK + 1234
    stream = streams.mix_stream(rng, 40, [(item, start)], "train", streams.TRAIN_SETTINGS)
    labels = stream.labels()
    expected_chunk = (start + len(item.audio) - 1) // CHUNK
    assert labels[expected_chunk] == tasks.REPLY_INDEX[tasks.EVENT_REPLIES["doorbell"]]
    assert np.count_nonzero(labels != streams.SILENT) == 1
    # the sound is really there: the labelled chunk is louder than the quiet lead-in
    lead = stream.audio[:3 * CHUNK]
    last = stream.audio[expected_chunk * CHUNK:(expected_chunk + 1) * CHUNK]
    assert np.sqrt(np.mean(last**2)) > 2 * np.sqrt(np.mean(lead**2))


def test_content_labels_mark_the_chunks_an_item_covers():
    rng = np.random.default_rng(1)
    item = streams.render_item(rng, "command", "lights_on", "train", text="turn on the lights")
    start = 5 * CHUNK
    stream = streams.mix_stream(rng, 30, [(item, start)], "train", streams.TRAIN_SETTINGS)
    content = stream.content()
    covered = np.flatnonzero(content == tasks.CONTENT_INDEX["lights_on"])
    assert covered[0] == 5 and np.all(np.diff(covered) == 1)  # one contiguous run from the start chunk
    last_full = (start + len(item.audio)) // CHUNK - 1
    assert covered[-1] >= last_full
    assert np.all(content[:5] == tasks.CONTENT_INDEX["background"])
    assert np.all(content[covered[-1] + 1:] == tasks.CONTENT_INDEX["background"])


@pytest.mark.parametrize("split", ["train", "eval"])
def test_streams_have_documented_length_levels_labels_and_quiet_stretches(split):
    settings = streams.SETTINGS[split]
    replies_seen = 0
    for seed in range(6):
        s = streams.make_stream(seed, split)
        assert s.audio.dtype == np.float32 and len(s.audio) % CHUNK == 0
        assert settings.min_chunks <= s.n_chunks <= settings.max_chunks
        assert np.isfinite(s.audio).all() and np.abs(s.audio).max() <= 1.0
        labels = s.labels()
        positives = [g for g in s.segments if g.reply is not None]
        assert np.count_nonzero(labels != streams.SILENT) == len(positives)
        for g in positives:
            k = g.reply_chunk
            assert k * CHUNK < g.end <= (k + 1) * CHUNK
            assert labels[k] == tasks.REPLY_INDEX[g.reply]
        replies_seen += len(positives)
        if s.segments:  # quiet lead-in, quiet gaps between items, quiet tail
            assert s.segments[0].start >= settings.lead_quiet_s[0] * 16000 - 1
            for a, b in zip(s.segments, s.segments[1:]):
                assert b.start - a.end >= settings.gap_s[0] * 16000 - 1
            assert len(s.audio) - s.segments[-1].end >= settings.min_tail_s * 16000 - 1
        for g in s.segments:
            if g.kind == "command":
                command = next(c for c in tasks.COMMANDS if c.name == g.name)
                assert g.text in command.phrases
            if g.kind == "distractor":
                assert g.text in tasks.distractors(split) and g.reply is None
    assert replies_seen > 0


@pytest.mark.parametrize("name", sorted(SOUND_EVENTS))
def test_every_sound_event_renders_with_sane_levels(name):
    for seed in range(3):
        x = SOUND_EVENTS[name](np.random.default_rng(seed))
        assert x.dtype == np.float32 and np.isfinite(x).all()
        assert abs(float(np.abs(x).max()) - 1.0) < 1e-5
        assert 0.3 * 16000 <= len(x) <= 8.0 * 16000
        assert np.sqrt(np.mean(x**2)) > 0.02  # audible, not a lone click (glass is peaky)
        assert np.abs(x[-1600:]).max() > 1e-3, "the array must end where the sound ends"
    a, b = (SOUND_EVENTS[name](np.random.default_rng(s)) for s in (0, 1))
    assert len(a) != len(b) or not np.array_equal(a, b), "parameters must be randomised"


def test_backgrounds_are_finite_at_unit_rms():
    rng = np.random.default_rng(1)
    beds = {name: gen(rng, 16000) for name, gen in backgrounds.NOISE_BACKGROUNDS.items()}
    beds["babble"] = backgrounds.babble(rng, 16000 * 3, tasks.TRAIN_DISTRACTORS, "train")
    for name, bed in beds.items():
        assert np.isfinite(bed).all(), name
        assert abs(np.sqrt(np.mean(bed.astype(np.float64) ** 2)) - 1.0) < 1e-3, name


def test_augmentations_keep_audio_usable():
    rng = np.random.default_rng(2)
    x = (0.5 * np.sin(np.arange(16000) * 0.05)).astype(np.float32)
    assert np.abs(augment.clip(x, 12.0)).max() <= 1.0
    assert len(augment.resample_artefacts(x, 8000)) == len(x)
    wet = augment.reverb(rng, x, rt60_s=0.5, wet=0.4)
    assert len(wet) == len(x) + 8000 and np.isfinite(wet).all()
    noisy = augment.add_noise(x, rng.standard_normal(len(x)).astype(np.float32), snr_db=10.0)
    noise = noisy - x
    assert abs(20 * np.log10(np.sqrt(np.mean(x**2)) / np.sqrt(np.mean(noise**2))) - 10.0) < 0.01
    with pytest.raises(ValueError):
        augment.resample_artefacts(x, 16000)


def test_features_are_the_runtime_chunk_features():
    s = streams.make_stream(3, "eval")
    feats = dataset.stream_features(s.audio)
    assert feats.shape == (s.n_chunks, 128, 40)
    mel = StreamingLogMel()
    for k in (0, 1, s.n_chunks - 1):
        if k == s.n_chunks - 1:
            mel.reset()
            for j in range(k):
                mel(s.audio[j * CHUNK:(j + 1) * CHUNK])
        np.testing.assert_array_equal(feats[k], mel(s.audio[k * CHUNK:(k + 1) * CHUNK]))


def test_voices_and_distractors_of_eval_are_held_out():
    assert not set(speech.TRAIN_LANGUAGES) & set(speech.EVAL_LANGUAGES)
    assert not set(speech.TRAIN_VARIANTS) & set(speech.EVAL_VARIANTS)
    assert not set(speech.TRAIN_FLITE_VOICES) & set(speech.EVAL_FLITE_VOICES)
    for c in tasks.COMMANDS:
        assert len(c.phrases) >= 4 and len(set(c.phrases)) == len(c.phrases)
    assert not set(tasks.distractors("train")) & set(tasks.EVAL_DISTRACTORS)
    spoken = {p for c in tasks.COMMANDS for p in c.phrases}
    assert not (set(tasks.distractors("train")) | set(tasks.EVAL_DISTRACTORS)) & spoken
    assert len(tasks.COMMANDS) >= 6 and set(tasks.EVENT_REPLIES) == set(SOUND_EVENTS)


def test_training_hears_thousands_of_distractor_sentences_and_eval_only_its_own():
    assert len(set(tasks.GENERATED_DISTRACTORS)) == len(tasks.GENERATED_DISTRACTORS) > 5000
    rng = np.random.default_rng(0)
    train = [tasks.pick_distractor(rng, "train") for _ in range(2000)]
    generated_set = set(tasks.GENERATED_DISTRACTORS)
    generated = sum(t in generated_set for t in train) / len(train)
    assert abs(generated - tasks.P_GENERATED) < 0.05
    assert len(set(train)) > 1000  # seldom the same sentence twice
    assert set(train) - generated_set <= set(tasks.TRAIN_DISTRACTORS)
    assert {tasks.pick_distractor(rng, "eval") for _ in range(200)} == set(tasks.EVAL_DISTRACTORS)
    with pytest.raises(ValueError):
        tasks.pick_distractor(rng, "test")


def test_tempo_change_shortens_and_raises_the_pitch():
    tone = np.sin(2 * np.pi * 200.0 * np.arange(16000) / 16000).astype(np.float32)
    faster = augment.change_tempo(tone, 1.25)
    assert faster.dtype == np.float32 and abs(len(faster) - 12800) <= 2
    peak_hz = np.argmax(np.abs(np.fft.rfft(faster))) * 16000 / len(faster)
    assert abs(peak_hz - 250.0) < 3.0
    with pytest.raises(ValueError):
        augment.change_tempo(tone, 3.0)


def test_training_speech_comes_at_several_tempi_and_eval_speech_never_changes_tempo():
    command = streams.render_item(np.random.default_rng(0), "command", "stop", "train")
    event = streams.render_item(np.random.default_rng(0), "event", "doorbell", "train")
    lengths = {len(streams.vary_tempo(np.random.default_rng(seed), command, streams.TRAIN_SETTINGS).audio)
               for seed in range(40)}
    assert len(command.audio) in lengths and len(lengths) > 10
    assert max(lengths) > 1.1 * len(command.audio) and min(lengths) < 0.9 * len(command.audio)
    assert streams.vary_tempo(np.random.default_rng(1), event, streams.TRAIN_SETTINGS) is event
    rng = np.random.default_rng(5)
    assert streams.vary_tempo(rng, command, streams.EVAL_SETTINGS) is command
    assert rng.random() == np.random.default_rng(5).random()  # nothing drawn: eval streams unchanged


def test_both_synthesizers_speak_every_split():
    for split, flite_voices in (("train", speech.TRAIN_FLITE_VOICES), ("eval", speech.EVAL_FLITE_VOICES)):
        rng = np.random.default_rng(3)
        voices = [speech.random_voice(rng, split) for _ in range(200)]
        flite = [v for v in voices if v.synth == "flite"]
        assert 0.15 < len(flite) / len(voices) < 0.45
        assert {v.language for v in flite} <= set(flite_voices)
    slow = speech.render("turn off the lights", speech.Voice("slt", "", 125, 50, synth="flite"))
    fast = speech.render("turn off the lights", speech.Voice("slt", "", 200, 50, synth="flite"))
    assert slow.dtype == np.float32 and np.isclose(np.abs(slow).max(), 1.0)
    assert len(slow) > 1.3 * len(fast)  # the speed setting reaches flite
