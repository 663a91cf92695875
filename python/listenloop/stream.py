"""DecoderStream: one stream's decoder state over a shared Model (docs/PROTOCOL.md,
"Listening step", "Reply", "Context policy").

A stream owns its KV cache, its position, the token to feed back, its recent audio for
context resets, and its decision policy (speak bias, sampler, reply cap), fixed at creation.

The KV cache is the one the profile chooses (kv_cache.py): the stream's own buffers, written
in place by one decoder call per step, or its slot in buffers shared by S streams, whose steps
run together (slot_pool.py). The stream stages its tokens the same way for both and reads its
logits from the same row; `listen_steps` and `speak_steps` are generators that yield while a
shared step is pending, and `listen` and `speak_step` drive them to their end.

Every step carries one chunk (or one reply token) of this stream's, so its numbers never
depend on what other chunks or streams exist: int8 graphs quantize activations per call, and
one chunk per call keeps that a function of the chunk alone; the slot decoder computes every
slot's rows by themselves (docs/DESIGN.md, "Fixed-slot batching").

Not thread-safe: one thread drives a stream at a time (different streams may run in parallel).
"""
from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .context import (HISTORY_CHUNKS, LEVEL_FLOOR_CHUNKS, LEVEL_MARGIN, QUIET_CHUNKS, QUIET_P_SPEAK, ContextPolicy,
                      reply_reserve)
from .errors import ModelOutputError, ProtocolError
from .kv_cache import allocate_host
from .protocol import BLOCK, STEP, VECTORS_PER_CHUNK
from .sampling import NEAR_END_SHARE, PLAYBACK_BIAS, Sampler, SamplingConfig

log = logging.getLogger("listenloop")


class ListenResult:
    """One listening decision. `logits` is a view valid until the stream's next call."""

    __slots__ = ("spoke", "p_speak", "logits", "position", "context_reset", "_ids")

    def __init__(self, spoke: bool, p_speak: float, logits: np.ndarray, position: int,
                 context_reset: str | None, decision_ids: tuple):
        self.spoke = spoke
        self.p_speak = p_speak  # softmax over the two decision logits, speak_bias included
        self.logits = logits  # float32[V] at the ASSISTANT position
        self.position = position  # tokens in the cache after this step
        self.context_reset = context_reset  # why the cache was rebuilt before this step, if it was
        self._ids = decision_ids

    @property
    def decision_logits(self) -> np.ndarray:
        """float32[2]: KEEP_SILENCE, TEXT_BEGIN logits (speak_bias not added)."""
        return self.logits[list(self._ids)].astype(np.float32)

    def __repr__(self) -> str:
        return (f"ListenResult(spoke={self.spoke}, p_speak={self.p_speak:.4f}, position={self.position}, "
                f"context_reset={self.context_reset!r})")


@dataclass
class SpeakStep:
    """One reply token. `logits` is a view valid until the stream's next call."""

    token: int
    logits: np.ndarray


