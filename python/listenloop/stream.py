"""DecoderStream: one stream's decoder state over a shared Model (docs/PROTOCOL.md,
"Listening step", "Reply", "Context policy").

A stream owns its KV cache, its position, the token to feed back, its recent audio for
context resets, and its decision policy (speak bias, sampler, reply cap), fixed at creation.

Each layer has one key and one value buffer of the stream's capacity C, which the graph writes
in place (docs/DESIGN.md, "Decoder graph contract"): nothing is copied or reallocated per step.
With the `grouped` graph a buffer is position-major `[1, C, KVH, D]` and each call binds
`past_*` to its first P rows and `new_*` to rows P..P+T. With the `gqa` graph it is head-major
`[1, KVH, C, D]`, bound whole as both past and present; the listening step and the reply step
each keep their own binding, so a step only writes positions and `seqlens_k` into staging
that never moves (fixed shapes and addresses: what CUDA graphs capture).

Every decoder call feeds exactly one chunk (or one reply token), so a stream's numbers never
depend on what other chunks or streams exist: int8 graphs quantize activations per call, and
one chunk per call keeps that a function of the chunk alone.

Not thread-safe: one thread drives a stream at a time (different streams may run in parallel).
"""
from __future__ import annotations

import collections
import functools
import logging
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .context import (HISTORY_CHUNKS, LEVEL_FLOOR_CHUNKS, LEVEL_MARGIN, QUIET_CHUNKS, QUIET_P_SPEAK, ContextPolicy,
                      reply_reserve)
from .errors import ModelOutputError, ProtocolError
from .protocol import BLOCK, STEP, VECTORS_PER_CHUNK
from .sampling import NEAR_END_SHARE, PLAYBACK_BIAS, Sampler, SamplingConfig

log = logging.getLogger("listenloop")

_ONNX_FLOAT, _ONNX_INT32, _ONNX_INT64, _ONNX_FLOAT16 = 1, 6, 7, 10  # onnx.TensorProto element types
# CUDA graph id of each captured step kind (T): the listening step and the reply token.
_CAPTURED_STEPS = {STEP: 1, 1: 2}


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


class _Binder:
    """IOBinding calls with the device objects made once.

    The public IOBinding methods build an OrtDevice on every call, which costs more than the
    bind itself at 4 bindings per layer per step; the C-level binding takes it prebuilt.
    Falls back to the public API if this onnxruntime lays its wrapper out differently.
    """

    def __init__(self, session, run_options=None):
        self.io = session.io_binding()
        self.bound_T = None  # the step length this binding's staging inputs are bound for
        self.staging = None  # a _GraphStaging when this step kind is captured as a CUDA graph
        self._c_io = getattr(self.io, "_iobinding", None)
        self._c_sess = getattr(session, "_sess", None)
        self._devices = {}
        try:
            from onnxruntime.capi.onnxruntime_inference_collection import OrtDevice

            for kind in ("cpu", "cuda"):
                try:
                    self._devices[kind] = OrtDevice.make(kind, 0)._get_c_device()
                except Exception:  # noqa: BLE001 - a build without that device type
                    pass
        except ImportError:
            pass
        self.fast = self._c_io is not None and self._c_sess is not None and "cpu" in self._devices
        # bind_input/bind_output(name, device, element_type, shape, ptr), with `device` from
        # device(kind): the same signature on both paths, so the per-step loop has one form.
        if self.fast:
            self.bind_input, self.bind_output = self._c_io.bind_input, self._c_io.bind_output
            self.run = functools.partial(self._c_sess.run_with_iobinding, self._c_io, run_options)
        else:
            io = self.io
            self.bind_input = lambda name, device, dtype, shape, ptr: io.bind_input(name, device, 0, dtype, shape, ptr)
            self.bind_output = lambda name, device, dtype, shape, ptr: io.bind_output(name, device, 0, dtype, shape, ptr)
            self.run = functools.partial(session.run_with_iobinding, io, run_options)

    def device(self, kind: str):
        """The device argument of bind_input/bind_output for "cpu" or "cuda"."""
        return self._devices[kind] if self.fast else kind


