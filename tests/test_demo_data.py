"""The demo model's synthetic data: reproducible, correctly labelled, sane levels; cached
features normalised as the runtime normalises them, also after a context reset; phoneme
targets; feature augmentation."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # demo/ is a top-level folder, not installed

from demo import augment, backgrounds, dataset, phonemes, speech, streams, tasks  # noqa: E402
from demo.sounds import SOUND_EVENTS  # noqa: E402
from listenloop.features import StreamingLogMel  # noqa: E402
from listenloop.protocol import LOG_FLOOR  # noqa: E402

# Only rendering speech needs the synthesizers; features, phoneme units and augmentation do not.
needs_synth = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("flite") is None,
    reason="espeak-ng or flite is not installed (apt-get install espeak-ng flite); "
    "they are needed only to generate the demo model's training data"
)
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")

CHUNK = streams.CHUNK_SAMPLES


@pytest.fixture(autouse=True)
def private_speech_cache(tmp_path, monkeypatch):
    """Each test renders into its own cache, so cached and fresh renders are both exercised."""
    monkeypatch.setattr(speech, "CACHE_DIR", tmp_path / "speech")


def _same_stream(a: streams.Stream, b: streams.Stream) -> bool:
    return np.array_equal(a.audio, b.audio) and a.segments == b.segments


@needs_synth
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


@needs_synth
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


@needs_synth
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


@needs_synth
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
            k, due = g.reply_chunk, g.cue_end or g.end
            assert k * CHUNK < due <= (k + 1) * CHUNK and due <= g.end
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
        x, cue = SOUND_EVENTS[name](np.random.default_rng(seed))
        assert 0.3 * 16000 <= cue <= len(x)
        assert x.dtype == np.float32 and np.isfinite(x).all()
        assert abs(float(np.abs(x).max()) - 1.0) < 1e-5
        assert 0.3 * 16000 <= len(x) <= 8.0 * 16000
        assert np.sqrt(np.mean(x**2)) > 0.02  # audible, not a lone click (glass is peaky)
        assert np.abs(x[-1600:]).max() > 1e-3, "the array must end where the sound ends"
    a, b = (SOUND_EVENTS[name](np.random.default_rng(s)).audio for s in (0, 1))
    assert len(a) != len(b) or not np.array_equal(a, b), "parameters must be randomised"


def test_a_repeating_smoke_alarm_is_answered_once_after_its_first_round():
    alarms = [SOUND_EVENTS["smoke_alarm"](np.random.default_rng(seed)) for seed in range(12)]
    single = [a for a in alarms if a.cue == len(a.audio)]
    double = [a for a in alarms if a.cue < len(a.audio)]
    assert single and double, "both one-round and two-round alarms are drawn"
    for audio, cue in double:
        assert np.array_equal(audio[:cue], audio[len(audio) - cue:]), "the second round repeats the first"
        assert not audio[cue:cue + 16000].any(), "a silent pause follows the first round"
    item = streams.Item("event", "smoke_alarm", None, double[0].audio, double[0].cue)
    segment = item.segment(start=CHUNK * 5)
    assert segment.reply_chunk == streams.reply_chunk(CHUNK * 5 + double[0].cue) < segment.end // CHUNK
    stream = streams.Stream(0, "train", np.zeros(segment.end + 8 * CHUNK - segment.end % CHUNK, np.float32), [segment])
    assert np.flatnonzero(stream.labels() != streams.SILENT).tolist() == [segment.reply_chunk]


@needs_synth
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


@needs_synth
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
    # the cache keeps log10 mel before the peak floor; normalising it from the start gives the same
    log10 = dataset.stream_log10(s.audio)
    np.testing.assert_array_equal(dataset.normalised(log10, log10.max(axis=(1, 2))), feats)


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


@needs_synth
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


@needs_synth
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


def _noise_chunks(levels, seed: int) -> np.ndarray:
    """White noise, one chunk per RMS level."""
    rng = np.random.default_rng(seed)
    return np.concatenate([level * rng.standard_normal(CHUNK) for level in levels]).astype(np.float32)


def _feature_set(log10s) -> dataset.FeatureSet:
    """Silent, background-only streams with these log10 mels. float32, unlike the float16 cache,
    so that comparisons with the runtime's features are exact."""
    log10 = np.concatenate(log10s)
    total = len(log10)
    return dataset.FeatureSet(log10=log10, peaks=log10.max(axis=(1, 2)),
                              offsets=np.concatenate([[0], np.cumsum([len(x) for x in log10s])]).astype(np.int64),
                              labels=np.full(total, streams.SILENT, np.int16),
                              content=np.full(total, tasks.CONTENT_INDEX["background"], np.int16),
                              items=np.zeros((0, 5), np.int64), texts=[], seeds=np.arange(len(log10s)))