@dataclass(frozen=True)
class Policy:
    """How a stream decides and replies, fixed when the stream is created:

    - speak_bias: added to the TEXT_BEGIN logit (default: the package's); a finite number in
      [-10000, 10000] (+-50 already decides every chunk);
    - sampling: how decisions and reply tokens are drawn (default: the package's sampling,
      greedy unless it says otherwise), a SamplingConfig; `sampler`, an object with decide()
      and sample(), replaces it (tests and benchmarks script choices this way);
    - speak_threshold: if set, speak when p_speak >= it (overrides sampling for decisions);
      in [0, 1.01]: 0 always speaks, anything above 1 never does;
    - max_reply_tokens: the reply cap (default: the package's), an integer in [1, 32768];
    - history_chunks: chunks a context reset re-prefills, an integer in [1, HISTORY_CHUNKS];
    - quiet_resets: reset at quiet moments before the context is full (True); False resets
      only when it must, so a comparison with an unbounded reference stays exact while it fits;
    - playback_bias: added to the TEXT_BEGIN logit, on top of speak_bias, for chunks heard
      while the device's own playback can echo into them (docs/PROTOCOL.md, "Own voice"): a
      finite number in [-10000, 0]; 0 treats them like any other chunk. A quarter of it
      applies where someone seems to talk over the device. Such chunks, but for those, are
      never re-fed by a context reset;
    - reset_after_playback: rebuild the context when the device stops playing (True): at once,
      or at the next quiet moment if someone talked over it, so what it heard of its own
      voice does not shape later decisions.

    `build` checks every option (booleans are not numbers, NaN and infinities never pass) and
    raises one ConfigError line naming the option; an unknown option name is a TypeError.
    """

    speak_bias: float
    sampling: SamplingConfig
    max_reply_tokens: int
    speak_threshold: float | None = None
    history_chunks: int = HISTORY_CHUNKS
    quiet_resets: bool = True
    sampler: object = None
    playback_bias: float = PLAYBACK_BIAS
    reset_after_playback: bool = True

    OPTIONS = ("speak_bias", "sampling", "sampler", "speak_threshold", "max_reply_tokens", "history_chunks",
               "quiet_resets", "playback_bias", "reset_after_playback")

    @classmethod
    def build(cls, defaults: dict, **options) -> "Policy":
        from .errors import Bounds, ConfigError, show
        from .sampling import PLAYBACK_BIAS_BOUNDS, REPLY_TOKENS, SPEAK_BIAS, SPEAK_THRESHOLD

        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            raise TypeError(f"unknown stream option(s): {', '.join(unknown)} (known: {', '.join(cls.OPTIONS)})")
        given = {k: v for k, v in options.items() if v is not None}

        def number(name, bounds, default=None):
            value = given.get(name, default)
            problem = bounds.problem(value)
            if problem:
                raise ConfigError(f"{name} {problem}")
            return int(value) if bounds.integer else float(value)

        sampling = given.get("sampling")
        if sampling is None:
            sampling = SamplingConfig(temperature=defaults["temperature"], top_k=defaults["top_k"],
                                      top_p=defaults["top_p"])
        elif not isinstance(sampling, SamplingConfig):
            raise ConfigError(f"sampling must be a SamplingConfig, got {show(sampling)}")
        sampling.check()  # a SamplingConfig is mutable: check what it holds now
        sampler = given.get("sampler")
        if sampler is not None and not (callable(getattr(sampler, "decide", None))
                                        and callable(getattr(sampler, "sample", None))):
            raise ConfigError(f"sampler must have decide() and sample() methods, got {show(sampler)}")
        quiet_resets = given.get("quiet_resets", True)
        if not isinstance(quiet_resets, (bool, np.bool_)):
            raise ConfigError(f"quiet_resets must be True or False, got {show(quiet_resets)}")
        reset_after_playback = given.get("reset_after_playback", True)
        if not isinstance(reset_after_playback, (bool, np.bool_)):
            raise ConfigError(f"reset_after_playback must be True or False, got {show(reset_after_playback)}")
        threshold = number("speak_threshold", SPEAK_THRESHOLD) if "speak_threshold" in given else None
        return cls(speak_bias=number("speak_bias", SPEAK_BIAS, defaults["speak_bias"]), sampling=sampling,
                   max_reply_tokens=number("max_reply_tokens", REPLY_TOKENS, defaults["max_reply_tokens"]),
                   speak_threshold=threshold,
                   history_chunks=number("history_chunks", Bounds(1, HISTORY_CHUNKS, integer=True), HISTORY_CHUNKS),
                   quiet_resets=bool(quiet_resets), sampler=sampler,
                   playback_bias=number("playback_bias", PLAYBACK_BIAS_BOUNDS, PLAYBACK_BIAS),
                   reset_after_playback=bool(reset_after_playback))

    def new_sampler(self):
        """The stream's own sampler (its random state is per stream)."""
        return self.sampler if self.sampler is not None else Sampler(self.sampling)