class _GraphStaging:
    """Inputs and logits of one captured step kind in device memory (gqa graphs on CUDA with
    CUDA graphs): a replayed graph reads and writes fixed device addresses, so the host staging
    is copied into these buffers before each run and the logits copied back after it."""

    def __init__(self, stream, T: int, device: str):
        import onnxruntime as ort

        def on_device(array):
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, 0)

        self.embeds_host = stream._embeds[:T][None]
        self.positions_host = stream._positions[:T][None]
        self.embeds = on_device(self.embeds_host)
        self.positions = on_device(self.positions_host)
        self.seqlens = on_device(stream._seqlens)
        self.logits_index = on_device(np.array([T - 1], np.int64))  # fixed per kind: the last row
        self.logits = on_device(stream._logits)
        self._stream = stream

    def bind(self, binder) -> None:
        io = binder.io
        io.bind_ortvalue_input("inputs_embeds", self.embeds)
        io.bind_ortvalue_input("position_ids", self.positions)
        io.bind_ortvalue_input("logits_index", self.logits_index)
        io.bind_ortvalue_input("seqlens_k", self.seqlens)
        io.bind_ortvalue_output("logits", self.logits)

    def before(self) -> None:
        self.embeds.update_inplace(self.embeds_host)
        self.positions.update_inplace(self.positions_host)
        self.seqlens.update_inplace(self._stream._seqlens)

    def after(self) -> None:
        # OrtValue offers no copy into an existing host array: one [1, V] array per step.
        self._stream._logits[...] = self.logits.numpy()


