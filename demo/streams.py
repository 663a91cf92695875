"""Labelled synthetic streams: tens of seconds of background with a few foreground items
(sound events, commands, distractor speech) separated by quiet stretches.

Labelling rule (the model was trained with each reply at the last chunk boundary reached by the
end of the user's turn audio; we make it exact): an item whose cue ends at sample `e` (exclusive,
dry signal, before any reverb tail) gets its reply on chunk k = (e - 1) // 6400, the chunk whose
end boundary (k + 1)·6400 is the first boundary at or after `e`. The cue is the whole item, except
for an alarm that repeats (sounds.py): that is answered after its first round. The model therefore
answers right after the chunk in which the item, or its first round, ends: within one chunk
(0.4 s). Every other chunk is labelled silent.

Train and eval streams differ in seed salt, voices, distractor sentences, level ranges and
tempo changes (training only); the command phrasings are shared (see tasks.py), so evaluation
measures generalisation to unheard voices, levels and noise, and to unheard speech that must
get no reply.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from listenloop.protocol import CHUNK_SAMPLES, SAMPLE_RATE

from . import augment, backgrounds, speech, tasks
from .dsp import db_to_amplitude, seconds, set_rms
from .sounds import SOUND_EVENTS

SILENT = -1  # label of a chunk that gets no reply
_SPLIT_SALT = {"train": 0x5EED, "eval": 0xE7A1}
_PAIRS_SALT = 0x9A15

# Commands that differ by a word or two, or that short utterances blur: a pair stream speaks two
# of them in one voice (lights on / off in the same phrasing slot, whose phrasings are parallel).
CONFUSABLE_COMMANDS = (("lights_on", "lights_off"), ("greeting", "help"), ("volume_up", "lights_on"),
                       ("volume_up", "lights_off"), ("stop", "help"), ("capabilities", "timer"), ("greeting", "stop"))


@dataclass(frozen=True)
class StreamSettings:
    min_chunks: int  # stream length bounds, in 0.4 s chunks
    max_chunks: int
    lead_quiet_s: tuple[float, float]  # background only before the first item
    gap_s: tuple[float, float]  # background only between items
    min_tail_s: float  # background only after the last item
    foreground_db: tuple[float, float]  # foreground RMS in dBFS
    snr_db: tuple[float, float]  # foreground RMS over background RMS
    p_empty: float  # share of streams with background only
    item_weights: tuple[float, float, float]  # sound event, command, distractor speech
    p_reverb: float
    p_resample: float
    p_clip: float
    p_tempo: float = 0.0  # share of spoken items resampled to a new speed (pitch and formants move too)
    tempo: tuple[float, float] = (1.0, 1.0)  # speed factor range


TRAIN_SETTINGS = StreamSettings(
    min_chunks=50, max_chunks=90, lead_quiet_s=(1.6, 4.0), gap_s=(2.0, 6.0), min_tail_s=2.0,
    foreground_db=(-32.0, -14.0), snr_db=(5.0, 35.0), p_empty=0.1, item_weights=(0.4, 0.35, 0.25),
    p_reverb=0.3, p_resample=0.15, p_clip=0.05, p_tempo=0.5, tempo=(0.85, 1.15),
)
EVAL_SETTINGS = StreamSettings(
    min_chunks=50, max_chunks=90, lead_quiet_s=(2.0, 4.0), gap_s=(2.5, 6.0), min_tail_s=2.0,
    foreground_db=(-28.0, -16.0), snr_db=(8.0, 30.0), p_empty=0.1, item_weights=(0.4, 0.35, 0.25),
    p_reverb=0.25, p_resample=0.1, p_clip=0.03,
)
SETTINGS = {"train": TRAIN_SETTINGS, "eval": EVAL_SETTINGS}


@dataclass(frozen=True)
class Segment:
    kind: str  # "event", "command" or "distractor"
    name: str  # event type, command name, or "distractor"
    text: str | None  # what was spoken, None for sound events
    start: int  # first sample
    end: int  # one past the last sample of the dry sound
    reply: tasks.Reply | None  # None: must stay silent
    cue_end: int | None = None  # one past the sample the reply waits for; None: `end` (module doc)

    @property
    def reply_chunk(self) -> int | None:
        return reply_chunk(self.cue_end or self.end) if self.reply is not None else None


@dataclass
class Stream:
    seed: int
    split: str
    audio: np.ndarray  # float32, a whole number of chunks
    segments: list[Segment] = field(default_factory=list)

    @property
    def n_chunks(self) -> int:
        return len(self.audio) // CHUNK_SAMPLES

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SAMPLE_RATE

    def labels(self) -> np.ndarray:
        """Per chunk: index into tasks.REPLIES, or SILENT."""
        labels = np.full(self.n_chunks, SILENT, np.int16)
        for seg in self.segments:
            if seg.reply is not None:
                labels[seg.reply_chunk] = tasks.REPLY_INDEX[seg.reply]
        return labels

    def content(self) -> np.ndarray:
        """Per chunk: tasks.CONTENT_INDEX of the item covering most of it (dry signal), or
        "background" where no item covers a quarter of the chunk."""
        best = np.full(self.n_chunks, CHUNK_SAMPLES // 4, np.int64)  # overlap a class must beat
        content = np.full(self.n_chunks, tasks.CONTENT_INDEX["background"], np.int16)
        for seg in self.segments:
            for k in range(seg.start // CHUNK_SAMPLES, min(self.n_chunks, (seg.end - 1) // CHUNK_SAMPLES + 1)):
                overlap = min(seg.end, (k + 1) * CHUNK_SAMPLES) - max(seg.start, k * CHUNK_SAMPLES)
                if overlap > best[k]:
                    best[k], content[k] = overlap, tasks.CONTENT_INDEX[seg.name]
        return content


def reply_chunk(end_sample: int) -> int:
    """The chunk whose end boundary is the first one at or after `end_sample` (see module doc)."""
    if end_sample <= 0:
        raise ValueError(f"an item must end after the stream starts, got end sample {end_sample}")
    return (end_sample - 1) // CHUNK_SAMPLES


@dataclass(frozen=True)
class Item:
    """One rendered foreground item, not yet placed."""
    kind: str  # "event", "command" or "distractor"
    name: str  # event type, command name, or "distractor"
    text: str | None
    audio: np.ndarray  # dry, peak 1
    cue: int | None = None  # samples until the reply is due (sounds.Sound); None: the whole item

    @property
    def reply(self) -> tasks.Reply | None:
        return item_reply(self.kind, self.name)

    def segment(self, start: int) -> Segment:
        """This item placed at sample `start` of a stream."""
        cue_end = start + self.cue if self.cue is not None else None
        return Segment(self.kind, self.name, self.text, start, start + len(self.audio), self.reply, cue_end)


def render_item(rng: np.random.Generator, kind: str, name: str, split: str, text: str | None = None,
                voice: speech.Voice | None = None) -> Item:
    """Render one foreground item. `name` is the event type, the command name, or
    "distractor"; `text` picks the phrase (else a random one of the split), `voice` the
    speaker (else a random one of the split)."""
    if kind == "event":
        return Item(kind, name, None, *SOUND_EVENTS[name](rng))
    if kind == "command":
        command = next((c for c in tasks.COMMANDS if c.name == name), None)
        if command is None:
            raise ValueError(f"unknown command {name!r}")
        text = text if text is not None else str(rng.choice(command.phrases))
    elif kind == "distractor":
        text = text if text is not None else tasks.pick_distractor(rng, split)
    else:
        raise ValueError(f"unknown item kind {kind!r}")
    return Item(kind, name, text, speech.render(text, voice if voice is not None else speech.random_voice(rng, split)))


def vary_tempo(rng: np.random.Generator, item: Item, settings: StreamSettings) -> Item:
    """Sometimes play a spoken item faster or slower (settings.p_tempo). Draws nothing from
    `rng` when p_tempo is 0, so evaluation streams are what they were before tempo existed."""
    if item.kind == "event" or not settings.p_tempo or rng.random() >= settings.p_tempo:
        return item
    return replace(item, audio=augment.change_tempo(item.audio, rng.uniform(*settings.tempo)))


def item_reply(kind: str, name: str) -> tasks.Reply | None:
    if kind == "event":
        return tasks.EVENT_REPLIES[name]
    if kind == "command":
        return next(c for c in tasks.COMMANDS if c.name == name).reply
    return None


BACKGROUND_NAMES = tuple(backgrounds.NOISE_BACKGROUNDS) + ("babble",)


def make_background(rng: np.random.Generator, n: int, split: str, main: str | None = None) -> np.ndarray:
    """A background bed at RMS 1: one main texture (random unless `main` names one of
    BACKGROUND_NAMES), sometimes with a quieter second layer."""
    if main is None:
        main = str(rng.choice(BACKGROUND_NAMES))
    elif main not in BACKGROUND_NAMES:
        raise ValueError(f"unknown background {main!r}; choose from {BACKGROUND_NAMES}")
    if main == "babble":
        bed = backgrounds.babble(rng, n, tasks.distractors(split), split)
    else:
        bed = backgrounds.NOISE_BACKGROUNDS[main](rng, n)
    if rng.random() < 0.3:
        layer = str(rng.choice(["hum", "pink", "white"]))
        bed = bed + db_to_amplitude(rng.uniform(-20.0, -6.0)) * backgrounds.NOISE_BACKGROUNDS[layer](rng, n)
    return set_rms(bed, 1.0)


def mix_stream(
    rng: np.random.Generator,
    n_chunks: int,
    placed: list[tuple[Item, int]],
    split: str,
    settings: StreamSettings,
    seed: int = -1,
    background: str | None = None,
    bed: np.ndarray | None = None,
    bed_snr_db: float | None = None,
) -> Stream:
    """Background plus rendered items at given start samples, with level and channel augmentation.
    `bed` (RMS 1, n_chunks of samples) replaces the synthetic background, `bed_snr_db` its
    level below the foreground."""
    n = n_chunks * CHUNK_SAMPLES
    foreground_db = rng.uniform(*settings.foreground_db)
    background_db = foreground_db - (bed_snr_db if bed_snr_db is not None else rng.uniform(*settings.snr_db))
    audio = (bed.astype(np.float32) if bed is not None else make_background(rng, n, split, background)) \
        * db_to_amplitude(background_db)
    segments: list[Segment] = []
    for item, start in placed:
        end = start + len(item.audio)
        if start < 0 or end > n:
            raise ValueError(f"{item.kind} {item.name!r} at sample {start} does not fit in {n} samples")
        wet = item.audio
        if rng.random() < settings.p_reverb:
            wet = augment.reverb(rng, wet, rt60_s=rng.uniform(0.2, 0.8), wet=rng.uniform(0.2, 0.6))
        wet = set_rms(wet, db_to_amplitude(foreground_db + rng.uniform(-4.0, 4.0)))
        piece = wet[: n - start]  # a reverb tail may be cut at the stream's end
        audio[start : start + len(piece)] += piece
        segments.append(item.segment(start))
    if rng.random() < settings.p_resample:
        audio = augment.resample_artefacts(audio, int(rng.choice([8000, 11025])))
    if rng.random() < settings.p_clip:
        peak = float(np.abs(audio).max(initial=1e-9))
        audio = augment.clip(audio, 20 * np.log10(rng.uniform(1.5, 3.0) / peak))
    audio = np.clip(audio, -1.0, 1.0).astype(np.float32)  # a real input never exceeds full scale
    return Stream(seed=seed, split=split, audio=audio, segments=segments)


def _random_item(rng: np.random.Generator, settings: StreamSettings) -> tuple[str, str]:
    weights = np.asarray(settings.item_weights) / sum(settings.item_weights)
    kind = str(rng.choice(["event", "command", "distractor"], p=weights))
    if kind == "event":
        return kind, str(rng.choice(list(SOUND_EVENTS)))
    if kind == "command":
        return kind, str(rng.choice([c.name for c in tasks.COMMANDS]))
    return kind, "distractor"


def make_stream(seed: int, split: str = "train") -> Stream:
    """One reproducible labelled stream for `seed` in `split` ("train" or "eval")."""
    settings = SETTINGS.get(split)
    if settings is None:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = np.random.default_rng([seed, _SPLIT_SALT[split]])
    n_chunks = int(rng.integers(settings.min_chunks, settings.max_chunks + 1))
    n = n_chunks * CHUNK_SAMPLES
    placed = place_items(rng, n, settings, split) if rng.random() >= settings.p_empty else []
    return mix_stream(rng, n_chunks, placed, split, settings, seed=seed)


def place_items(rng: np.random.Generator, n: int, settings: StreamSettings, split: str) -> list[tuple[Item, int]]:
    """Random items of `split` and their start samples in a stream of n samples: a quiet lead,
    then items separated by gaps until the next one would eat the quiet tail."""
    placed: list[tuple[Item, int]] = []
    start = seconds(rng.uniform(*settings.lead_quiet_s))
    while True:
        item = vary_tempo(rng, render_item(rng, *_random_item(rng, settings), split), settings)
        if start + len(item.audio) + seconds(settings.min_tail_s) > n:
            return placed  # the next item would eat the quiet tail: the stream is full
        placed.append((item, start))
        start += len(item.audio) + seconds(rng.uniform(*settings.gap_s))


def make_pair_stream(seed: int) -> Stream:
    """A training stream with confusable items in ONE voice at one tempo: two commands of a
    CONFUSABLE_COMMANDS pair (the same phrasing slot), a distractor that shares their words
    (tasks.CONFUSABLE_DISTRACTORS) and sometimes a sound event, in random order. Only the words
    that differ tell the items apart, and the encoder's pretraining takes all items of such a
    stream into one batch, so its loss contrasts them directly."""
    settings = TRAIN_SETTINGS
    rng = np.random.default_rng([seed, _PAIRS_SALT])
    voice = speech.random_voice(rng, "train")
    tempo = float(rng.uniform(*settings.tempo)) if rng.random() < settings.p_tempo else 1.0
    pair = list(CONFUSABLE_COMMANDS[int(rng.integers(len(CONFUSABLE_COMMANDS)))])
    slot = int(rng.integers(7))
    items = []
    for name in pair:
        phrases = next(c for c in tasks.COMMANDS if c.name == name).phrases
        items.append(render_item(rng, "command", name, "train", phrases[slot % len(phrases)], voice))
    confusable = str(rng.choice(tasks.CONFUSABLE_DISTRACTORS))
    items.append(render_item(rng, "distractor", "distractor", "train", confusable, voice))
    if rng.random() < 0.3:
        items.append(render_item(rng, "event", str(rng.choice(list(SOUND_EVENTS))), "train"))
    if tempo != 1.0:
        items = [replace(it, audio=augment.change_tempo(it.audio, tempo)) if it.kind != "event" else it for it in items]
    order = rng.permutation(len(items))
    placed, start = [], seconds(rng.uniform(*settings.lead_quiet_s))
    for k in order:
        placed.append((items[k], start))
        start += len(items[k].audio) + seconds(rng.uniform(*settings.gap_s))
    n_chunks = -(-(placed[-1][1] + len(placed[-1][0].audio) + seconds(settings.min_tail_s)) // CHUNK_SAMPLES)
    return mix_stream(rng, int(n_chunks), placed, "train", settings, seed=seed)