class DecoderStream:
    """Per-stream decoder state; `policy` is a Policy or Policy.build's options."""

    def __init__(self, model, policy: Policy | None = None, **options):
        self.model = model
        self.policy = policy if policy is not None else Policy.build(model.sampling_defaults, **options)
        self.sampler = self.policy.new_sampler()

        self.capacity = model.capacity
        self.tokens = model.tokens
        self._silence_id, self._speak_id = self.tokens["KEEP_SILENCE"], self.tokens["TEXT_BEGIN"]
        self._text_end = self.tokens["TEXT_END"]
        self._decision_ids = (self._silence_id, self._speak_id)
        self._prefix = model.prefix_ids
        self.context = ContextPolicy(self.capacity, len(self._prefix),
                                     reply_reserve(self.capacity, self.policy.max_reply_tokens), self.policy.history_chunks)
        self._audio_shape = (VECTORS_PER_CHUNK, model.hidden)
        self._table = model.embeddings
        self._reply_set = model.reply_set
        self._said: list[int] = []  # the reply's tokens so far
        self._constrained = np.empty(model.vocab, np.float64) if model.reply_set is not None else None
        self._allocate()
        self.reset()

    # -- set-up --------------------------------------------------------------------------

    def _allocate(self) -> None:
        """Every buffer a step touches, allocated once."""
        m, C, H = self.model, self.capacity, self.model.hidden
        self.io_dtype = m.io_dtype
        emb_raw, self._emb_owner = allocate_host(C * H * self.io_dtype.itemsize)
        self._embeds = emb_raw.view(self.io_dtype).reshape(C, H)
        self._ids = np.zeros(C, np.int64)
        # position_ids are always P..P+T-1: the grouped graph binds that window of this array
        self._arange = np.arange(C, dtype=np.int64)
        self._positions = np.zeros(C, np.int64)  # the gqa graph's positions, written per step
        self._seqlens = np.zeros(1, np.int32)  # gqa: P + T - 1
        # gqa: the buffer's length. Rows past seqlens_k are never read, so the capacity can stay
        # bound, and the value never changes (a CPU input that CUDA graphs cannot update).
        self._total = np.array(C, np.int32)
        self._logits_index = np.zeros(1, np.int64)
        self._logits = np.zeros((1, m.vocab), np.float32)
        self._row = self._logits[0]
        self._history = np.zeros((self.context.history_chunks, VECTORS_PER_CHUNK, H), self.io_dtype)
        self._step_audio = self._embeds[2:2 + VECTORS_PER_CHUNK]  # the PAD rows of the steady step
        self._steady_staged = False  # staging holds the [KEEP_SILENCE] + block layout
        self._last = (0, 0)  # (P, T) of the last decoder call, for inspection
        # the KV cache the profile chooses (kv_cache.py): the stream's own buffers, or its slot
        # in buffers shared by S streams; nothing below depends on which
        self.cache = m.new_cache(self)

    # -- public state --------------------------------------------------------------------

    @property
    def position(self) -> int:
        return self._position

    @property
    def speaking(self) -> bool:
        return self._speaking

    @property
    def kv_bytes(self) -> int:
        return self.cache.nbytes

    @property
    def kv_cache(self):
        """The KV buffers as a host array (None when they live on a device); for tests."""
        return self.cache.array

    def close(self) -> None:
        """Give the KV cache back (a slot becomes free for another stream); idempotent."""
        self.cache.close()

    def reset(self) -> None:
        """Empty the KV cache; the next listen feeds the prompt prefix first."""
        self._position = 0
        self._previous = None  # token to feed before the next block; None: feed the prefix
        self._speaking = False
        self._reply_left = 0
        self._history_count = 0  # chunks heard since the last reply, up to history_chunks
        self._history_next = 0
        self._quiet_run = 0  # silent, low-p_speak (and not loud) chunks in a row
        self._heard_playback = False  # the context holds chunks heard while the device played
        self._heard_voice_over_playback = False  # ... and someone seemed to talk over it
        self._levels = collections.deque(maxlen=LEVEL_FLOOR_CHUNKS)
        self.reply_truncated = False

    def last_inputs(self) -> dict:
        """What the last decoder call was fed (views into the staging; for tests and debugging)."""
        P, T = self._last
        return {"past_length": P, "token_ids": self._ids[:T], "positions": self._arange[P:P + T],
                "inputs_embeds": self._embeds[:T], "logits_index": self._logits_index[:1]}

    # -- decoder calls -------------------------------------------------------------------

    def _ran(self, T: int) -> None:
        """The staged T tokens went through the cache (`yield from self.cache.run(T)`, which
        yields while a shared step is pending): they now sit at P..P+T."""
        self._last = (self._position, T)
        self._position += T

    def _stage(self, lead, blocks) -> int:
        """Stage `lead` token ids, then one listening block per audio array with KEEP_SILENCE
        between them (docs/PROTOCOL.md, "Listening step"); logits at the last ASSISTANT."""
        t = self.tokens
        n = len(lead)
        self._ids[:n] = lead
        rows = []
        for j, audio in enumerate(blocks):
            if j:
                self._ids[n] = self._silence_id
                n += 1
            self._ids[n] = t["AUDIO_BEGIN"]
            self._ids[n + 1:n + 1 + VECTORS_PER_CHUNK] = t["PAD"]
            self._ids[n + BLOCK - 1] = t["ASSISTANT"]
            rows.append((n + 1, audio))
            n += BLOCK
        self._steady_staged = False
        np.take(self._table, self._ids[:n], axis=0, out=self._embeds[:n])
        for row, audio in rows:
            self._embeds[row:row + VECTORS_PER_CHUNK] = audio
        self._logits_index[0] = n - 1
        return n

    def _stage_steady(self, audio: np.ndarray) -> int:
        """The common step, [KEEP_SILENCE] + block: its 13 token ids never change, so their
        embeddings stay staged between steps and only the audio rows and positions are written."""
        if self._steady_staged:
            self._step_audio[...] = audio
        else:
            self._stage((self._silence_id,), (audio,))
            self._steady_staged = True
        return STEP

    def _history_chunks(self) -> list:
        n, size = self._history_count, self.context.history_chunks
        oldest = (self._history_next - n) % size
        return [self._history[(oldest + j) % size] for j in range(n)]

    def _remember(self, audio: np.ndarray) -> None:
        size, i = self.context.history_chunks, self._history_next
        self._history[i] = audio
        self._history_next = (i + 1) % size
        self._history_count = min(self._history_count + 1, size)

    def pending_reset(self, playing: bool = False) -> str | None:
        """Why the next listen() (of a chunk heard while the device played, if `playing`) will
        rebuild the context first, or None. The front end asks so it can restart the mel's
        running peak at that same chunk."""
        if self._position == 0:
            return None
        if self.context.must_reset(self._position, STEP):
            return f"context full at {self._position} of {self.capacity} tokens"
        if (self._heard_playback and not playing and self.policy.reset_after_playback and not self._speaking
                and self._previous == self._silence_id):
            # Someone talked over the device: keep listening until they are done (a quiet moment)
            if not self._heard_voice_over_playback:
                return f"own voice ended at {self._position} of {self.capacity} tokens"
            if self._quiet_run >= QUIET_CHUNKS:
                return f"own voice ended, quiet moment at {self._position} of {self.capacity} tokens"
        if (self.policy.quiet_resets and self._previous == self._silence_id
                and self.context.quiet_reset(self._position, self._quiet_run)):
            return f"quiet moment at {self._position} of {self.capacity} tokens"
        return None

    def _restart_context(self) -> None:
        """After NaN or infinite outputs: the KV cache may hold them, so the next listen()
        starts a fresh context (prompt and its own chunk) instead of building on it."""
        if self._speaking:
            self.reply_truncated = True
        self._speaking, self._previous, self._position, self._steady_staged = False, None, 0, False
        self._history_count = self._quiet_run = 0
        self._heard_playback = self._heard_voice_over_playback = False
        self.cache.clear()

    def _decision(self, row: np.ndarray, playing: bool, near_end: bool) -> tuple[bool, float]:
        silence = row.item(self._silence_id)  # a Python float, without a NumPy scalar in between
        policy = self.policy
        speak = row.item(self._speak_id) + policy.speak_bias
        if not (math.isfinite(silence) and math.isfinite(speak)):
            self._restart_context()
            raise ModelOutputError(f"the decoder computed non-finite decision logits ({silence}, {speak}) "
                                   f"at position {self._position}; the context restarts")
        if playing:  # stronger evidence while its own voice may echo, less when someone talks over it
            speak += policy.playback_bias * (NEAR_END_SHARE if near_end else 1.0)
        margin = speak - silence
        p_speak = 1.0 / (1.0 + math.exp(-margin)) if margin > -700 else 0.0  # softmax over the two
        if policy.speak_threshold is not None:
            return p_speak >= policy.speak_threshold, p_speak
        return self.sampler.decide(silence, speak), p_speak

    # -- listening -----------------------------------------------------------------------

    def listen(self, audio_embeds: np.ndarray, level: float | None = None, playing: bool = False,
               near_end: bool = False) -> ListenResult:
        """One listening step for one chunk's [10, H] audio vectors: one decoder call.
        `level` (context.chunk_level of the chunk's mel), when given, keeps the context policy
        from taking a loud chunk for a quiet moment. `playing`: the device's playback could echo
        into this chunk (the own-voice policy applies); `near_end`: someone seems to talk over it."""
        return self.cache.drive(self.listen_steps(audio_embeds, level, playing, near_end))

    def listen_steps(self, audio_embeds: np.ndarray, level: float | None = None, playing: bool = False,
                     near_end: bool = False):
        """listen() as a generator that yields while its cache waits for a shared step and
        returns the ListenResult: what a scheduler that batches streams drives."""
        audio_embeds, T, reason = self._stage_listen(audio_embeds, playing, near_end)
        yield from self.cache.run(T)  # the decoder call (with slots: one or more shared steps)
        self._ran(T)
        return self._decide(audio_embeds, level, playing, near_end, reason)

    def _stage_listen(self, audio_embeds, playing: bool, near_end: bool) -> tuple:
        """Everything before a listening step's decoder call: checks, the context policy, the
        staged tokens. -> (the audio vectors, tokens staged, why the context is rebuilt or None)."""
        if type(audio_embeds) is not np.ndarray or audio_embeds.shape != self._audio_shape:
            audio_embeds = np.asarray(audio_embeds)
            if audio_embeds.shape != self._audio_shape:
                raise ValueError(f"audio vectors must be [{VECTORS_PER_CHUNK}, {self.model.hidden}], "
                                 f"got {list(audio_embeds.shape)}")
        if self._speaking:
            raise ProtocolError("listen() during a reply: finish the reply first")
        reason = self.pending_reset(playing)
        if reason is not None:
            self._heard_playback = self._heard_voice_over_playback = False
        self._heard_playback = self._heard_playback or playing
        self._heard_voice_over_playback = self._heard_voice_over_playback or (playing and near_end)
        if reason is None and self._previous == self._silence_id:
            T = self._stage_steady(audio_embeds)  # the steady state: every 0.4 s for the whole stream
        else:
            if reason is not None:
                history = self._history_chunks()
                reason += f": kept the prompt and re-prefilled the last {len(history)} chunks"
                log.debug(reason)  # (the session reports it as a ContextReset event)
                self._position, self._previous = 0, None
                blocks = history + [audio_embeds]
            else:
                blocks = [audio_embeds]
            lead = self._prefix if self._previous is None else (self._previous,)
            T = self._stage(lead, blocks)
        return audio_embeds, T, reason

    def _decide(self, audio_embeds, level, playing: bool, near_end: bool, reason) -> ListenResult:
        """Everything after a listening step's decoder call: the decision and its bookkeeping."""
        spoke, p_speak = self._decision(self._row, playing, near_end)
        loud = False
        if level is not None:
            self._levels.append(level)
            loud = level > min(self._levels) + LEVEL_MARGIN
        if spoke:
            self._speaking, self._previous = True, None
            self._reply_left = self.policy.max_reply_tokens
            self._said.clear()
            self._history_count = self._quiet_run = 0  # answered audio is never re-fed
        else:
            self._previous = self._silence_id
            if near_end or not playing:  # its own voice is never re-fed after a reset; a voice over it is
                self._remember(audio_embeds)
            # the device's own voice is no quiet moment, whatever the policy made of p_speak
            self._quiet_run = self._quiet_run + 1 if p_speak < QUIET_P_SPEAK and not loud and not playing else 0
        return ListenResult(spoke, p_speak, self._row, self._position, reason, self._decision_ids)

    # -- replying ------------------------------------------------------------------------

    def speak_step(self) -> SpeakStep | None:
        """The next reply token after a TEXT_BEGIN decision: one decoder call; None once the
        reply is over (TEXT_END was returned by the previous call, or the cap or the context
        capacity ended it, in which case TEXT_END is fed back and `reply_truncated` is set)."""
        return self.cache.drive(self.speak_steps())

    def speak_steps(self):
        """speak_step() as a generator (see listen_steps)."""
        if not self._speaking:
            raise ProtocolError("speak_step() needs a TEXT_BEGIN decision from listen() first")
        if self._reply_left <= 0 or self._position + 1 + STEP > self.capacity:
            if self._reply_left > 0:
                log.info("reply cut at the context capacity (%d tokens)", self.capacity)
            self.end_reply()
            return None
        token = self._speak_id if self._previous is None else self._previous
        self._ids[0] = token
        self._steady_staged = False
        self._embeds[0] = self._table[token]
        self._logits_index[0] = 0
        yield from self.cache.run(1)
        self._ran(1)
        self._reply_left -= 1
        if not np.isfinite(self._row).all():
            self._restart_context()
            raise ModelOutputError(f"the decoder computed NaN or infinite reply logits at position {self._position}; "
                                   "the reply ends and the context restarts")
        row = self._row
        if self._reply_set is not None:  # only a listed reply may be said (docs/PROTOCOL.md, "Reply set")
            row = self._reply_set.constrain(row, self._said, self._constrained)
        token = self.sampler.sample(row)
        self._said.append(token)
        if token == self._text_end:
            self._speaking, self._previous, self.reply_truncated = False, self._text_end, False
        else:
            self._previous = token
        return SpeakStep(token, self._row)

    def end_reply(self) -> None:
        """Stop the reply now: TEXT_END becomes the fed-back token, as after a normal reply."""
        if self._speaking:
            self._speaking, self._previous, self.reply_truncated = False, self._text_end, True

    def speak(self, max_tokens: int | None = None) -> Iterator[SpeakStep]:
        """Decode the whole reply after a TEXT_BEGIN decision, TEXT_END included. A caller that
        stops iterating ends the reply as end_reply() does."""
        if not self._speaking:
            raise ProtocolError("speak() needs a TEXT_BEGIN decision from listen() first")
        if max_tokens is not None:
            self._reply_left = int(max_tokens)
        try:
            while (step := self.speak_step()) is not None:
                yield step
                if not self._speaking:
                    return
        finally:
            self.end_reply()

    def __repr__(self) -> str:
        return f"DecoderStream({self.model.package.name!r}, position={self._position}/{self.capacity})"