def _allocate_host(nbytes: int) -> tuple[np.ndarray, object]:
    """Page-locked memory from listenloop._core (async-capable CUDA copies), as a uint8 array."""
    from . import _core

    buf = _core.PinnedBuffer(nbytes)
    return np.frombuffer(buf, dtype=np.uint8, count=nbytes), buf


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
        self._io_type = _ONNX_FLOAT16 if self.io_dtype == np.float16 else _ONNX_FLOAT
        self._row_bytes = m.kv_heads * m.head_dim * self.io_dtype.itemsize
        self._kv_device = m.profile.kv_cache_device
        self._shared_cache = m.attention == "gqa"
        if self._kv_device == "cuda":
            import onnxruntime as ort

            self._kv_values = [ort.OrtValue.ortvalue_from_shape_and_type(list(m.kv_shape), self.io_dtype, "cuda", 0)
                               for _ in range(2 * m.layers)]
            kv_ptrs = [v.data_ptr() for v in self._kv_values]
            self.kv_cache = None
        else:
            raw, self._kv_owner = _allocate_host(m.kv_bytes)
            self.kv_cache = raw.view(self.io_dtype).reshape(2 * m.layers, *m.kv_shape)
            kv_ptrs = [self.kv_cache[j].ctypes.data for j in range(2 * m.layers)]
        emb_raw, self._emb_owner = _allocate_host(C * H * self.io_dtype.itemsize)
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
        binder = self._binder = _Binder(m.decoder)
        self._bind_in, self._bind_out = binder.bind_input, binder.bind_output
        self._cpu_dev, self._kv_dev = binder.device("cpu"), binder.device(self._kv_device)
        self._steady_staged = False  # staging holds the [KEEP_SILENCE] + block layout
        self._kv_ptrs = kv_ptrs
        self._layer_bindings = [(f"past_key.{i}", f"new_key.{i}", f"past_value.{i}", f"new_value.{i}",
                                 kv_ptrs[2 * i], kv_ptrs[2 * i + 1]) for i in range(m.layers)]
        # gqa: one binding per step kind (the listening step, a reply token), made on first use,
        # and one for every other length (prompt and re-prefill), rebound when its T changes.
        self._step_binders = {}
        self._graph_capture = m.cuda_graphs
        self._last = (0, 0)  # (P, T) of the last decoder call, for inspection

    # -- public state --------------------------------------------------------------------

    @property
    def position(self) -> int:
        return self._position

    @property
    def speaking(self) -> bool:
        return self._speaking

    @property
    def kv_bytes(self) -> int:
        return self.model.kv_bytes

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

    def _run(self, T: int) -> None:
        """Run the decoder on the staged T tokens, appending them to the cache at P."""
        if self._shared_cache:
            self._run_shared(T)
        else:
            self._run_prefix(T)
        self._last = (self._position, T)
        self._position += T

    def _run_prefix(self, T: int) -> None:
        """grouped graph: past = the first P rows of each buffer, new = rows P..P+T."""
        P = self._position
        bind_in, bind_out, cpu, dtype = self._bind_in, self._bind_out, self._cpu_dev, self._io_type
        if self._binder.bound_T != T:  # staging pointers never change; only shapes do
            bind_in("inputs_embeds", cpu, dtype, [1, T, self.model.hidden], self._embeds.ctypes.data)
            bind_in("logits_index", cpu, _ONNX_INT64, [1], self._logits_index.ctypes.data)
            bind_out("logits", cpu, _ONNX_FLOAT, [1, self.model.vocab], self._logits.ctypes.data)
            self._binder.bound_T = T
        bind_in("position_ids", cpu, _ONNX_INT64, [1, T], self._arange.ctypes.data + 8 * P)  # int64 P..P+T-1
        m = self.model
        past_shape, new_shape = [1, P, m.kv_heads, m.head_dim], [1, T, m.kv_heads, m.head_dim]
        offset, dev = P * self._row_bytes, self._kv_dev
        for pk, nk, pv, nv, kp, vp in self._layer_bindings:  # most of the per-step overhead
            bind_in(pk, dev, dtype, past_shape, kp)
            bind_out(nk, dev, dtype, new_shape, kp + offset)
            bind_in(pv, dev, dtype, past_shape, vp)
            bind_out(nv, dev, dtype, new_shape, vp + offset)
        self._binder.run()

    def _run_shared(self, T: int) -> None:
        """gqa graph: every buffer whole as past and present; the new rows go to P..P+T."""
        P = self._position
        np.add(self._arange[:T], P, out=self._positions[:T])
        self._seqlens[0] = P + T - 1
        binder = self._shared_binder(T)
        staging = binder.staging
        if staging is None:
            binder.run()
        else:
            staging.before()
            binder.run()
            staging.after()

    def _shared_binder(self, T: int) -> "_Binder":
        """The binding of T's step kind. With CUDA graphs the listening step and the reply token
        are captured as graphs 1 and 2 (their shapes and addresses never change); other lengths
        run uncaptured (graph id -1)."""
        kind = T if T in _CAPTURED_STEPS else 0
        binder = self._step_binders.get(kind)
        if binder is None:
            options = None
            if self._graph_capture:
                import onnxruntime as ort

                options = ort.RunOptions()
                options.add_run_config_entry("gpu_graph_id", str(_CAPTURED_STEPS.get(kind, -1)))
            binder = self._step_binders[kind] = _Binder(self.model.decoder, options)
            binder.staging = _GraphStaging(self, T, self._kv_device) if self._graph_capture and kind else None
        if binder.bound_T != T:
            self._bind_shared(binder, T)
            binder.bound_T = T
        return binder

    def _bind_shared(self, binder: "_Binder", T: int) -> None:
        m, cpu, dtype = self.model, binder.device("cpu"), self._io_type
        bind_in, bind_out = binder.bind_input, binder.bind_output
        if binder.staging is not None:  # a captured step kind reads and writes device staging
            binder.staging.bind(binder)
        else:
            bind_in("inputs_embeds", cpu, dtype, [1, T, m.hidden], self._embeds.ctypes.data)
            bind_in("position_ids", cpu, _ONNX_INT64, [1, T], self._positions.ctypes.data)
            bind_in("logits_index", cpu, _ONNX_INT64, [1], self._logits_index.ctypes.data)
            bind_in("seqlens_k", cpu, _ONNX_INT32, [1], self._seqlens.ctypes.data)
            bind_out("logits", cpu, _ONNX_FLOAT, [1, m.vocab], self._logits.ctypes.data)
        bind_in("total_sequence_length", cpu, _ONNX_INT32, [], self._total.ctypes.data)  # a CPU input either way
        shape, dev = list(m.kv_shape), binder.device(self._kv_device)
        for i in range(m.layers):
            for j, kind in enumerate(("key", "value")):
                ptr = self._kv_ptrs[2 * i + j]
                bind_in(f"past_{kind}.{i}", dev, dtype, shape, ptr)
                bind_out(f"present_{kind}.{i}", dev, dtype, shape, ptr)

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

    def _steady_step(self, audio: np.ndarray) -> None:
        """The common step, [KEEP_SILENCE] + block: its 13 token ids never change, so their
        embeddings stay staged between steps and only the audio rows and positions are written."""
        if self._steady_staged:
            self._step_audio[...] = audio
        else:
            self._stage((self._silence_id,), (audio,))
            self._steady_staged = True
        self._run(STEP)

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
            self._steady_step(audio_embeds)  # the steady state: every 0.4 s for the whole stream
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
            self._run(self._stage(lead, blocks))
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
        self._run(1)
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