def test_a_window_is_normalised_as_the_runtime_after_a_context_reset():
    """A reset at chunk `restart` restarts the running peak there (docs/PROTOCOL.md, "Log-mel");
    the re-prefilled chunks before it keep the features they were heard with."""
    audio = _noise_chunks([0.9, 1e-4, 2e-4, 1e-4, 3e-4, 1e-2, 1e-4], seed=0)
    other = _noise_chunks([0.1, 0.3], seed=1)  # stream 0, so that stream 1's rows start at an offset
    fs = _feature_set([dataset.stream_log10(other), dataset.stream_log10(audio)])
    restart = 3
    mel = StreamingLogMel()
    runtime = []
    for k, chunk in enumerate(audio.reshape(-1, CHUNK)):
        if k == restart:
            mel._peak = -np.inf  # only the peak restarts: the left edge's history is still the audio before
        runtime.append(mel(chunk))
    runtime = np.stack(runtime)
    for first, end in ((0, 7), (1, 5), (2, 4), (3, 6), (4, 7)):
        np.testing.assert_array_equal(fs.window(1, first, end, restart), runtime[first:end], err_msg=f"{first}:{end}")
    from_start = dataset.stream_features(audio)  # the runtime without a reset
    np.testing.assert_array_equal(fs.stream(1)[0], from_start)
    np.testing.assert_array_equal(fs.window(1, 2, 6), from_start[2:6])
    np.testing.assert_array_equal(fs.stream(0)[0], dataset.stream_features(other))
    # the restart matters here: the loud first chunk floors the quiet ones until the peak restarts
    assert not np.array_equal(runtime[restart:], from_start[restart:])
    np.testing.assert_array_equal(runtime[:restart], from_start[:restart])


def test_a_gain_plays_a_window_louder():
    audio = _noise_chunks([0.05, 1e-3, 0.2, 1e-3, 5e-3], seed=2)
    log10 = dataset.stream_log10(audio)
    assert log10.min() > np.log10(LOG_FLOOR)  # no mel power at LOG_FLOOR, which a gain would not move
    fs = _feature_set([log10])
    gain = 0.4  # log10 power: 4 dB
    louder = fs.window(0, 1, 5, restart=2, gain_log10=gain)
    np.testing.assert_allclose(louder, fs.window(0, 1, 5, restart=2) + gain / 4, atol=1e-6)
    # what the runtime computes when the same audio comes 4 dB louder
    heard = _feature_set([dataset.stream_log10(audio * np.float32(10 ** (gain / 2)))])
    np.testing.assert_allclose(louder, heard.window(0, 1, 5, restart=2), atol=1e-5)


def test_feature_sets_are_the_documented_kinds():
    assert dataset.SETS == ("train", "eval", "pairs", "real", "own", "real-eval")
    with pytest.raises(ValueError, match="set must be one of"):
        dataset.build("test", 0, 1)


def test_spec_augment_masks_bands_and_frames_with_the_chunk_mean():
    mel = np.random.default_rng(0).standard_normal((4, 128, 40)).astype(np.float32)
    before = mel.copy()
    out = augment.spec_augment(np.random.default_rng(1), mel)
    np.testing.assert_array_equal(mel, before)  # the input may be a view of cached features
    assert out.shape == mel.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, augment.spec_augment(np.random.default_rng(1), mel))
    assert not np.array_equal(out, augment.spec_augment(np.random.default_rng(2), mel))
    assert np.all((out == mel) | (out == mel.mean(axis=(1, 2), keepdims=True)))
    assert (out != mel).any(axis=(1, 2)).sum() >= 3  # most chunks get a mask (a width may be 0)


def test_phoneme_units_drop_stress_and_word_marks():
    assert phonemes.units("t'3:n '0f D@ l'aIts") == [phonemes.UNIT[c] for c in "t3:n0fD@laIts"]
    assert phonemes.units("a,b%c=d_e|f") == phonemes.units("abcdef")
    assert phonemes.BLANK not in phonemes.UNIT.values() and max(phonemes.UNIT.values()) == phonemes.N_UNITS - 1


@needs_espeak
def test_transcriptions_tell_lights_on_from_off():
    on, off = phonemes.transcribe("turn on the lights"), phonemes.transcribe("turn off the lights")
    assert phonemes.units(on) and phonemes.units(on) != phonemes.units(off)
    assert phonemes.transcribe("turn off the lights") == off  # one transcription per text


def test_phoneme_targets_are_transcribed_once_and_cached(tmp_path, monkeypatch):
    spoken = {"turn on": "t'3:n '0n", "turn off": "t'3:n '0f", "hello": "h@l'oU"}
    calls = []

    def transcribe(text):
        calls.append(text)
        return spoken[text]

    monkeypatch.setattr(phonemes, "transcribe", transcribe)
    cache = tmp_path / "phonemes.json"
    first = phonemes.targets_for(["turn on", "turn off", "turn on"], cache)
    assert sorted(calls) == ["turn off", "turn on"]  # each text once
    assert first == [phonemes.units("t3:n0n"), phonemes.units("t3:n0f"), phonemes.units("t3:n0n")]
    assert json.loads(cache.read_text()) == {"turn on": spoken["turn on"], "turn off": spoken["turn off"]}

    def no_espeak(text):
        raise AssertionError(f"{text!r} is cached: espeak-ng must not run again")

    monkeypatch.setattr(phonemes, "transcribe", no_espeak)
    assert phonemes.targets_for(["turn off", "turn on"], cache) == [first[1], first[0]]
    monkeypatch.setattr(phonemes, "transcribe", transcribe)
    calls.clear()
    assert phonemes.targets_for(["hello", "turn on"], cache)[0] == phonemes.units("h@loU")
    assert calls == ["hello"]  # only the new text; the cache keeps the old ones
    assert set(json.loads(cache.read_text())) == {"turn on", "turn off", "hello"}


@needs_synth
def test_a_pair_stream_speaks_two_confusable_commands_and_a_distractor():
    first = streams.make_pair_stream(0)
    assert _same_stream(first, streams.make_pair_stream(0))
    assert not _same_stream(first, streams.make_pair_stream(1))
    for seed in range(3):
        s = first if seed == 0 else streams.make_pair_stream(seed)
        assert s.audio.dtype == np.float32 and len(s.audio) % CHUNK == 0 and np.abs(s.audio).max() <= 1.0
        commands = [g for g in s.segments if g.kind == "command"]
        distractors = [g for g in s.segments if g.kind == "distractor"]
        events = [g for g in s.segments if g.kind == "event"]
        assert len(commands) == 2 and len(distractors) == 1 and len(events) <= 1
        assert len(s.segments) == len(commands) + len(distractors) + len(events)
        names = tuple(g.name for g in commands)
        assert names in streams.CONFUSABLE_COMMANDS or names[::-1] in streams.CONFUSABLE_COMMANDS
        phrases = [next(c for c in tasks.COMMANDS if c.name == g.name).phrases for g in commands]
        assert any(all(g.text == p[slot % len(p)] for g, p in zip(commands, phrases)) for slot in range(7))
        assert distractors[0].text in tasks.CONFUSABLE_DISTRACTORS and distractors[0].reply is None
        labels = s.labels()  # exactly the replies of the commands (and of a sound event)
        expected = {g.reply_chunk: tasks.REPLY_INDEX[g.reply] for g in commands + events}
        assert {int(k): int(labels[k]) for k in np.flatnonzero(labels != streams.SILENT)} == expected
    # the cached form: one item per segment, ending with the chunk its reply goes to
    log10, peaks, labels, content, items = dataset._render((0, "pairs"))
    assert log10.dtype == np.float16 and len(log10) == first.n_chunks
    np.testing.assert_array_equal(peaks, dataset.stream_log10(first.audio).max(axis=(1, 2)))
    np.testing.assert_array_equal(labels, first.labels())
    assert [(cls, text) for _, _, cls, text in items] == [(tasks.CONTENT_INDEX[g.name], g.text) for g in first.segments]
    for (a, b, cls, _), g in zip(items, first.segments):
        assert b - 1 == streams.reply_chunk(g.end) and cls in content[a:b]


def test_frequency_warp_moves_formants_as_a_longer_or_shorter_vocal_tract():
    mel = np.zeros((2, 128, 40), np.float32)
    mel[:, 60] = 1.0
    assert np.array_equal(augment.warp_frequencies(mel, 1.0), mel)
    assert int(np.argmax(augment.warp_frequencies(mel, 1.1)[0, :, 0])) > 60  # higher formants
    assert int(np.argmax(augment.warp_frequencies(mel, 0.9)[0, :, 0])) < 60
    assert augment.warp_frequencies(mel, 1.1).shape == mel.shape
